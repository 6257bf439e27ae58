"""`search report`: one HTML page (index.html with PNGs beside it) that shows what a collection looks like
and how well and how fast its two engines find neighbours.

The images a report looks at are the whole collection, or `--sample N` of them drawn with the seed: they
are the points of the t-SNE maps, the features of the PCA curve and the queries of the quality numbers.
Neighbours are always searched among every image of the collection, as the engines do.

Exact neighbours of every query come from numpy (brute force over the stored embeddings, ties broken by id
as in SQL); that is pgvector's answer, and the report checks it on the latency queries. Annoy's come from
the collection's Annoy file. Everything random is seeded, so one seed gives the same numbers and maps.
"""
from __future__ import annotations

import html
import os
import sys
import time
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from tqdm import tqdm

from ingest.db import Database
from ingest.errors import RisError
from ingest.reduce import normalize
from ingest.store import CollectionInfo, get_collection, image_paths, read_vectors, resolve_collection
from search.engines import AnnoyEngine, PgvectorEngine, brute_force
from search.plot import THUMB, draw_row, thumbnail
from search.query import check_searchable

import matplotlib.pyplot as plt  # noqa: E402  (after search.plot, which selects the Agg backend)
from matplotlib import patheffects  # noqa: E402
from matplotlib.colors import hsv_to_rgb  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
from PIL import Image  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402
from scipy.spatial.distance import cdist  # noqa: E402

TSNE_PERPLEXITY = 30
TSNE_EARLY_ITER, TSNE_ITER = 250, 500  # openTSNE's defaults, spelled out for the progress bar
TSNE_CHOICE = (
    "t-SNE by openTSNE (Barnes-Hut gradients, exact neighbour affinities), chosen over scikit-learn's TSNE after one "
    "measurement on 8,677 x 128 random clustered vectors, 2 cores, perplexity 30, seed 0: openTSNE took 38-49 s and "
    "scikit-learn 88-148 s in the same session, with the same quality (KL 0.837 against 0.846; 32.4% against 32.1% "
    "of each point's 10 nearest neighbours kept); both gave the same map twice for one seed."
)
GRID_QUERIES = 5
LATENCY_QUERIES = 50
BEST_WORST = 5
MAX_THUMBNAILS = 1600  # a 40 x 40 map; larger samples show a seeded subset
MAP_PIXELS = 2560  # width of the thumbnail map; cells are 64 to 160 px
MIN_IMAGES = 5
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


@dataclass
class ReportSummary:
    """The numbers of a report and the files it wrote (index.html first)."""

    collection: str
    out: Path
    images: int  # searchable images in the collection
    sampled: int  # images the report looks at
    labels: int
    k: int
    seed: int
    pca_dims: int
    explained_variance: float  # cumulative share of variance the collection's dims keep (PCA refit)
    tsne: str
    precision_exact: float | None  # None when no image has a label
    precision_annoy: float | None
    annoy_recall: float
    pgvector_agreement: float  # share of latency queries where pgvector returned the numpy neighbours
    best_labels: list[LabelScore]
    worst_labels: list[LabelScore]
    latency: list[Latency]
    timings: dict[str, float]
    files: list[Path]
    tsne_xy: np.ndarray = field(repr=False)
    comparison: dict | None = None  # hold-out precision@k, this collection against a fine-tuned one

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["tsne_xy"]
        return d | {"out": str(self.out), "files": [str(f) for f in self.files]}


@dataclass(frozen=True)
class Images:
    """The searchable images of a collection, ordered by id."""

    ids: np.ndarray
    vectors: np.ndarray
    paths: list[str]
    labels: list[str | None]


class Stopwatch:
    """Times the parts of a report; says each one as it ends when progress is on."""

    def __init__(self, progress: bool):
        self.progress = progress
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, part: str):
        start = time.perf_counter()
        yield
        self.timings[part] = round(time.perf_counter() - start, 2)
        if self.progress:
            tqdm.write(f"{part}: {self.timings[part]:.1f} s", file=sys.stderr)


def rng_for(seed: int, purpose: str) -> np.random.Generator:
    """One random stream per purpose, so drawing more queries never moves the sample."""
    return np.random.default_rng([seed, zlib.crc32(purpose.encode())])


