"""A load: candidate files -> decoded pixels -> ResNet50 features -> PostgreSQL, then PCA and the Annoy file.

Files are read, hashed and decoded by worker threads while the model runs on the previous batch, and a
writer thread commits each batch (COPY) while the model runs on the next; each batch is committed on its
own, in order, so an interrupted load keeps what it stored and a rerun skips it (by sha256). The end-of-load
work (`Collection.finish`: fit or apply PCA, build the index) runs under a per-collection lock, so concurrent
loads of one collection finish consistently.
"""
from __future__ import annotations

import hashlib
import time
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from ingest import store, sync
from ingest.config import DEFAULT_BATCH_SIZE, DEFAULT_TREES, Settings
from ingest.db import Database
from ingest.errors import ImageError
from ingest.images import DecodedImage, decode_image, read_file
from ingest.reduce import check_dims
from ingest.sources import Candidate
from ingest.store import ImageRow, absolute

if TYPE_CHECKING:
    from ingest.collection import Collection
    from ingest.distributed import Cluster
    from ingest.features import Extractor

DEFAULT_PCA_DIMS = 128
WRITES_AHEAD = 1  # embedded batches waiting for the writer thread besides the one it commits: bounds their memory


@dataclass
class LoadSummary:
    """What a load did; `failures` lists (path, reason) of this run."""

    collection: str
    ingested: int = 0
    present: int = 0  # files already recorded with this content
    moved: int = 0  # stored pictures found at a new path while an old one is gone (ingest/sync.py)
    duplicates: int = 0  # new files holding a picture that is stored under another path
    missing: int = 0  # recorded files gone from disk (or pictures no file holds), kept until --prune
    pruned: int = 0  # files gone that --prune forgot
    removed: int = 0  # images --prune deleted (no file holds them any more)
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


def prepare(candidate: Candidate, known) -> Prepared:
    """Read and hash a file; decode it only if its content is not `known` (stored, or met earlier in this load).
    Decoding threads only read `known`; `first_copies` adds to it, in walk order."""
    try:
        data = read_file(candidate.path)
        sha = hashlib.sha256(data).hexdigest()
        if sha in known:
            return Prepared(candidate, sha, len(data))
        return Prepared(candidate, sha, len(data), decode_image(data))
    except ImageError as e:
        return Prepared(candidate, failure=str(e))


def first_copies(prepared: Iterable[Prepared], known) -> Iterator[Prepared]:
    """`prepared` in walk order, where a content decoded twice (two copies read at once by two threads) is kept
    from its first file only, the others counted as already present: each picture is embedded once and stored
    under its first path whatever the threads' timing; ingest/sync.py records the other paths."""
    for p in prepared:
        if p.decoded is not None:
            if p.sha256 in known:
                p = Prepared(p.candidate, p.sha256, p.size)
            else:
                known.add(p.sha256)
        yield p


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
    db: Database, settings: Settings, name: str, candidates: list[Candidate], extractor: Extractor, *,
    pca_dims: int | None = None, **options,
) -> LoadSummary:
    """Store every new picture of `candidates` in collection `name` (created if new), then bring its PCA and
    Annoy file up to date. `options` are those of add_pictures."""
    from ingest.collection import Collection

    if pca_dims is not None:
        check_dims(pca_dims)
    coll = Collection.create(db, settings, name, extractor, pca_dims=pca_dims or DEFAULT_PCA_DIMS)
    return add_pictures(coll, candidates, pca_dims=pca_dims, **options)


def add_pictures(
    coll: Collection, candidates: list[Candidate], *, pca_dims: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
    trees: int = DEFAULT_TREES, workers: int = 2, skipped: int = 0, progress: bool = True, root: Path | None = None,
    prune: bool = False, cluster: Cluster | None = None,
) -> LoadSummary:
    """Read, decode, embed and store the pictures the collection does not hold yet, a committed batch at a time,
    record where every file found lives (moves, copies, and with a `root` the files gone from it, forgotten with
    `prune`: ingest/sync.py), then `coll.finish`. Worker threads read and decode while the model runs on the
    previous batch; with a `cluster`, Ray tasks and actors do that middle part instead (ingest/distributed.py)."""
    known = store.stored_hashes(coll.db, coll.id)
    before = sync.snapshot(coll, root, candidates)
    seen: dict[str, tuple[str, str | None]] = {}
    if coll.pca is None:
        plan_pca_dims(coll, pca_dims, len(known) + len(candidates))
    summary = LoadSummary(coll.name, skipped=skipped)
    started = time.perf_counter()
    if cluster is not None:
        from ingest.distributed import store_on_ray

        stored = store_on_ray(coll, candidates, known, summary, cluster)
    else:
        stored = store_here(coll, candidates, known, summary, batch_size, workers)
    with tqdm(total=len(candidates), unit="img", desc=f"ingest {coll.name}", disable=not progress, smoothing=0.1) as bar:
        for files in stored:
            seen.update((path, (sha, label)) for path, sha, label in files if sha)
            bar.update(len(files))
    sync.reconcile(coll, root, before, seen, summary, prune=prune)
    coll.finish(trees=trees)
    summary.seconds = time.perf_counter() - started
    return summary


