"""`ingest remove`: a collection goes with everything derived from it, so nothing stale is left to search.

Its row is deleted under the collection lock (a load finishing meanwhile waits, then finds it gone); images,
features, paths, failures and fine-tuning splits follow by ON DELETE CASCADE; then its pgvector HNSW index
(a partial index on `images`, which a cascade does not drop) and its Annoy files.
"""
from __future__ import annotations

import sqlalchemy as sa

from ingest import hnsw, locks
from ingest.annoy_index import remove_index_files
from ingest.collection import Collection


def describe(coll: Collection) -> str:
    """What removing it deletes, for the confirmation question."""
    with coll.db.connect() as conn:
        images, paths = conn.execute(sa.text("SELECT (SELECT count(*) FROM images WHERE collection_id = :c),"
                                             " (SELECT count(*) FROM image_paths WHERE collection_id = :c)"), {"c": coll.id}).one()
    return f"collection {coll.name!r}: {images} images, {paths} paths, and its index files in {coll.settings.annoy_dir}"


def remove_collection(coll: Collection) -> None:
    with coll.db.begin() as conn:
        locks.lock_in_transaction(conn, locks.COLLECTION, of=coll.id)
        conn.execute(sa.text("DELETE FROM collections WHERE id = :c"), {"c": coll.id})
    hnsw.drop(coll.db, coll.id)
    remove_index_files(coll.settings.annoy_dir, coll.name)
