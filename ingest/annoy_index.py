"""The Annoy file of a collection: derived from the `images` table, never the other way round.

Item ids are `images.id`; the metric is euclidean, whose ranking matches pgvector's `<->`. The file is
written to a temporary name and renamed, and a JSON sidecar records what it was built from, so a
reader can tell a stale index (the table changed since) from a fresh one.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from annoy import AnnoyIndex
from sqlalchemy.engine import Engine

from ingest.config import DEFAULT_TREES
from ingest.store import CollectionInfo, embedding_state, read_vectors

METRIC = "euclidean"
ANNOY_SEED = 0


@dataclass(frozen=True)
class Sidecar:
    """What an index file was built from."""

    collection: str
    items: int
    max_id: int
    dims: int
    pca_version: int
    trees: int
    metric: str
    built_at: float


def index_path(annoy_dir: Path, collection: str) -> Path:
    return annoy_dir / f"{collection}.ann"


def sidecar_path(ann: Path) -> Path:
    return ann.with_suffix(".json")


def build_index(engine: Engine, annoy_dir: Path, coll: CollectionInfo, trees: int = DEFAULT_TREES) -> Sidecar:
    """Build the collection's index from its stored embeddings and swap it in atomically."""
    ids, vectors = read_vectors(engine, coll.id, "embedding", "AND i.embedding IS NOT NULL")
    state = embedding_state(engine, coll.id)
    index = AnnoyIndex(coll.pca_dims, METRIC)
    index.set_seed(ANNOY_SEED)
    for item, vector in zip(ids.tolist(), vectors):
        index.add_item(item, vector)
    index.build(trees, n_jobs=1)  # one job: the same seed gives the same trees
    ann = index_path(annoy_dir, coll.name)
    ann.parent.mkdir(parents=True, exist_ok=True)
    sidecar = Sidecar(coll.name, len(ids), int(ids.max()) if len(ids) else 0, coll.pca_dims, state["pca_version"], trees, METRIC, time.time())
    tmp = ann.with_name(f".{ann.name}.{os.getpid()}.tmp")
    index.save(str(tmp))
    index.unload()
    os.replace(tmp, ann)
    write_atomically(sidecar_path(ann), json.dumps(asdict(sidecar), indent=2))
    return sidecar


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_sidecar(ann: Path) -> Sidecar | None:
    """The sidecar of an index file, or None if there is none or it is unreadable."""
    try:
        return Sidecar(**json.loads(sidecar_path(ann).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def staleness(sidecar: Sidecar | None, ann: Path, state: dict) -> str | None:
    """Why an index cannot be trusted for the table's current state, or None if it is fresh."""
    if sidecar is None or not ann.exists():
        return f"no Annoy index at {ann}"
    for key in ("items", "max_id", "dims", "pca_version"):
        if getattr(sidecar, key) != state[key]:
            return f"the Annoy index {ann} is stale ({key} {getattr(sidecar, key)} in the index, {state[key]} in the table)"
    return None
