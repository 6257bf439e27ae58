"""Reading and writing a collection's rows in PostgreSQL: the SQL behind `Collection`.

Batches go in with binary COPY into a temporary table and one INSERT ... ON CONFLICT DO NOTHING, all in
one transaction: a crash loses at most the batch in flight, and two loads of one folder at once cannot
store a picture (by sha256) twice in a collection. Vectors come out in binary, a chunk of rows at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ingest.db import Database
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


@dataclass(frozen=True)
class ImageRow:
    """What is stored about one picture besides its vectors."""

    path: str
    label: str | None
    sha256: str
    width: int
    height: int
    bytes: int


COLLECTION_COLUMNS = ("id, name, model, weights, weights_fingerprint, pca_dims, pca_version, pca_mean, pca_components, "
                      "pca_explained_variance, embedding_seq, removed_rows, hnsw, precision")

# What `vector_chunks` can read; every query is restricted to one collection by a bound id.
VECTOR_QUERIES = {
    "embedding": "SELECT i.id, i.embedding FROM images i WHERE i.collection_id = %s AND i.embedding IS NOT NULL",
    "raw": "SELECT i.id, f.raw FROM images i JOIN features f ON f.image_id = i.id WHERE i.collection_id = %s",
    "raw without embedding": "SELECT i.id, f.raw FROM images i JOIN features f ON f.image_id = i.id"
                             " WHERE i.collection_id = %s AND i.embedding IS NULL",
}


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
                         row.embedding_seq, row.removed_rows, row.hnsw, row.precision)


def find_row(conn: Connection, name: str) -> CollectionRow | None:
    row = conn.execute(sa.text(f"SELECT {COLLECTION_COLUMNS} FROM collections WHERE name = :n"), {"n": name}).first()
    return to_row(row) if row else None


def all_rows(conn: Connection) -> list[CollectionRow]:
    return [to_row(r) for r in conn.execute(sa.text(f"SELECT {COLLECTION_COLUMNS} FROM collections ORDER BY name"))]


def create_row(db: Database, name: str, weights: str, fingerprint: str, pca_dims: int) -> CollectionRow:
    """Insert the collection if it is new; either way return the row as stored (its weights may differ)."""
    with db.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO collections (name, model, weights, weights_fingerprint, pca_dims) "
                "VALUES (:n, :m, :w, :f, :d) ON CONFLICT (name) DO NOTHING"
            ),
            {"n": name, "m": MODEL_NAME, "w": weights, "f": fingerprint, "d": pca_dims},
        )
        return find_row(conn, name)


def set_pca_dims(db: Database, collection_id: int, dims: int) -> None:
    """Change the planned dims of a collection whose PCA is not fitted yet."""
    with db.begin() as conn:
        conn.execute(sa.text("UPDATE collections SET pca_dims = :d WHERE id = :c AND pca_mean IS NULL"), {"d": dims, "c": collection_id})


def stored_hashes(db: Database, collection_id: int) -> set[str]:
    with db.connect() as conn:
        return set(conn.execute(sa.text("SELECT sha256 FROM images WHERE collection_id = :c"), {"c": collection_id}).scalars())


def insert_images(
    db: Database, collection_id: int, rows: list[ImageRow], raw: np.ndarray, embeddings: np.ndarray | None, *, pca_version: int
) -> int:
    """Store one batch (images, raw features, embeddings if PCA is known) in one transaction; returns rows added.

    `embeddings` were projected with PCA `pca_version`. The collection row is held FOR SHARE, which a refit
    (save_pca) updates; if the PCA changed since the load opened the collection, the rows go in without
    embeddings and `Collection.finish` projects them with the current PCA.
    """
    if not rows:
        return 0
    with db.begin() as conn:
        cur = raw_cursor(conn)
        if embeddings is not None:
            cur.execute("SELECT pca_version FROM collections WHERE id = %s FOR SHARE", (collection_id,))
            if cur.fetchone()[0] != pca_version:
                embeddings = None
        cur.execute(
            "CREATE TEMP TABLE staging (path text, label text, sha256 text, width int, height int, bytes bigint, "
            f"raw vector({RAW_DIMS}), embedding vector) ON COMMIT DROP"
        )
        with cur.copy("COPY staging FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["text", "text", "text", "int4", "int4", "int8", "vector", "vector"])
            for i, r in enumerate(rows):
                emb = None if embeddings is None else embeddings[i]
                copy.write_row((r.path, r.label, r.sha256, r.width, r.height, r.bytes, raw[i], emb))
        cur.execute(
            "WITH added AS ("
            " INSERT INTO images (collection_id, path, label, sha256, width, height, bytes, embedding)"
            " SELECT DISTINCT ON (sha256) %(c)s, path, label, sha256, width, height, bytes, embedding FROM staging"
            " ORDER BY sha256, path"
            " ON CONFLICT (collection_id, sha256) DO NOTHING RETURNING id, sha256)"
            " INSERT INTO features (image_id, raw)"
            " SELECT DISTINCT ON (a.id) a.id, s.raw FROM added a JOIN staging s USING (sha256)",
            {"c": collection_id},
        )
        added = cur.rowcount
        cur.execute(
            "DELETE FROM ingest_failures f USING staging s WHERE f.collection_id = %s AND f.path = s.path", (collection_id,)
        )
    return added


def record_failures(db: Database, collection_id: int, failures: list[tuple[str, str]]) -> None:
    """Remember why files could not be used; a file that fails again keeps one row with the latest reason."""
    if not failures:
        return
    with db.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO ingest_failures (collection_id, path, reason) VALUES (:c, :p, :r) "
                "ON CONFLICT (collection_id, path) DO UPDATE SET reason = EXCLUDED.reason, at = now()"
            ),
            [{"c": collection_id, "p": p, "r": r} for p, r in dict(failures).items()],
        )


def vector_chunks(db: Database, collection_id: int, kind: str, chunk: int = CHUNK_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, matrix) blocks of a collection's vectors in id order, `chunk` rows at a time (keyset paging, binary).

    `kind` is a key of VECTOR_QUERIES: stored embeddings, raw features, or raw features of rows without an embedding.
    """
    last = 0
    while True:
        with db.connect() as conn:
            cur = raw_cursor(conn)
            cur.execute(f"{VECTOR_QUERIES[kind]} AND i.id > %s ORDER BY i.id LIMIT %s", (collection_id, last, chunk), binary=True)
            rows = cur.fetchall()
        if not rows:
            return
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        yield ids, np.stack([as_array(r[1]) for r in rows])
        if len(rows) < chunk:
            return
        last = int(ids[-1])