def store_here(coll: Collection, candidates: list[Candidate], known: set[str], summary: LoadSummary, batch_size: int,
               workers: int) -> Iterator[list[tuple[str, str | None, str | None]]]:
    """Embed batch by batch in this process while `workers` threads read and decode the next ones and one writer
    thread commits the previous ones, in order, each in its own transaction (the model never waits for COPY);
    yields (path, sha256, label) of each file of a committed batch."""
    with ThreadPoolExecutor(workers) as pool, ThreadPoolExecutor(1, thread_name_prefix="ris-writer") as writer:
        prepared = first_copies(bounded_map(pool, lambda c: prepare(c, known), candidates, ahead=batch_size * 2), known)
        writing: deque = deque()
        for batch in batched(prepared, batch_size):
            writing.append((writer.submit(write_batch, coll, embed_batch(coll, batch), summary), batch))
            while writing and (len(writing) > WRITES_AHEAD or writing[0][0].done()):
                yield committed(*writing.popleft())
        while writing:
            yield committed(*writing.popleft())


def committed(write: Future, batch: list[Prepared]) -> list[tuple[str, str | None, str | None]]:
    """(path, sha256, label) of each file of a batch, once its write has committed (its error raised here)."""
    write.result()
    return [(absolute(p.candidate.path), p.sha256, p.candidate.label) for p in batch]


def plan_pca_dims(coll: Collection, requested: int | None, most_images: int) -> None:
    """Settle the dims of a collection whose PCA is not fitted yet, before any work.

    Explicit --pca-dims above the number of images there can be is refused now, not after an hour of
    embedding. The default (128) is not shrunk to the candidates here: some may fail to decode, so the
    first fit (`Collection.finish`) shrinks it to the pictures actually embedded (e.g. --limit-per-class 1).
    """
    if most_images == 0:
        return
    dims = requested or DEFAULT_PCA_DIMS
    check_dims(dims, most_images if requested else None)
    if dims != coll.dims:
        coll.set_planned_dims(dims)


def store_batch(coll: Collection, batch: list[Prepared], summary: LoadSummary) -> None:
    """Embed the decoded pictures of a batch and commit them, with the batch's failures."""
    write_batch(coll, embed_batch(coll, batch), summary)


@dataclass(frozen=True)
class EmbeddedBatch:
    """A batch after the model: its files, the decoded ones' vectors, and the PCA version that projected them."""

    batch: list[Prepared]
    raw: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    pca_version: int = 0

    @property
    def fresh(self) -> list[Prepared]:
        return [p for p in self.batch if p.decoded is not None]


def embed_batch(coll: Collection, batch: list[Prepared]) -> EmbeddedBatch:
    """Run the model on the decoded pictures of a batch (no database work)."""
    fresh = [p for p in batch if p.decoded is not None]
    if not fresh:
        return EmbeddedBatch(batch)
    raw, embeddings = coll.embed(np.stack([p.decoded.pixels for p in fresh]))
    return EmbeddedBatch(batch, raw, embeddings, coll.row.pca_version)


def write_batch(coll: Collection, embedded: EmbeddedBatch, summary: LoadSummary) -> None:
    """Commit an embedded batch and its failures, and count them into `summary`."""
    batch, fresh = embedded.batch, embedded.fresh
    failures = [(absolute(p.candidate.path), p.failure) for p in batch if p.failure]
    store.record_failures(coll.db, coll.id, failures)
    summary.failures.extend(failures)
    summary.failed += len(failures)
    summary.present += sum(1 for p in batch if p.sha256 and p.decoded is None)
    if not fresh:
        return
    rows = [
        ImageRow(absolute(p.candidate.path), p.candidate.label, p.sha256, p.decoded.width, p.decoded.height, p.size)
        for p in fresh
    ]
    added = store.insert_images(coll.db, coll.id, rows, embedded.raw, embedded.embeddings, pca_version=embedded.pca_version)
    summary.ingested += added
    summary.present += len(fresh) - added
