"""Pictures of results: the query beside its neighbours (`search similar --plot`), and the report's figures:
t-SNE views, the thumbnail map, neighbour grids, PCA variance, labels and latency.

Every function takes arrays, lists and paths and writes one PNG (or a few) into `out`; the report's numbers come
from search.evaluation and the map from search.tsne. matplotlib with the Agg backend, fig.savefig, plt.close:
nothing here opens a window.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
from tqdm import tqdm

from search.evaluation import BEST_WORST, Latency

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the Agg backend is selected)
from matplotlib import patheffects  # noqa: E402
from matplotlib.colors import hsv_to_rgb  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402
from scipy.spatial.distance import cdist  # noqa: E402

if TYPE_CHECKING:
    from ingest import Hit

THUMB = 160  # pixels of a thumbnail in a row of neighbours
MAX_THUMBNAILS = 1600  # a 40 x 40 map; larger samples show a seeded subset
MAP_PIXELS = 2560  # width of the thumbnail map; cells are 64 to 160 px


@dataclass(frozen=True)
class GridQuery:
    """One query of the neighbour grids and each engine's answer to it, as (engine name, hits), top row first."""

    id: int
    path: str
    label: str | None
    answers: list[tuple[str, list[Hit]]]


def save(fig, path: Path) -> Path:
    """Write the figure trimmed to its contents and free it: a report draws dozens, and open figures pile up."""
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def thumbnail(path: str | Path, size: int = THUMB):
    """An upright RGB thumbnail, or a grey square if the file cannot be opened any more."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
            img.thumbnail((size, size))
            return img
    except (OSError, ValueError, Image.DecompressionBombError):
        return Image.new("RGB", (size, size), (200, 200, 200))


def draw_row(axes, query_path: str | None, query_label: str | None, hits: list[Hit], title: str | None = None) -> None:
    """Fill one row of axes: the query first, then its neighbours; wrong labels are captioned in red."""
    axes[0].imshow(thumbnail(query_path) if query_path else Image.new("RGB", (THUMB, THUMB), "white"))
    axes[0].set_title(f"query\n{query_label or ''}" if not title else f"{title}\n{query_label or ''}", fontsize=9, fontweight="bold")
    for ax, hit in zip(axes[1:], hits):
        ax.imshow(thumbnail(hit.path))
        wrong = query_label is not None and hit.label != query_label
        ax.set_title(f"#{hit.rank} {hit.label or ''}\nd={hit.distance:.3f}" + (" ✗" if wrong else ""),
                     fontsize=8, color="crimson" if wrong else "black")
    for ax in axes:
        ax.axis("off")


def plot_neighbours(out: Path, query_path: str | None, query_label: str | None, hits: list[Hit], title: str = "") -> Path:
    """Write a PNG of the query and its k neighbours in one row."""
    columns = len(hits) + 1
    fig, axes = plt.subplots(1, columns, figsize=(2.0 * columns, 2.6), squeeze=False)
    draw_row(axes[0], query_path, query_label, hits)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


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


def plot_tsne(out: Path, xy: np.ndarray, labels: list[str | None], title: str, prefix: str = "tsne") -> list[Path]:
    """Two views of the map: points coloured by label, and the same points faded with label names at their medians
    (PREFIX_labels.png, PREFIX_clusters.png)."""
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
            place_names(ax, medians, names, sizes, font=9 if len(names) <= 30 else 8)
        elif len(names) <= 20:
            ax.legend(title="label (images)", loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0,
                      markerscale=max(1, 30 / size) ** 0.5)
        files.append(save(fig, out / f"{prefix}_{view}.png"))
    return files


def place_names(ax, points: list[np.ndarray], names: list[str], sizes: list[int], *, font: int) -> None:
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


def plot_thumbnail_map(out: Path, xy: np.ndarray, paths: list[str], *, rng: np.random.Generator, title: str,
                       progress: bool = False, name: str = "tsne_thumbnails.png") -> Path:
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
    path = out / name
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_neighbour_grids(out: Path, queries: list[GridQuery], k: int) -> list[Path]:
    """Per query, one row per method (in the order of its answers), each neighbour captioned with label and distance."""
    files = []
    for n, query in enumerate(queries, 1):
        fig, axes = plt.subplots(len(query.answers), k + 1, figsize=(2.2 * (k + 1), 0.4 + 2.6 * len(query.answers)), squeeze=False,
                                 gridspec_kw={"wspace": 0.08, "hspace": 0.35, "top": 0.86})  # no tight_layout: too slow here
        for ax_row, (engine, hits) in zip(axes, query.answers):
            draw_row(ax_row, query.path, query.label, hits, engine)
        fig.suptitle(f"query {n}: image {query.id} ({query.label or 'no label'}), its {k} nearest other images; "
                     "red ✗ = another label", fontsize=10)
        files.append(save(fig, out / f"neighbours_{n}.png"))
    return files


def plot_method_grid(out: Path, name: str, method: str, queries: list[GridQuery], k: int) -> Path:
    """One method's answers to every grid query, a row per query (the same queries in every section)."""
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(2.2 * (k + 1), 0.6 + 2.3 * len(queries)), squeeze=False,
                             gridspec_kw={"wspace": 0.08, "hspace": 0.4, "top": 1 - 0.5 / (0.6 + 2.3 * len(queries))})
    for n, (ax_row, query) in enumerate(zip(axes, queries), 1):
        hits = dict(query.answers)[method]
        draw_row(ax_row, query.path, query.label, hits, f"query {n}: image {query.id}")
    fig.suptitle(f"{method}: the {k} nearest other images of each query; red ✗ = another label", fontsize=11)
    return save(fig, out / name)


def plot_sweep(out: Path, rows: list, engines: list, k: int, reference_k: int) -> Path:
    """precision@k against dims (log scale) beside the book's published figures (Koul et al. 2019, chapter 4),
    and query time against dims.
    `rows` are the sweep's SweepRows (numpy brute force); `engines` are SweepRows of the engines as deployed."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    dims = [r.dims for r in rows]
    left.plot(dims, [r.precision for r in rows], "o-", color="C0", label=f"exact KNN, this collection (precision@{k})")
    ref = [(r.dims, r.reference) for r in rows if r.reference is not None]
    if ref:
        left.plot(*zip(*ref), "s--", color="0.5", label=f"Koul et al. 2019, ch. 4: ImageNet weights (precision@{reference_k})")
    for i, r in enumerate(engines, 1):
        if r.precision is not None:
            left.plot([r.dims], [r.precision], "D", color=f"C{i}", markersize=8, label=f"{r.method} ({r.dims} dims)")
    right.plot(dims, [r.p50_ms for r in rows], "o-", color="C0", label="exact KNN, numpy brute force")
    for i, r in enumerate(engines, 1):
        right.plot([r.dims], [r.p50_ms], "D", color=f"C{i}", markersize=8, label=f"{r.method}: {r.timed_with}")
    for ax, what in ((left, f"precision@{k} (leave-one-out)"), (right, "p50 ms per query (log scale)")):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("dims (log scale)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=8)  # below: the points stay visible
    right.set_yscale("log")
    left.set_ylim(0, 1.02)
    left.set_title("Quality against dimensions")
    right.set_title("Query time against dimensions")
    return save(fig, out / "dims_sweep.png")


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

