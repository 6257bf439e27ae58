"""The partitioned layout of revision 0007, and the in-place conversion to it.

images, features, image_paths and finetune_splits are LIST-partitioned by collection_id (one partition of each per
collection, made with it and dropped with it), and a picture is keyed by (collection_id, sha256): content dedupe is
the primary key, and every row about a picture carries both columns, so joins stay within a partition and, once the
tables are distributed by sha256 (docs/storage.md), within a shard. images.id keeps its sequence: ids users have
seen stay valid. Raw features are halfvec(2048).

The conversion copies rows into new tables with staging names (`__next`), one collection and id range at a time,
each batch committed (`copy_batches`: what `ingest db upgrade` runs first, with progress), then swaps the tables in
one transaction (`swap`: the 0007 revision, which copies whatever is left first, so a small database converts in
one go). Rerun after a crash: staging tables are made IF NOT EXISTS and each batch starts after the highest id
already copied of its collection. The old tables are read, never changed, until the swap.

This module is part of the migration: a snapshot of the layout as 0007 made it (ingest/partitions.py makes the
partitions of new collections on the live schema).
"""
from __future__ import annotations

from typing import Callable

import sqlalchemy as sa

STAGING = "__next"
TABLES = ("images", "features", "image_paths", "finetune_splits")  # referenced before referencing
HALF_MAX = 65504.0  # the largest finite half-precision value


def parent_ddl(s: str = STAGING) -> list[str]:
    """The partitioned parents with suffix `s` on every name (tables, constraints, indexes)."""
    return [
        f"""CREATE TABLE IF NOT EXISTS images{s} (
            collection_id integer NOT NULL, id bigint NOT NULL DEFAULT nextval('images_id_seq'),
            sha256 varchar(64) NOT NULL, path text NOT NULL, label text, width integer NOT NULL, height integer NOT NULL,
            bytes bigint NOT NULL, ingested_at timestamptz NOT NULL DEFAULT now(), embedding vector,
            embedding_seq bigint NOT NULL DEFAULT 0,
            CONSTRAINT pk_images{s} PRIMARY KEY (collection_id, sha256),
            CONSTRAINT fk_images_collection_id_collections{s} FOREIGN KEY (collection_id)
                REFERENCES collections (id) ON DELETE CASCADE
        ) PARTITION BY LIST (collection_id)""",
        f"CREATE INDEX IF NOT EXISTS ix_images_collection_id_id{s} ON images{s} (collection_id, id)",
        f"CREATE INDEX IF NOT EXISTS ix_images_collection_id_embedding_seq{s} ON images{s} (collection_id, embedding_seq)",
        f"CREATE INDEX IF NOT EXISTS ix_images_collection_id_label{s} ON images{s} (collection_id, label)",
        f"""CREATE TABLE IF NOT EXISTS features{s} (
            collection_id integer NOT NULL, sha256 varchar(64) NOT NULL, raw halfvec(2048) NOT NULL,
            CONSTRAINT pk_features{s} PRIMARY KEY (collection_id, sha256),
            CONSTRAINT fk_features_collection_id_images{s} FOREIGN KEY (collection_id, sha256)
                REFERENCES images{s} (collection_id, sha256) ON DELETE CASCADE
        ) PARTITION BY LIST (collection_id)""",
        f"""CREATE TABLE IF NOT EXISTS image_paths{s} (
            collection_id integer NOT NULL, sha256 varchar(64) NOT NULL, image_id bigint NOT NULL, path text NOT NULL,
            CONSTRAINT pk_image_paths{s} PRIMARY KEY (collection_id, sha256, path),
            CONSTRAINT uq_image_paths_collection_id{s} UNIQUE (collection_id, path),
            CONSTRAINT fk_image_paths_collection_id_images{s} FOREIGN KEY (collection_id, sha256)
                REFERENCES images{s} (collection_id, sha256) ON DELETE CASCADE
        ) PARTITION BY LIST (collection_id)""",
        f"CREATE INDEX IF NOT EXISTS ix_image_paths_collection_id_image_id{s} ON image_paths{s} (collection_id, image_id)",
        f"""CREATE TABLE IF NOT EXISTS finetune_splits{s} (
            collection_id integer NOT NULL, run text NOT NULL, sha256 varchar(64) NOT NULL, image_id bigint NOT NULL,
            split text NOT NULL,
            CONSTRAINT pk_finetune_splits{s} PRIMARY KEY (collection_id, run, sha256),
            CONSTRAINT fk_finetune_splits_collection_id_images{s} FOREIGN KEY (collection_id, sha256)
                REFERENCES images{s} (collection_id, sha256) ON DELETE CASCADE
        ) PARTITION BY LIST (collection_id)""",
        f"CREATE INDEX IF NOT EXISTS ix_finetune_splits_run{s} ON finetune_splits{s} (run)",
    ]


