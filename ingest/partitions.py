"""A collection's partitions: every table keyed by picture (images, features, image_paths, finetune_splits) is
LIST-partitioned by collection_id, one partition each per collection, made in the transaction that makes the
collection and dropped when it is removed (seconds at any size: no row is deleted one by one).

Queries name the parent tables with the collection's id as a literal, so the planner keeps only that partition when
it plans, whatever psycopg prepares (a generic plan of `collection_id = $1` prunes only when it runs, and cannot pick
a partition's own HNSW index). The layout and its keys are in docs/storage.md.
"""
from __future__ import annotations

import random
import time

from psycopg.errors import LockNotAvailable
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

NOWAIT_FOR = 1.0  # seconds lock_for_ddl tries without waiting, before it queues
LOCK_WAIT = "100ms"  # each queued try of lock_for_ddl
TABLES = ("images", "features", "image_paths", "finetune_splits")  # referenced first, referencing after


def partition(table: str, collection_id: int) -> str:
    """The partition of `table` that holds a collection's rows."""
    return f"{table}_p{int(collection_id)}"


def lock_for_ddl(conn: Connection) -> None:
    """Call first in a transaction that makes or drops partitions: it takes every lock their DDL takes, up front.

    The DDL takes each parent table (ACCESS EXCLUSIVE), then `collections`, which their foreign keys reference. A
    batch's writer takes its collection's row first and the pictures' tables after, and a reader may hold one parent
    while it asks for another: taken as the DDL goes, these orders deadlock (two new collections made at once, one
    made or removed while another is loaded or read; on one server, and on a Citus cluster every time). So:
    `collections` first, EXCLUSIVE (writers' row locks wait for it, plain reads go on), then the parents all at once:
    for a second without waiting (a transaction that waits for nothing closes no cycle), then, so that a steady stream
    of queries cannot hold it off, queued behind them for LOCK_WAIT at a time, which gives way before PostgreSQL's
    deadlock check (deadlock_timeout, 1 s) and mostly before Citus's (every 2 s) would cancel a reader."""
    conn.exec_driver_sql("LOCK TABLE collections IN EXCLUSIVE MODE")
    started = time.monotonic()
    while True:
        queued = time.monotonic() - started > NOWAIT_FOR
        try:
            with conn.begin_nested():
                if queued:
                    conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{LOCK_WAIT}'")
                conn.exec_driver_sql(f"LOCK TABLE {', '.join(TABLES)} IN ACCESS EXCLUSIVE MODE{'' if queued else ' NOWAIT'}")
                if queued:
                    conn.exec_driver_sql("SET LOCAL lock_timeout TO DEFAULT")
            return
        except OperationalError as e:
            if not isinstance(e.orig, LockNotAvailable):
                raise
            time.sleep(random.uniform(0, 0.05))


def create(conn: Connection, collection_id: int) -> None:
    """Make the collection's partitions (if missing) in the caller's transaction."""
    c = int(collection_id)
    for table in TABLES:
        conn.exec_driver_sql(f"CREATE TABLE IF NOT EXISTS {partition(table, c)} PARTITION OF {table} FOR VALUES IN ({c})")


def drop(conn: Connection, collection_id: int) -> None:
    """Drop the collection's partitions with their rows and indexes (its HNSW index too), in the caller's transaction.
    The referencing ones go first; the pictures' partition is detached before it is dropped, which releases the
    foreign keys that other tables' parents hold on it."""
    for table in reversed(TABLES[1:]):
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {partition(table, collection_id)}")
    images = partition("images", collection_id)
    if conn.exec_driver_sql("SELECT to_regclass(%s) IS NOT NULL", (images,)).scalar():
        conn.exec_driver_sql(f"ALTER TABLE images DETACH PARTITION {images}")
        conn.exec_driver_sql(f"DROP TABLE {images}")


def refresh_statistics(db, collection_id: int) -> bool:
    """ANALYZE the collection's pictures partition when the planner knows too little of it: never analyzed, or more
    rows written since than autovacuum's own rule allows (50 + 10%), without waiting for its next round. A search
    picks its engine from the planner's estimate of a filter's rows (Collection.searcher_for); with no statistics that
    estimate is a guess (0.5% of 0.5% of the rows for a label), so every filtered HNSW query of a collection just
    loaded would go exact until autovacuum came by. Returns whether it ran."""
    images = partition("images", collection_id)
    with db.begin() as conn:
        stale = conn.exec_driver_sql(
            "SELECT coalesce(last_analyze, last_autoanalyze) IS NULL OR n_mod_since_analyze > 50 + 0.1 * n_live_tup"
            " FROM pg_stat_user_tables WHERE relid = to_regclass(%s)", (images,)).scalar()
        if stale:
            conn.exec_driver_sql(f"ANALYZE {images}")
    return bool(stale)
