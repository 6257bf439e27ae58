"""The 2-d map of a report: openTSNE on the stored embeddings, seeded, with a progress bar.

Why openTSNE rather than scikit-learn's TSNE is measured in README (Report); this module only runs it.
"""
from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

TSNE_PERPLEXITY = 30
TSNE_EARLY_ITER, TSNE_ITER = 250, 500  # openTSNE's defaults, spelled out for the progress bar


def tsne_perplexity(n: int) -> float:
    """30, or less for small collections (t-SNE needs about three times the perplexity in neighbours)."""
    return float(min(TSNE_PERPLEXITY, max(1, (n - 1) // 3)))


def tsne_threads(n: int) -> int:
    """Every core for large maps; one for small ones, where threads cost more than they save (and wait on
    each other badly when another process holds a core). The map is the same for any number of threads."""
    if n < 2000:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def tsne_neighbours(n: int) -> int:
    """How many exact neighbours of each point t-SNE's affinities use (openTSNE's own choice: 3 x perplexity)."""
    return min(n - 1, int(3 * tsne_perplexity(n)))


def run_tsne(vectors: np.ndarray, seed: int, progress: bool = False, *, neighbours: tuple[np.ndarray, np.ndarray] | None = None,
             init: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """2-d openTSNE map of the vectors (exact affinities, PCA initialisation), and a line saying how it was made.

    For 2048-d raw features, give `neighbours` (row numbers and distances of each point's tsne_neighbours(n)
    exact nearest others) and `init` (the rows' first two principal components), both already computed by the
    report: openTSNE would otherwise search and fit them again, which costs far more than the map itself."""
    import openTSNE

    perplexity = tsne_perplexity(len(vectors))
    every = 25
    with tqdm(total=TSNE_EARLY_ITER + TSNE_ITER, desc="t-SNE", unit="iter", disable=not progress) as bar:

        def tick(iteration, error, embedding) -> bool:
            bar.update(every)
            return False  # never stop early

        tsne = openTSNE.TSNE(
            perplexity=perplexity,
            early_exaggeration_iter=TSNE_EARLY_ITER,
            n_iter=TSNE_ITER,
            neighbors="exact",
            random_state=seed,
            n_jobs=tsne_threads(len(vectors)),
            callbacks=tick,
            callbacks_every_iters=every,
            verbose=False,
        )
        if neighbours is None:
            xy = tsne.fit(vectors.astype(np.float64))
        else:
            knn = openTSNE.nearest_neighbors.PrecomputedNeighbors(*neighbours)
            affinities = openTSNE.affinity.PerplexityBasedNN(perplexity=perplexity, knn_index=knn, n_jobs=tsne.n_jobs)
            start = openTSNE.initialization.jitter(openTSNE.initialization.rescale(np.asarray(init, np.float64)), random_state=seed)
            xy = tsne.fit(affinities=affinities, initialization=start)
        xy = np.asarray(xy, dtype=np.float64)
    return xy, f"openTSNE {openTSNE.__version__}, perplexity {perplexity:g}, seed {seed}, exact affinities, PCA initialisation"