def partition_ddl(collection_id: int, s: str = STAGING) -> list[str]:
    c = int(collection_id)
    return [f"CREATE TABLE IF NOT EXISTS {t}_p{c} PARTITION OF {t}{s} FOR VALUES IN ({c})" for t in TABLES]


def collection_ids(conn: sa.Connection) -> list[int]:
    return list(conn.execute(sa.text("SELECT id FROM collections ORDER BY id")).scalars())


def converted(conn: sa.Connection) -> bool:
    """Whether `images` is already the partitioned table."""
    return bool(conn.execute(sa.text("SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass('images')")).scalar())


def rows_to_convert(conn: sa.Connection) -> int:
    """Pictures in the old one-table layout (0 once converted): whether the conversion is more than a rename."""
    if converted(conn) or conn.execute(sa.text("SELECT to_regclass('images') IS NULL")).scalar():
        return 0
    return conn.execute(sa.text("SELECT count(*) FROM images")).scalar()


def prepare(conn: sa.Connection) -> None:
    """The staging parents and a partition of each for every collection (idempotent)."""
    for ddl in parent_ddl():
        conn.execute(sa.text(ddl))
    for c in collection_ids(conn):
        for ddl in partition_ddl(c):
            conn.execute(sa.text(ddl))


def copy_batch(conn: sa.Connection, collection_id: int, batch: int) -> int:
    """Copy the next `batch` pictures of a collection (by id, after those already copied) with their features, paths
    and splits; returns how many. Raw features become half precision here; one beyond its range stops the copy."""
    p = {"c": collection_id, "n": batch}
    p["lo"] = conn.execute(sa.text(f"SELECT coalesce(max(id), 0) FROM images{STAGING} WHERE collection_id = :c"), p).scalar()
    p["hi"] = conn.execute(sa.text("SELECT max(id) FROM (SELECT id FROM images WHERE collection_id = :c AND id > :lo"
                                   " ORDER BY id LIMIT :n) s"), p).scalar()
    if p["hi"] is None:
        return 0
    picked = "i.collection_id = :c AND i.id > :lo AND i.id <= :hi"
    copied = conn.execute(sa.text(
        f"INSERT INTO images{STAGING} (collection_id, id, sha256, path, label, width, height, bytes, ingested_at, embedding,"
        " embedding_seq) SELECT collection_id, id, sha256, path, label, width, height, bytes, ingested_at, embedding,"
        f" embedding_seq FROM images i WHERE {picked}"), p).rowcount
    try:
        with conn.begin_nested():
            conn.execute(sa.text(
                f"INSERT INTO features{STAGING} (collection_id, sha256, raw) SELECT i.collection_id, i.sha256,"
                f" f.raw::halfvec(2048) FROM features f JOIN images i ON i.id = f.image_id WHERE {picked}"), p)
    except sa.exc.DataError as e:  # pgvector: a value beyond half precision's range
        name = conn.execute(sa.text("SELECT name FROM collections WHERE id = :c"), p).scalar()
        raise ValueError(f"collection {name!r} has raw features beyond half precision's range (±{HALF_MAX:g}): remove it, "
                         f"or its raw features (DELETE FROM features ...), and upgrade again ({str(e.orig).splitlines()[0]})") from None
    conn.execute(sa.text(
        f"INSERT INTO image_paths{STAGING} (collection_id, sha256, image_id, path) SELECT i.collection_id, i.sha256, i.id,"
        f" ip.path FROM image_paths ip JOIN images i ON i.id = ip.image_id WHERE {picked}"), p)
    conn.execute(sa.text(
        f"INSERT INTO finetune_splits{STAGING} (collection_id, run, sha256, image_id, split) SELECT i.collection_id, s.run,"
        f" i.sha256, i.id, s.split FROM finetune_splits s JOIN images i ON i.id = s.image_id WHERE {picked}"), p)
    return copied


