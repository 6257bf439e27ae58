"""`search audit`: what in a labelled collection cannot be trusted before training or evaluating on it.

Four findings, all read from each picture's k nearest other pictures (found once, by `neighbours`):
- leaks: one stored picture whose files sit in different splits, and near-identical pictures (within the
  duplicates threshold) in different splits. Splits come from a fine-tuning run (finetune_splits, matched by
  sha256, so a run's own tuned collection is audited against it too) or from `--split-by REGEX` on the path;
- label suspects: pictures whose neighbours carry one other label at agreement >= `agreement` while the picture
  sits within that label's usual spread (an outlier score under `outlier_score` against it), and pictures whose
  files sit under folders of different labels (conflicts, listed first);
- outliers: pictures far from every picture of their own label: the mean distance to the label's 3 nearest other
  members over the label's median of that distance (1 is typical), at least `outlier_score`, suspects left out
  (their label explains the distance). Pictures without a label form one group of their own;
- per-label leave-one-out precision@k (search.evaluation.precision_at_k, as `search report` computes it) and
  the label pairs most often confused (how many of label A's neighbours carry label B).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
from tqdm import tqdm

from ingest import Collection, EngineName, finetune_runs, identical_files, split_by_hash
from ingest.errors import RisError
from search.duplicates import DEFAULT_THRESHOLD
from search.audit_findings import (
    Confusion, LabelQuality, Leak, Outlier, Suspect, conflicts, find_leaks, find_suspects, label_codes, label_quality, nearest_among,
    outlier_scores, splits_of_rows,
)
from search.evaluation import exact_neighbours
from search.split_rule import SplitRule

DEFAULT_K = 10
DEFAULT_AGREEMENT = 0.6  # a clear majority of the neighbours: with k = 10, 6 of them
DEFAULT_OUTLIER_SCORE = 4.0  # four times the label's median (Caltech 101, random weights: 0.2% of pictures)
EXACT_MAX_ROWS = 50_000  # above this, neighbours come from an engine's index (n x n distances grow past seconds)
DETAIL_ROWS = 50_000  # ids per read of paths and labels


@dataclass(frozen=True)
class Images:
    """Every searchable picture, in id order: its vector, shown path, label (split folder dropped), sha256, and the
    label stored for the shown path (where the folder loaded ends: the root other files' labels are read from)."""

    ids: np.ndarray
    vectors: np.ndarray
    paths: list[str]
    labels: list[str | None]
    sha256: list[str]
    stored_labels: list[str | None]


@dataclass(frozen=True)
class Neighbours:
    rows: np.ndarray  # (n, k) row numbers of each picture's nearest other pictures, nearest first; -1 where none
    distances: np.ndarray  # (n, k) euclidean; inf where rows is -1
    engine: dict  # how they were found, for the summary line and the benchmark


@dataclass
class Audit:
    collection: str
    k: int
    leaks: list[Leak]
    suspects: list[Suspect]
    outliers: list[Outlier]
    labels: list[LabelQuality]
    confused: list[Confusion]
    splits: str  # where the splits came from
    notes: list[str]  # why a section is empty
    seconds: float
    images: Images = field(repr=False)
    neighbours: Neighbours = field(repr=False)

    def to_dict(self) -> dict:
        """What `search audit --json` prints: exactly the keys docs/audit.md lists."""
        place = lambda p: {"id": p.id, "path": p.path, "split": p.split}  # noqa: E731
        return {
            "collection": self.collection, "k": self.k,
            "leaks": [{"a": place(x.a), "b": place(x.b), "distance": x.distance} for x in self.leaks],
            "suspects": [{"id": s.id, "path": s.path, "label": s.label, "suggested": s.suggested, "agreement": s.agreement}
                         for s in self.suspects],
            "outliers": [{"id": o.id, "path": o.path, "label": o.label, "score": o.score} for o in self.outliers],
            "labels": [{"label": q.label, "images": q.images, "precision_at_k": q.precision_at_k} for q in self.labels],
            "confused": [{"a": c.a, "b": c.b, "count": c.count} for c in self.confused],
        }

    def limited(self, n: int | None) -> "Audit":
        """The same audit with at most n entries in each section (the worst ones: every section is sorted worst first)."""
        if n is None:
            return self
        return replace(self, leaks=self.leaks[:n], suspects=self.suspects[:n], outliers=self.outliers[:n], labels=self.labels[:n],
                       confused=self.confused[:n])


def audit(coll: Collection, *, k: int = DEFAULT_K, run: str | None = None, split_by: str | None = None,
          agreement: float = DEFAULT_AGREEMENT, threshold: float = DEFAULT_THRESHOLD, outlier_score: float = DEFAULT_OUTLIER_SCORE,
          progress: bool = False) -> Audit:
    """Audit a searchable collection; splits from fine-tuning run `run` (default: the latest) or from `split_by`."""
    started = time.perf_counter()
    if run is not None and split_by is not None:
        raise RisError("give --run or --split-by, not both")
    if k < 1:
        raise RisError(f"k must be at least 1, got {k}")
    rule = SplitRule.parse(split_by) if split_by is not None else None
    run_name, by_sha = (None, {}) if rule else run_splits(coll, run)
    coll.check_searchable()
    images = load_images(coll, rule)
    if len(images.ids) < 2:
        raise RisError(f"an audit needs at least 2 searchable images; {coll.name!r} has {len(images.ids)}")
    near = neighbours(coll, images, k, progress=progress)
    copies = identical_files(coll.db, coll.id)
    names, codes = label_codes(images.labels)
    notes = []
    split_of = splits_of_rows(images, rule, by_sha)
    if rule is None and run_name is None:
        notes.append(f"no splits: {coll.name!r} has no fine-tuning run and no --split-by was given, so no leaks are looked for")
        source = "none"
    else:
        source = f"--split-by {split_by}" if rule else f"fine-tuning run {run_name}"
        if not any(s is not None for s in split_of):
            notes.append(f"no picture is in a split of {source}")
    found = find_leaks(images, near, split_of, copies if rule else {}, rule, threshold)
    scores, spread = outlier_scores(images, near, codes, len(names) + 1)
    if names:
        suspects, flagged = find_suspects(images, near, names, codes, spread, agreement, outlier_score)
        files = conflicts(images, near, copies, rule, names, codes, k)
        listed = {(f.id, f.path) for f in files}
        suspects = files + [s for s in suspects if (s.id, s.path) not in listed]
        quality, confused = label_quality(images, near, names, codes, k)
    else:
        notes.append("no picture has a label, so there are no label suspects, per-label precision or confused labels "
                     "(a load labels a picture by its folder under the folder loaded)")
        suspects, flagged, quality, confused = [], np.zeros(len(images.ids), bool), [], []
    far = np.flatnonzero((scores >= outlier_score) & ~flagged)
    outliers = [Outlier(int(images.ids[r]), images.paths[r], images.labels[r], round(float(scores[r]), 4))
                for r in far[np.argsort(-scores[far], kind="stable")].tolist()]
    return Audit(coll.name, k, found, suspects, outliers, quality, confused, source, notes, round(time.perf_counter() - started, 2),
                 images, near)


# --- reading ---------------------------------------------------------------------------------------------


def load_images(coll: Collection, rule: SplitRule | None) -> Images:
    """Every searchable picture's vector (read a chunk at a time), shown path, label and sha256."""
    ids, vectors = coll.read_vectors("embedding")
    paths, labels, shas, stored = [], [], [], []
    for start in range(0, len(ids), DETAIL_ROWS):
        block = ids[start:start + DETAIL_ROWS].tolist()
        details = coll.details(block)
        for i in block:
            found = details[i]
            paths.append(found.path)
            labels.append(rule.label(found.path, found.label) if rule else found.label)
            shas.append(found.sha256)
            stored.append(found.label)
    return Images(ids, vectors, paths, labels, shas, stored)


def run_splits(coll: Collection, run: str | None) -> tuple[str | None, dict[str, str]]:
    """(run, sha256 -> 'train'|'holdout') of a fine-tuning run of this collection (made from it, or producing it);
    with no run given, the latest (by the creation of the collection it produced), or (None, {}) if there is none."""
    runs = finetune_runs(coll.db, coll)
    if run is None and not runs:
        return None, {}
    if run is not None and run not in runs:
        raise RisError(f"no fine-tuning run {run!r} of collection {coll.name!r} (runs: {', '.join(runs) or 'none'})")
    run = run or runs[0]
    return run, split_by_hash(coll.db, run)


# --- neighbours ------------------------------------------------------------------------------------------


def neighbours(coll: Collection, images: Images, k: int, *, engine: str = EngineName.ANNOY, progress: bool = False) -> Neighbours:
    """Each picture's k nearest other pictures: exact (numpy, a block of queries at a time) up to EXACT_MAX_ROWS,
    else from `engine`'s index (the Engine interface: any engine answers). The one place that chooses how
    neighbours are found."""
    if len(images.ids) <= EXACT_MAX_ROWS:
        return exact(images, k, progress)
    coll.check_searchable(engine)
    return approximate(coll, images, k, engine, progress)


def exact(images: Images, k: int, progress: bool) -> Neighbours:
    n = len(images.ids)
    found, d = exact_neighbours(images.ids, images.vectors, np.arange(n), min(k, n - 1), progress=progress, distances=True)
    return Neighbours(*padded(np.searchsorted(images.ids, found), d, k), {"engine": "exact (numpy)", "rows": n})


def approximate(coll: Collection, images: Images, k: int, engine_name: str, progress: bool) -> Neighbours:
    """The engine's neighbourhood of every row its index holds (`Engine.neighbourhoods`: the Annoy file's nearest
    items, rows removed since its build skipped), merged with the rows it lacks (written since), searched exactly."""
    engine = coll.engine(engine_name)
    ids, n = images.ids, len(images.ids)
    rows, dist = np.full((n, k), -1, np.int64), np.full((n, k), np.inf)
    held = np.zeros(n, bool)
    with tqdm(total=n, desc=f"{engine.name} k-NN", unit="img", disable=not progress) as bar:
        for near in engine.neighbourhoods(k):
            row = row_of(ids, np.array([near.image_id]))[0]
            if row < 0:  # stored after the images were read
                continue
            found = row_of(ids, near.ids)
            keep = found >= 0
            found, d = found[keep][:k], near.distances[keep][:k]
            rows[row, :len(found)], dist[row, :len(found)], held[row] = found, d, True
            bar.update()
    delta = np.flatnonzero(~held)
    if len(delta):
        merge_delta(images, rows, dist, delta, k)
    return Neighbours(rows, dist, {"engine": str(engine.name), **engine.describe(k), "delta_rows": len(delta)})


def row_of(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row numbers of image ids among `ids` (sorted), -1 for ids not there."""
    at = np.minimum(np.searchsorted(ids, wanted), len(ids) - 1)
    return np.where(ids[at] == wanted, at, -1)


def merge_delta(images: Images, rows: np.ndarray, dist: np.ndarray, delta: np.ndarray, k: int) -> None:
    """Rows the Annoy file lacks: their own neighbours exactly, and each of them as a candidate for every other row."""
    everyone = np.arange(len(images.ids))
    rows[delta], dist[delta] = nearest_among(images.vectors, delta, everyone, k)
    others = np.setdiff1d(everyone, delta)
    found, d = nearest_among(images.vectors, others, delta, k)
    cand_rows, cand_d = np.concatenate([rows[others], found], axis=1), np.concatenate([dist[others], d], axis=1)
    order = np.argsort(cand_d, axis=1, kind="stable")[:, :k]
    rows[others], dist[others] = np.take_along_axis(cand_rows, order, 1), np.take_along_axis(cand_d, order, 1)


def padded(rows: np.ndarray, distances: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) arrays from fewer columns (a collection of k or fewer pictures): -1 rows at infinite distance."""
    extra = k - rows.shape[1]
    return (np.pad(rows, ((0, 0), (0, extra)), constant_values=-1).astype(np.int64),
            np.pad(distances.astype(np.float64), ((0, 0), (0, extra)), constant_values=np.inf))
