"""The Annoy file of a collection: derived from the `images` table, never the other way round.

Item ids are `images.id`; the metric is euclidean, whose ranking matches pgvector's `<->`. The file is
written to a temporary name and renamed, and a JSON sidecar records what it was built from, so a
reader can tell a stale index (the table changed since) from a fresh one.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ingest.atomic import replacing, write_atomically
from ingest.config import DEFAULT_TREES
from ingest.db import Database
from ingest.store import CollectionRow, embedding_state, vector_chunks

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


def build_index(db: Database, annoy_dir: Path, coll: CollectionRow, trees: int = DEFAULT_TREES) -> Sidecar:
    """Build the collection's index from its stored embeddings and swap it in atomically."""
    from annoy import AnnoyIndex

    state = embedding_state(db, coll.id)
    index = AnnoyIndex(coll.pca_dims, METRIC)
    index.set_seed(ANNOY_SEED)
    items, max_id = 0, 0
    for ids, vectors in vector_chunks(db, coll.id, "embedding"):
        for item, vector in zip(ids.tolist(), vectors):
            index.add_item(item, vector)
        items, max_id = items + len(ids), int(ids[-1])
    index.build(trees, n_jobs=1)  # one job: the same seed gives the same trees
    ann = index_path(annoy_dir, coll.name)
    sidecar = Sidecar(coll.name, items, max_id, coll.pca_dims, state["pca_version"], trees, METRIC, time.time())
    with replacing(ann) as tmp:
        index.save(str(tmp))
        index.unload()
    write_atomically(sidecar_path(ann), json.dumps(asdict(sidecar), indent=2))
    return sidecar


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
