"""`similar`: the library call behind `search similar` (and the report's neighbour grids)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ingest.db import Database
from ingest.errors import RisError
from ingest.store import CollectionInfo, resolve_collection
from search import ENGINES
from search.engines import AnnoyEngine, Hit, PgvectorEngine
from search.query import Query, check_searchable, query_by_file, query_by_id


@dataclass(frozen=True)
class Result:
    collection: str
    engine: str
    query: Query
    hits: list[Hit]
    note: str | None = None  # e.g. when a filter left fewer than k


def make_engine(db: Database, coll: CollectionInfo, engine: str, annoy_dir: Path, search_k: int = -1):
    if engine == "pgvector":
        return PgvectorEngine(db.engine, coll)
    if engine == "annoy":
        return AnnoyEngine(db.engine, coll, annoy_dir, search_k)
    raise RisError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")


def label_condition(label: str | None, where: str | None) -> str | None:
    """--label and --where as one SQL condition on images (the label is quoted, never interpolated raw)."""
    parts = []
    if label is not None:
        parts.append("label = " + "'" + label.replace("'", "''") + "'")
    if where:
        parts.append(f"({where})")
    return " AND ".join(parts) or None


def similar(
    db: Database,
    annoy_dir: Path,
    collection: str | None = None,
    image: Path | None = None,
    image_id: int | None = None,
    engine: str = "pgvector",
    k: int = 10,
    label: str | None = None,
    where: str | None = None,
    exclude_self: bool = False,
    search_k: int = -1,
) -> Result:
    """The k images of a collection nearest to an image file or a stored image id."""
    if (image is None) == (image_id is None):
        raise RisError("give either an image file or --id")
    if k < 1:
        raise RisError(f"k must be at least 1, got {k}")
    coll = resolve_collection(db.engine, collection)
    check_searchable(db.engine, coll)
    searcher = make_engine(db, coll, engine, annoy_dir, search_k)
    query = query_by_id(db.engine, coll, image_id) if image_id is not None else query_by_file(db.engine, coll, image)
    exclude = query.image_id if exclude_self else None
    hits = searcher.search(query.vector, k, label_condition(label, where), exclude)
    note = f"only {len(hits)} of {k} neighbours match the filter" if len(hits) < k and (label or where) else None
    return Result(coll.name, engine, query, hits, note)