def build_report(
    db: Database,
    annoy_dir: Path,
    collection: str | None,
    out: Path,
    sample: int | None = None,
    seed: int = 0,
    k: int = 4,
    progress: bool = True,
    compare_with: str | None = None,
) -> ReportSummary:
    """Write out/index.html and its PNGs for a collection, and return the numbers shown there.

    With `compare_with` (a collection made by `ingest finetune` from this one), the report also gives the
    leave-one-out precision@k of the run's hold-out images in both collections.
    """
    clock = Stopwatch(progress)
    with clock("load vectors"):
        coll = resolve_collection(db.engine, collection)
        check_searchable(db.engine, coll)
        images = load_images(db.engine, coll)
        check_sizes(len(images.ids), sample, k)
        rows = sample_rows(len(images.ids), sample, seed)
        annoy = AnnoyEngine(db.engine, coll, annoy_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with clock("exact neighbours (numpy, all queries)"):
        exact = exact_neighbours(images.ids, images.vectors, rows, k, progress)
    with clock("Annoy neighbours (all queries)"):
        approx = annoy_neighbours(annoy.index, images.ids, rows, k, progress)
    quality = score(images, rows, exact, approx, k)
    with clock("latency (pgvector, Annoy, numpy)"):
        latency, agreement = measure_latency(db.engine, coll, annoy, images, rows, exact, k, seed, progress)
    with clock("PCA variance curve"):
        curve = variance_curve(db.engine, coll, images.ids[rows], seed)
    with clock("t-SNE"):
        xy, tsne_text = run_tsne(images.vectors[rows], seed, progress)
    files = []
    with clock("t-SNE figures"):
        labels = [images.labels[r] for r in rows]
        files += plot_tsne(out, xy, labels, f"{coll.name}: t-SNE of {len(rows)} embeddings")
    with clock("thumbnail map"):
        files.append(plot_thumbnail_map(out, xy, [images.paths[r] for r in rows], rng_for(seed, "thumbnails"),
                                        f"{coll.name}: thumbnails on the t-SNE map", progress))
    with clock("neighbour grids"):
        queries = rows[rng_for(seed, "grid queries").choice(len(rows), min(GRID_QUERIES, len(rows)), replace=False)]
        files += plot_neighbour_grids(out, queries, images, PgvectorEngine(db.engine, coll), annoy, k)
    with clock("PCA, quality and speed figures"):
        files.append(plot_variance(out, curve, coll.pca_dims, coll.name))
        if quality["per_label"]:
            files.append(plot_labels(out, quality, k))
        files.append(plot_latency(out, latency, len(images.ids), k))
    explained = float(curve[min(coll.pca_dims, len(curve)) - 1])
    summary = ReportSummary(
        coll.name, out, len(images.ids), len(rows), len({x for x in images.labels if x is not None}), k, seed,
        coll.pca_dims, explained, tsne_text, quality["exact"], quality["annoy"], quality["recall"], agreement,
        quality["best"], quality["worst"], latency, clock.timings, [], xy,
    )
    if compare_with:
        with clock("hold-out comparison"):
            summary.comparison = compare_holdout(db.engine, coll, compare_with, k)
    summary.files = [write_html(out / "index.html", summary, files)] + files
    return summary


def compare_holdout(engine: Engine, base: CollectionInfo, tuned_name: str, k: int) -> dict:
    """Leave-one-out precision@k of a fine-tuning run's hold-out images, in the base and in the tuned collection.

    The hold-out images were never trained on; they are matched across the two collections by sha256, and
    their neighbours are searched among all images of each collection (exact, leaving the query out).
    """
    tuned = get_collection(engine, tuned_name)
    with engine.connect() as conn:
        holdout = set(conn.execute(sa.text(
            "SELECT i.sha256 FROM finetune_splits s JOIN images i ON i.id = s.image_id "
            "WHERE s.run = :run AND s.collection_id = :c AND s.split = 'holdout'"), {"run": tuned.name, "c": base.id}).scalars())
    if not holdout:
        raise RisError(f"no fine-tuning hold-out of {base.name!r} is recorded for {tuned.name!r}; run `ingest finetune --into {tuned.name}`")
    result = {"base": base.name, "tuned": tuned.name, "k": k, "holdout_images": len(holdout)}
    for key, coll in (("base_precision", base), ("tuned_precision", tuned)):
        images = load_images(engine, coll)
        with engine.connect() as conn:
            sha_of = dict(conn.execute(sa.text("SELECT id, sha256 FROM images WHERE collection_id = :c"), {"c": coll.id}).all())
        rows = np.array([r for r, i in enumerate(images.ids.tolist()) if sha_of[i] in holdout], np.int64)
        found = exact_neighbours(images.ids, images.vectors, rows, k)
        label_of = dict(zip(images.ids.tolist(), images.labels))
        result[key] = float(np.mean([precision_at_k(images.labels[r], [label_of[i] for i in n], k) for r, n in zip(rows, found.tolist())]))
    return result


def load_images(engine: Engine, coll: CollectionInfo) -> Images:
    """Every searchable image: id, embedding, path and label."""
    ids, vectors = read_vectors(engine, coll.id, "embedding", "AND i.embedding IS NOT NULL")
    rows = image_paths(engine, ids.tolist())
    return Images(ids, vectors, [rows[i][0] for i in ids.tolist()], [rows[i][1] for i in ids.tolist()])


def check_sizes(n: int, sample: int | None, k: int) -> None:
    """Refuse what cannot make a report: k other neighbours need k + 1 images, a map at least a handful."""
    if sample is not None and sample < MIN_IMAGES:
        raise RisError(f"--sample must be at least {MIN_IMAGES}, got {sample}")
    if k < 1:
        raise RisError(f"k must be at least 1, got {k}")
    if n < max(MIN_IMAGES, k + 1):
        raise RisError(f"a report needs at least {max(MIN_IMAGES, k + 1)} searchable images (k={k}); the collection has {n}")


def sample_rows(n: int, sample: int | None, seed: int) -> np.ndarray:
    """Row numbers of the images the report looks at: all, or `sample` of them drawn with the seed, in id order."""
    if sample is None or sample >= n:
        return np.arange(n)
    return np.sort(rng_for(seed, "sample").choice(n, sample, replace=False))


def exact_neighbours(ids: np.ndarray, vectors: np.ndarray, rows: np.ndarray, k: int, progress: bool = False) -> np.ndarray:
    """Ids (len(rows), k) of the k nearest other images of each query row, as pgvector ranks them.

    A matrix product shortlists candidates a block of queries at a time; brute_force then ranks each
    shortlist with the engines' own distance and tie-break, so the answer is the baseline's.
    """
    v = vectors.astype(np.float64)
    squares = (v**2).sum(axis=1)
    shortlist = min(len(ids) - 1, k + 16)
    found = np.empty((len(rows), k), np.int64)
    with tqdm(total=len(rows), desc="exact k-NN", unit="query", disable=not progress) as bar:
        for start in range(0, len(rows), CHUNK):
            block = rows[start : start + CHUNK]
            d2 = squares[block, None] - 2 * v[block] @ v.T + squares[None, :]
            d2[np.arange(len(block)), block] = np.inf  # the query itself
            candidates = np.argpartition(d2, shortlist - 1, axis=1)[:, :shortlist]
            for i, (row, cand) in enumerate(zip(block, candidates)):
                cand = cand[cand != row]
                found[start + i] = brute_force(ids[cand], vectors[cand], vectors[row], k)[0]
            bar.update(len(block))
    return found


def annoy_neighbours(index, ids: np.ndarray, rows: np.ndarray, k: int, progress: bool = False) -> list[list[int]]:
    """Annoy's k nearest other images of each query row, as AnnoyEngine.search(exclude=query) returns them."""
    members = set(ids.tolist())
    found = []
    for row in tqdm(rows.tolist(), desc="Annoy k-NN", unit="query", disable=not progress):
        item = int(ids[row])
        items = index.get_nns_by_item(item, k + 1)
        found.append([i for i in items if i != item and i in members][:k])
    return found


def precision_at_k(label: str | None, neighbour_labels: list[str | None], k: int) -> float:
    """Share of the k neighbours carrying the query's label (missing neighbours count as wrong)."""
    return sum(1 for x in neighbour_labels if x == label) / k


def score(images: Images, rows: np.ndarray, exact: np.ndarray, approx: list[list[int]], k: int) -> dict:
    """Leave-one-out precision@k (exact and Annoy) over labelled queries, per label, and Annoy's recall@k."""
    label_of = dict(zip(images.ids.tolist(), images.labels))
    per_label: dict[str, list[tuple[float, float]]] = {}
    recall = []
    for row, e, a in zip(rows.tolist(), exact.tolist(), approx):
        recall.append(len(set(e) & set(a)) / k)
        label = images.labels[row]
        if label is not None:
            pair = (precision_at_k(label, [label_of[i] for i in e], k), precision_at_k(label, [label_of[i] for i in a], k))
            per_label.setdefault(label, []).append(pair)
    scores = [LabelScore(lb, len(p), float(np.mean([x[0] for x in p])), float(np.mean([x[1] for x in p]))) for lb, p in per_label.items()]
    pairs = [pair for p in per_label.values() for pair in p]
    return {
        "exact": float(np.mean([p[0] for p in pairs])) if pairs else None,
        "annoy": float(np.mean([p[1] for p in pairs])) if pairs else None,
        "recall": float(np.mean(recall)),
        "per_label": scores,
        "best": sorted(scores, key=lambda s: (-s.exact, s.label))[:BEST_WORST],
        "worst": sorted(scores, key=lambda s: (s.exact, s.label))[:BEST_WORST],
    }


def measure_latency(engine: Engine, coll: CollectionInfo, annoy: AnnoyEngine, images: Images, rows: np.ndarray,
                    exact: np.ndarray, k: int, seed: int, progress: bool = False) -> tuple[list[Latency], float]:
    """p50/p95 per query of each engine on the same stored vectors, and how often pgvector agreed with numpy."""
    picks = rng_for(seed, "latency queries").choice(len(rows), min(LATENCY_QUERIES, len(rows)), replace=False)
    pgvector = PgvectorEngine(engine, coll)
    searches = {
        "pgvector (exact, SQL)": lambda row: [h.id for h in pgvector.search(images.vectors[row], k, exclude=int(images.ids[row]))],
        "Annoy (engine, with row lookup)": lambda row: annoy.search(images.vectors[row], k, exclude=int(images.ids[row])),
        "Annoy (index only)": lambda row: annoy.index.get_nns_by_vector(images.vectors[row].tolist(), k + 1),
        "numpy brute force": lambda row: brute_force(images.ids, images.vectors, images.vectors[row], k + 1),
    }
    times = {name: [] for name in searches}
    agree = 0
    for pick in tqdm(picks.tolist(), desc="latency", unit="query", disable=not progress):
        row = int(rows[pick])
        for name, search in searches.items():
            start = time.perf_counter()
            answer = search(row)
            times[name].append(1000 * (time.perf_counter() - start))
            if name.startswith("pgvector"):
                agree += answer == exact[pick].tolist()
    latency = [Latency(name, len(t), float(np.percentile(t, 50)), float(np.percentile(t, 95))) for name, t in times.items()]
    return latency, agree / len(picks)


def variance_curve(engine: Engine, coll: CollectionInfo, ids: np.ndarray, seed: int) -> np.ndarray:
    """Cumulative explained variance of a full PCA refit on the images' stored raw features (normalised, as at load)."""
    from sklearn.decomposition import PCA

    raw_ids, raw = read_vectors(engine, coll.id, "raw")
    raw = normalize(raw[np.isin(raw_ids, ids)])
    pca = PCA(n_components=min(raw.shape), svd_solver="covariance_eigh" if len(raw) > raw.shape[1] else "full", random_state=seed)
    return np.cumsum(pca.fit(raw).explained_variance_ratio_)


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


# Figures: matplotlib's Agg backend (set by search.plot), fig.savefig, plt.close; nothing opens a window.


def save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def label_colours(names: list[str]) -> dict[str, tuple]:
    """Colours that tell labels apart: tab10 or tab20 for few; for more, golden-ratio steps round the hue
    circle at three lightnesses, so labels next to each other in the list never look alike."""
    n = len(names)
    if n <= 10:
        colours = list(plt.get_cmap("tab10").colors)
    elif n <= 20:
        tab20 = plt.get_cmap("tab20").colors
        colours = list(tab20[0::2] + tab20[1::2])
    else:
        shades = [(0.85, 0.9), (0.55, 0.75), (0.9, 0.55)]
        colours = [hsv_to_rgb(((i * 0.618034) % 1, *shades[i % 3])) for i in range(n)]
    return {name: tuple(colours[i]) for i, name in enumerate(names)}


def plot_tsne(out: Path, xy: np.ndarray, labels: list[str | None], title: str) -> list[Path]:
    """Two views of the map: points coloured by label, and the same points faded with label names at their medians."""
    names = sorted({x for x in labels if x is not None})
    colours = label_colours(names)
    label_array = np.array([x if x is not None else "" for x in labels], dtype=object)
    size = float(np.clip(6000 / len(xy), 4, 40))
    span = np.ptp(xy, axis=0)
    width = 11 if len(names) <= 30 else 15
    height = width * float(np.clip(span[1] / max(span[0], 1e-9), 0.6, 1.2))
    files = []
    for view in ("labels", "clusters"):
        fig, ax = plt.subplots(figsize=(width, height))
        faded = view == "clusters"
        for name in names + ([""] if "" in set(label_array) else []):
            mask = label_array == name
            ax.scatter(xy[mask, 0], xy[mask, 1], s=size, linewidths=0, alpha=0.35 if faded else 0.85,
                       color=colours.get(name, (0.6, 0.6, 0.6)), label=f"{name or '(no label)'} ({mask.sum()})")
        what = "label names at the median of their points" if faded else "coloured by label"
        ax.set_title(f"{title}, {what} ({len(names)} labels)")
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
        ax.set_aspect("equal", "datalim")
        if faded:
            medians = [np.median(xy[label_array == name], axis=0) for name in names]
            sizes = [int((label_array == name).sum()) for name in names]
            place_names(ax, medians, names, sizes, 9 if len(names) <= 30 else 8)
        elif len(names) <= 20:
            ax.legend(title="label (images)", loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0,
                      markerscale=max(1, 30 / size) ** 0.5)
        files.append(save(fig, out / f"tsne_{view}.png"))
    return files


def place_names(ax, points: list[np.ndarray], names: list[str], sizes: list[int], font: int) -> None:
    """Write each name at its point or, where it would cover a name already written (largest labels go
    first), at the nearest free spot around it; a thin line leads from the point to a moved name."""
    ax.figure.canvas.draw()  # fixes the data-to-pixel mapping the boxes are measured in
    renderer = ax.figure.canvas.get_renderer()
    halo = [patheffects.withStroke(linewidth=2.5, foreground="white")]
    steps = sorted(((dx, dy) for dx in range(-3, 4) for dy in range(-10, 11)), key=lambda m: (m[0] * 2.5) ** 2 + m[1] ** 2)
    placed = []
    for i in sorted(range(len(names)), key=lambda i: (-sizes[i], names[i])):
        text = ax.text(*points[i], names[i], ha="center", va="center", fontsize=font, fontweight="bold", path_effects=halo, zorder=3)
        box = text.get_window_extent(renderer)
        moves = [(dx * box.width * 0.55, dy * box.height * 1.05) for dx, dy in steps]
        crowding = lambda m: sum(overlap(box.translated(*m), other) for other in placed)  # noqa: E731
        dx, dy = next((m for m in moves if crowding(m) == 0), None) or min(moves, key=crowding)
        placed.append(box.translated(dx, dy))
        if dx or dy:
            anchor = ax.transData.transform(points[i])
            text.set_position(ax.transData.inverted().transform(anchor + (dx, dy)))
            ax.plot(*np.column_stack([points[i], text.get_position()]), color="0.4", linewidth=0.6, zorder=2)


def overlap(a, b) -> float:
    """Area two display boxes share."""
    return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))


