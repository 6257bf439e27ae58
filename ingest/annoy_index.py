"""The Annoy file of a collection: derived from the `images` table, never the other way round.

Items are dense per collection (0..n-1 in id order) and a numpy file beside the index maps them back to
`images.id`, so a file's size follows its own collection's rows, whatever ids other collections took. The
metric is euclidean, whose ranking matches pgvector's `<->`.

A build writes a new pair of data files under a fresh name, then swaps the JSON sidecar that names them
(one rename), so a reader sees either the old pair or the new one and queries keep using the old file until
the new one is in place. The sidecar records the collection's watermarks at build time: its PCA version,
`embedding_seq` (rows written after it are the index's delta, searched exactly in SQL) and `removed_rows`
(items that may have been removed since, so a query fetches that many more).
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ingest.atomic import replacing, write_atomically
from ingest.config import DEFAULT_TREES
from ingest.db import Database
from ingest.names import file_stem
from ingest.store import CollectionRow, settled_row, vector_chunks

METRIC = "euclidean"
ANNOY_SEED = 0


@dataclass(frozen=True)
class Sidecar:
    """What an index file was built from, and the names of its data files."""

    collection: str
    file: str  # the Annoy file, beside the sidecar
    ids_file: str  # item number -> images.id, int64
    items: int
    dims: int
    pca_version: int
    embedding_seq: int  # rows with a higher images.embedding_seq are not in the file
    removed_rows: int  # collections.removed_rows when the build read the table
    trees: int
    metric: str
    built_at: float


def sidecar_path(annoy_dir: Path, collection: str) -> Path:
    """Every file name here starts with `file_stem` of the collection's name: inside `annoy_dir` whatever the name."""
    return annoy_dir / f"{file_stem(collection)}.json"


def read_sidecar(annoy_dir: Path, collection: str) -> Sidecar | None:
    """The sidecar of a collection's index, or None if there is none or it is unreadable."""
    try:
        return Sidecar(**json.loads(sidecar_path(annoy_dir, collection).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def index_path(annoy_dir: Path, collection: str) -> Path:
    """The Annoy file in use (the one the sidecar names), or where it would be if there is none."""
    sidecar = read_sidecar(annoy_dir, collection)
    return annoy_dir / (sidecar.file if sidecar else f"{file_stem(collection)}.ann")


def data_files(annoy_dir: Path, collection: str) -> list[Path]:
    """Every data file of the collection's builds, current or superseded (not other collections', whatever their names)."""
    stem = file_stem(collection)
    pattern = re.compile(rf"{re.escape(stem)}\.\d+\.(ann|ids\.npy)")
    if not annoy_dir.is_dir():
        return []
    legacy = annoy_dir / f"{stem}.ann"  # the single file of builds before migration 0004 (items were images.id)
    return [p for p in annoy_dir.iterdir() if pattern.fullmatch(p.name)] + ([legacy] if legacy.exists() else [])


def remove_index_files(annoy_dir: Path, collection: str) -> None:
    """Delete a collection's sidecar and data files (a removed collection's index)."""
    sidecar_path(annoy_dir, collection).unlink(missing_ok=True)
    for path in data_files(annoy_dir, collection):
        path.unlink(missing_ok=True)


def build_index(db: Database, annoy_dir: Path, coll: CollectionRow, trees: int = DEFAULT_TREES) -> Sidecar:
    """Build the collection's index from the embeddings written up to its current watermark, and swap it in.

    The watermark is read first: rows written after it (by loads running meanwhile) carry a higher
    embedding_seq and stay in the delta. It is read once no batch holds the collection row (`settled_row`): a batch
    stamped at or below it has committed everywhere, also on a cluster's workers, which commit after the coordinator.
    Annoy builds on disk, so memory holds the trees, not every vector twice.
    """
    from annoy import AnnoyIndex

    state = settled_row(db, coll.name)
    stem = f"{file_stem(coll.name)}.{time.time_ns()}"
    ann, ids_path = annoy_dir / f"{stem}.ann", annoy_dir / f"{stem}.ids.npy"
    index = AnnoyIndex(state.pca_dims, METRIC)
    index.set_seed(ANNOY_SEED)
    with replacing(ann) as tmp:
        index.on_disk_build(str(tmp))
        blocks = []
        for ids, vectors in vector_chunks(db, coll.id, "embedding", through=state.embedding_seq):
            for item, vector in enumerate(vectors, start=sum(len(b) for b in blocks)):
                index.add_item(item, vector)
            blocks.append(ids)
        index.build(trees, n_jobs=1)  # one job: the same seed gives the same trees
        index.unload()
    ids = np.concatenate(blocks) if blocks else np.zeros(0, np.int64)
    with replacing(ids_path, ".npy") as tmp:
        np.save(tmp, ids)
    sidecar = Sidecar(coll.name, ann.name, ids_path.name, len(ids), state.pca_dims, state.pca_version,
                      state.embedding_seq, state.removed_rows, trees, METRIC, time.time())
    write_atomically(sidecar_path(annoy_dir, coll.name), json.dumps(asdict(sidecar), indent=2))
    for old in data_files(annoy_dir, coll.name):  # readers that mapped them keep their pages until they close
        if old not in (ann, ids_path):
            old.unlink(missing_ok=True)
    return sidecar


def staleness(sidecar: Sidecar | None, annoy_dir: Path, coll: CollectionRow) -> str | None:
    """Why an index cannot answer for the collection as its row describes it now, or None if it can.

    Only the row is read: rows added since the build are the delta (searched exactly), removed ones are
    filtered out by the row lookup; a new PCA or other dims make every item wrong.
    """
    if sidecar is None or not (annoy_dir / sidecar.file).exists():
        return f"no Annoy index at {index_path(annoy_dir, coll.name)}"
    for key, now in (("dims", coll.pca_dims), ("pca_version", coll.pca_version)):
        if getattr(sidecar, key) != now:
            return f"the Annoy index {annoy_dir / sidecar.file} is stale ({key} {getattr(sidecar, key)} in the index, {now} in the table)"
    return None
