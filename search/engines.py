"""Two engines, one shape: `search(vector, k, where) -> list[Hit]`.

PgvectorEngine is exact: a plain `ORDER BY embedding <-> :q LIMIT :k`, with index scans switched off
so an approximate index can never change the answer. AnnoyEngine is fast and approximate: the
collection's Annoy file, opened by mmap once per process and refused if it does not match the table.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ingest.annoy_index import METRIC, index_path, read_sidecar, staleness
from ingest.errors import IndexFileError
from ingest.store import CollectionInfo, embedding_state
from search.sql import read_only


@dataclass(frozen=True)
class Hit:
    """One neighbour: its rank (1 = nearest), the image, and its euclidean distance to the query."""

    rank: int
    id: int
    path: str
    label: str | None
    distance: float

    def to_dict(self) -> dict:
        return asdict(self)


def vector_literal(vector: np.ndarray) -> str:
    """pgvector's text form, '[1.0,2.0,...]', bound as a parameter and cast with ::vector."""
    return "[" + ",".join(repr(float(x)) for x in np.asarray(vector, dtype=np.float32)) + "]"


class PgvectorEngine:
    """Exact k nearest neighbours in SQL."""

    name = "pgvector"

    def __init__(self, engine: Engine, coll: CollectionInfo):
        self.engine = engine
        self.coll = coll

    def search(self, vector: np.ndarray, k: int, where: str | None = None, exclude: int | None = None) -> list[Hit]:
        conditions = ["collection_id = :c", "embedding IS NOT NULL"]
        if exclude is not None:
            conditions.append("id <> :exclude")
        if where:
            conditions.append(f"({where})")
        sql = (
            "SELECT id, path, label, embedding <-> CAST(:q AS vector) AS distance FROM images"
            f" WHERE {' AND '.join(conditions)} ORDER BY embedding <-> CAST(:q AS vector), id LIMIT :k"
        )
        with self.engine.begin() as conn:
            if where:
                read_only(conn)
            conn.execute(sa.text("SELECT set_config('enable_indexscan', 'off', true), set_config('enable_bitmapscan', 'off', true)"))
            rows = conn.execute(
                sa.text(sql), {"c": self.coll.id, "q": vector_literal(vector), "k": k, "exclude": exclude}
            ).all()
        return [Hit(rank, r.id, r.path, r.label, float(r.distance)) for rank, r in enumerate(rows, 1)]


class AnnoyEngine:
    """Approximate k nearest neighbours from the collection's Annoy file."""

    name = "annoy"
    _open: dict[tuple, object] = {}  # one mmap per file version and process

    def __init__(self, engine: Engine, coll: CollectionInfo, annoy_dir: Path, search_k: int = -1):
        self.engine = engine
        self.coll = coll
        self.search_k = search_k
        self.path = index_path(annoy_dir, coll.name)
        self.index = self.open_checked()

    def open_checked(self):
        """Open the file, refusing anything that could return wrong rows: missing, stale, damaged, other dims."""
        from annoy import AnnoyIndex

        hint = f"; run `ingest index --collection {self.coll.name}`"
        sidecar = read_sidecar(self.path)
        problem = staleness(sidecar, self.path, embedding_state(self.engine, self.coll.id))
        if problem:
            raise IndexFileError(problem + hint)
        stat = self.path.stat()
        key = (self.path, stat.st_ino, stat.st_size, stat.st_mtime_ns)  # a rebuilt or damaged file is a new key
        if key in self._open:
            return self._open[key]
        index = AnnoyIndex(self.coll.pca_dims, METRIC)
        try:
            index.load(str(self.path))
        except OSError as e:
            raise IndexFileError(f"cannot open the Annoy index {self.path}: {e}{hint}") from None
        if index.get_n_items() != sidecar.max_id + 1 or index.f != self.coll.pca_dims:
            raise IndexFileError(f"the Annoy index {self.path} is damaged or of other dimensions{hint}")
        self._open[key] = index
        return index

    def search(self, vector: np.ndarray, k: int, where: str | None = None, exclude: int | None = None) -> list[Hit]:
        """Over-fetch when filtering, then keep the first k that pass; fewer than k may remain."""
        wanted = k + (1 if exclude is not None else 0)
        fetch = wanted if not where else max(wanted * 10, 100)
        ids, distances = self.index.get_nns_by_vector(
            np.asarray(vector, dtype=np.float32).tolist(), fetch, search_k=self.search_k, include_distances=True
        )
        rows = self.rows(ids, where)
        hits = []
        for item, distance in zip(ids, distances):
            if item == exclude or item not in rows:
                continue
            path, label = rows[item]
            hits.append(Hit(len(hits) + 1, item, path, label, float(distance)))
            if len(hits) == k:
                break
        return hits

    def rows(self, ids: list[int], where: str | None) -> dict[int, tuple[str, str | None]]:
        """path and label of the ids Annoy returned, keeping only rows of this collection that match `where`."""
        condition = f" AND ({where})" if where else ""
        with self.engine.begin() as conn:
            if where:
                read_only(conn)
            result = conn.execute(
                sa.text(f"SELECT id, path, label FROM images WHERE collection_id = :c AND id = ANY(:ids){condition}"),
                {"c": self.coll.id, "ids": list(ids)},
            )
            return {r.id: (r.path, r.label) for r in result}


def brute_force(ids: np.ndarray, vectors: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The baseline: exact euclidean k-NN in numpy over the same vectors (ties broken by id, as in SQL)."""
    diff = np.asarray(vectors, dtype=np.float64) - np.asarray(query, dtype=np.float64)  # no copy if already float64
    distances = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    order = np.lexsort((ids, distances))[:k]
    return ids[order], distances[order]
