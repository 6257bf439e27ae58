"""`ingest remove`: a collection goes with everything derived from it, so nothing stale is left to search.

Its row is deleted under the collection lock (a load finishing meanwhile waits, then finds it gone); images,
features, paths, failures and fine-tuning splits follow by ON DELETE CASCADE; then its pgvector HNSW index
(a partial index on `images`, which a cascade does not drop) and its Annoy files.
"""
from __future__ import annotations

from ingest import hnsw, locks, store
from ingest.annoy_index import remove_index_files
from ingest.collection import Collection
from ingest.counts import images_and_paths


def describe(coll: Collection) -> str:
    """What removing it deletes, for the confirmation question."""
    images, paths = images_and_paths(coll.db, coll.id)
    return f"collection {coll.name!r}: {images} images, {paths} paths, and its index files in {coll.settings.annoy_dir}"


def remove_collection(coll: Collection) -> None:
    with coll.db.begin() as conn:
        locks.lock_in_transaction(conn, locks.COLLECTION, of=coll.id)
        store.delete_row(conn, coll.id)
    hnsw.drop(coll.db, coll.id)
    remove_index_files(coll.settings.annoy_dir, coll.name)
