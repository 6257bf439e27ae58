"""Quality against dimensions: leave-one-out precision@k of exact KNN at several PCA dims and on the raw
2048-d features, beside Annoy at the collection's dims and the published reference's numbers.

PCA for the sweep is fitted once on the report's images (their normalised raw features, a deterministic
full eigendecomposition), and each dims keeps its first components: the same subspace a fit of that many
components finds. The collection's stored PCA is never touched. Query time per dims is numpy brute force
over the report's images, so the column shows what dims cost a search and nothing else.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from search.evaluation import brute_force, exact_neighbours, percentiles, precision_at_k, time_each

SWEEP_DIMS = (10, 20, 50, 100, 200)
RAW_DIMS = 2048
# Chapter 4 of Koul, Ganju and Kasam, Practical Deep Learning for Cloud, Mobile, and Edge (O'Reilly, 2019): ResNet50
# with ImageNet weights on Caltech 101, precision@4 by dims, "raw" = 2048-d.
REFERENCE_K = 4
REFERENCE = {10: 0.66, 20: 0.80, 50: 0.868, 100: 0.886, 200: 0.888, RAW_DIMS: 0.8846}
TIMED_QUERIES = 30
NUMPY = "numpy brute force over the report's images"


@dataclass(frozen=True)
class SweepRow:
    """One method at one number of dims: its precision@k and per-query time, and the reference's precision@4."""

    method: str
    dims: int
    precision: float | None  # None when no query has a label
    p50_ms: float
    timed_with: str  # what the time measures
    reference: float | None  # the published precision@4 at these dims (ImageNet weights), if any

    def to_dict(self) -> dict:
        return asdict(self)


def fit_full_pca(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, components, explained variance ratio) of a PCA of every component of the (normalised) features,
    largest first. With more images than dims, the eigenvectors of the covariance matrix (its product in float32,
    the eigendecomposition in float64: what sklearn's covariance_eigh solver does, several times faster here);
    else an SVD of the centred rows. Deterministic, so no seed is needed."""
    mean = features.mean(axis=0, dtype=np.float64)
    centred = (features - mean).astype(np.float32)
    if len(features) > features.shape[1]:
        values, vectors = np.linalg.eigh((centred.T @ centred).astype(np.float64) / (len(features) - 1))
        values, components = np.clip(values[::-1], 0, None), vectors[:, ::-1].T
    else:
        _, singular, components = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
        values = singular**2 / max(len(features) - 1, 1)
    return mean, components.astype(np.float32), values / values.sum()


def sweep_dims(n_images: int) -> list[int]:
    """The reference's dims that a PCA of n_images rows can have (fewer than the images)."""
    return [d for d in SWEEP_DIMS if d < n_images]


def mean_precision(found: np.ndarray | list, ids: np.ndarray, labels: list[str | None], k: int) -> float | None:
    """Leave-one-out precision@k over the labelled queries; row i of `found` answers image i of `ids`."""
    label_of = dict(zip(ids.tolist(), labels))
    scores = [precision_at_k(labels[i], [label_of[j] for j in near], k) for i, near in enumerate(np.asarray(found).tolist())
              if labels[i] is not None]
    return float(np.mean(scores)) if scores else None


def query_ms(ids: np.ndarray, vectors: np.ndarray, k: int, rng: np.random.Generator) -> float:
    """p50 ms of one numpy brute-force query over every image of the report, on a seeded set of query rows."""
    picks = rng.choice(len(ids), min(TIMED_QUERIES, len(ids)), replace=False).tolist()
    v = np.asarray(vectors, dtype=np.float64)  # once: brute_force would otherwise convert all rows on every query
    _, ms = time_each(lambda row: brute_force(ids, v, v[row], k + 1), picks)
    return percentiles(ms)["p50_ms"]


def run_sweep(ids: np.ndarray, labels: list[str | None], raw: np.ndarray, mean: np.ndarray, components: np.ndarray, *, k: int,
              raw_found: np.ndarray, rng: np.random.Generator, progress: bool = False) -> list[SweepRow]:
    """Exact KNN at each sweep dims (projections on the first `components` of a PCA fitted on `raw`, the report's
    normalised raw features), and on raw itself (`raw_found`: its neighbours, already found for the raw section)."""
    rows = []
    reference = lambda d: REFERENCE.get(d) if k == REFERENCE_K else None  # noqa: E731
    centred = (raw - mean).astype(np.float32)
    for d in tqdm(sweep_dims(len(ids)), desc="dims sweep", unit="dims", disable=not progress):
        projected = centred @ components[:d].T
        found = exact_neighbours(ids, projected, np.arange(len(ids)), k)
        rows.append(SweepRow("exact KNN, PCA", d, mean_precision(found, ids, labels, k), query_ms(ids, projected, k, rng),
                             NUMPY, reference(d)))
    rows.append(SweepRow("exact KNN, raw", RAW_DIMS, mean_precision(raw_found, ids, labels, k), query_ms(ids, raw, k, rng),
                         NUMPY, reference(RAW_DIMS)))
    return rows
