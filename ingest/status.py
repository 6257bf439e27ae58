"""`ingest status`: what is stored, per collection, and whether its Annoy file matches the table."""
from __future__ import annotations

import sqlalchemy as sa

from ingest.annoy_index import read_sidecar
from ingest.collection import Collection
from ingest.config import Settings
from ingest.db import Database


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
        sidecar = read_sidecar(coll.annoy_path)
        row = counts[coll.id]
        collections.append(
            {
                "name": coll.name,
                "images": row.images,
                "labels": row.labels,
                "dims": coll.dims,
                "weights": coll.weights,
                "failures": row.failures,
                "annoy": {"path": str(coll.annoy_path), "items": sidecar.items if sidecar else 0, "fresh": coll.index_problem() is None},
            }
        )
    return {"database": db.kind, "collections": collections}
