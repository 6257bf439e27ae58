"""Reading and writing a collection's rows in PostgreSQL: the SQL behind `Collection`.

Batches go in with binary COPY into a temporary table and one INSERT ... ON CONFLICT DO NOTHING, all in
one transaction: a crash loses at most the batch in flight, and two loads of one folder at once cannot
store a picture (by sha256) twice in a collection. Vectors come out in binary, a chunk of rows at a time.
Statements use psycopg's placeholders throughout (the COPY and binary reads need its cursor); counts of rows are
in ingest/counts.py, paths in ingest/paths.py, fine-tuning splits in ingest/splits.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
from pgvector import HalfVector
from sqlalchemy.engine import Connection

from ingest import partitions
from ingest.db import Database
from ingest.errors import CollectionError
from ingest.features import MODEL_NAME, RAW_DIMS
from ingest.reduce import Pca

CHUNK_ROWS = 20_000  # rows per read of vectors: ~160 MB of raw features at most in flight


@dataclass(frozen=True)
class CollectionRow:
    """A collections row, with its PCA decoded (None until fitted)."""

    id: int
    name: str
    model: str
    weights: str
    weights_fingerprint: str
    pca_dims: int
    pca_version: int
    pca: Pca | None
    embedding_seq: int = 0  # bumped by each transaction that writes embeddings (ingest/engines.py: the delta)
    removed_rows: int = 0  # rows ever removed from the collection
    hnsw: bool = False  # a pgvector HNSW index is kept for it
    precision: str = "fp32"  # how the CNN ran: 'fp32' or 'bf16'
    runtime: str = "tensorflow"  # what ran it: 'openvino' or 'tensorflow'
    raw_features: str = "half"  # 'half': raw features kept (half precision); 'none': dropped once the PCA is fitted

    @property
    def keeps_raw(self) -> bool:
        return self.raw_features != "none"


@dataclass(frozen=True)
class ImageRow:
    """What is stored about one picture besides its vectors."""

    path: str
    label: str | None
    sha256: str
    width: int
    height: int
    bytes: int


@dataclass(frozen=True)
class StoredImage:
    """A searchable picture of a collection, as a query by id or by identical content starts from."""

    id: int
    path: str
    label: str | None
    embedding: np.ndarray


@dataclass(frozen=True)
class ImageDetails:
    """What a hit or a report shows of a stored picture besides its vector."""

    path: str
    label: str | None
    sha256: str


COLLECTION_COLUMNS = ("id, name, model, weights, weights_fingerprint, pca_dims, pca_version, pca_mean, pca_components, "
                      "pca_explained_variance, embedding_seq, removed_rows, hnsw, precision, runtime, raw_features")

JOIN_FEATURES = "JOIN features f ON f.collection_id = i.collection_id AND f.sha256 = i.sha256"  # a picture's own row
HALF_MAX = 65504.0  # the largest finite half-precision value: raw features beyond it cannot be stored

# What `vector_chunks` can read: kind -> (the vector column, the rows that have one); every query is restricted to
# one collection by a bound id.
VECTOR_ROWS = {
    "embedding": ("i.embedding", "FROM images i WHERE i.collection_id = %s AND i.embedding IS NOT NULL"),
    "raw": ("f.raw", f"FROM images i {JOIN_FEATURES} WHERE i.collection_id = %s"),
    "raw without embedding": ("f.raw", f"FROM images i {JOIN_FEATURES} WHERE i.collection_id = %s AND i.embedding IS NULL"),
}


def vector_query(kind: str, *, with_vectors: bool = True) -> str:
    """SELECT the ids (and vectors) of a kind of row of VECTOR_ROWS, before any further condition."""
    column, rows = VECTOR_ROWS[kind]
    return f"SELECT i.id, {column} {rows}" if with_vectors else f"SELECT i.id {rows}"


def raw_cursor(conn: Connection):
    """The psycopg cursor under a SQLAlchemy connection: binary results and COPY need it. The vector type is
    registered on every connection when it opens (ingest.db), so vectors read and write as numpy arrays."""
    return conn.connection.driver_connection.cursor()


def as_array(value) -> np.ndarray:
    """A pgvector value as a float32 numpy array."""
    return np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value, dtype=np.float32)


def to_row(row) -> CollectionRow:
    pca = Pca.from_bytes(row.pca_mean, row.pca_components, row.pca_explained_variance) if row.pca_mean else None
    return CollectionRow(row.id, row.name, row.model, row.weights, row.weights_fingerprint, row.pca_dims, row.pca_version, pca,
                         row.embedding_seq, row.removed_rows, row.hnsw, row.precision, row.runtime, row.raw_features)


def find_row(conn: Connection, name: str) -> CollectionRow | None:
    row = conn.exec_driver_sql(f"SELECT {COLLECTION_COLUMNS} FROM collections WHERE name = %s", (name,)).first()
    return to_row(row) if row else None


def settled_row(db: Database, name: str) -> CollectionRow | None:
    """The collection row once no transaction holds it: a batch writing rows holds it until its commit is over on every
    node (a Citus transaction releases its locks only after the workers' commits), so every row stamped at or below
    the embedding_seq read here is visible to whoever reads next (an index build's watermark)."""
    with db.begin() as conn:
        row = conn.exec_driver_sql(f"SELECT {COLLECTION_COLUMNS} FROM collections WHERE name = %s FOR SHARE", (name,)).first()
        return to_row(row) if row else None


def all_rows(conn: Connection) -> list[CollectionRow]:
    return [to_row(r) for r in conn.exec_driver_sql(f"SELECT {COLLECTION_COLUMNS} FROM collections ORDER BY name")]


def search_state(db: Database, collection_id: int) -> tuple[int, int, bool] | None:
    """(pca_version, pca_dims, hnsw) of a collection, or None once it is removed: one primary-key lookup that tells a
    collection held open (the web server's) whether to read its row again."""
    with db.connect() as conn:
        row = conn.exec_driver_sql("SELECT pca_version, pca_dims, hnsw FROM collections WHERE id = %s", (collection_id,)).first()
    return tuple(row) if row else None


def delete_row(conn: Connection, collection_id: int) -> None:
    """Delete a collection: its partitions are dropped (images, features, paths and splits, with their indexes),
    its row deleted (failures go by ON DELETE CASCADE)."""
    partitions.lock_for_ddl(conn)
    partitions.drop(conn, collection_id)
    conn.exec_driver_sql("DELETE FROM collections WHERE id = %s", (collection_id,))


def create_row(db: Database, name: str, weights: str, fingerprint: str, pca_dims: int, precision: str = "fp32",
               runtime: str = "openvino", raw_features: str = "half") -> CollectionRow:
    """Insert the collection with its partitions if it is new; either way return the row as stored (its weights,
    precision and raw features may differ). Only a new one waits for partitions.lock_for_ddl, in a transaction that
    holds no other lock before it (the read that found none has ended: its lock could be one a removal waits for)."""
    with db.connect() as conn:
        found = find_row(conn, name)
        conn.rollback()
        if found is not None:
            return found
        with conn.begin():
            partitions.lock_for_ddl(conn)
            made = conn.exec_driver_sql(
                "INSERT INTO collections (name, model, weights, weights_fingerprint, pca_dims, precision, runtime, raw_features) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING RETURNING id",
                (name, MODEL_NAME, weights, fingerprint, pca_dims, precision, runtime, raw_features),
            ).scalar()
            if made is not None:
                partitions.create(conn, made)
            return find_row(conn, name)


def set_pca_dims(db: Database, collection_id: int, dims: int) -> None:
    """Change the planned dims of a collection whose PCA is not fitted yet."""
    with db.begin() as conn:
        conn.exec_driver_sql("UPDATE collections SET pca_dims = %s WHERE id = %s AND pca_mean IS NULL", (dims, collection_id))


def image_files(db: Database, collection_id: int) -> list[tuple[str, str | None]]:
    """(path, label) of every picture of a collection, in id order: what re-embedding it reads again."""
    with db.connect() as conn:
        return [(r.path, r.label) for r in conn.exec_driver_sql(
            "SELECT path, label FROM images WHERE collection_id = %s ORDER BY id", (collection_id,))]


def stored_hashes(db: Database, collection_id: int) -> set[str]:
    with db.connect() as conn:
        return set(conn.exec_driver_sql("SELECT sha256 FROM images WHERE collection_id = %s", (collection_id,)).scalars())


def insert_images(
    db: Database, collection_id: int, rows: list[ImageRow], raw: np.ndarray, embeddings: np.ndarray | None, *, pca_version: int
) -> int:
    """Store one batch (images, raw features, embeddings if PCA is known) in one transaction; returns rows added.
    Raw features are stored in half precision unless the collection keeps none and the batch has embeddings (a batch
    without them needs its raw features until `Collection.finish` projects them).

    `embeddings` were projected with PCA `pca_version`. Every batch bumps the collection's embedding_seq, holding the
    collection row until commit, and stamps rows written with embeddings with it: writers of one collection commit in
    seq order, so an index built at watermark S holds every row stamped S or less; a refit (save_pca, which updates
    the same row) waits for the batch; and path writes (here, a sync's, a prune's) are one collection's at a time,
    which keeps one picture per path where no unique key can (a Citus cluster: ingest/cluster.py). If the PCA changed
    since the load opened the collection, the rows go in without embeddings and `Collection.finish` projects them.
    Statements are plain INSERTs of a temporary table's rows, each with RETURNING where a count matters: what Citus
    runs through its coordinator as well as one server does.
    """
    if not rows:
        return 0
    check_half_range(raw)
    with db.begin() as conn:
        cur = raw_cursor(conn)
        seq, version, keep_raw = bump_embedding_seq(cur, collection_id)
        if embeddings is None or version != pca_version:
            embeddings, seq = None, 0
        keep_raw = keep_raw or embeddings is None
        cur.execute(
            "CREATE TEMP TABLE staging (path text, label text, sha256 text, width int, height int, bytes bigint, "
            f"raw halfvec({RAW_DIMS}), embedding vector) ON COMMIT DROP"
        )
        with cur.copy("COPY staging FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["text", "text", "text", "int4", "int4", "int8", "halfvec", "vector"])
            for i, r in enumerate(rows):
                emb = None if embeddings is None else embeddings[i]
                half = HalfVector(raw[i].astype(np.float16)) if keep_raw else None
                copy.write_row((r.path, r.label, r.sha256, r.width, r.height, r.bytes, half, emb))
        cur.execute(
            "INSERT INTO images (collection_id, path, label, sha256, width, height, bytes, embedding, embedding_seq)"
            " SELECT DISTINCT ON (sha256) %(c)s, path, label, sha256, width, height, bytes, embedding, %(s)s FROM staging"
            " ORDER BY sha256, path ON CONFLICT (collection_id, sha256) DO NOTHING RETURNING id, sha256, path",
            {"c": collection_id, "s": seq},
        )
        added = cur.fetchall()
        if added:
            write_paths(cur, collection_id, [(sha, image_id, path) for image_id, sha, path in added])
            cur.execute("INSERT INTO features (collection_id, sha256, raw) SELECT DISTINCT ON (sha256) %s, sha256, raw"
                        " FROM staging WHERE raw IS NOT NULL AND sha256 = ANY(%s) ORDER BY sha256",
                        (collection_id, [sha for _, sha, _ in added]))
        cur.execute("DELETE FROM ingest_failures WHERE collection_id = %s AND path = ANY(%s)",
                    (collection_id, [r.path for r in rows]))
    return len(added)


def write_paths(cur, collection_id: int, rows: list[tuple[str, int, str]]) -> None:
    """Record (sha256, image id, path) rows, each path leaving the picture it held before (one picture per path), in the
    caller's transaction, which holds the collection row (every writer of paths takes it first)."""
    shas, ids, paths = (list(column) for column in zip(*rows))
    cur.execute("DELETE FROM image_paths WHERE collection_id = %s AND path = ANY(%s)", (collection_id, paths))
    cur.execute("INSERT INTO image_paths (collection_id, sha256, image_id, path)"
                " SELECT %s, s, i, p FROM unnest(%s::text[], %s::bigint[], %s::text[]) AS u(s, i, p)",
                (collection_id, shas, ids, paths))


def bump_embedding_seq(cur, collection_id: int) -> tuple[int, int, bool]:
    """Take the next embedding_seq of a collection, holding its row until commit; returns (seq, pca_version, keeps raw)."""
    cur.execute("UPDATE collections SET embedding_seq = embedding_seq + 1 WHERE id = %s"
                " RETURNING embedding_seq, pca_version, raw_features <> 'none'", (collection_id,))
    return cur.fetchone()


def check_half_range(raw: np.ndarray) -> None:
    """Refuse, before anything is written, raw features that half precision cannot hold (weights whose outputs
    exceed ±65504, or are not finite): one line, not a failed batch."""
    worst = float(np.max(np.abs(raw))) if raw.size else 0.0
    if not worst <= HALF_MAX:
        raise CollectionError(f"these weights give raw features up to {worst:g}, beyond half precision's ±{HALF_MAX:g} that "
                              "features are stored in: use --raw-features none (no refit, no raw space) or other weights")


def forget_raw(db: Database, collection_id: int) -> int:
    """Delete the raw features of a collection that keeps none, once its rows have embeddings; returns rows deleted."""
    with db.begin() as conn:
        return conn.exec_driver_sql(
            "DELETE FROM features f USING images i WHERE f.collection_id = %(c)s AND i.collection_id = %(c)s"
            " AND i.sha256 = f.sha256 AND i.embedding IS NOT NULL", {"c": collection_id}).rowcount


def record_failures(db: Database, collection_id: int, failures: list[tuple[str, str]]) -> None:
    """Remember why files could not be used; a file that fails again keeps one row with the latest reason (and when
    it first failed for that reason)."""
    if not failures:
        return
    with db.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO ingest_failures (collection_id, path, reason) VALUES (%s, %s, %s) "
            "ON CONFLICT (collection_id, path) DO UPDATE SET reason = EXCLUDED.reason, at = now()"
            " WHERE ingest_failures.reason <> EXCLUDED.reason",  # the same failure again changes nothing
            [(collection_id, p, r) for p, r in dict(failures).items()],
        )


def vector_chunks(db: Database, collection_id: int, kind: str, chunk: int = CHUNK_ROWS, *,
                  through: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, matrix) blocks of a collection's vectors in id order, `chunk` rows at a time (keyset paging, binary).

    `kind` is a key of VECTOR_ROWS: stored embeddings, raw features, or raw features of rows without an embedding.
    `through` keeps only rows written by embedding_seq `through` or before (what an index build covers).
    """
    last = 0
    extra, params = ("", ()) if through is None else (" AND i.embedding_seq <= %s", (through,))
    while True:
        with db.connect() as conn:
            cur = raw_cursor(conn)
            cur.execute(f"{vector_query(kind)}{extra} AND i.id > %s ORDER BY i.id LIMIT %s",
                        (collection_id, *params, last, chunk), binary=True)
            rows = cur.fetchall()
        if not rows:
            return
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        yield ids, np.stack([as_array(r[1]) for r in rows])
        if len(rows) < chunk:
            return
        last = int(ids[-1])


def vectors_of(db: Database, collection_id: int, kind: str, ids: np.ndarray, chunk: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(ids, matrix) of some rows of a collection ('embedding' or 'raw'), in id order; ids without such a vector,
    or of another collection, are left out. Memory follows len(ids), not the collection (a sample, a PCA fit)."""
    wanted = np.unique(np.asarray(ids, dtype=np.int64))
    found_ids, blocks = [], []
    for start in range(0, len(wanted), chunk):
        with db.connect() as conn:
            cur = raw_cursor(conn)
            cur.execute(f"{vector_query(kind)} AND i.id = ANY(%s) ORDER BY i.id",
                        (collection_id, wanted[start:start + chunk].tolist()), binary=True)
            rows = cur.fetchall()
        found_ids.extend(r[0] for r in rows)
        blocks.extend(as_array(r[1]) for r in rows)
    if not blocks:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return np.asarray(found_ids, dtype=np.int64), np.stack(blocks)


def image_ids(db: Database, collection_id: int, kind: str = "raw") -> np.ndarray:
    """Every id of a collection that has a vector of `kind` ('embedding' or 'raw'), in order: 8 bytes a row,
    so a sample can be drawn without reading vectors."""
    with db.connect() as conn:
        cur = raw_cursor(conn)
        cur.execute(vector_query(kind, with_vectors=False) + " ORDER BY i.id", (collection_id,), binary=True)
        return np.fromiter((r[0] for r in cur), np.int64)


def read_vectors(db: Database, collection_id: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """All of `vector_chunks` at once: (ids, matrix), empty arrays for a collection without such rows."""
    blocks = list(vector_chunks(db, collection_id, kind))
    if not blocks:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])


def remove_images(db: Database, collection_id: int, ids: list[int]) -> int:
    """Delete some images of a collection (their features, paths and splits go with them) and count them in
    collections.removed_rows, in one transaction, so every index knows items may be gone. Returns rows deleted."""
    if not ids:
        return 0
    with db.begin() as conn:
        return delete_images(conn, collection_id, ids)


def delete_images(conn: Connection, collection_id: int, ids: list[int]) -> int:
    """`remove_images` inside a caller's transaction (a prune also forgets paths in it): the one place rows are deleted.
    The collection row is taken first, as every writer of embeddings takes it, so a load and a prune cannot deadlock."""
    sequential(conn)
    conn.exec_driver_sql("SELECT 1 FROM collections WHERE id = %s FOR UPDATE", (collection_id,))
    gone = list(conn.exec_driver_sql("SELECT sha256 FROM images WHERE collection_id = %s AND id = ANY(%s)",
                                     (collection_id, list(ids))).scalars())
    conn.exec_driver_sql("UPDATE collections SET removed_rows = removed_rows + %s WHERE id = %s", (len(gone), collection_id))
    for table in reversed(partitions.TABLES):  # a cluster keeps no foreign keys between these (ingest/cluster.py)
        conn.exec_driver_sql(f"DELETE FROM {table} WHERE collection_id = %s AND sha256 = ANY(%s)", (collection_id, gone))
    return len(gone)


def sequential(conn: Connection) -> None:
    """A transaction that writes the collections row after writing pictures' rows: on a Citus cluster, a reference
    table's row cannot be written after a parallel write to shards in the same transaction, so the shards are written
    one connection at a time (a custom setting, which a server without Citus keeps and ignores)."""
    conn.exec_driver_sql("SET LOCAL citus.multi_shard_modify_mode TO 'sequential'")


def stored_image(db: Database, collection_id: int, *, image_id: int | None = None, sha256: str | None = None) -> StoredImage | None:
    """The collection's searchable image with this id or sha256, or None."""
    column, value = ("id", image_id) if image_id is not None else ("sha256", sha256)
    with db.connect() as conn:
        cur = raw_cursor(conn)
        cur.execute(
            f"SELECT id, path, label, embedding FROM images WHERE collection_id = %s AND {column} = %s AND embedding IS NOT NULL",
            (collection_id, value), binary=True,
        )
        row = cur.fetchone()
    return StoredImage(row[0], row[1], row[2], as_array(row[3])) if row else None


def image_details(db: Database, collection_id: int, ids: list[int]) -> dict[int, ImageDetails]:
    """id -> details of some images of one collection (ids of other collections are left out)."""
    with db.connect() as conn:
        rows = conn.exec_driver_sql("SELECT id, path, label, sha256 FROM images WHERE collection_id = %s AND id = ANY(%s)",
                                    (collection_id, list(ids)))
        return {r.id: ImageDetails(r.path, r.label, r.sha256) for r in rows}
