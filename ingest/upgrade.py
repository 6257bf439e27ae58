"""`ingest db upgrade`: the migrations, with those that rewrite stored pictures done the safe way.

Migrations that only add run on any command's first use (ingest.db.connect). One that rewrites every picture (0007:
a partition per collection, half-precision raw features) runs here alone: it checks the server's disk first, copies
rows in committed batches with a progress bar (a crash loses one batch; a rerun goes on from there), and only then
swaps the tables in one short transaction. HNSW indexes that lived on the old tables are built again on the
partitions. Other commands refuse to start while such a rewrite is pending (ingest.db.refuse_rewrites).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from sqlalchemy import text
from tqdm import tqdm

from ingest import hnsw, locks
from ingest.cluster import DEFAULT_SHARDS, distribute, has_citus, is_distributed
from ingest.db import HEAD_REVISION, Database, current_revision, upgrade
from ingest.errors import DatabaseError

BATCH_ROWS = 10_000  # pictures per committed batch: ~60 MB of raw features read, ~40 MB written
DISK_MARGIN = 1.25  # free space asked for, beyond the estimate of the new tables' size


@dataclass
class UpgradeReport:
    """What an upgrade did: revisions, pictures copied by batches, HNSW indexes built, the disk check's finding."""

    before: str | None
    after: str
    copied: int = 0
    hnsw_rebuilt: int = 0
    disk: str = ""
    distributed: int = 0  # shards the tables were distributed into by this upgrade (a Citus coordinator), else 0


def upgrade_database(db: Database, *, batch: int = BATCH_ROWS, progress: bool = True, shards: int = DEFAULT_SHARDS) -> UpgradeReport:
    """Bring the schema to the newest revision, converting stored pictures in place where a migration needs it; on a
    Citus coordinator, distribute the tables into `shards` shards once (a distributed database is left as it is)."""
    from migrations import partitioned_layout as layout

    report = UpgradeReport(current_revision(db.engine), HEAD_REVISION)
    if report.before != HEAD_REVISION:
        with db.connect() as conn:
            pending = layout.rows_to_convert(conn)
        if pending:
            if report.before is None or report.before < "0006":
                upgrade(db.engine, "0006")  # the additive ones first: the copy reads the 0006 layout
            report.disk = check_disk(db, layout)
            report.copied = copy_pictures(db, layout, pending, batch, progress)
        upgrade(db.engine)
        db.dispose()  # connections opened before a new type existed do not know it
        from ingest.reader import prepare

        prepare(db)
    with db.begin() as conn:
        if has_citus(conn) and not is_distributed(conn):
            distribute(conn, shards)
            report.distributed = shards
    db._distributed = None
    report.hnsw_rebuilt = rebuild_hnsw(db, progress)
    return report


def copy_pictures(db: Database, layout, pending: int, batch: int, progress: bool) -> int:
    """Copy every collection's pictures into the staging tables, one committed batch at a time (one process at a time)."""
    copied = 0
    with db.connect() as lock_conn, locks.holding(lock_conn, locks.REWRITE):
        with db.begin() as conn:
            layout.prepare(conn)
            ids = layout.collection_ids(conn)
            done = conn.execute(text(f"SELECT count(*) FROM images{layout.STAGING}")).scalar()
        with tqdm(total=pending, initial=done, unit="img", desc="upgrade: copying pictures", disable=not progress) as bar:
            def counted(n: int) -> None:
                nonlocal copied
                copied += n
                bar.update(n)

            for collection_id in ids:
                try:
                    layout.copy_collection(db.begin, collection_id, batch, counted)
                except ValueError as e:  # raw features half precision cannot hold
                    raise DatabaseError(str(e)) from None
    return copied


def check_disk(db: Database, layout) -> str:
    """Refuse before copying if the server's disk cannot hold the new tables beside the old ones (they are dropped only
    at the end). The new size is estimated from the old: the same, but raw features take half. Only a disk this
    machine can see is checked (the embedded server's, or a local server's data directory); else it says so."""
    with db.connect() as conn:
        sizes = dict(conn.execute(text(
            "SELECT t, coalesce(pg_total_relation_size(to_regclass(t)), 0) FROM unnest(CAST(:t AS text[])) AS t"),
            {"t": list(layout.TABLES)}).all())
        try:
            data_dir = conn.execute(text("SELECT current_setting('data_directory')")).scalar()
        except Exception:  # noqa: BLE001 - a role without pg_read_all_settings may not ask
            data_dir = None
    needed = int((sum(sizes.values()) - sizes["features"] / 2) * DISK_MARGIN)
    where = db.settings.pgdata if db.kind == "embedded" and db.settings else data_dir
    if not where or not os.path.isdir(where):
        return f"the server's disk is not visible from here: make sure it has {gib(needed)} free"
    free = shutil.disk_usage(where).free
    if free < needed:
        raise DatabaseError(f"the upgrade needs about {gib(needed)} free on the database's disk ({where}), which has {gib(free)}: "
                            "free some space and run `ingest db upgrade` again")
    return f"{gib(free)} free, about {gib(needed)} needed"


def rebuild_hnsw(db: Database, progress: bool) -> int:
    """Build the HNSW index of every collection that keeps one and has none of its dims (the old ones went with
    the old tables)."""
    built = 0
    with db.connect() as conn:
        wanted = conn.execute(text("SELECT id, pca_dims FROM collections WHERE hnsw AND pca_mean IS NOT NULL ORDER BY id")).all()
    for collection_id, dims in wanted:
        if not hnsw.has_index(db, collection_id, dims):
            hnsw.build(db, collection_id, dims, progress=progress)
            built += 1
    return built


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"
