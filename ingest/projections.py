"""Writing a collection's embeddings: every row's, projected with a newly fitted PCA (`save_pca`), or some rows'
(`write_embeddings`, for rows stored before their PCA existed). Both stamp the rows with a new embedding_seq while
holding the collection row, as every writer of embeddings does (ingest/store.py `insert_images`), so an index's
watermark stays true.
"""
from __future__ import annotations

import numpy as np

from ingest.db import Database
from ingest.reduce import Pca
from ingest.store import CHUNK_ROWS, as_array, bump_embedding_seq, raw_cursor, vector_query


def save_pca(db: Database, collection_id: int, pca: Pca, chunk: int = CHUNK_ROWS) -> int:
    """Store a newly fitted PCA with every embedding it gives, in one transaction, and bump pca_version so
    Annoy files built before it read as stale. Raw features are read and projected `chunk` rows at a time.

    The collection row is updated first: that waits for batches being inserted with the old PCA (they hold
    the row) and makes later ones insert without embeddings. Rows without raw features lose their embedding
    (it belongs to the old PCA).
    """
    mean, components, ratio = pca.to_bytes()
    with db.begin() as conn:
        cur = raw_cursor(conn)
        cur.execute(
            "UPDATE collections SET pca_mean = %s, pca_components = %s, pca_explained_variance = %s, pca_dims = %s, "
            "pca_version = pca_version + 1, embedding_seq = embedding_seq + 1, updated_at = now() WHERE id = %s "
            "RETURNING pca_version, embedding_seq",
            (mean, components, ratio, pca.dims, collection_id),
        )
        version, seq = cur.fetchone()
        cur.execute("CREATE TEMP TABLE new_embeddings (id bigint, embedding vector) ON COMMIT DROP")
        last = 0
        while True:
            cur.execute(f"{vector_query('raw')} AND i.id > %s ORDER BY i.id LIMIT %s", (collection_id, last, chunk), binary=True)
            rows = cur.fetchall()
            if not rows:
                break
            ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            copy_rows(cur, ids, pca.project(np.stack([as_array(r[1]) for r in rows])))
            last = int(ids[-1])
        cur.execute("UPDATE images SET embedding = n.embedding, embedding_seq = %s FROM new_embeddings n"
                    " WHERE images.collection_id = %s AND images.id = n.id", (seq, collection_id))
        cur.execute("UPDATE images SET embedding = NULL WHERE collection_id = %s AND embedding IS NOT NULL AND embedding_seq <> %s",
                    (collection_id, seq))
        return version


def write_embeddings(db: Database, collection_id: int, ids: np.ndarray, embeddings: np.ndarray) -> None:
    """Set images.embedding for many rows of a collection at once, stamped with a new embedding_seq."""
    with db.begin() as conn:
        cur = raw_cursor(conn)
        seq, _, _ = bump_embedding_seq(cur, collection_id)
        cur.execute("CREATE TEMP TABLE new_embeddings (id bigint, embedding vector) ON COMMIT DROP")
        copy_rows(cur, ids, embeddings)
        cur.execute("UPDATE images SET embedding = n.embedding, embedding_seq = %s FROM new_embeddings n "
                    "WHERE images.id = n.id AND images.collection_id = %s", (seq, collection_id))


def copy_rows(cur, ids: np.ndarray, embeddings: np.ndarray) -> None:
    """COPY (id, embedding) pairs into the transaction's new_embeddings table."""
    with cur.copy("COPY new_embeddings FROM STDIN WITH (FORMAT BINARY)") as copy:
        copy.set_types(["int8", "vector"])
        for i, e in zip(ids.tolist(), embeddings):
            copy.write_row((i, e))
