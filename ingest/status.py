"""`ingest status`: what is stored, per collection (files, copies, files gone), and whether its Annoy file matches the table."""
from __future__ import annotations

from ingest.collection import Collection
from ingest.config import Settings
from ingest.counts import collection_counts
from ingest.db import Database
from ingest.hnsw import has_index
from ingest.image_paths import path_counts


def files(db: Database, collection_id: int) -> dict:
    """Files recorded (paths), extra copies of stored pictures (duplicates), and files gone from disk plus pictures
    no file holds any more (missing; one stat a path)."""
    counts = path_counts(db, collection_id)
    return {"paths": counts["paths"], "duplicates": counts["duplicate_paths"], "missing": counts["missing"] + counts["orphans"]}


def status(db: Database, settings: Settings) -> dict:
    """The status as a dict, in the shape `ingest status --json` prints."""
    counts = collection_counts(db)
    collections = []
    for coll in Collection.all(db, settings):
        sidecar = coll.sidecar()
        row = counts[coll.id]
        collections.append(
            {
                "name": coll.name,
                "images": row.images,
                "labels": row.labels,
                "dims": coll.dims,
                "weights": coll.weights,
                "precision": coll.precision,
                "runtime": coll.runtime,
                "failures": row.failures,
                **files(db, coll.id),
                "annoy": {"path": str(coll.annoy_path), "items": sidecar.items if sidecar else 0, "fresh": coll.index_problem() is None,
                          "delta": coll.index_delta(settings.annoy_max_delta) if sidecar else None},
                "hnsw": coll.row.hnsw and has_index(db, coll.id, coll.dims),
            }
        )
    return {"database": db.kind, "collections": collections}