def read_vectors(db: Database, collection_id: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """All of `vector_chunks` at once: (ids, matrix), empty arrays for a collection without such rows."""
    blocks = list(vector_chunks(db, collection_id, kind))
    if not blocks:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])


def save_pca(db: Database, collection_id: int, pca: Pca, ids: np.ndarray, embeddings: np.ndarray) -> int:
    """Store a newly fitted PCA with every embedding it gives, in one transaction, and bump pca_version so
    Annoy files built before it read as stale.

    The collection row is updated first: that waits for batches being inserted with the old PCA (they hold
    the row FOR SHARE) and makes later ones insert without embeddings. Rows stored since `ids` were read
    carry old-PCA embeddings; they are cleared here and projected by `Collection.finish`.
    """
    mean, components, ratio = pca.to_bytes()
    with db.begin() as conn:
        version = conn.execute(
            sa.text(
                "UPDATE collections SET pca_mean = :m, pca_components = :c, pca_explained_variance = :r, pca_dims = :d, "
                "pca_version = pca_version + 1, updated_at = now() WHERE id = :id RETURNING pca_version"
            ),
            {"m": mean, "c": components, "r": ratio, "d": pca.dims, "id": collection_id},
        ).scalar_one()
        conn.execute(
            sa.text("UPDATE images SET embedding = NULL WHERE collection_id = :c AND embedding IS NOT NULL AND NOT (id = ANY(:ids))"),
            {"c": collection_id, "ids": ids.tolist()},
        )
        copy_embeddings(conn, ids, embeddings)
        return version


def write_embeddings(db: Database, ids: np.ndarray, embeddings: np.ndarray) -> None:
    """Set images.embedding for many rows at once."""
    with db.begin() as conn:
        copy_embeddings(conn, ids, embeddings)


def copy_embeddings(conn: Connection, ids: np.ndarray, embeddings: np.ndarray) -> None:
    """COPY (id, embedding) pairs into a temporary table, then one UPDATE."""
    cur = raw_cursor(conn)
    cur.execute("CREATE TEMP TABLE new_embeddings (id bigint, embedding vector) ON COMMIT DROP")
    with cur.copy("COPY new_embeddings FROM STDIN WITH (FORMAT BINARY)") as copy:
        copy.set_types(["int8", "vector"])
        for i, e in zip(ids.tolist(), embeddings):
            copy.write_row((i, e))
    cur.execute("UPDATE images SET embedding = n.embedding FROM new_embeddings n WHERE images.id = n.id")


def embedding_state(db: Database, collection_id: int) -> dict:
    """What an Annoy file of this collection must match to be fresh: rows, max id, dims, PCA version."""
    with db.connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT count(i.embedding) AS items, coalesce(max(i.id) FILTER (WHERE i.embedding IS NOT NULL), 0) AS max_id,"
                " c.pca_dims AS dims, c.pca_version AS pca_version"
                " FROM collections c LEFT JOIN images i ON i.collection_id = c.id WHERE c.id = :c GROUP BY c.id"
            ),
            {"c": collection_id},
        ).one()
    return dict(row._mapping)


def stored_image(db: Database, collection_id: int, *, image_id: int | None = None, sha256: str | None = None):
    """(id, path, label, embedding) of the collection's searchable image with this id or sha256, or None."""
    column, value = ("id", image_id) if image_id is not None else ("sha256", sha256)
    with db.connect() as conn:
        cur = raw_cursor(conn)
        cur.execute(
            f"SELECT id, path, label, embedding FROM images WHERE collection_id = %s AND {column} = %s AND embedding IS NOT NULL",
            (collection_id, value), binary=True,
        )
        row = cur.fetchone()
    return (row[0], row[1], row[2], as_array(row[3])) if row else None


def image_details(db: Database, collection_id: int, ids: list[int]) -> dict[int, tuple[str, str | None, str]]:
    """id -> (path, label, sha256) for some images of one collection (ids of other collections are left out)."""
    with db.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT id, path, label, sha256 FROM images WHERE collection_id = :c AND id = ANY(:ids)"),
            {"c": collection_id, "ids": list(ids)},
        )
        return {r.id: (r.path, r.label, r.sha256) for r in rows}


def count_searchable(db: Database, collection_id: int) -> int:
    with db.connect() as conn:
        return conn.execute(
            sa.text("SELECT count(*) FROM images WHERE collection_id = :c AND embedding IS NOT NULL"), {"c": collection_id}
        ).scalar()


def absolute(path: Path) -> str:
    """Stored paths are absolute so that reports and grids can open the pictures later."""
    return str(path.absolute())
