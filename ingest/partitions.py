"""A collection's partitions: every table keyed by picture (images, features, image_paths, finetune_splits) is
LIST-partitioned by collection_id, one partition each per collection, made in the transaction that makes the
collection and dropped when it is removed (seconds at any size: no row is deleted one by one).

Queries name the parent tables with the collection's id as a literal, so the planner keeps only that partition when
it plans, whatever psycopg prepares (a generic plan of `collection_id = $1` prunes only when it runs, and cannot pick
a partition's own HNSW index). The layout and its keys are in docs/storage.md.
"""
from __future__ import annotations

from sqlalchemy.engine import Connection

TABLES = ("images", "features", "image_paths", "finetune_splits")  # referenced first, referencing after


def partition(table: str, collection_id: int) -> str:
    """The partition of `table` that holds a collection's rows."""
    return f"{table}_p{int(collection_id)}"


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
