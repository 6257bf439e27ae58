"""How well and how fast neighbours are found: the numbers `search report` shows and `bench/search.py` prints.

One copy of each measure, so the page and the benchmark can never disagree on what recall or p95 means
(ann-benchmarks keeps its metrics in one module that both its plots and its website import, for the same
reason). Everything here takes arrays, lists and callables; nothing reads the database.

The baseline is `brute_force`: exact euclidean k-NN in numpy, ties broken by id as SQL breaks them, so
its answer is pgvector's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from ingest import Engine, QueryArgs

BEST_WORST = 5  # labels shown at each end of the precision ranking
CHUNK = 512  # query rows per block of the numpy distance matrix


@dataclass(frozen=True)
class LabelScore:
    """precision@k of one label's queries, exact and Annoy."""

    label: str
    queries: int
    exact: float
    annoy: float


@dataclass(frozen=True)
class Latency:
    """Per-query time of one engine over the same stored vectors, in milliseconds."""

    engine: str
    queries: int
    p50_ms: float
    p95_ms: float


# Neighbours


def brute_force(ids: np.ndarray, vectors: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The baseline: exact euclidean k-NN in numpy over the same vectors (ties broken by id, as in SQL)."""
    diff = np.asarray(vectors, dtype=np.float64) - np.asarray(query, dtype=np.float64)  # no copy if already float64
    distances = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    order = np.lexsort((ids, distances))[:k]
    return ids[order], distances[order]


def exact_neighbours(ids: np.ndarray, vectors: np.ndarray, rows: np.ndarray, k: int, *, progress: bool = False,
                     distances: bool = False):
    """Ids (len(rows), k) of the k nearest other images of each query row, as pgvector ranks them (and, with
    `distances`, their euclidean distances beside them: what a t-SNE of the vectors needs).

    A matrix product shortlists candidates a block of queries at a time; brute_force then ranks each
    shortlist with the engines' own distance and tie-break, so the answer is the baseline's. The product runs
    in float32 (twice as fast as float64 on 2048-d features): its rounding (about 1e-6 of a squared distance)
    could only push a true neighbour past the 16 spare places of the shortlist if 16 others tied with it.
    """
    v = np.asarray(vectors, dtype=np.float32)
    squares = np.einsum("ij,ij->i", v, v)
    shortlist = min(len(ids) - 1, k + 16)
    found, found_d = np.empty((len(rows), k), np.int64), np.empty((len(rows), k), np.float64)
    with tqdm(total=len(rows), desc="exact k-NN", unit="query", disable=not progress) as bar:
        for start in range(0, len(rows), CHUNK):
            block = rows[start : start + CHUNK]
            d2 = squares[block, None] - 2 * v[block] @ v.T + squares[None, :]
            d2[np.arange(len(block)), block] = np.inf  # the query itself
            candidates = np.argpartition(d2, shortlist - 1, axis=1)[:, :shortlist]
            for i, (row, cand) in enumerate(zip(block, candidates)):
                cand = cand[cand != row]
                found[start + i], found_d[start + i] = brute_force(ids[cand], vectors[cand], vectors[row], k)
            bar.update(len(block))
    return (found, found_d) if distances else found


def engine_neighbours(engine: Engine, ids: np.ndarray, rows: np.ndarray, k: int, *, fetch: int | None = None,
                      args: QueryArgs = QueryArgs(), progress: bool = False) -> list[list[int]]:
    """An engine's k nearest other images of each query row, from its own index (`Engine.neighbours_of_stored`:
    for Annoy the bare file lookup, as the report's recall measures it).

    Ids not in `ids` are skipped, so when `ids` are a sample of the collection, ask for `fetch` neighbours (more
    than k) to keep k of them.
    """
    members = set(ids.tolist())
    found = []
    for row in tqdm(rows.tolist(), desc=f"{engine.name} k-NN", unit="query", disable=not progress):
        item = int(ids[row])
        near = engine.neighbours_of_stored(item, max(fetch or 0, k), args)
        found.append([i for i in near if i in members][:k])
    return found


# Quality


def recall(approx: Sequence[Sequence[int]], exact: Sequence[Sequence[int]]) -> float:
    """Mean share of each query's exact neighbours that the approximate answer also holds (order ignored)."""
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact)]))


