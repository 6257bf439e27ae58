"""Search engines, one shape: `search(vector, k, filter) -> list[Hit]`.

ExactSearch ("pgvector") is exact: a plain `ORDER BY embedding <-> q LIMIT k`, with index scans switched
off so an approximate index can never change the answer. AnnoySearch ("annoy") is fast and approximate:
the collection's Annoy file (opened by mmap once per process) for the rows it was built from, merged with
an exact search of the rows written since (its delta). HnswSearch ("hnsw") is pgvector's HNSW index on the
collection, approximate and always up to date. All see only the collection's rows, whatever the filter says
(ingest.filters), and whether an index can answer is decided from the collection row, never by scanning images.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ingest.annoy_index import METRIC, read_sidecar, sidecar_path, staleness
from ingest.db import Database, read_only
from ingest.errors import IndexFileError, RisError
from ingest.filters import Filter
from ingest.reduce import normalize
from ingest.store import CollectionRow, raw_cursor

ENGINES = ("pgvector", "annoy", "hnsw")  # exact SQL, fast approximate file, approximate index in PostgreSQL
SEARCH_K_FACTOR = 2  # Annoy's search_k, in multiples of its default (trees x items asked for)
DEFAULT_EF_SEARCH = 800  # HNSW candidate list per query: at 1M rows recall@10 0.971, 7.3 ms p50; 200 gave 0.89-0.95 (bench/scale.py)


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


def ranked(rows) -> list[Hit]:
    """Hits from (id, path, label, distance) rows, nearest first."""
    return [Hit(rank, r[0], r[1], r[2], float(r[3])) for rank, r in enumerate(rows, 1)]


def run_filtered(db: Database, sql: str, params: dict, flt: Filter, *, timeout: str | None, exact: bool = False) -> list[tuple]:
    """Run one filtered query; a user's --where runs read-only, as the reader role, under the timeout."""
    with db.begin() as conn:
        cur = filtered_cursor(conn, flt, timeout=timeout, exact=exact)
        cur.execute(sql, params)
        return cur.fetchall()


def filtered_cursor(conn, flt: Filter, *, timeout: str | None, exact: bool = False):
    """A cursor in `conn`'s transaction, read-only as the reader role if the filter has a user's --where."""
    if flt.where is not None:
        read_only(conn, timeout=timeout)
    cur = raw_cursor(conn)
    if exact:  # an HNSW or IVFFlat index on images would answer approximately
        cur.execute("SELECT set_config('enable_indexscan', 'off', true), set_config('enable_bitmapscan', 'off', true)")
    return cur


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
        return ranked(rows)


class RawSearch:
    """Exact k nearest neighbours over the stored 2048-d features, normalised as at ingest (`--space raw`):
    the reference project's first method, no PCA. The filter picks the collection's rows first; only then
    are their features joined, so a --where still sees images' columns only. Every row is scanned (8 KB each)."""

    def __init__(self, db: Database, coll: CollectionRow, *, timeout: str | None = None):
        self.db = db
        self.coll = coll
        self.timeout = timeout

    def search(self, vector: np.ndarray, k: int, flt: Filter = Filter()) -> list[Hit]:
        """`vector` is a raw feature vector, normalised here by the function ingest uses (`ingest.reduce.normalize`)."""
        q = normalize(np.asarray(vector, dtype=np.float32).reshape(1, -1))[0]
        rows_sql = flt.scoped("id, path, label", "true")
        sql = (f"SELECT r.id, r.path, r.label, l2_normalize(f.raw) <-> %(q)s AS distance FROM ({rows_sql}) AS r"
               " JOIN features f ON f.image_id = r.id ORDER BY distance, r.id LIMIT %(k)s")
        rows = run_filtered(self.db, sql, flt.params(self.coll.id) | {"q": q, "k": k}, flt, timeout=self.timeout, exact=True)
        return ranked(rows)


