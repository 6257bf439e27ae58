"""PCA: from 2048 raw floats to the few dims that are stored in `images.embedding` and searched.

Raw features are L2-normalised before PCA (and so are queries'), so that distances compare the
direction of features, not how strongly an image excites the network. PCA only centres and rotates
(no whitening), so `<->` on the reduced vectors approximates the distance between normalised features.
The parameters live in the database, so any process can project a query exactly as stored images were.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ingest.errors import CollectionError

MAX_DIMS = 2000  # pgvector indexes (HNSW, IVFFlat) take at most 2000 dims
PCA_SEED = 0
PCA_SAMPLE = 50_000  # rows PCA is fitted on at most (a seeded sample): 400 MB of raw features, whatever the collection


def normalize(raw: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; an all-zero row stays zero."""
    raw = np.asarray(raw, dtype=np.float32)
    norms = np.linalg.norm(raw, axis=1, keepdims=True)
    return raw / np.maximum(norms, np.float32(1e-12))


@dataclass(frozen=True)
class Pca:
    """A fitted PCA's parameters: enough to project, and to plot how much variance the dims keep."""

    mean: np.ndarray  # (2048,)
    components: np.ndarray  # (dims, 2048)
    explained_variance_ratio: np.ndarray  # (dims,)

    @property
    def dims(self) -> int:
        return self.components.shape[0]

    def project(self, raw: np.ndarray) -> np.ndarray:
        """Raw ResNet50 features (n, 2048) -> embeddings (n, dims), float32."""
        return ((normalize(raw) - self.mean) @ self.components.T).astype(np.float32)

    def to_bytes(self) -> tuple[bytes, bytes, bytes]:
        return tuple(np.ascontiguousarray(a, dtype="<f4").tobytes() for a in (self.mean, self.components, self.explained_variance_ratio))

    @classmethod
    def from_bytes(cls, mean: bytes, components: bytes, ratio: bytes) -> "Pca":
        m = np.frombuffer(mean, dtype="<f4")
        c = np.frombuffer(components, dtype="<f4").reshape(-1, m.shape[0])
        return cls(m, c, np.frombuffer(ratio, dtype="<f4"))


def check_dims(dims: int, n_images: int | None = None) -> None:
    """Refuse dims pgvector cannot index, or more dims than there are images to fit them on."""
    if dims < 1 or dims > MAX_DIMS:
        raise CollectionError(f"--pca-dims must be between 1 and {MAX_DIMS} (pgvector's index limit), got {dims}")
    if n_images is not None and dims > n_images:
        raise CollectionError(f"--pca-dims {dims} is more than the {n_images} images to fit PCA on; choose at most {n_images}")


def fit_pca(raw: np.ndarray, dims: int) -> Pca:
    """Fit PCA on normalised raw features, deterministically (fixed seed)."""
    from sklearn.decomposition import PCA

    check_dims(dims, len(raw))
    pca = PCA(n_components=dims, random_state=PCA_SEED).fit(normalize(raw))
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    return Pca(f32(pca.mean_), f32(pca.components_), f32(pca.explained_variance_ratio_))


PCA_REFIT_GROWTH = 4  # `refit_due`: a PCA is refitted once the collection holds this many times the pictures it was fitted on
PCA_REFIT_MIN_ROWS = 100  # ... and at least this many


def refit_due(fitted_dims: int, dims: int, stored: int, at_fit: int) -> int | None:
    """The dims to refit a PCA of `fitted_dims` to, for a collection planned at `dims` that holds `stored` pictures and
    held `at_fit` when it was fitted, or None.

    A fit cut to fewer dims than `dims` because there were no more pictures than that is refitted at `dims` once
    the collection holds `dims` pictures. Any fit is refitted once the collection holds PCA_REFIT_MIN_ROWS
    pictures and PCA_REFIT_GROWTH times those it held at the fit (at its own dims, or as many of `dims` as there
    are pictures if it was cut), until one was fitted on a full PCA_SAMPLE. From a dozen pictures that is a refit
    at 100, 128, 512, 2048, ... pictures: a growing collection is refitted a logarithmic number of times."""
    cut = fitted_dims < dims and fitted_dims >= at_fit
    if cut and stored >= dims:
        return dims
    if stored >= max(PCA_REFIT_MIN_ROWS, PCA_REFIT_GROWTH * at_fit) and at_fit < PCA_SAMPLE:
        return min(dims, stored) if cut else fitted_dims
    return None