def precision_at_k(label: str | None, neighbour_labels: list[str | None], k: int) -> float:
    """Share of the k neighbours carrying the query's label (missing neighbours count as wrong)."""
    return sum(1 for x in neighbour_labels if x == label) / k


def score(exact: np.ndarray, approx: list[list[int]], *, ids: np.ndarray, labels: list[str | None], rows: np.ndarray,
          k: int) -> dict:
    """Leave-one-out precision@k (exact and Annoy) over labelled queries, per label, and Annoy's recall@k.

    `ids` and `labels` describe every image (neighbours are looked up there); `rows` are the queries,
    row by row with `exact` and `approx`. Unlabelled queries count for recall only.
    """
    label_of = dict(zip(ids.tolist(), labels))
    per_label: dict[str, list[tuple[float, float]]] = {}
    for row, e, a in zip(rows.tolist(), exact.tolist(), approx):
        label = labels[row]
        if label is not None:
            pair = (precision_at_k(label, [label_of[i] for i in e], k), precision_at_k(label, [label_of[i] for i in a], k))
            per_label.setdefault(label, []).append(pair)
    scores = [LabelScore(lb, len(p), float(np.mean([x[0] for x in p])), float(np.mean([x[1] for x in p]))) for lb, p in per_label.items()]
    pairs = [pair for p in per_label.values() for pair in p]
    return {
        "exact": float(np.mean([p[0] for p in pairs])) if pairs else None,
        "annoy": float(np.mean([p[1] for p in pairs])) if pairs else None,
        "recall": recall(approx, exact.tolist()),
        "per_label": scores,
        "best": sorted(scores, key=lambda s: (-s.exact, s.label))[:BEST_WORST],
        "worst": sorted(scores, key=lambda s: (s.exact, s.label))[:BEST_WORST],
    }


def explained_variance_curve(features: np.ndarray, seed: int) -> np.ndarray:
    """Cumulative explained variance of a full PCA refit on `features` (one row per image).

    The covariance solver is far faster when there are more images than dims, and gives the same curve.
    """
    from sklearn.decomposition import PCA

    solver = "covariance_eigh" if len(features) > features.shape[1] else "full"
    pca = PCA(n_components=min(features.shape), svd_solver=solver, random_state=seed)
    return np.cumsum(pca.fit(features).explained_variance_ratio_)


# Speed


def timed(search: Callable[[Any], Any], query: Any) -> tuple[Any, float]:
    """One call's answer and its wall time in milliseconds: the one stopwatch every latency here is read from."""
    start = time.perf_counter()
    answer = search(query)
    return answer, 1000 * (time.perf_counter() - start)


def time_each(search: Callable[[Any], Any], queries: Sequence) -> tuple[list, np.ndarray]:
    """Answers and per-query ms of one engine over all queries, after one untimed warm-up call
    (the first call pays for connections and page faults that no later query sees)."""
    search(queries[0])
    answers, ms = [], []
    for query in queries:
        answer, took = timed(search, query)
        answers.append(answer)
        ms.append(took)
    return answers, np.array(ms)


def time_interleaved(searches: dict[str, Callable[[Any], Any]], queries: Sequence, *,
                     progress: bool = False) -> tuple[dict[str, list], dict[str, list[float]]]:
    """Answers and per-query ms of several engines, each query passed to every engine in turn, so a
    change in the machine's load falls on all of them alike."""
    answers: dict[str, list] = {name: [] for name in searches}
    times: dict[str, list[float]] = {name: [] for name in searches}
    for query in tqdm(list(queries), desc="latency", unit="query", disable=not progress):
        for name, search in searches.items():
            answer, took = timed(search, query)
            answers[name].append(answer)
            times[name].append(took)
    return answers, times


def percentiles(ms: Sequence[float]) -> dict[str, float]:
    """p50 and p95 of per-query times: the typical query and the slow one a user still meets often."""
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


def latency_of(engine: str, ms: Sequence[float]) -> Latency:
    """One engine's row of the latency table."""
    return Latency(engine, len(ms), **percentiles(ms))
