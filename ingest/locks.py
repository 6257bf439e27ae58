"""PostgreSQL advisory locks: which work one process at a time may do, across every process on the database.

Each kind of work has its own key here and nowhere else; callers (tests included) name the lock, not a number.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy.engine import Connection

MIGRATION = 7_474_201  # one process migrates the schema at a time
COLLECTION = 7_474_202  # the end-of-load work of one collection (PCA fit, projection, index build)
FINETUNE_SPLIT = 7_474_203  # recording one fine-tuning run's train/hold-out split
REWRITE = 7_474_204  # `ingest db upgrade` copying stored pictures into a new layout (ingest/upgrade.py)


def lock_in_transaction(conn: Connection, key: int, *, of: int | str = 0) -> None:
    """Hold lock (key, of) until the connection's transaction ends; `of` names the collection id or run."""
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k, hashtext(:of))"), {"k": key, "of": str(of)})


@contextmanager
def holding(conn: Connection, key: int, *, of: int | str = 0) -> Iterator[None]:
    """Hold lock (key, of) on this connection for the block, whatever transactions it runs meanwhile.

    The lock is the session's, so the connection leaves its transaction at once: an idle-in-transaction
    snapshot would make CREATE INDEX CONCURRENTLY (an HNSW build inside the block) wait for it forever."""
    conn.execute(sa.text("SELECT pg_advisory_lock(:k, hashtext(:of))"), {"k": key, "of": str(of)})
    conn.commit()
    try:
        yield
    finally:
        conn.execute(sa.text("SELECT pg_advisory_unlock(:k, hashtext(:of))"), {"k": key, "of": str(of)})
        conn.commit()
