"""A load: candidate files -> decoded pixels -> ResNet50 features -> PostgreSQL, then PCA and the Annoy file.

Files are read, hashed and decoded by worker threads while the model runs on the previous batch, and a
writer thread commits each batch (COPY) while the model runs on the next; each batch is committed on its
own, in order, so an interrupted load keeps what it stored and a rerun skips it (by sha256). The end-of-load
work (`Collection.finish`: fit or apply PCA, build the index) runs under a per-collection lock, so concurrent
loads of one collection finish consistently.

A batch's own steps (read and hash, embed, commit) are ingest/batches.py, which Ray actors share
(ingest/distributed.py); where every file found lives is ingest/sync.py. The collection is reached only through
`Collection`'s verbs (`stored_hashes`, `store_pictures`, `record_failures`, `finish`): no SQL here.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from tqdm import tqdm

from ingest import sync
from ingest.batches import LoadSummary, Prepared, embed_batch, first_copies, prepare, write_batch
from ingest.collection import Collection
from ingest.config import DEFAULT_BATCH_SIZE, DEFAULT_TREES, Settings
from ingest.db import Database
from ingest.reduce import check_dims
from ingest.sources import Candidate

if TYPE_CHECKING:
    from ingest.distributed import Cluster
    from ingest.features import Extractor

DEFAULT_PCA_DIMS = 128
WRITES_AHEAD = 1  # embedded batches waiting for the writer thread besides the one it commits: bounds their memory


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
    pca_dims: int | None = None, raw_features: str = "half", **options,
) -> LoadSummary:
    """Store every new picture of `candidates` in collection `name` (created if new, keeping `raw_features`), then bring
    its PCA and Annoy file up to date. `options` are those of add_pictures."""
    if pca_dims is not None:
        check_dims(pca_dims)
    coll = Collection.create(db, settings, name, extractor, pca_dims=pca_dims or DEFAULT_PCA_DIMS, raw_features=raw_features)
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
    known = coll.stored_hashes()
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
    return [(p.path, p.sha256, p.candidate.label) for p in batch]


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
