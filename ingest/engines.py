"""Search engines: one interface (`Engine`), registered by name (`EngineName`), so callers never ask which one it is.

Every engine answers `search(vector, k, filter, args) -> list[Hit]` over one collection's rows, whatever the
filter says (ingest.filters), says whether it can answer now (`problem()`: None, or one line and the command to
run), and answers what duplicates, evaluation and audits ask of an index through methods, never its attributes.
Query-time knobs (Annoy's search_k, HNSW's ef_search) travel with each query in `QueryArgs`, as ann-benchmarks
sets them per run: the engine object, its open file and its checks, stay the same.

ExactSearch ("pgvector") is exact: a plain `ORDER BY embedding <-> q LIMIT k`, with index scans switched off so an
approximate index can never change the answer. RawSearch is the same over the raw features (`--space raw`),
not selectable by name. AnnoySearch ("annoy", ingest/annoy_engine.py) is the fast file plus an exact search of the
rows written since its build; HnswSearch ("hnsw", ingest/hnsw_engine.py) is pgvector's HNSW index.
Adding an engine: a subclass of Engine with `name` (a new EngineName member), `exact`, `problem` and `search`,
in a module imported at the end of this one; subclassing registers it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar, Iterator

import numpy as np
from pgvector import HalfVector

from ingest import store
from ingest.db import Database
from ingest.errors import RisError
from ingest.filters import Filter
from ingest.reader import reading
from ingest.reduce import normalize
from ingest.store import CollectionRow, raw_cursor

if TYPE_CHECKING:
    from ingest.config import Settings


class EngineName(StrEnum):
    """The engines a search can name (`--engine`, the web API's `engine`), in the order they are offered."""

    PGVECTOR = "pgvector"  # exact SQL
    ANNOY = "annoy"  # fast approximate file, plus an exact search of the rows written since its build
    HNSW = "hnsw"  # approximate index inside PostgreSQL, always up to date


ENGINES: tuple[str, ...] = tuple(name.value for name in EngineName)  # plain strings: click.Choice, JSON, messages
REGISTRY: dict[EngineName, type["Engine"]] = {}  # filled by Engine subclasses that have a name


def engine_name(name: str) -> EngineName:
    """The engine called `name`, or one line naming the choices."""
    try:
        return EngineName(name)
    except ValueError:
        raise RisError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}") from None


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


@dataclass(frozen=True)
class QueryArgs:
    """Query-time knobs of the approximate engines, given with each query; None is the engine's own default.
    An exact engine ignores them."""

    search_k: int | None = None  # Annoy: tree nodes inspected (default: SEARCH_K_FACTOR x trees x items asked for)
    ef_search: int | None = None  # HNSW: candidate list (default: DEFAULT_EF_SEARCH)

    def __post_init__(self):
        if self.search_k is not None and self.search_k < 1:
            raise RisError(f"search_k must be at least 1 (or None for the default), got {self.search_k}")
        if self.ef_search is not None and not 1 <= self.ef_search <= 1000:
            raise RisError(f"--ef-search must be between 1 and 1000, got {self.ef_search}")

    @classmethod
    def of(cls, search_k: int | None = -1, ef_search: int | None = None) -> "QueryArgs":
        """From the commands' and `Collection.similar`'s keywords, where a search_k of -1 (or 0) means the default."""
        return cls(search_k if search_k is not None and search_k > 0 else None, ef_search)


@dataclass(frozen=True, slots=True)
class Neighbourhood:
    """One image an index holds, and the nearest other images it finds for it, nearest first."""

    image_id: int
    ids: np.ndarray  # int64
    distances: np.ndarray  # euclidean


def ranked(rows) -> list[Hit]:
    """Hits from (id, path, label, distance) rows, nearest first."""
    return [Hit(rank, r[0], r[1], r[2], float(r[3])) for rank, r in enumerate(rows, 1)]