def copy_collection(conn_for_batch: Callable[[], object], collection_id: int, batch: int, done: Callable[[int], None]) -> None:
    """Copy every remaining picture of one collection, a batch per transaction that `conn_for_batch()` opens."""
    while True:
        with conn_for_batch() as conn:
            n = copy_batch(conn, collection_id, batch)
        if not n:
            return
        done(n)


def swap(conn: sa.Connection) -> None:
    """Copy what is left (in this transaction), check nothing was lost, and put the new tables in the old ones' place."""
    prepare(conn)
    for c in collection_ids(conn):
        while copy_batch(conn, c, 50_000):
            pass
    for t in TABLES:
        old, new = (conn.execute(sa.text(f"SELECT count(*) FROM {name}")).scalar() for name in (t, t + STAGING))
        if old != new:
            raise RuntimeError(f"{t}: {old} rows before, {new} after the copy; nothing was changed")
    conn.execute(sa.text("ALTER SEQUENCE images_id_seq OWNED BY NONE"))
    for t in reversed(TABLES):
        conn.execute(sa.text(f"DROP TABLE {t}"))
    rename_staged(conn)
    conn.execute(sa.text("ALTER SEQUENCE images_id_seq OWNED BY images.id"))


def rename_staged(conn: sa.Connection, suffix: str = STAGING) -> None:
    """Drop a staging suffix from the tables and from their constraints and indexes."""
    for t in TABLES:
        conn.execute(sa.text(f'ALTER TABLE "{t}{suffix}" RENAME TO "{t}"'))
    staged = f"%{suffix.replace('_', chr(92) + '_')}"
    for table, name in conn.execute(sa.text(
            "SELECT conrelid::regclass::text, conname FROM pg_constraint WHERE conname LIKE :s AND contype = 'f'"), {"s": staged}).all():
        conn.execute(sa.text(f'ALTER TABLE "{table}" RENAME CONSTRAINT "{name}" TO "{name[:-len(suffix)]}"'))
    for (name,) in conn.execute(sa.text("SELECT relname FROM pg_class WHERE relname LIKE :s AND relkind IN ('I', 'i')"),
                                {"s": staged}).all():
        conn.execute(sa.text(f'ALTER INDEX "{name}" RENAME TO "{name[:-len(suffix)]}"'))


PREVIOUS = "__prev"


