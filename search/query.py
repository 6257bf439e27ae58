"""A query becomes a vector exactly as stored images did.

A stored image (by --id, or a file with the same sha256) reuses its stored embedding: no CNN, no
TensorFlow import. Any other picture goes through ingest's own decoding, the collection's own weights
(refused if they cannot be loaded or differ) and the collection's PCA.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ingest.errors import CollectionError, ImageError, RisError
from ingest.images import decode_image, read_file
from ingest.store import CollectionInfo, as_array, vector_cursor

_extractors: dict[str, object] = {}  # weights -> FeatureExtractor: build the model once per process


@dataclass(frozen=True)
class Query:
    """The vector to search with; `image_id` is set when the query is an image of the collection."""

    vector: np.ndarray
    image_id: int | None = None
    path: str | None = None
    label: str | None = None


def stored(engine: Engine, coll: CollectionInfo, column: str, value) -> Query | None:
    """The stored embedding of the collection's image with this id or sha256, if there is one."""
    with engine.connect() as conn:
        cur = vector_cursor(conn)
        cur.execute(
            f"SELECT id, path, label, embedding FROM images WHERE collection_id = %s AND {column} = %s AND embedding IS NOT NULL",
            (coll.id, value),
        )
        row = cur.fetchone()
    return Query(as_array(row[3]), row[0], row[1], row[2]) if row else None


def query_by_id(engine: Engine, coll: CollectionInfo, image_id: int) -> Query:
    found = stored(engine, coll, "id", image_id)
    if found is None:
        raise CollectionError(f"no image with id {image_id} in collection {coll.name!r}")
    return found


def query_by_file(engine: Engine, coll: CollectionInfo, path: Path) -> Query:
    """Stored embedding if the collection holds the same picture, else embed it with the collection's model."""
    if not path.exists():
        raise RisError(f"no such file: {path}")
    try:
        data = read_file(path)
        found = stored(engine, coll, "sha256", hashlib.sha256(data).hexdigest())
        if found is not None:
            return found
        pixels = decode_image(data).pixels
    except ImageError as e:
        raise RisError(f"cannot use {path} as a query: {e}") from None
    raw = extractor_for(coll).embed(pixels[np.newaxis])
    return Query(coll.pca.project(raw)[0], path=str(path.absolute()))


def extractor_for(coll: CollectionInfo):
    """The collection's own model, checked against the fingerprint its vectors were made with."""
    from ingest.features import FeatureExtractor

    if coll.weights not in _extractors:
        _extractors[coll.weights] = FeatureExtractor(coll.weights)
    extractor = _extractors[coll.weights]
    extractor.check_matches(coll.weights_fingerprint, coll.name)
    return extractor


def check_searchable(engine: Engine, coll: CollectionInfo) -> None:
    """An empty or unfinished collection cannot answer; say what to run."""
    with engine.connect() as conn:
        n = conn.execute(
            sa.text("SELECT count(*) FROM images WHERE collection_id = :c AND embedding IS NOT NULL"), {"c": coll.id}
        ).scalar()
    if coll.pca is None or n == 0:
        raise CollectionError(f"collection {coll.name!r} has no searchable images yet; run `ingest load` (or `ingest index`)")