def run_filtered(db: Database, sql: str, params: dict, flt: Filter, *, timeout: str | None, exact: bool = False) -> list[tuple]:
    """Run one filtered query; a user's --where runs on the reader (ingest.reader), under the timeout."""
    with filtered_cursor(db, flt, timeout=timeout, exact=exact) as cur:
        cur.execute(sql, params)
        return cur.fetchall()


@contextmanager
def filtered_cursor(db: Database, flt: Filter, *, timeout: str | None, exact: bool = False):
    """A cursor in one transaction: on the reader's least-privilege login, read-only and under the timeout, if the
    filter has a user's --where; on the pool's own connection otherwise."""
    with (reading(db, timeout) if flt.where is not None else db.begin()) as conn:
        cur = raw_cursor(conn)
        if exact:  # an HNSW or IVFFlat index answers approximately, and only through an ordered index scan; a bitmap
            # scan (a filter's rows found through the label's b-tree) stays allowed
            set_local(cur, db, enable_indexscan="off")
        yield cur


def set_local(cur, db: Database, **settings: str | int) -> None:
    """SET LOCAL planner settings for the cursor's transaction, in one round trip; on a Citus cluster they reach the
    shards too (Citus forwards SET LOCAL once told to). Values are the engines' own
    (names and numbers), never a user's."""
    statements = [f"SET LOCAL {name.replace('__', '.')} = '{value}'" for name, value in settings.items()]
    if db.distributed:
        statements.insert(0, "SET LOCAL citus.propagate_set_commands = 'local'")
    cur.execute("; ".join(statements))


def estimated_rows(db: Database, collection_id: int, flt: Filter, *, timeout: str | None) -> float:
    """How many of the collection's searchable rows the planner expects the filter to keep (one EXPLAIN, no rows read;
    a --where is estimated on the reader's login, as it would run)."""
    if db.distributed:  # the coordinator's plan does not say; HNSW's iterative scans answer (docs/cluster.md)
        return float("inf")
    with filtered_cursor(db, flt, timeout=timeout) as cur:
        cur.execute("EXPLAIN (FORMAT JSON) " + flt.scoped("1", "embedding IS NOT NULL", collection_id), flt.params(collection_id))
        return float(cur.fetchone()[0][0]["Plan"]["Plan Rows"])


class Engine(ABC):
    """What every engine does over one collection. Subclasses answer `problem` and `search`; the other questions
    have answers built on `search` that an engine with an index of its own (Annoy) answers faster from it."""

    name: ClassVar[EngineName | None] = None  # set: registered under it (make_engine); None: used directly (RawSearch)
    exact: ClassVar[bool]  # True: the answer is the true k nearest, always
    vectors: ClassVar[str] = "embedding"  # the stored vectors it searches: store.VECTOR_ROWS' kind

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name") is not None:
            REGISTRY[cls.name] = cls

    def __init__(self, db: Database, coll: CollectionRow, settings: Settings):
        self.db = db
        self.coll = coll
        self.settings = settings
        self.timeout = settings.statement_timeout

    @abstractmethod
    def problem(self) -> str | None:
        """None if the engine can answer for the collection now; else why not, and the command to run."""

    @abstractmethod
    def search(self, vector: np.ndarray, k: int, flt: Filter = Filter(), args: QueryArgs = QueryArgs()) -> list[Hit]:
        """The k rows nearest to `vector` that pass the filter (fewer only if the filter leaves fewer), nearest first."""

    def ids_near(self, vector: np.ndarray, n: int, args: QueryArgs = QueryArgs()) -> list[int]:
        """Ids of the n nearest rows to a vector, by the cheapest path the engine has (Annoy: the bare file lookup)."""
        return [h.id for h in self.search(vector, n, args=args)]

    def neighbours_of_stored(self, image_id: int, n: int, args: QueryArgs = QueryArgs()) -> list[int]:
        """Ids of the n nearest other images to a stored image, nearest first; [] if the engine does not hold it."""
        ids, vectors = store.vectors_of(self.db, self.coll.id, self.vectors, np.array([image_id]))
        if not len(ids):
            return []
        return [h.id for h in self.search(vectors[0], n, Filter.of(exclude=image_id), args)]

    def neighbourhoods(self, n: int, args: QueryArgs = QueryArgs()) -> Iterator[Neighbourhood]:
        """Every image the engine holds with its n nearest other images (duplicates, audits): here one search each."""
        for ids, vectors in store.vector_chunks(self.db, self.coll.id, self.vectors):
            for image_id, vector in zip(ids.tolist(), vectors):
                hits = self.search(vector, n, Filter.of(exclude=image_id), args)
                yield Neighbourhood(image_id, np.array([h.id for h in hits], np.int64), np.array([h.distance for h in hits]))

    def pending_ids(self) -> np.ndarray:
        """Ids of stored rows that `neighbourhoods` leaves out (written since an index was built): none here."""
        return np.zeros(0, np.int64)

    def describe(self, n: int, args: QueryArgs = QueryArgs()) -> dict:
        """How it answers n neighbours with these args, for a summary line (trees, search_k, ef_search, ...)."""
        return {}


