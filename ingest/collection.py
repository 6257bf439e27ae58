"""One collection: its database rows, its PCA, its model and its Annoy file, behind a few verbs.

`Collection` is the library API that `ingest`, `search`, the report and fine-tuning all use:
`create`/`named` open one, `add` stores pictures, `finish` brings PCA and the index up to date, `refit`
changes the dims, `embed` turns pixels into vectors, `vectors` reads them back in chunks, `query` makes a
search vector from a file or a stored id, and `similar` returns the nearest images as `Hit`s.
A query becomes a vector exactly as stored pictures did: through `embed`, with the collection's model.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from ingest import locks, store
from ingest.annoy_index import Sidecar, build_index, index_path, read_sidecar, staleness
from ingest.config import DEFAULT_TREES, Settings
from ingest.db import Database
from ingest.engines import Hit, make_engine
from ingest.errors import CollectionError, ImageError, RisError
from ingest.filters import Filter
from ingest.images import decode_image, read_file
from ingest.reduce import Pca, fit_pca

if TYPE_CHECKING:
    from ingest.features import FeatureExtractor
    from ingest.load import LoadSummary
    from ingest.sources import Candidate

DEFAULT_COLLECTION = "caltech101"


@dataclass(frozen=True)
class Query:
    """The vector to search with; `image_id` is set when the query is an image of the collection."""

    vector: np.ndarray
    image_id: int | None = None
    path: str | None = None
    label: str | None = None


class Collection:
    """A named set of pictures embedded by one model with one set of weights, and the PCA that reduces them."""

    def __init__(self, db: Database, settings: Settings, row: store.CollectionRow, *, extractor: FeatureExtractor | None = None):
        self.db = db
        self.settings = settings
        self.row = row
        self._extractor = None
        self._engines: dict[tuple, object] = {}
        if extractor is not None:
            self.use_extractor(extractor, remedy="re-ingest or restore those weights")

    # --- opening ------------------------------------------------------------------------------------

    @classmethod
    def named(cls, db: Database, settings: Settings, name: str | None = None, *, extractor: FeatureExtractor | None = None) -> "Collection":
        """The named collection; with no name, the only collection there is, else caltech101."""
        with db.connect() as conn:
            row = store.find_row(conn, name) if name else None
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
    def create(cls, db: Database, settings: Settings, name: str, extractor: FeatureExtractor, *, pca_dims: int) -> "Collection":
        """Create the collection, or reuse it if it was built with the same weights (never mix two models' vectors)."""
        row = store.create_row(db, name, extractor.weights, extractor.fingerprint, pca_dims)
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
    def dims(self) -> int:
        return self.row.pca_dims

    @property
    def pca(self) -> Pca | None:
        return self.row.pca

    @property
    def annoy_path(self) -> Path:
        return index_path(self.settings.annoy_dir, self.name)

    def index_problem(self) -> str | None:
        """Why the Annoy file cannot be trusted for the table as it is, or None if it is fresh."""
        return staleness(read_sidecar(self.annoy_path), self.annoy_path, store.embedding_state(self.db, self.id))

    # --- the model ----------------------------------------------------------------------------------

    def use_extractor(self, extractor: FeatureExtractor, *, remedy: str) -> None:
        """Embed with `extractor` from now on, if its weights are the ones this collection's vectors came from."""
        from ingest.features import check_weights

        check_weights(extractor.fingerprint, extractor.weights, collection=self.name, recorded_weights=self.row.weights,
                      recorded_fingerprint=self.row.weights_fingerprint, remedy=remedy)
        self._extractor = extractor

    def extractor(self) -> FeatureExtractor:
        """The collection's own model, built once per process and checked against the recorded fingerprint."""
        if self._extractor is None:
            from ingest.features import extractor_for

            self.use_extractor(extractor_for(self.weights), remedy="re-ingest or restore those weights")
        return self._extractor

    def embed(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(raw features, embeddings) of decoded pixels: the one recipe for stored pictures and queries alike.
        Embeddings are None until the collection has a PCA."""
        raw = self.extractor().embed(pixels)
        return raw, (self.pca.project(raw) if self.pca is not None else None)

    # --- writing ------------------------------------------------------------------------------------

    def add(self, candidates: list[Candidate], **options) -> LoadSummary:
        """Store every new picture of `candidates`, then `finish`; options as ingest.load.add_pictures."""
        from ingest.load import add_pictures

        return add_pictures(self, candidates, **options)

    def finish(self, *, trees: int = DEFAULT_TREES, refit_dims: int | None = None) -> "Collection":
        """Fit PCA if there is none (or refit with `refit_dims`), project rows that lack an embedding, and rebuild
        the Annoy file if it does not match the table. Safe to run again at any time; one process at a time."""
        with self.db.connect() as conn, locks.holding(conn, locks.COLLECTION, of=self.id):
            self.reload()
            if self.pca is None or refit_dims is not None:
                self.fit(refit_dims or self.dims)
            if self.pca is not None:  # rows stored without embeddings, or whose PCA was replaced meanwhile
                for ids, raw in store.vector_chunks(self.db, self.id, "raw without embedding"):
                    store.write_embeddings(self.db, ids, self.pca.project(raw))
                if self.index_problem():
                    self.build_index(trees)
        return self

    def refit(self, dims: int, *, trees: int = DEFAULT_TREES) -> "Collection":
        """A new PCA of `dims` from the stored raw features (no CNN run), every embedding and the Annoy file rewritten."""
        return self.finish(trees=trees, refit_dims=dims)

    def fit(self, dims: int) -> None:
        """Fit PCA on all stored raw features and rewrite every embedding (callers hold the collection lock)."""
        ids, raw = store.read_vectors(self.db, self.id, "raw")
        if len(ids):
            pca = fit_pca(raw, dims)
            store.save_pca(self.db, self.id, pca, ids, pca.project(raw))
        self.reload()

    def set_planned_dims(self, dims: int) -> None:
        """Settle the dims of a collection whose PCA is not fitted yet."""
        store.set_pca_dims(self.db, self.id, dims)
        self.reload()

    def build_index(self, trees: int = DEFAULT_TREES) -> Sidecar:
        """Rebuild the Annoy file from the table, whether or not it is stale."""
        return build_index(self.db, self.settings.annoy_dir, self.row, trees)

    # --- reading ------------------------------------------------------------------------------------

    def vectors(self, kind: str = "embedding", *, chunk: int = store.CHUNK_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, matrix) blocks in id order: 'embedding' (searchable rows) or 'raw' (features of every row)."""
        return store.vector_chunks(self.db, self.id, kind, chunk)

    def read_vectors(self, kind: str = "embedding") -> tuple[np.ndarray, np.ndarray]:
        """All of `vectors` at once: (ids, matrix); for whole-collection work such as a report."""
        return store.read_vectors(self.db, self.id, kind)

    def details(self, ids: list[int]) -> dict[int, tuple[str, str | None, str]]:
        """id -> (path, label, sha256) of some of the collection's images (ids of other collections are left out)."""
        return store.image_details(self.db, self.id, ids)

    def check_searchable(self, engine: str = "pgvector") -> None:
        """Refuse, before any work, what cannot answer: an empty or unfinished collection, an unknown engine,
        or (for 'annoy') a missing, stale or damaged index file. Says what to run."""
        if self.pca is None or store.count_searchable(self.db, self.id) == 0:
            raise CollectionError(f"collection {self.name!r} has no searchable images yet; run `ingest load` (or `ingest index`)")
        self.engine(engine)

    def query(self, *, image: Path | None = None, image_id: int | None = None) -> Query:
        """The search vector of a stored image (by id, or a file with the same content: no CNN) or of a new picture."""
        if (image is None) == (image_id is None):
            raise RisError("give either an image file or --id")
        if image_id is not None:
            found = store.stored_image(self.db, self.id, image_id=image_id)
            if found is None:
                raise CollectionError(f"no image with id {image_id} in collection {self.name!r}")
            return Query(found[3], found[0], found[1], found[2])
        path = Path(image)
        if not path.exists():
            raise RisError(f"no such file: {path}")
        try:
            data = read_file(path)
            found = store.stored_image(self.db, self.id, sha256=hashlib.sha256(data).hexdigest())
            if found is not None:
                return Query(found[3], found[0], found[1], found[2])
            pixels = decode_image(data).pixels
        except ImageError as e:
            raise RisError(f"cannot use {path} as a query: {e}") from None
        return Query(self.embed(pixels[np.newaxis])[1][0], path=str(path.absolute()))

    def engine(self, name: str = "pgvector", *, search_k: int = -1):
        """A search engine over this collection: 'pgvector' (exact) or 'annoy' (fast; refused if its file is stale).

        Opened once per Collection object (the Annoy file's freshness is checked then), so repeated queries pay
        only for the search."""
        key = (name, search_k)
        if key not in self._engines:
            self._engines[key] = make_engine(name, self.db, self.row, self.settings.annoy_dir, search_k=search_k,
                                             timeout=self.settings.statement_timeout)
        return self._engines[key]

    def similar(self, query: Query | np.ndarray, k: int = 10, *, engine: str = "pgvector", label: str | None = None,
                where: str | None = None, exclude: int | None = None, search_k: int = -1) -> list[Hit]:
        """The k images nearest to a query (or a vector in the collection's PCA space), filtered by label and a
        --where condition that cannot reach beyond this collection, leaving out image `exclude`."""
        if k < 1:
            raise RisError(f"k must be at least 1, got {k}")
        vector = query.vector if isinstance(query, Query) else query
        return self.engine(engine, search_k=search_k).search(vector, k, Filter.of(label, where, exclude))

