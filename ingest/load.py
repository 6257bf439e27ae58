"""A load: candidate files -> decoded pixels -> ResNet50 features -> PostgreSQL, then PCA and the Annoy file.

Files are read, hashed and decoded by worker threads while the model runs on the previous batch;
each batch is committed on its own, so an interrupted load keeps what it stored and a rerun skips
it (by sha256). The end-of-load work (fit or apply PCA, build the index) runs under a per-collection
lock, so concurrent loads of one collection finish consistently.
"""
from __future__ import annotations

import hashlib
import time
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from ingest.annoy_index import DEFAULT_TREES, build_index, index_path, read_sidecar, staleness
from ingest.config import DEFAULT_BATCH_SIZE
from ingest.db import Database
from ingest.errors import ImageError
from ingest.features import FeatureExtractor
from ingest.images import DecodedImage, decode_image, read_file
from ingest.reduce import check_dims, fit_pca
from ingest.sources import Candidate
from ingest.store import (
    CollectionInfo,
    ImageRow,
    absolute,
    embedding_state,
    get_collection,
    insert_images,
    lock_collection,
    open_collection,
    read_vectors,
    record_failures,
    save_pca,
    set_pca_dims,
    stored_hashes,
    unlock_collection,
    write_embeddings,
)

DEFAULT_PCA_DIMS = 128


@dataclass
class LoadSummary:
    """What a load did; `failures` lists (path, reason) of this run."""

    collection: str
    ingested: int = 0
    present: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return (self.ingested + self.present) / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Prepared:
    """One candidate after reading: decoded, already stored, or failed with a reason."""

    candidate: Candidate
    sha256: str | None = None
    size: int = 0
    decoded: DecodedImage | None = None
    failure: str | None = None


def prepare(candidate: Candidate, known: set[str]) -> Prepared:
    """Read and hash a file; decode it only if the collection does not hold it yet."""
    try:
        data = read_file(candidate.path)
        sha = hashlib.sha256(data).hexdigest()
        if sha in known:
            return Prepared(candidate, sha, len(data))
        return Prepared(candidate, sha, len(data), decode_image(data))
    except ImageError as e:
        return Prepared(candidate, failure=str(e))


def bounded_map(pool: Executor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """Like pool.map, in order, but with at most `ahead` results in flight: decoded pixels take memory."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def batched(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def load_collection(
    db: Database,
    annoy_dir: Path,
    name: str,
    candidates: list[Candidate],
    extractor: FeatureExtractor,
    pca_dims: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    trees: int = DEFAULT_TREES,
    workers: int = 2,
    skipped: int = 0,
    progress: bool = True,
) -> LoadSummary:
    """Store every new picture of `candidates` in collection `name`, then bring its PCA and Annoy file up to date."""
    if pca_dims is not None:
        check_dims(pca_dims)
    coll = open_collection(db.engine, name, extractor.weights, extractor.fingerprint, pca_dims or DEFAULT_PCA_DIMS)
    known = stored_hashes(db.engine, coll.id)
    if coll.pca is None:
        coll = plan_pca_dims(db, coll, pca_dims, len(known) + len(candidates))
    summary = LoadSummary(name, skipped=skipped)
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool, tqdm(
        total=len(candidates), unit="img", desc=f"ingest {name}", disable=not progress, smoothing=0.1
    ) as bar:
        prepared = bounded_map(pool, lambda c: prepare(c, known), candidates, ahead=batch_size * 2)
        for batch in batched(prepared, batch_size):
            store_batch(db, coll, batch, extractor, summary)
            bar.update(len(batch))
    finish_collection(db, annoy_dir, name, trees)
    summary.seconds = time.perf_counter() - started
    return summary


def plan_pca_dims(db: Database, coll: CollectionInfo, requested: int | None, most_images: int) -> CollectionInfo:
    """Settle the dims of a collection whose PCA is not fitted yet, before any work.

    Explicit --pca-dims above the number of images there can be is refused now, not after an hour of
    embedding; the default (128) shrinks to fit a small collection (e.g. --limit-per-class 1).
    """
    if most_images == 0:
        return coll
    dims = requested or min(DEFAULT_PCA_DIMS, most_images)
    check_dims(dims, most_images)
    return set_pca_dims(db.engine, coll.id, dims) if dims != coll.pca_dims else coll


def store_batch(db: Database, coll: CollectionInfo, batch: list[Prepared], extractor: FeatureExtractor, summary: LoadSummary) -> None:
    """Embed the decoded pictures of a batch and commit them, with the batch's failures."""
    failures = [(absolute(p.candidate.path), p.failure) for p in batch if p.failure]
    record_failures(db.engine, coll.id, failures)
    summary.failures.extend(failures)
    summary.failed += len(failures)
    fresh = [p for p in batch if p.decoded is not None]
    summary.present += sum(1 for p in batch if p.sha256 and p.decoded is None)
    if not fresh:
        return
    raw = extractor.embed(np.stack([p.decoded.pixels for p in fresh]))
    embeddings = coll.pca.project(raw) if coll.pca is not None else None
    rows = [
        ImageRow(absolute(p.candidate.path), p.candidate.label, p.sha256, p.decoded.width, p.decoded.height, p.size)
        for p in fresh
    ]
    added = insert_images(db.engine, coll.id, rows, raw, embeddings, coll.pca_version)
    summary.ingested += added
    summary.present += len(fresh) - added


def finish_collection(db: Database, annoy_dir: Path, name: str, trees: int = DEFAULT_TREES, refit_dims: int | None = None) -> CollectionInfo:
    """Fit PCA if the collection has none (or refit with `refit_dims`), project rows that lack an embedding,
    and rebuild the Annoy file if it does not match the table. Safe to run again at any time."""
    coll = get_collection(db.engine, name)
    with db.engine.connect() as conn:
        lock_collection(conn, coll.id)
        try:
            coll = get_collection(db.engine, name)
            if coll.pca is None or refit_dims is not None:
                refit(db, coll, refit_dims or coll.pca_dims)
                coll = get_collection(db.engine, name)
            if coll.pca is not None:  # rows stored without embeddings, or whose PCA was replaced meanwhile
                ids, raw = read_vectors(db.engine, coll.id, "raw", "AND i.embedding IS NULL")
                if len(ids):
                    write_embeddings(db.engine, ids, coll.pca.project(raw))
            coll = get_collection(db.engine, name)
            ann = index_path(annoy_dir, name)
            if coll.pca is not None and staleness(read_sidecar(ann), ann, embedding_state(db.engine, coll.id)):
                build_index(db.engine, annoy_dir, coll, trees)
        finally:
            unlock_collection(conn, coll.id)
    return coll


def refit(db: Database, coll: CollectionInfo, dims: int) -> None:
    """Fit PCA on all stored raw features and rewrite every embedding of the collection."""
    ids, raw = read_vectors(db.engine, coll.id, "raw")
    if not len(ids):
        return
    pca = fit_pca(raw, dims)
    save_pca(db.engine, coll.id, pca, ids, pca.project(raw))
