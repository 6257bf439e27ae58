"""One collection: its database rows, its PCA, its model and its Annoy file, behind a few verbs.

`Collection` is the library API that `ingest`, `search`, the report and fine-tuning all use:
`create`/`named` open one, `store_pictures` commits a load's batch (ingest/load.py), `finish` brings PCA and the index up to date, `refit`
changes the dims, `embed` turns pixels into vectors, `vectors` reads them back in chunks, `query` makes a
search vector from a file or a stored id, and `similar` returns the nearest images as `Hit`s.
A query becomes a vector exactly as stored pictures did: through `embed`, with the collection's model.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from ingest import counts, hnsw, locks, partitions, projections, store
from ingest.annoy_index import Sidecar, build_index, index_path, read_sidecar, staleness
from ingest.config import DEFAULT_TREES, Settings
from ingest.db import Database
from ingest.engines import Engine, EngineName, Hit, QueryArgs, RawSearch, engine_name, estimated_rows, make_engine
from ingest.hnsw_engine import EXACT_FILTER_ROWS
from ingest.errors import CollectionError, ImageError, IndexFileError, RisError
from ingest.filters import Filter
from ingest.images import decode_image, read_file
from ingest.names import check_name, may_exist
from ingest.reduce import PCA_SAMPLE, PCA_SEED, Pca, fit_pca, refit_due

if TYPE_CHECKING:
    from ingest.features import Extractor

DEFAULT_COLLECTION = "caltech101"


@dataclass(frozen=True)
class Query:
    """The vector to search with; `image_id` is set when the query is an image of the collection. `raw` holds its
    2048 raw features when they were computed (a new picture) or asked for (`space="raw"`), else None."""

    vector: np.ndarray
    image_id: int | None = None
    path: str | None = None
    label: str | None = None
    raw: np.ndarray | None = None


class Collection:
    """A named set of pictures embedded by one model with one set of weights, and the PCA that reduces them."""

    def __init__(self, db: Database, settings: Settings, row: store.CollectionRow, *, extractor: Extractor | None = None):
        self.db = db
        self.settings = settings
        self.row = row
        self._extractor = None
        self._engines: dict[str, Engine] = {}  # by engine name, and 'raw'
        if extractor is not None:
            self.use_extractor(extractor, remedy="re-ingest or restore those weights")

    # --- opening ------------------------------------------------------------------------------------

    @classmethod
    def named(cls, db: Database, settings: Settings, name: str | None = None, *, extractor: Extractor | None = None) -> "Collection":
        """The named collection; with no name, the only collection there is, else caltech101. Any name is looked up
        (collections named before names were checked stay readable); one no collection can have (a NUL) is not."""
        with db.connect() as conn:
            row = store.find_row(conn, name) if name and may_exist(name) else None
            if row is None and not name:
                rows = store.all_rows(conn)
                row = rows[0] if len(rows) == 1 else store.find_row(conn, DEFAULT_COLLECTION)
            if row is None:
                names = [r.name for r in store.all_rows(conn)]
        if row is None:
            known = ", ".join(names) if names else "none yet; run `ingest load`"
            raise CollectionError(f"no collection named {name or DEFAULT_COLLECTION!r} (collections: {known})")
        return cls(db, settings, row, extractor=extractor)

    @classmethod
    def create(cls, db: Database, settings: Settings, name: str, extractor: Extractor, *, pca_dims: int,
               raw_features: str = "half") -> "Collection":
        """Create the collection (keeping `raw_features`: 'half' or 'none'), or reuse it if it was built with the same
        weights (never mix two models' vectors; an existing one keeps its own raw features choice). The name must be
        valid (ingest/names.py), also to load into an existing collection."""
        check_name(name)
        if raw_features not in ("half", "none"):
            raise RisError(f"raw features are 'half' or 'none', not {raw_features!r}")
        row = store.create_row(db, name, extractor.weights, extractor.fingerprint, pca_dims, extractor.precision, extractor.runtime,
                               raw_features)
        coll = cls(db, settings, row)
        coll.use_extractor(extractor, remedy="loading them would mix two models' vectors: use another --collection")
        return coll

    @classmethod
    def all(cls, db: Database, settings: Settings) -> list["Collection"]:
        with db.connect() as conn:
            return [cls(db, settings, row) for row in store.all_rows(conn)]

    def reload(self) -> "Collection":
        """Read the collection's row again (another process may have fitted or refitted its PCA)."""
        with self.db.connect() as conn:
            row = store.find_row(conn, self.name)
        if row is None:
            raise CollectionError(f"collection {self.name!r} was removed")
        self.row = row
        self._engines.clear()  # they hold the old row (dims, PCA version)
        return self

    def changed(self) -> bool:
        """Whether another process refitted the PCA or built or dropped the HNSW index since the row was read (one
        primary-key lookup; `reload` reads it all); CollectionError once the collection is removed."""
        state = store.search_state(self.db, self.id)
        if state is None:
            raise CollectionError(f"collection {self.name!r} was removed")
        return state != (self.row.pca_version, self.dims, self.row.hnsw)

    # --- what it is ---------------------------------------------------------------------------------

    @property
    def id(self) -> int:
        return self.row.id

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def weights(self) -> str:
        return self.row.weights

    @property
    def precision(self) -> str:
        """'fp32' or 'bf16': how the CNN ran for every stored vector, and runs for queries by file."""
        return self.row.precision

    @property
    def runtime(self) -> str:
        """'openvino' or 'tensorflow': what ran the CNN when the collection was created (queries use the process's
        runtime, at the collection's precision: both runtimes give the same vectors within float rounding)."""
        return self.row.runtime

    @property
    def dims(self) -> int:
        return self.row.pca_dims

    @property
    def pca(self) -> Pca | None:
        return self.row.pca

    @property
    def annoy_path(self) -> Path:
        return index_path(self.settings.annoy_dir, self.name)

    def sidecar(self) -> Sidecar | None:
        """What the Annoy file in use was built from (None if there is none)."""
        return read_sidecar(self.settings.annoy_dir, self.name)

    def index_problem(self) -> str | None:
        """Why the Annoy file cannot answer for the collection as its row says it is, or None if it can
        (rows added since it was built are its delta, searched exactly)."""
        return staleness(self.sidecar(), self.settings.annoy_dir, self.row)

    def index_delta(self, limit: int) -> int:
        """Rows the Annoy file does not hold (added since its build) plus rows removed since, counted up to
        `limit` + 1: what a query must search exactly or skip."""
        sidecar = self.sidecar()
        if sidecar is None:
            return limit + 1
        removed = self.row.removed_rows - sidecar.removed_rows
        return removed + counts.delta_rows(self.db, self.id, sidecar.embedding_seq, limit)

    # --- the model ----------------------------------------------------------------------------------

    def use_extractor(self, extractor: Extractor, *, remedy: str) -> None:
        """Embed with `extractor` from now on, if its weights and precision are the ones this collection's vectors came from."""
        from ingest.features import check_weights
        from ingest.precision import check_precision

        check_weights(extractor.fingerprint, extractor.weights, collection=self.name, recorded_weights=self.row.weights,
                      recorded_fingerprint=self.row.weights_fingerprint, remedy=remedy)
        check_precision(extractor.precision, collection=self.name, recorded=self.precision, remedy=remedy)
        self._extractor = extractor

    def extractor(self) -> Extractor:
        """The collection's own model at its own precision on the settings' runtime, built once per process (for queries:
        a load hands its own, built for batches) and checked against the recorded fingerprint."""
        if self._extractor is None:
            from ingest.features import extractor_for

            extractor = extractor_for(self.weights, self.precision, self.settings.runtime, models_dir=self.settings.models_dir,
                                      latency=True)
            self.use_extractor(extractor, remedy="re-ingest or restore those weights")
        return self._extractor

    def embed(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(raw features, embeddings) of decoded pixels: the one recipe for stored pictures and queries alike.
        Embeddings are None until the collection has a PCA."""
        raw = self.extractor().embed(pixels)
        return raw, (self.pca.project(raw) if self.pca is not None else None)

    # --- writing ------------------------------------------------------------------------------------

    def stored_hashes(self) -> set[str]:
        """The sha256 of every picture stored: a load reads these files' bytes but decodes and embeds only the others."""
        return store.stored_hashes(self.db, self.id)

    def store_pictures(self, rows: list[store.ImageRow], raw: np.ndarray, embeddings: np.ndarray | None, *, pca_version: int) -> int:
        """Commit a batch of new pictures in one transaction; returns how many were added (not those stored meanwhile)."""
        return store.insert_images(self.db, self.id, rows, raw, embeddings, pca_version=pca_version)

    def record_failures(self, failures: list[tuple[str, str]]) -> None:
        """Remember why files (path, reason) could not be used (the table ingest_failures)."""
        store.record_failures(self.db, self.id, failures)

    def finish(self, *, trees: int = DEFAULT_TREES, refit_dims: int | None = None, rebuild: bool = False,
               progress: bool = False) -> "Collection":
        """Fit PCA if there is none (at the planned dims, or as many as there are pictures embedded if fewer: a
        load whose files partly failed still ends searchable) or refit with `refit_dims`, project rows that lack
        an embedding, and bring the indexes up to date: the Annoy file is rebuilt only if it cannot answer, its
        delta has outgrown `settings.annoy_max_delta`, or `rebuild`; an HNSW index, once asked for, is rebuilt if
        a refit dropped it. Safe to run again at any time; one process at a time."""
        with self.db.connect() as conn, locks.holding(conn, locks.COLLECTION, of=self.id):
            self.reload()
            if refit_dims is not None and self.pca is not None and not self.row.keeps_raw:
                raise CollectionError(f"collection {self.name!r} keeps no raw features (--raw-features none): its PCA cannot be refitted")
            if self.pca is None or refit_dims is not None:
                self.fit(refit_dims or self.dims, at_most_rows=refit_dims is None)
            if self.pca is not None:  # rows stored without embeddings, or whose PCA was replaced meanwhile
                for ids, raw in store.vector_chunks(self.db, self.id, "raw without embedding"):
                    projections.write_embeddings(self.db, self.id, ids, self.pca.project(raw))
                if not self.row.keeps_raw:
                    store.forget_raw(self.db, self.id)
                partitions.refresh_statistics(self.db, self.id)  # a filter's expected rows pick its engine (searcher_for)
                self.reload()
                limit = self.settings.annoy_max_delta
                if rebuild or self.index_problem() or self.index_delta(limit) > limit:
                    self.build_index(trees)
                if self.row.hnsw:
                    hnsw.build(self.db, self.id, self.dims, progress=progress)
        return self

    def refit(self, dims: int, *, trees: int = DEFAULT_TREES) -> "Collection":
        """A new PCA of `dims` from the stored raw features (no CNN run), every embedding and the Annoy file rewritten."""
        return self.finish(trees=trees, refit_dims=dims)

    def fit(self, dims: int, *, at_most_rows: bool = False) -> None:
        """Fit PCA on a seeded sample of at most PCA_SAMPLE rows' raw features (all of them in a smaller collection)
        and rewrite every embedding a chunk at a time (callers hold the collection lock). The HNSW index is
        dropped first (rewriting every row through it would be slower than building it again in `finish`).
        With `at_most_rows`, dims shrink to the number of rows stored if that is smaller (else it is refused)."""
        ids = store.image_ids(self.db, self.id, "raw")
        if at_most_rows:
            dims = min(dims, max(len(ids), 1))
        if len(ids) > PCA_SAMPLE:
            ids = np.sort(np.random.default_rng(PCA_SEED).choice(ids, PCA_SAMPLE, replace=False))
        if len(ids):
            _, raw = store.vectors_of(self.db, self.id, "raw", ids)
            pca = fit_pca(raw, dims)
            del raw
            hnsw.drop(self.db, self.id, rebuild=True)
            projections.save_pca(self.db, self.id, pca)
        self.reload()

    def refit_due(self, dims: int) -> int | None:
        """The dims to refit PCA to now that the collection has grown (`ingest watch` asks after each batch), or None
        (the rule: ingest.reduce.refit_due). Without raw features there is nothing to refit from."""
        if self.pca is None or not self.row.keeps_raw:
            return None
        return refit_due(self.pca.dims, dims, *counts.pca_growth(self.db, self.id))

    def set_planned_dims(self, dims: int) -> None:
        """Settle the dims of a collection whose PCA is not fitted yet."""
        store.set_pca_dims(self.db, self.id, dims)
        self.reload()

    def build_index(self, trees: int = DEFAULT_TREES) -> Sidecar:
        """Rebuild the Annoy file from the table, whether or not it is stale."""
        return build_index(self.db, self.settings.annoy_dir, self.row, trees)

    def build_hnsw(self, *, progress: bool = False) -> str:
        """Build the collection's pgvector HNSW index (if it has none of its dims) and keep it from now on."""
        if self.pca is None:
            raise CollectionError(f"collection {self.name!r} has no embeddings yet; run `ingest load` first")
        name = hnsw.build(self.db, self.id, self.dims, progress=progress)
        self.reload()
        return name

    def drop_hnsw(self) -> None:
        hnsw.drop(self.db, self.id)
        self.reload()

    # --- reading ------------------------------------------------------------------------------------

    def vectors(self, kind: str = "embedding", *, chunk: int = store.CHUNK_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, matrix) blocks in id order: 'embedding' (searchable rows) or 'raw' (features of every row)."""
        return store.vector_chunks(self.db, self.id, kind, chunk)

    def read_vectors(self, kind: str = "embedding") -> tuple[np.ndarray, np.ndarray]:
        """All of `vectors` at once: (ids, matrix); for whole-collection work such as a report."""
        return store.read_vectors(self.db, self.id, kind)

    def image_ids(self, kind: str = "embedding") -> np.ndarray:
        """Every id with a vector of `kind`, in order (8 bytes a row: a sample is drawn from these, not from vectors)."""
        return store.image_ids(self.db, self.id, kind)

    def vectors_of(self, kind: str, ids) -> tuple[np.ndarray, np.ndarray]:
        """(ids, matrix) of some rows, in id order, read a chunk at a time; ids without such a vector are left out."""
        return store.vectors_of(self.db, self.id, kind, np.asarray(ids, dtype=np.int64))

    def details(self, ids: list[int]) -> dict[int, store.ImageDetails]:
        """id -> path, label and sha256 of some of the collection's images (ids of other collections are left out)."""
        return store.image_details(self.db, self.id, ids)

    def check_searchable(self, engine: str = EngineName.PGVECTOR, *, count_rows: bool = True) -> None:
        """Refuse, before any work, what cannot answer: an empty or unfinished collection, an unknown engine,
        or (for 'annoy') a missing, stale or damaged index file. Says what to run. Without `count_rows` a
        collection with a PCA counts as searchable (a search per request cannot afford a count)."""
        if self.pca is None or (count_rows and counts.count_searchable(self.db, self.id) == 0):
            raise CollectionError(f"collection {self.name!r} has no searchable images yet; run `ingest load` (or `ingest index`)")
        if problem := self.engine(engine).problem():
            raise IndexFileError(problem)

    def query(self, *, image: Path | None = None, image_id: int | None = None, space: str = "pca") -> Query:
        """The search vector of a stored image (by id, or a file with the same content: no CNN) or of a new picture
        (embedded once: both its raw features and its embedding). With space 'raw', a stored image's raw
        features are read from the features table too."""
        if (image is None) == (image_id is None):
            raise RisError("give either an image file or --id")
        if image_id is not None:
            found = store.stored_image(self.db, self.id, image_id=image_id)
            if found is None:
                raise CollectionError(f"no image with id {image_id} in collection {self.name!r}")
            return self.stored_query(found, space)
        path = Path(image)
        if not path.exists():
            raise RisError(f"no such file: {path}")
        try:
            data = read_file(path)
            found = store.stored_image(self.db, self.id, sha256=hashlib.sha256(data).hexdigest())
            if found is not None:
                return self.stored_query(found, space)
            pixels = decode_image(data).pixels
        except ImageError as e:
            raise RisError(f"cannot use {path} as a query: {e}") from None
        raw, embedding = self.embed(pixels[np.newaxis])
        return Query(embedding[0], path=str(path.absolute()), raw=raw[0])

    def stored_query(self, found: store.StoredImage, space: str) -> Query:
        """The Query of a stored image, with its raw features if space is 'raw'."""
        raw = None
        if space == "raw":
            ids, vectors = self.vectors_of("raw", [found.id])
            if not len(ids):
                raise CollectionError(f"image {found.id} of {self.name!r} has no raw features stored; search it with --space pca")
            raw = vectors[0]
        return Query(found.embedding, found.id, found.path, found.label, raw)

    def engine(self, name: str = EngineName.PGVECTOR) -> Engine:
        """The engine registered as `name` (ingest/engines.py), opened once per Collection object and name: knobs go with
        each query, so repeated queries pay only for the search. Whether it can answer now is its `problem()`."""
        name = engine_name(name)
        if name not in self._engines:
            self._engines[name] = make_engine(name, self.db, self.row, self.settings)
        return self._engines[name]

    def searcher_for(self, flt: Filter, engine: str = EngineName.PGVECTOR, *, space: str = "pca") -> Engine:
        """The engine that answers one query: `engine` over the PCA embeddings, or exact search of the raw features.
        The one place a query's engine is chosen: a rule such as "a selective filter goes exact" belongs here."""
        if space == "raw":
            return self.raw_engine(engine)
        chosen = self.engine(engine)
        if not chosen.exact and flt.narrows and \
                estimated_rows(self.db, self.id, flt, timeout=self.settings.statement_timeout) <= EXACT_FILTER_ROWS:
            return self.engine(EngineName.PGVECTOR)  # a selective filter: exact is faster than an index, and complete
        return chosen

    def similar(self, query: Query | np.ndarray, k: int = 10, *, engine: str = EngineName.PGVECTOR, label: str | None = None,
                where: str | None = None, exclude: int | Iterable[int] | None = None, search_k: int = -1, ef_search: int | None = None,
                space: str = "pca") -> list[Hit]:
        """The k images nearest to a query (or a vector of that space), filtered by label and a --where condition
        that cannot reach beyond this collection, leaving out image(s) `exclude`. Space 'pca' searches the stored
        embeddings with `engine`; 'raw' searches the 2048-d features exactly (RawSearch; no approximate engine)."""
        if k < 1:
            raise RisError(f"k must be at least 1, got {k}")
        flt = Filter.of(label, where, exclude)
        if space == "raw":
            raw = query.raw if isinstance(query, Query) else query
            if raw is None:
                raise RisError("this query has no raw features; make it with Collection.query(..., space='raw')")
            return self.searcher_for(flt, engine, space="raw").search(raw, k, flt)
        if space != "pca":
            raise RisError(f"unknown space {space!r}; choose pca or raw")
        vector = query.vector if isinstance(query, Query) else query
        return self.searcher_for(flt, engine).search(vector, k, flt, QueryArgs.of(search_k, ef_search))

    def raw_engine(self, engine: str = EngineName.PGVECTOR) -> RawSearch:
        """Exact search over the raw features; refuses an approximate engine, whose index holds PCA embeddings only."""
        if engine_name(engine) != EngineName.PGVECTOR:
            raise RisError(f"--space raw is exact KNN over the 2048-d features; --engine {engine} searches the PCA space only")
        return self._engines.setdefault("raw", RawSearch(self.db, self.row, self.settings))  # (opening one reads nothing)