def previous_ddl(s: str = PREVIOUS) -> list[str]:
    """The one-table layout of revision 0006, with suffix `s` on every name."""
    return [
        f"""CREATE TABLE images{s} (
            id bigint NOT NULL DEFAULT nextval('images_id_seq'), collection_id integer NOT NULL, path text NOT NULL,
            label text, sha256 varchar(64) NOT NULL, width integer NOT NULL, height integer NOT NULL, bytes bigint NOT NULL,
            ingested_at timestamptz NOT NULL DEFAULT now(), embedding vector, embedding_seq bigint NOT NULL DEFAULT 0,
            CONSTRAINT pk_images{s} PRIMARY KEY (id),
            CONSTRAINT uq_images_collection_id{s} UNIQUE (collection_id, sha256),
            CONSTRAINT fk_images_collection_id_collections{s} FOREIGN KEY (collection_id) REFERENCES collections (id) ON DELETE CASCADE)""",
        f"CREATE INDEX ix_images_collection_id{s} ON images{s} (collection_id)",
        f"CREATE INDEX ix_images_collection_id_embedding_seq{s} ON images{s} (collection_id, embedding_seq)",
        f"""CREATE TABLE features{s} (image_id bigint NOT NULL, raw vector(2048) NOT NULL,
            CONSTRAINT pk_features{s} PRIMARY KEY (image_id),
            CONSTRAINT fk_features_image_id_images{s} FOREIGN KEY (image_id) REFERENCES images{s} (id) ON DELETE CASCADE)""",
        f"""CREATE TABLE image_paths{s} (id bigserial NOT NULL, image_id bigint NOT NULL, collection_id integer NOT NULL,
            path text NOT NULL, CONSTRAINT pk_image_paths{s} PRIMARY KEY (id),
            CONSTRAINT uq_image_paths_collection_id{s} UNIQUE (collection_id, path),
            CONSTRAINT fk_image_paths_image_id_images{s} FOREIGN KEY (image_id) REFERENCES images{s} (id) ON DELETE CASCADE,
            CONSTRAINT fk_image_paths_collection_id_collections{s} FOREIGN KEY (collection_id) REFERENCES collections (id)
                ON DELETE CASCADE)""",
        f"CREATE INDEX ix_image_paths_image_id{s} ON image_paths{s} (image_id)",
        f"""CREATE TABLE finetune_splits{s} (run text NOT NULL, image_id bigint NOT NULL, collection_id integer NOT NULL,
            split text NOT NULL, CONSTRAINT pk_finetune_splits{s} PRIMARY KEY (run, image_id),
            CONSTRAINT fk_finetune_splits_image_id_images{s} FOREIGN KEY (image_id) REFERENCES images{s} (id) ON DELETE CASCADE,
            CONSTRAINT fk_finetune_splits_collection_id_collections{s} FOREIGN KEY (collection_id) REFERENCES collections (id)
                ON DELETE CASCADE)""",
        f"CREATE INDEX ix_finetune_splits_collection_id{s} ON finetune_splits{s} (collection_id)",
    ]


def swap_back(conn: sa.Connection) -> None:
    """The partitioned tables back into the one-table layout, in this transaction. Half-precision raw features come back
    as float32 with the precision they were stored at: what was rounded away is not restored."""
    s = PREVIOUS
    for ddl in previous_ddl():
        conn.execute(sa.text(ddl))
    conn.execute(sa.text(f"INSERT INTO images{s} (id, collection_id, path, label, sha256, width, height, bytes, ingested_at,"
                         " embedding, embedding_seq) SELECT id, collection_id, path, label, sha256, width, height, bytes,"
                         " ingested_at, embedding, embedding_seq FROM images"))
    conn.execute(sa.text(f"INSERT INTO features{s} (image_id, raw) SELECT i.id, f.raw::vector(2048) FROM features f"
                         " JOIN images i USING (collection_id, sha256)"))
    conn.execute(sa.text(f"INSERT INTO image_paths{s} (image_id, collection_id, path) SELECT image_id, collection_id, path"
                         " FROM image_paths ORDER BY image_id, path"))
    conn.execute(sa.text(f"INSERT INTO finetune_splits{s} (run, image_id, collection_id, split) SELECT run, image_id,"
                         " collection_id, split FROM finetune_splits"))
    conn.execute(sa.text("ALTER SEQUENCE images_id_seq OWNED BY NONE"))
    for t in reversed(TABLES):
        conn.execute(sa.text(f"DROP TABLE {t}"))  # its partitions go with it
    rename_staged(conn, PREVIOUS)
    conn.execute(sa.text(f'ALTER SEQUENCE "image_paths{s}_id_seq" RENAME TO image_paths_id_seq'))
    conn.execute(sa.text("ALTER SEQUENCE images_id_seq OWNED BY images.id"))
