"""Reading and writing collections in PostgreSQL.

Batches go in with binary COPY into a temporary table and one INSERT ... ON CONFLICT DO NOTHING, all in
one transaction: a crash loses at most the batch in flight, and two loads of one folder at once cannot
store a picture (by sha256) twice in a collection.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from pgvector.psycopg import register_vector
from sqlalchemy.engine import Connection, Engine

from ingest.errors import CollectionError, WeightsError
from ingest.features import MODEL_NAME
from ingest.reduce import Pca


@dataclass(frozen=True)
class CollectionInfo:
    """A collections row, with its PCA decoded (None until fitted)."""

    id: int
    name: str
    model: str
    weights: str
    weights_fingerprint: str
    pca_dims: int
    pca_version: int
    pca: Pca | None


@dataclass(frozen=True)
class ImageRow:
    """What is stored about one picture besides its vectors."""

    path: str
    label: str | None
    sha256: str
    width: int
    height: int
    bytes: int


COLLECTION_COLUMNS = "id, name, model, weights, weights_fingerprint, pca_dims, pca_version, pca_mean, pca_components, pca_explained_variance"


def vector_cursor(conn: Connection):
    """A psycopg cursor of this connection that reads and writes pgvector values as numpy arrays (for COPY)."""
    raw = conn.connection.driver_connection
    register_vector(raw)
    return raw.cursor()


def as_array(value) -> np.ndarray:
    """A pgvector value read through vector_cursor as a float32 numpy array."""
    return np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value, dtype=np.float32)


def row_to_collection(row) -> CollectionInfo:
    pca = Pca.from_bytes(row.pca_mean, row.pca_components, row.pca_explained_variance) if row.pca_mean else None
    return CollectionInfo(row.id, row.name, row.model, row.weights, row.weights_fingerprint, row.pca_dims, row.pca_version, pca)


def find_collection(conn: Connection, name: str) -> CollectionInfo | None:
    row = conn.execute(sa.text(f"SELECT {COLLECTION_COLUMNS} FROM collections WHERE name = :n"), {"n": name}).first()
    return row_to_collection(row) if row else None


def get_collection(engine: Engine, name: str) -> CollectionInfo:
    """The named collection, or a CollectionError that lists the ones there are."""
    with engine.connect() as conn:
        found = find_collection(conn, name)
        if found:
            return found
        names = conn.execute(sa.text("SELECT name FROM collections ORDER BY name")).scalars().all()
    known = ", ".join(names) if names else "none yet; run `ingest load`"
    raise CollectionError(f"no collection named {name!r} (collections: {known})")


def resolve_collection(engine: Engine, name: str | None) -> CollectionInfo:
    """The named collection; with no name, the only collection there is, else caltech101."""
    if name:
        return get_collection(engine, name)
    collections = list_collections(engine)
    if len(collections) == 1:
        return collections[0]
    return get_collection(engine, "caltech101")


def list_collections(engine: Engine) -> list[CollectionInfo]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT {COLLECTION_COLUMNS} FROM collections ORDER BY name")).all()
    return [row_to_collection(r) for r in rows]


def open_collection(engine: Engine, name: str, weights: str, fingerprint: str, pca_dims: int) -> CollectionInfo:
    """Create the collection, or reuse it if it was built with the same weights (never mix two models' vectors)."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO collections (name, model, weights, weights_fingerprint, pca_dims) "
                "VALUES (:n, :m, :w, :f, :d) ON CONFLICT (name) DO NOTHING"
            ),
            {"n": name, "m": MODEL_NAME, "w": weights, "f": fingerprint, "d": pca_dims},
        )
        coll = find_collection(conn, name)
    if coll.weights_fingerprint != fingerprint:
        raise WeightsError(
            f"collection {name!r} was built with weights {coll.weights} (fingerprint {coll.weights_fingerprint[:12]}); "
            f"these weights ({weights}, {fingerprint[:12]}) would mix two models' vectors: use another --collection"
        )
    return coll


def set_pca_dims(engine: Engine, collection_id: int, dims: int) -> CollectionInfo:
    """Change the planned dims of a collection whose PCA is not fitted yet."""
    with engine.begin() as conn:
        name = conn.execute(
            sa.text("UPDATE collections SET pca_dims = :d WHERE id = :c AND pca_mean IS NULL RETURNING name"), {"d": dims, "c": collection_id}
        ).scalar_one()
        return find_collection(conn, name)


def stored_hashes(engine: Engine, collection_id: int) -> set[str]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT sha256 FROM images WHERE collection_id = :c"), {"c": collection_id})
        return set(rows.scalars())


