"""pgvector HNSW, per collection: an approximate index inside PostgreSQL, kept up to date by every insert.

`images.embedding` has no fixed dimension (each collection has its own PCA dims), so the index is an expression
index on the collection's own partition (ingest/partitions.py), as pgvector advises for many tenants:
`CREATE INDEX ON images_pX USING hnsw ((embedding::vector(N)))`. A query uses it if it orders by the same expression
and its plan holds that partition alone (the collection id is a literal in every search, ingest/filters.py).
Its name carries the dims, so a refit to other dims can never leave an index that rejects new rows.
"""
from __future__ import annotations

import threading

import sqlalchemy as sa
from tqdm import tqdm

from ingest.db import Database
from ingest.partitions import partition

HNSW_M = 16  # pgvector's defaults: links per node and candidate list while building
EF_CONSTRUCTION = 64
BUILD_MEMORY = "1GB"  # maintenance_work_mem for a build: ~0.8 KB a row at 128-d, so 1M rows fit in memory


def index_name(collection_id: int, dims: int) -> str:
    return f"{partition('images', collection_id)}_hnsw_{int(dims)}"


def indexes(conn: sa.Connection, collection_id: int) -> dict[str, bool]:
    """The collection's HNSW indexes (any dims): name -> valid (an interrupted concurrent build leaves an invalid one)."""
    rows = conn.execute(
        sa.text("SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                " WHERE c.relname LIKE :p"),
        {"p": f"{partition('images', collection_id)}_hnsw_%".replace("_", "\\_")},
    )
    return {r.relname: r.indisvalid for r in rows}


def has_index(db: Database, collection_id: int, dims: int) -> bool:
    with db.connect() as conn:
        return indexes(conn, collection_id).get(index_name(collection_id, dims), False)


def autocommit(db: Database) -> sa.Connection:
    """CREATE/DROP INDEX CONCURRENTLY cannot run inside a transaction block."""
    return db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")


def drop(db: Database, collection_id: int, *, rebuild: bool = False) -> None:
    """Drop the collection's HNSW index and stop keeping one; with `rebuild`, keep wanting one, so that
    `Collection.finish` builds it again (a refit drops it: rewriting every row through it would be slower)."""
    if not rebuild:
        with db.begin() as conn:
            conn.execute(sa.text("UPDATE collections SET hnsw = false WHERE id = :c"), {"c": collection_id})
    drop_indexes(db, collection_id)


def drop_indexes(db: Database, collection_id: int, *, keep: str | None = None) -> None:
    """Drop the collection's HNSW indexes (but `keep`), without blocking other collections' reads and writes."""
    with autocommit(db) as conn:
        for name in indexes(conn, collection_id):
            if name != keep:
                conn.execute(sa.text(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"'))


def build(db: Database, collection_id: int, dims: int, *, progress: bool = True) -> str:
    """Create the collection's HNSW index if it does not exist (concurrently: loads and searches go on), drop
    any of other dims or left invalid by an interrupted build, and mark the collection so loads keep it."""
    name = index_name(collection_id, dims)
    with db.begin() as conn:
        conn.execute(sa.text("UPDATE collections SET hnsw = true WHERE id = :c"), {"c": collection_id})
        valid = indexes(conn, collection_id).get(name)
    drop_indexes(db, collection_id, keep=name if valid else None)
    if valid:
        return name
    with autocommit(db) as conn:
        conn.execute(sa.text(f"SET maintenance_work_mem = '{BUILD_MEMORY}'"))
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        watcher = ProgressLine(db, pid, name, enabled=progress)
        try:
            conn.execute(sa.text(
                f'CREATE INDEX CONCURRENTLY "{name}" ON {partition("images", collection_id)}'
                f" USING hnsw ((embedding::vector({int(dims)})) vector_l2_ops) WITH (m = {HNSW_M}, ef_construction = {EF_CONSTRUCTION})"
            ))
        finally:
            watcher.stop()
    return name


class ProgressLine:
    """A progress bar fed from pg_stat_progress_create_index while another connection builds the index."""

    def __init__(self, db: Database, pid: int, name: str, *, enabled: bool):
        self.db, self.pid = db, pid
        self.bar = tqdm(desc=f"hnsw {name}", unit="block", disable=not enabled)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        if enabled:
            self.thread.start()

    def watch(self) -> None:
        with self.db.connect() as conn:
            while not self.done.wait(1.0):
                row = conn.execute(sa.text("SELECT phase, tuples_total, tuples_done, blocks_total, blocks_done"
                                           " FROM pg_stat_progress_create_index WHERE pid = :p"), {"p": self.pid}).first()
                conn.rollback()  # each poll its own snapshot
                if row is None:
                    continue
                total, done = (row.tuples_total, row.tuples_done) if row.tuples_total else (row.blocks_total, row.blocks_done)
                self.bar.unit = "row" if row.tuples_total else "block"
                self.bar.set_postfix_str(row.phase, refresh=False)
                self.bar.total = total or None
                self.bar.n = done or 0
                self.bar.refresh()

    def stop(self) -> None:
        self.done.set()
        if self.thread.is_alive():
            self.thread.join()
        self.bar.close()
