"""How many rows a collection has, counted in SQL: what `ingest status`, `ingest remove`, the web server's listing
and the index checks (`Collection.index_delta`, `refit_due`, `check_searchable`) show or decide by.
"""
from __future__ import annotations

from dataclasses import dataclass

from ingest.db import Database


@dataclass(frozen=True)
class CollectionCounts:
    """Pictures stored, distinct labels among them, and files that could not be used."""

    images: int
    labels: int
    failures: int


def collection_counts(db: Database) -> dict[int, CollectionCounts]:
    """collection id -> its counts, for every collection, in one statement (`ingest status`)."""
    with db.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT c.id AS collection_id, count(i.id) AS images, count(DISTINCT i.label) AS labels,"
            " (SELECT count(*) FROM ingest_failures f WHERE f.collection_id = c.id) AS failures"
            " FROM collections c LEFT JOIN images i ON i.collection_id = c.id GROUP BY c.id"
        )
        return {r.collection_id: CollectionCounts(r.images, r.labels, r.failures) for r in rows}


def images_and_paths(db: Database, collection_id: int) -> tuple[int, int]:
    """(pictures stored, files recorded) of a collection: what removing it deletes."""
    with db.connect() as conn:
        row = conn.exec_driver_sql("SELECT (SELECT count(*) FROM images WHERE collection_id = %(c)s) AS images,"
                                   " (SELECT count(*) FROM image_paths WHERE collection_id = %(c)s) AS paths",
                                   {"c": collection_id}).one()
    return row.images, row.paths


def count_searchable(db: Database, collection_id: int) -> int:
    """Pictures of a collection that have an embedding (a search can find them)."""
    with db.connect() as conn:
        return conn.exec_driver_sql("SELECT count(*) FROM images WHERE collection_id = %s AND embedding IS NOT NULL",
                                    (collection_id,)).scalar()


def label_counts(db: Database, collection_id: int) -> dict[str, int]:
    """label -> searchable pictures with it, in label order (unlabelled pictures left out)."""
    with db.connect() as conn:
        rows = conn.exec_driver_sql("SELECT label, count(*) AS images FROM images WHERE collection_id = %s AND embedding IS NOT NULL"
                                    " AND label IS NOT NULL GROUP BY label ORDER BY label", (collection_id,))
        return {r.label: r.images for r in rows}


def delta_rows(db: Database, collection_id: int, after_seq: int, limit: int) -> int:
    """How many searchable rows were written after embedding_seq `after_seq`, counting at most `limit` + 1
    (an index probe on (collection_id, embedding_seq): the cost follows the delta, not the collection)."""
    with db.connect() as conn:
        return conn.exec_driver_sql(
            "SELECT count(*) FROM (SELECT 1 FROM images WHERE collection_id = %s AND embedding_seq > %s"
            " AND embedding IS NOT NULL LIMIT %s) d", (collection_id, after_seq, limit + 1),
        ).scalar()


def pca_growth(db: Database, collection_id: int) -> tuple[int, int]:
    """(pictures stored, those of them stored by the time the PCA was last fitted): `save_pca` alone sets
    collections.updated_at, and images.ingested_at is when each picture went in (`Collection.refit_due`)."""
    with db.connect() as conn:
        row = conn.exec_driver_sql("SELECT count(*) AS stored, count(*) FILTER (WHERE i.ingested_at <= c.updated_at) AS at_fit"
                                   " FROM images i JOIN collections c ON c.id = i.collection_id WHERE i.collection_id = %s",
                                   (collection_id,)).one()
    return row.stored, row.at_fit