def grid_cells(xy: np.ndarray) -> tuple[int, np.ndarray]:
    """Snap points to a G x G grid keeping the map's layout: each point gets its own cell, chosen by
    an optimal assignment (least total squared distance from points to cell centres). Returns G and (col, row)."""
    g = int(np.ceil(np.sqrt(len(xy))))
    span = np.ptp(xy, axis=0)
    unit = (xy - xy.min(axis=0)) / np.where(span > 0, span, 1)
    cols, rows = np.meshgrid(np.arange(g), np.arange(g))
    cells = np.column_stack([cols.ravel(), rows.ravel()])
    cost = cdist(unit, (cells + 0.5) / g, "sqeuclidean")
    points, chosen = linear_sum_assignment(cost)
    return g, cells[chosen[np.argsort(points)]]


def plot_thumbnail_map(out: Path, xy: np.ndarray, paths: list[str], rng: np.random.Generator, title: str,
                       progress: bool = False) -> Path:
    """The pictures themselves, tiled where t-SNE put them (at most MAX_THUMBNAILS: a seeded subset of more)."""
    shown = np.arange(len(xy)) if len(xy) <= MAX_THUMBNAILS else np.sort(rng.choice(len(xy), MAX_THUMBNAILS, replace=False))
    g, cells = grid_cells(xy[shown])
    cell = int(np.clip(MAP_PIXELS // g, 64, THUMB))
    canvas = Image.new("RGB", (g * cell, g * cell), (245, 245, 245))
    for i, (col, row) in zip(tqdm(shown.tolist(), desc="thumbnails", unit="image", disable=not progress), cells.tolist()):
        thumb = thumbnail(paths[i], cell - 2)
        left, top = col * cell, (g - 1 - row) * cell  # row 0 is the bottom of the map, as on the scatter plots
        canvas.paste(thumb, (left + (cell - thumb.width) // 2, top + (cell - thumb.height) // 2))
    subset = f"{len(shown)} of {len(xy)} images (seeded subset)" if len(shown) < len(xy) else f"{len(xy)} images"
    lines = [title, f"{subset} on a {g} x {g} grid"]
    side, header = g * cell, 90
    points = min(22.0, 0.9 * side / (0.6 * max(map(len, lines))) * 0.72)  # the longer line fits the width
    fig = plt.figure(figsize=(side / 100, (side + header) / 100), dpi=100)
    fig.figimage(np.asarray(canvas), xo=0, yo=0, origin="upper")
    fig.text(0.5, 1 - header / 2 / (side + header), "\n".join(lines), ha="center", va="center", fontsize=points)
    path = out / "tsne_thumbnails.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_neighbour_grids(out: Path, queries: np.ndarray, images: Images, pgvector: PgvectorEngine, annoy: AnnoyEngine,
                         k: int) -> list[Path]:
    """Per query, pgvector's row above Annoy's, each neighbour captioned with label and distance (the query excluded)."""
    files = []
    for n, row in enumerate(queries.tolist(), 1):
        vector, item, label = images.vectors[row], int(images.ids[row]), images.labels[row]
        results = [("pgvector (exact)", pgvector.search(vector, k, exclude=item)), ("Annoy", annoy.search(vector, k, exclude=item))]
        fig, axes = plt.subplots(2, k + 1, figsize=(2.2 * (k + 1), 5.6), squeeze=False,
                                 gridspec_kw={"wspace": 0.08, "hspace": 0.35, "top": 0.86})  # no tight_layout: too slow here
        for ax_row, (engine, hits) in zip(axes, results):
            draw_row(ax_row, images.paths[row], label, hits, engine)
        fig.suptitle(f"query {n}: image {item} ({label or 'no label'}), its {k} nearest other images; red ✗ = another label",
                     fontsize=10)
        files.append(save(fig, out / f"neighbours_{n}.png"))
    return files


def plot_variance(out: Path, curve: np.ndarray, dims: int, collection: str) -> Path:
    """Cumulative explained variance against components, with the collection's dims marked."""
    x = np.arange(1, len(curve) + 1)
    at = min(dims, len(curve))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    ax.plot(x, 100 * curve, color="C0", label="cumulative explained variance")
    ax.axvline(dims, color="C3", linestyle="--", label=f"stored: {dims} dims keep {100 * curve[at - 1]:.1f}%")
    ax.plot([at], [100 * curve[at - 1]], "o", color="C3")
    for share in (0.9, 0.95):
        needed = int(np.searchsorted(curve, share) + 1)
        if needed <= len(curve):  # the text goes up and left of its point, where a rising curve never is
            ax.plot([needed], [100 * curve[needed - 1]], "s", color="C2", markersize=5)
            ax.annotate(f"{share:.0%} of the variance: {needed} dim{'s' if needed > 1 else ''}", (needed, 100 * curve[needed - 1]),
                        textcoords="offset points", xytext=(-6, 4), fontsize=9, color="C2", ha="right", va="bottom")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlim(1, len(curve))
    ax.set_ylim(0, 104)
    ax.set_xlabel("number of PCA components (log scale)")
    ax.set_ylabel("cumulative explained variance (%)")
    ax.set_title(f"{collection}: PCA of the normalised raw features, refit on {len(curve)} components")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")
    return save(fig, out / "pca_variance.png")


def plot_labels(out: Path, quality: dict, k: int) -> Path:
    """The best and worst labels' precision@k, exact beside Annoy, with the averages as lines."""
    shown = list(dict.fromkeys(reversed(quality["best"])) | dict.fromkeys(reversed(quality["worst"])))
    shown.sort(key=lambda s: (s.exact, s.label))
    y = np.arange(len(shown))
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.45 * len(shown)))
    ax.barh(y + 0.2, [s.exact for s in shown], height=0.4, color="C0", label="pgvector (exact)")
    ax.barh(y - 0.2, [s.annoy for s in shown], height=0.4, color="C1", label="Annoy")
    ax.axvline(quality["exact"], color="C0", linestyle="--", label=f"average, exact: {quality['exact']:.3f}")
    ax.axvline(quality["annoy"], color="C1", linestyle=":", label=f"average, Annoy: {quality['annoy']:.3f}")
    ax.set_yticks(y, [f"{s.label} ({s.queries})" for s in shown])
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"precision@{k} (share of the {k} nearest other images with the query's label)")
    ax.set_title(f"The {BEST_WORST} best and {BEST_WORST} worst labels by exact precision@{k} (queries per label)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    return save(fig, out / "quality_labels.png")


def plot_latency(out: Path, latency: list[Latency], n: int, k: int) -> Path:
    """p50 bars with the p95 marked, log scale: the engines differ by orders of magnitude."""
    y = np.arange(len(latency))[::-1]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.barh(y, [t.p50_ms for t in latency], color="C0", label="p50")
    ax.plot([t.p95_ms for t in latency], y, "|", color="black", markersize=22, markeredgewidth=2, label="p95")
    for yi, t in zip(y, latency):
        ax.annotate(f"p50 {t.p50_ms:.2f} ms, p95 {t.p95_ms:.2f} ms", (t.p95_ms, yi), textcoords="offset points",
                    xytext=(10, 0), va="center", fontsize=9)
    ax.set_yticks(y, [t.engine for t in latency])
    ax.set_xscale("log")
    ax.set_xlim(min(t.p50_ms for t in latency) / 2, max(t.p95_ms for t in latency) * 20)
    ax.set_xlabel("milliseconds per query (log scale)")
    ax.set_title(f"Query latency, k={k}, over {n} images ({latency[0].queries} stored vectors as queries)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    return save(fig, out / "latency.png")


# The page


def table(header: list[str] | None, rows: list[list]) -> str:
    """An HTML table, every value escaped; without a header the first column is set as row headings."""
    cells = lambda tag, row: "".join(f"<{tag}>{html.escape(str(v))}</{tag}>" for v in row)  # noqa: E731
    head = f"<tr>{cells('th', header)}</tr>" if header else ""
    body = "".join(f"<tr>{cells('td', r) if header else cells('th', r[:1]) + cells('td', r[1:])}</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def figure(path: Path, caption: str) -> str:
    name = html.escape(path.name)
    return f'<figure><a href="{name}"><img src="{name}" alt="{html.escape(caption)}"></a><figcaption>{html.escape(caption)}</figcaption></figure>'


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }}
img {{ max-width: 100%; border: 1px solid #ddd; }} figure {{ margin: 1.5em 0; }} figcaption {{ color: #555; font-size: 0.9em; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }} td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
th {{ background: #f3f3f3; }} code {{ background: #f3f3f3; padding: 0 0.2em; }}
</style></head><body>
<h1>{title}</h1>
{body}
</body></html>
"""


def write_html(path: Path, s: ReportSummary, files: list[Path]) -> Path:
    """index.html: every figure linked by its file name (relative), so the folder can be moved or opened as is."""
    by_name = {f.name: f for f in files}
    grids = sorted((f for f in files if f.name.startswith("neighbours_")), key=lambda f: int(f.stem.split("_")[1]))
    k = s.k
    parts = [
        "<h2>What this is</h2>",
        table(None, [
            ["collection", s.collection], ["searchable images", s.images],
            ["images in this report", f"{s.sampled} ({'all' if s.sampled == s.images else f'sample drawn with seed {s.seed}'})"],
            ["labels", s.labels], ["stored dims (PCA)", s.pca_dims], ["k", k], ["seed", s.seed], ["t-SNE", s.tsne],
        ]),
        f"<p>{html.escape(TSNE_CHOICE)}</p>",
        "<p>Queries are the images in this report; their neighbours are searched among all images of the collection, "
        "always leaving the query itself out.</p>",
        "<h2>t-SNE map of the embeddings</h2>",
        figure(by_name["tsne_labels.png"], "Each point is an image, coloured by its label."),
        figure(by_name["tsne_clusters.png"], "The same map; each label's name is written at the median of its points."),
        figure(by_name["tsne_thumbnails.png"], "The pictures, each snapped to its own cell of a grid laid over the map (click for full size)."),
        "<h2>Neighbours of a few queries</h2>",
        f"<p>{len(grids)} queries drawn with the seed. Top row: pgvector (exact); bottom row: Annoy. "
        "Each neighbour shows its label and euclidean distance; a red ✗ marks a label other than the query's.</p>",
        *[figure(f, f"query {i}") for i, f in enumerate(grids, 1)],
        "<h2>PCA: how much variance the stored dims keep</h2>",
        figure(by_name["pca_variance.png"], f"A full PCA refit on the stored raw features; the collection stores {s.pca_dims} dims, "
               f"which keep {100 * s.explained_variance:.1f}% of the variance."),
        f"<h2>Quality: leave-one-out precision@{k}</h2>",
        table(["measure", "value"], [
            [f"precision@{k}, pgvector (exact)", fmt(s.precision_exact)],
            [f"precision@{k}, Annoy", fmt(s.precision_annoy)],
            [f"Annoy recall@{k} against exact", fmt(s.annoy_recall)],
            ["pgvector returned the numpy neighbours", f"{100 * s.pgvector_agreement:.0f}% of {s.latency[0].queries} queries"],
        ]),
        f"<p>precision@{k}: the share of a query's {k} nearest other images that carry its label, averaged over the labelled "
        f"queries. Exact neighbours of every query come from numpy brute force over the stored vectors (pgvector's answer, "
        f"checked on the latency queries); recall@{k}: the share of those that Annoy also returns.</p>",
    ]
    if s.best_labels:
        rows = lambda scores: [[x.label, x.queries, fmt(x.exact), fmt(x.annoy)] for x in scores]  # noqa: E731
        header = ["label", "queries", "exact", "Annoy"]
        parts += [f"<h3>Best {len(s.best_labels)} labels</h3>", table(header, rows(s.best_labels)),
                  f"<h3>Worst {len(s.worst_labels)} labels</h3>", table(header, rows(s.worst_labels)),
                  figure(by_name["quality_labels.png"], "Best and worst labels, exact and Annoy.")]
    if s.comparison:
        c = s.comparison
        parts += [f"<h2>Fine-tuning: hold-out precision@{k}</h2>",
                  table(["collection", f"precision@{k} of {c['holdout_images']} hold-out images"],
                        [[c["base"] + " (base)", fmt(c["base_precision"])], [c["tuned"] + " (tuned)", fmt(c["tuned_precision"])]]),
                  "<p>The hold-out images were never trained on; their neighbours are all other images of each collection.</p>"]
    parts += [
        "<h2>Speed</h2>",
        table(["engine", "queries", "p50 (ms)", "p95 (ms)"], [[t.engine, t.queries, f"{t.p50_ms:.2f}", f"{t.p95_ms:.2f}"] for t in s.latency]),
        figure(by_name["latency.png"], "Per-query latency on the same stored vectors."),
        "<h2>How long this report took</h2>",
        table(["part", "seconds"], [[p, f"{t:.1f}"] for p, t in s.timings.items()] + [["total", f"{sum(s.timings.values()):.1f}"]]),
    ]
    path.write_text(PAGE.format(title=html.escape(f"Report: {s.collection}"), body="\n".join(parts)), encoding="utf-8")
    return path