class ExactSearch(Engine):
    """Exact k nearest neighbours in SQL."""

    name = EngineName.PGVECTOR
    exact = True

    def problem(self) -> str | None:
        return None

    def search(self, vector: np.ndarray, k: int, flt: Filter = Filter(), args: QueryArgs = QueryArgs()) -> list[Hit]:
        sql = flt.scoped("id, path, label, embedding <-> %(q)s AS distance", "embedding IS NOT NULL", self.coll.id) + " ORDER BY distance, id LIMIT %(k)s"
        params = flt.params(self.coll.id) | {"q": np.asarray(vector, dtype=np.float32), "k": k}
        rows = run_filtered(self.db, sql, params, flt, timeout=self.timeout, exact=True)
        return ranked(rows)


class RawSearch(Engine):
    """Exact k nearest neighbours over the stored 2048-d features, normalised as at ingest (`--space raw`):
    the reference project's first method, no PCA. The filter picks the collection's rows first; only then
    are their features joined, so a --where still sees images' columns only. Every row of the collection's partition
    is scanned (4 KB each, half precision; the query is rounded to half precision too, distances sum in float32)."""

    exact = True
    vectors = "raw"

    def problem(self) -> str | None:
        if not self.coll.keeps_raw:
            return (f"collection {self.coll.name!r} keeps no raw features (loaded with --raw-features none): search it with"
                    " --space pca")
        return None

    def search(self, vector: np.ndarray, k: int, flt: Filter = Filter(), args: QueryArgs = QueryArgs()) -> list[Hit]:
        """`vector` is a raw feature vector, normalised here by the function ingest uses (`ingest.reduce.normalize`)."""
        if problem := self.problem():
            raise RisError(problem)
        q = HalfVector(normalize(np.asarray(vector, dtype=np.float32).reshape(1, -1))[0].astype(np.float16))
        rows_sql = flt.scoped("id, path, label, sha256", "true", self.coll.id)
        sql = (f"SELECT r.id, r.path, r.label, l2_normalize(f.raw) <-> %(q)s AS distance FROM ({rows_sql}) AS r"
               f" JOIN features f ON f.collection_id = {int(self.coll.id)} AND f.sha256 = r.sha256 ORDER BY distance, r.id LIMIT %(k)s")
        rows = run_filtered(self.db, sql, flt.params(self.coll.id) | {"q": q, "k": k}, flt, timeout=self.timeout, exact=True)
        return ranked(rows)


def make_engine(name: str, db: Database, coll: CollectionRow, settings: Settings) -> Engine:
    """The engine registered as `name` over one collection (it may not be able to answer yet: ask its `problem`)."""
    return REGISTRY[engine_name(name)](db, coll, settings)


from ingest import annoy_engine, hnsw_engine  # noqa: E402,F401  (each module registers its engine)