class AnnoySearch:
    """Approximate k nearest neighbours: the Annoy file for the rows it holds, exact SQL for the rows written
    since it was built (the delta), merged by distance. Rows removed since are dropped by the row lookup, and
    the file is asked for as many more items as were removed, so k rows still come back."""

    _open: dict[tuple, tuple] = {}  # one mmap per built file and process

    def __init__(self, db: Database, coll: CollectionRow, annoy_dir: Path, *, search_k: int = -1, timeout: str | None = None):
        self.db = db
        self.coll = coll
        self.search_k = search_k
        self.timeout = timeout
        self.annoy_dir = annoy_dir
        self.opened_at = self.sidecar_stamp()
        self.sidecar, self.index, self.ids = self.open_checked()
        self.removed = 0  # rows removed since the build, as last seen: the file is asked for that many more

    def sidecar_stamp(self) -> tuple | None:
        try:
            stat = sidecar_path(self.annoy_dir, self.coll.name).stat()
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns

    @property
    def hint(self) -> str:
        return f"; run `ingest index --collection {self.coll.name}`"

    def open_checked(self):
        """Open the file, refusing anything that could return wrong rows: missing, stale, damaged, other dims."""
        from annoy import AnnoyIndex

        sidecar = read_sidecar(self.annoy_dir, self.coll.name)
        problem = staleness(sidecar, self.annoy_dir, self.coll)
        if problem:
            raise IndexFileError(problem + self.hint)
        path = self.annoy_dir / sidecar.file
        stat = path.stat()
        key = (path, stat.st_ino, stat.st_size, stat.st_mtime_ns)  # a rebuilt or damaged file is a new key
        if key not in self._open:
            index = AnnoyIndex(sidecar.dims, METRIC)
            try:
                index.load(str(path))
                ids = np.load(self.annoy_dir / sidecar.ids_file, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise IndexFileError(f"cannot open the Annoy index {path}: {e}{self.hint}") from None
            if index.get_n_items() != sidecar.items or len(ids) != sidecar.items or index.f != self.coll.pca_dims:
                raise IndexFileError(f"the Annoy index {path} is damaged or of other dimensions{self.hint}")
            self._open[key] = (index, ids)
        return (sidecar, *self._open[key])

    def search(self, vector: np.ndarray, k: int, flt: Filter = Filter()) -> list[Hit]:
        """Over-fetch when filtering or after removals, keep what passes, add the delta's nearest; fewer than k
        may remain only when a filter leaves fewer. One statement a query as a rule (a second one only when it
        shows more rows removed than the file was asked to make up for), outside a transaction unless a
        --where must run read-only: at a million rows each round trip to the server costs about as much as
        the Annoy lookup itself."""
        q = np.asarray(vector, dtype=np.float32)
        stamp = self.sidecar_stamp()
        if stamp != self.opened_at:  # rebuilt since (a load passed the delta threshold): switch over
            self.opened_at = stamp
            self.sidecar, self.index, self.ids = self.open_checked()
            self.removed = 0
        with self.cursor(flt) as cur:
            while True:
                found, rows, removed = self.lookup(cur, q, k, flt)
                if removed <= self.removed:
                    break
                self.removed = removed  # rows removed since the build: ask the file for that many more
        merged = sorted((found.get(r[0], r[3]), r[0], r[1], r[2]) for r in rows)
        return ranked((i, path, label, d) for d, i, path, label in merged[:k])

    @contextmanager
    def cursor(self, flt: Filter):
        """A cursor outside any transaction (one statement needs none), or in a read-only one for a --where."""
        if flt.where is not None:
            with self.db.begin() as conn:
                yield filtered_cursor(conn, flt, timeout=self.timeout)
            return
        with self.db.connect() as conn:
            yield raw_cursor(conn.execution_options(isolation_level="AUTOCOMMIT"))

    def lookup(self, cur, q: np.ndarray, k: int, flt: Filter) -> tuple[dict, list, int]:
        """The file's nearest items, their rows (those still stored that pass the filter) and the delta's k
        nearest, with the collection row read by the same statement; refuse if its PCA changed since the build."""
        wanted = k + (1 if flt.exclude is not None else 0) + self.removed
        fetch = min(max(wanted * 10, 100) if flt.narrows else wanted, self.sidecar.items)
        items, distances = self.index.get_nns_by_vector(q.tolist(), fetch, search_k=self.search_k_for(fetch), include_distances=True)
        found = dict(zip(self.ids[items].tolist(), distances))
        cur.execute(self.lookup_sql(flt), flt.params(self.coll.id) | {"ids": list(found), "q": q, "k": k, "seq": self.sidecar.embedding_seq})
        rows = cur.fetchall()
        if not rows:
            raise RisError(f"collection {self.coll.name!r} was removed")
        pca_dims, pca_version, removed_rows = rows[0][4:]
        if (pca_dims, pca_version) != (self.sidecar.dims, self.sidecar.pca_version):
            raise IndexFileError(f"the Annoy index of {self.coll.name!r} is stale (the PCA changed since it was built){self.hint}")
        return found, [r[:4] for r in rows if r[0] is not None], max(0, removed_rows - self.sidecar.removed_rows)

    def search_k_for(self, n: int) -> int:
        """Annoy's search_k for n items: the one given, else twice Annoy's own default (trees x n). At 1M rows
        its default gave recall@10 0.929, twice that 0.989 for 0.12 ms more (bench/scale.py's data)."""
        return self.search_k if self.search_k > 0 else SEARCH_K_FACTOR * self.sidecar.trees * n

    def ids_near(self, vector: np.ndarray, n: int) -> list[int]:
        """Image ids of the file's n nearest items to a vector: the bare index lookup, without rows or delta."""
        q = np.asarray(vector, dtype=np.float32).tolist()
        return self.ids[self.index.get_nns_by_vector(q, n, search_k=self.search_k_for(n))].tolist()

    def ids_near_image(self, image_id: int, n: int) -> list[int]:
        """Image ids of the file's n nearest items to a stored image (itself first), or [] if it is not in the file."""
        item = int(np.searchsorted(self.ids, image_id))
        if item >= len(self.ids) or self.ids[item] != image_id:
            return []
        return self.ids[self.index.get_nns_by_item(item, n, search_k=self.search_k_for(n))].tolist()

    @staticmethod
    def lookup_sql(flt: Filter) -> str:
        """The file's candidates that are still rows and pass the filter, plus the delta's k nearest that pass
        it, each beside the collection row (which comes back alone when nothing matched)."""
        indexed = flt.scoped("id, path, label, NULL::float8 AS distance", "id = ANY(%(ids)s)")
        delta = flt.scoped("id, path, label, embedding <-> %(q)s AS distance", "embedding_seq > %(seq)s AND embedding IS NOT NULL")
        return (f"WITH hits AS ({indexed} UNION ALL ({delta} ORDER BY distance, id LIMIT %(k)s))"
                " SELECT h.id, h.path, h.label, h.distance, c.pca_dims, c.pca_version, c.removed_rows"
                " FROM collections c LEFT JOIN hits h ON true WHERE c.id = %(c)s")


class HnswSearch:
    """Approximate k nearest neighbours from the collection's pgvector HNSW index, always up to date.

    Sorting is switched off for the query, so the planner answers from the index (an ordered scan) even when
    its statistics make a small collection look cheaper to sort. Filtered queries use pgvector's iterative index scans (relaxed order, re-sorted here), so a label that
    holds 1% of the rows still gives k results."""

    def __init__(self, db: Database, coll: CollectionRow, *, ef_search: int | None = None, timeout: str | None = None):
        from ingest.hnsw import has_index

        self.db = db
        self.coll = coll
        self.ef_search = ef_search or DEFAULT_EF_SEARCH
        self.timeout = timeout
        if not 1 <= self.ef_search <= 1000:
            raise RisError(f"--ef-search must be between 1 and 1000, got {self.ef_search}")
        if coll.pca is None or not has_index(db, coll.id, coll.pca_dims):
            raise IndexFileError(f"collection {coll.name!r} has no HNSW index; run `ingest index --hnsw --collection {coll.name}`")

    def sql(self, flt: Filter) -> str:
        """Ordered by the indexed expression, within the index's collection: the only shape the planner matches."""
        distance = f"embedding::vector({int(self.coll.pca_dims)}) <-> %(q)s"
        return flt.scoped(f"id, path, label, {distance} AS distance", "embedding IS NOT NULL") + f" ORDER BY {distance} LIMIT %(k)s"

    def run(self, vector: np.ndarray, k: int, flt: Filter, *, explain: bool = False) -> list[tuple]:
        with self.db.begin() as conn:
            cur = filtered_cursor(conn, flt, timeout=self.timeout)
            cur.execute(
                "SELECT set_config('plan_cache_mode', 'force_custom_plan', true), set_config('enable_sort', 'off', true),"
                " set_config('hnsw.ef_search', %s, true), set_config('hnsw.iterative_scan', %s, true)",
                (str(min(1000, max(self.ef_search, k))), "relaxed_order" if flt.narrows or flt.exclude is not None else "off"),
            )
            cur.execute(("EXPLAIN " if explain else "") + self.sql(flt),
                        flt.params(self.coll.id) | {"q": np.asarray(vector, dtype=np.float32), "k": k})
            return cur.fetchall()

    def search(self, vector: np.ndarray, k: int, flt: Filter = Filter()) -> list[Hit]:
        rows = sorted(self.run(vector, k, flt), key=lambda r: (r[3], r[0]))  # relaxed order: nearly sorted
        return ranked(rows)

    def explain(self, vector: np.ndarray, k: int, flt: Filter = Filter()) -> str:
        """The plan of exactly the query `search` runs (tests prove the index is used)."""
        return "\n".join(r[0] for r in self.run(vector, k, flt, explain=True))


def make_engine(name: str, db: Database, coll: CollectionRow, annoy_dir: Path, *, search_k: int = -1, ef_search: int | None = None,
                timeout: str | None = None):
    """The search engine called `name` (one of ENGINES) over one collection."""
    if name == "pgvector":
        return ExactSearch(db, coll, timeout=timeout)
    if name == "annoy":
        return AnnoySearch(db, coll, annoy_dir, search_k=search_k, timeout=timeout)
    if name == "hnsw":
        return HnswSearch(db, coll, ef_search=ef_search, timeout=timeout)
    raise RisError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
