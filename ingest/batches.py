"""One batch of a load, wherever it runs (a decode thread and the writer thread here, or a Ray task and actor):
files read and hashed (`prepare`), the first copy of each new content kept (`first_copies`), embedded
(`embed_batch`) and committed through the collection (`write_batch`), counted into the load's `LoadSummary`.

Nothing here knows SQL: a batch is stored by `Collection.store_pictures` and its failures by
`Collection.record_failures`, so ingest/load.py and ingest/distributed.py share this code and not the store's.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from ingest.errors import ImageError
from ingest.images import DecodedImage, decode_image, read_file
from ingest.sources import Candidate
from ingest.store import ImageRow

if TYPE_CHECKING:
    from ingest.collection import Collection


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

    @property
    def path(self) -> str:
        """The file's path as stored: absolute, so that reports and grids can open the picture later."""
        return stored_path(self.candidate)


def stored_path(candidate: Candidate) -> str:
    """A candidate's path as the collection records it (absolute)."""
    return str(candidate.path.absolute())


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
    failures = [(p.path, p.failure) for p in batch if p.failure]
    coll.record_failures(failures)
    summary.failures.extend(failures)
    summary.failed += len(failures)
    summary.present += sum(1 for p in batch if p.sha256 and p.decoded is None)
    if not fresh:
        return
    rows = [ImageRow(p.path, p.candidate.label, p.sha256, p.decoded.width, p.decoded.height, p.size) for p in fresh]
    added = coll.store_pictures(rows, embedded.raw, embedded.embeddings, pca_version=embedded.pca_version)
    summary.ingested += added
    summary.present += len(fresh) - added


def store_batch(coll: Collection, batch: list[Prepared], summary: LoadSummary) -> None:
    """Embed the decoded pictures of a batch and commit them, with the batch's failures (a Ray actor's whole call)."""
    write_batch(coll, embed_batch(coll, batch), summary)
