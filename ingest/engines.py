"""Two search engines, one shape: `search(vector, k, filter) -> list[Hit]`.

ExactSearch ("pgvector") is exact: a plain `ORDER BY embedding <-> q LIMIT k`, with index scans switched
off so an approximate index can never change the answer. AnnoySearch ("annoy") is fast and approximate:
the collection's Annoy file, opened by mmap once per process and refused if it does not match the table.
Both see only the collection's rows, whatever the filter says (ingest.filters).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ingest.annoy_index import METRIC, index_path, read_sidecar, staleness
from ingest.db import Database, read_only
from ingest.errors import IndexFileError, RisError
from ingest.filters import Filter
from ingest.store import CollectionRow, embedding_state, raw_cursor

ENGINES = ("pgvector", "annoy")  # exact SQL, fast approximate file


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


def run_filtered(db: Database, sql: str, params: dict, flt: Filter, *, timeout: str | None, exact: bool = False) -> list[tuple]:
    """Run one filtered query; a user's --where runs read-only, as the reader role, under the timeout."""
    with db.begin() as conn:
        if flt.where is not None:
            read_only(conn, timeout=timeout)
        cur = raw_cursor(conn)
        if exact:  # an HNSW or IVFFlat index on images would answer approximately
            cur.execute("SELECT set_config('enable_indexscan', 'off', true), set_config('enable_bitmapscan', 'off', true)")
        cur.execute(sql, params)
        return cur.fetchall()


class ExactSearch:
    """Exact k nearest neighbours in SQL."""

    def __init__(self, db: Database, coll: CollectionRow, *, timeout: str | None = None):
        self.db = db
        self.coll = coll
        self.timeout = timeout

    def search(self, vector: np.ndarray, k: int, flt: Filter = Filter()) -> list[Hit]:
        sql = flt.scoped("id, path, label, embedding <-> %(q)s AS distance", "embedding IS NOT NULL") + " ORDER BY distance, id LIMIT %(k)s"
        params = flt.params(self.coll.id) | {"q": np.asarray(vector, dtype=np.float32), "k": k}
        rows = run_filtered(self.db, sql, params, flt, timeout=self.timeout, exact=True)
        return [Hit(rank, r[0], r[1], r[2], float(r[3])) for rank, r in enumerate(rows, 1)]


class AnnoySearch:
    """Approximate k nearest neighbours from the collection's Annoy file."""

    _open: dict[tuple, object] = {}  # one mmap per file version and process

    def __init__(self, db: Database, coll: CollectionRow, annoy_dir: Path, *, search_k: int = -1, timeout: str | None = None):
        self.db = db
        self.coll = coll
        self.search_k = search_k
        self.timeout = timeout
        self.path = index_path(annoy_dir, coll.name)
        self.index = self.open_checked()

    def open_checked(self):
        """Open the file, refusing anything that could return wrong rows: missing, stale, damaged, other dims."""
        from annoy import AnnoyIndex

        hint = f"; run `ingest index --collection {self.coll.name}`"
        sidecar = read_sidecar(self.path)
        problem = staleness(sidecar, self.path, embedding_state(self.db, self.coll.id))
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

    def search(self, vector: np.ndarray, k: int, flt: Filter = Filter()) -> list[Hit]:
        """Over-fetch when filtering, then keep the first k that pass; fewer than k may remain."""
        wanted = k + (1 if flt.exclude is not None else 0)
        fetch = max(wanted * 10, 100) if flt.narrows else wanted
        ids, distances = self.index.get_nns_by_vector(
            np.asarray(vector, dtype=np.float32).tolist(), fetch, search_k=self.search_k, include_distances=True
        )
        rows = self.rows(ids, flt)
        hits = []
        for item, distance in zip(ids, distances):
            if item in rows:
                hits.append(Hit(len(hits) + 1, item, *rows[item], float(distance)))
                if len(hits) == k:
                    break
        return hits

    def rows(self, ids: list[int], flt: Filter) -> dict[int, tuple[str, str | None]]:
        """path and label of the ids Annoy returned that are rows of this collection and pass the filter."""
        sql = flt.scoped("id, path, label", "id = ANY(%(ids)s)")
        found = run_filtered(self.db, sql, flt.params(self.coll.id) | {"ids": list(ids)}, flt, timeout=self.timeout)
        return {r[0]: (r[1], r[2]) for r in found}


def make_engine(name: str, db: Database, coll: CollectionRow, annoy_dir: Path, *, search_k: int = -1, timeout: str | None = None):
    """The search engine called `name` (one of ENGINES) over one collection."""
    if name == "pgvector":
        return ExactSearch(db, coll, timeout=timeout)
    if name == "annoy":
        return AnnoySearch(db, coll, annoy_dir, search_k=search_k, timeout=timeout)
    raise RisError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
