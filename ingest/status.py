"""`ingest status`: what is stored, per collection, and whether its Annoy file matches the table."""
from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from ingest.annoy_index import index_path, read_sidecar, staleness
from ingest.db import Database
from ingest.store import embedding_state, list_collections


def status(db: Database, annoy_dir: Path) -> dict:
    """The status as a dict, in the shape `ingest status --json` prints."""
    collections = []
    with db.engine.connect() as conn:
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
    for coll in list_collections(db.engine):
        ann = index_path(annoy_dir, coll.name)
        sidecar = read_sidecar(ann)
        row = counts[coll.id]
        collections.append(
            {
                "name": coll.name,
                "images": row.images,
                "labels": row.labels,
                "dims": coll.pca_dims,
                "weights": coll.weights,
                "failures": row.failures,
                "annoy": {
                    "path": str(ann),
                    "items": sidecar.items if sidecar else 0,
                    "fresh": staleness(sidecar, ann, embedding_state(db.engine, coll.id)) is None,
                },
            }
        )
    return {"database": db.kind, "collections": collections}
