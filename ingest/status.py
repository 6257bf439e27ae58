"""`ingest status`: what is stored, per collection (files, copies, files gone), and whether its Annoy file matches the table."""
from __future__ import annotations

import sqlalchemy as sa

from ingest.collection import Collection
from ingest.config import Settings
from ingest.db import Database
from ingest.hnsw import has_index
from ingest.paths import path_counts


def files(db: Database, collection_id: int) -> dict:
    """Files recorded (paths), extra copies of stored pictures (duplicates), and files gone from disk plus pictures
    no file holds any more (missing; one stat a path)."""
    counts = path_counts(db, collection_id)
    return {"paths": counts["paths"], "duplicates": counts["duplicate_paths"], "missing": counts["missing"] + counts["orphans"]}


def status(db: Database, settings: Settings) -> dict:
    """The status as a dict, in the shape `ingest status --json` prints."""
    with db.connect() as conn:
        counts = {
            r.collection_id: r
            for r in conn.execute(
                sa.text(
                    "SELECT c.id AS collection_id, count(i.id) AS images, count(DISTINCT i.label) AS labels,"
                    " (SELECT count(*) FROM ingest_failures f WHERE f.collection_id = c.id) AS failures"
                    " FROM collections c LEFT JOIN images i ON i.collection_id = c.id GROUP BY c.id"
                )
            )
        }
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