def insert_images(
    engine: Engine, collection_id: int, rows: list[ImageRow], raw: np.ndarray, embeddings: np.ndarray | None,
    pca_version: int | None = None,
) -> int:
    """Store one batch (images, raw features, embeddings if PCA is known) in one transaction; returns rows added.

    `embeddings` were projected with PCA `pca_version`. The collection row is held FOR SHARE, which a refit
    (save_pca) updates; if the PCA changed since the load opened the collection, the rows go in without
    embeddings and finish_collection projects them with the current PCA.
    """
    if not rows:
        return 0
    with engine.begin() as conn:
        cur = vector_cursor(conn)
        if embeddings is not None:
            cur.execute("SELECT pca_version FROM collections WHERE id = %s FOR SHARE", (collection_id,))
            if cur.fetchone()[0] != pca_version:
                embeddings = None
        cur.execute(
            "CREATE TEMP TABLE staging (path text, label text, sha256 text, width int, height int, bytes bigint, "
            "raw vector(2048), embedding vector) ON COMMIT DROP"
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


def record_failures(engine: Engine, collection_id: int, failures: list[tuple[str, str]]) -> None:
    """Remember why files could not be used; a file that fails again keeps one row with the latest reason."""
    if not failures:
        return
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO ingest_failures (collection_id, path, reason) VALUES (:c, :p, :r) "
                "ON CONFLICT (collection_id, path) DO UPDATE SET reason = EXCLUDED.reason, at = now()"
            ),
            [{"c": collection_id, "p": p, "r": r} for p, r in dict(failures).items()],
        )


def read_vectors(engine: Engine, collection_id: int, column: str, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(ids, matrix) of a collection's raw features ('raw') or embeddings ('embedding'), ordered by id."""
    source = {
        "raw": "SELECT i.id, f.raw FROM images i JOIN features f ON f.image_id = i.id",
        "embedding": "SELECT i.id, i.embedding FROM images i",
    }[column]
    with engine.connect() as conn:
        cur = vector_cursor(conn)
        cur.execute(f"{source} WHERE i.collection_id = %s {where} ORDER BY i.id", (collection_id,), binary=True)
        rows = cur.fetchall()
    if not rows:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
    return ids, np.stack([as_array(r[1]) for r in rows])


def save_pca(engine: Engine, collection_id: int, pca: Pca, ids: np.ndarray, embeddings: np.ndarray) -> int:
    """Store a newly fitted PCA with every embedding it gives, in one transaction, and bump pca_version so
    Annoy files built before it read as stale.

    The collection row is updated first: that waits for batches being inserted with the old PCA (they hold
    the row FOR SHARE) and makes later ones insert without embeddings. Rows stored since `ids` were read
    carry old-PCA embeddings; they are cleared here and projected by finish_collection.
    """
    mean, components, ratio = pca.to_bytes()
    with engine.begin() as conn:
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


def write_embeddings(engine: Engine, ids: np.ndarray, embeddings: np.ndarray) -> None:
    """Set images.embedding for many rows at once."""
    with engine.begin() as conn:
        copy_embeddings(conn, ids, embeddings)


def copy_embeddings(conn: Connection, ids: np.ndarray, embeddings: np.ndarray) -> None:
    """COPY (id, embedding) pairs into a temporary table, then one UPDATE."""
    cur = vector_cursor(conn)
    cur.execute("CREATE TEMP TABLE new_embeddings (id bigint, embedding vector) ON COMMIT DROP")
    with cur.copy("COPY new_embeddings FROM STDIN WITH (FORMAT BINARY)") as copy:
        copy.set_types(["int8", "vector"])
        for i, e in zip(ids.tolist(), embeddings):
            copy.write_row((i, e))
    cur.execute("UPDATE images SET embedding = n.embedding FROM new_embeddings n WHERE images.id = n.id")


def lock_collection(conn: Connection, collection_id: int) -> None:
    """Serialise the end-of-load work (PCA fit, projection, index build) of one collection across processes."""
    conn.execute(sa.text("SELECT pg_advisory_lock(7474202, :c)"), {"c": collection_id})


def unlock_collection(conn: Connection, collection_id: int) -> None:
    conn.execute(sa.text("SELECT pg_advisory_unlock(7474202, :c)"), {"c": collection_id})


def embedding_state(engine: Engine, collection_id: int) -> dict:
    """What an Annoy file of this collection must match to be fresh: rows, max id, dims, PCA version."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT count(i.embedding) AS items, coalesce(max(i.id) FILTER (WHERE i.embedding IS NOT NULL), 0) AS max_id,"
                " c.pca_dims AS dims, c.pca_version AS pca_version"
                " FROM collections c LEFT JOIN images i ON i.collection_id = c.id WHERE c.id = :c GROUP BY c.id"
            ),
            {"c": collection_id},
        ).one()
    return dict(row._mapping)


def image_paths(engine: Engine, ids: list[int]) -> dict[int, tuple[str, str | None]]:
    """id -> (path, label) for a few images."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, path, label FROM images WHERE id = ANY(:ids)"), {"ids": list(ids)})
        return {r.id: (r.path, r.label) for r in rows}


def absolute(path: Path) -> str:
    """Stored paths are absolute so that reports and grids can open the pictures later."""
    return str(path.absolute())
