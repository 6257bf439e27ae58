"""A Citus cluster behind DATABASE_URL: detected from the `citus` extension on the coordinator, and the project's
tables distributed there by `ingest db upgrade` (docs/cluster.md).

Pictures and every row about one (features, paths, fine-tuning splits) are hash-distributed by sha256 and co-located,
on top of the partition per collection (docs/storage.md): a collection spreads over every worker, content dedupe is
a unique key that holds the distribution column, and a picture's rows meet on one shard. collections and
ingest_failures are small reference tables (a copy on every node). The one key Citus cannot keep, a path's
uniqueness within a collection, is kept by the writers: every path write runs under the collection's lock and
deletes the path's other rows first (ingest/store.py, ingest/image_paths.py).
"""
from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Connection

DISTRIBUTED = ("images", "features", "image_paths", "finetune_splits")  # by sha256, co-located with images
REFERENCE = ("collections", "ingest_failures")
PICTURE_KEYS = {t: f"fk_{t}_collection_id_images" for t in DISTRIBUTED[1:]}  # (collection_id, sha256) -> images
DEFAULT_SHARDS = 32  # Citus's own default: enough to spread over a few dozen workers later without a re-split


def has_citus(conn: Connection) -> bool:
    """Whether the server is a Citus coordinator (the extension is installed in this database)."""
    return bool(conn.execute(text("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')")).scalar())


def is_distributed(conn: Connection) -> bool:
    """Whether the pictures' table is distributed already."""
    return bool(conn.execute(text(
        "SELECT EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = to_regclass('images'))")).scalar())


def distribute(conn: Connection, shards: int) -> None:
    """Distribute the tables, in the caller's transaction. Foreign keys between the pictures' tables are dropped: Citus
    distributes the tables one by one, and cannot check such a key when a new collection's partition is made; the rows
    about a picture go with it because its one deleter says so (store.delete_images). The path uniqueness becomes an
    index. Rows already stored move to the shards."""
    for table in REFERENCE:
        conn.execute(text("SELECT create_reference_table(:t)"), {"t": table})
    for table, key in PICTURE_KEYS.items():
        conn.execute(text(f"ALTER TABLE {table} DROP CONSTRAINT {key}"))
    conn.execute(text("ALTER TABLE image_paths DROP CONSTRAINT uq_image_paths_collection_id"))
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_image_paths_collection_id_path ON image_paths (collection_id, path)"))
    conn.execute(text("SELECT create_distributed_table('images', 'sha256', shard_count := :n)"), {"n": int(shards)})
    for table in DISTRIBUTED[1:]:
        conn.execute(text("SELECT create_distributed_table(:t, 'sha256', colocate_with := 'images')"), {"t": table})


def workers(conn: Connection) -> list[tuple[str, int]]:
    """(host, port) of the cluster's active workers."""
    return [tuple(r) for r in conn.execute(text("SELECT node_name, node_port FROM citus_get_active_worker_nodes() ORDER BY 1, 2"))]
