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


def run_tsne(vectors: np.ndarray, seed: int, progress: bool = False) -> tuple[np.ndarray, str]:
    """2-d openTSNE map of the embeddings (exact affinities, PCA initialisation), and a line saying how it was made."""
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
        xy = np.asarray(tsne.fit(vectors.astype(np.float64)), dtype=np.float64)
    return xy, f"openTSNE {openTSNE.__version__}, perplexity {perplexity:g}, seed {seed}, exact affinities, PCA initialisation"
