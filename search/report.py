"""`search report`: one HTML page (index.html with PNGs beside it) that shows what a collection looks like
and how well and how fast its two engines find neighbours.

The images a report looks at are the whole collection, or `--sample N` of them drawn with the seed: they
are the points of the t-SNE maps, the features of the PCA curve and the queries of the quality numbers.
Neighbours are always searched among every image of the collection, as the engines do.

Exact neighbours of every query come from numpy (brute force over the stored embeddings, ties broken by id
as in SQL); that is pgvector's answer, and the report checks it on the latency queries. Annoy's come from
the collection's Annoy file. Everything random is seeded, so one seed gives the same numbers and maps.

This module reads the collection, runs the parts in order and writes the page; the measures are in
search.evaluation (shared with bench/search.py), the map in search.tsne and the PNGs in search.figures.
"""
from __future__ import annotations

import html
import sys
import time
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ingest import Collection, Database, Settings, holdout_hashes, normalize
from ingest.errors import RisError
from search.evaluation import (
    LabelScore, Latency, annoy_neighbours, brute_force, exact_neighbours, explained_variance_curve, latency_of,
    precision_at_k, score, time_interleaved,
)
from search.figures import (
    GridQuery, plot_labels, plot_latency, plot_neighbour_grids, plot_thumbnail_map, plot_tsne, plot_variance,
)
from search.tsne import run_tsne

GRID_QUERIES = 5
LATENCY_QUERIES = 50
MIN_IMAGES = 5
PGVECTOR = "pgvector (exact, SQL)"  # the latency row whose answers are checked against numpy


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
        """What `search report --json` prints: plain JSON types, without the map's coordinates."""
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
    sha256: list[str]


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
    settings: Settings,
    collection: str | None,
    out: Path,
    *,
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
        coll = Collection.named(db, settings, collection)
        coll.check_searchable("annoy")
        images = load_images(coll)
        check_sizes(len(images.ids), sample, k)
        rows = sample_rows(len(images.ids), sample, seed)
        annoy_index = coll.engine("annoy").index
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with clock("exact neighbours (numpy, all queries)"):
        exact = exact_neighbours(images.ids, images.vectors, rows, k, progress=progress)
    with clock("Annoy neighbours (all queries)"):
        approx = annoy_neighbours(annoy_index, images.ids, rows, k, progress=progress)
    quality = score(exact, approx, ids=images.ids, labels=images.labels, rows=rows, k=k)
    with clock("latency (pgvector, Annoy, numpy)"):
        latency, agreement = measure_latency(coll, images=images, rows=rows, exact=exact, k=k, seed=seed,
                                             progress=progress)
    with clock("PCA variance curve"):
        curve = variance_curve(coll, images.ids[rows], seed)
    with clock("t-SNE"):
        xy, tsne_text = run_tsne(images.vectors[rows], seed, progress)
    files = []
    with clock("t-SNE figures"):
        labels = [images.labels[r] for r in rows]
        files += plot_tsne(out, xy, labels, f"{coll.name}: t-SNE of {len(rows)} embeddings")
    with clock("thumbnail map"):
        files.append(plot_thumbnail_map(out, xy, [images.paths[r] for r in rows], rng=rng_for(seed, "thumbnails"),
                                        title=f"{coll.name}: thumbnails on the t-SNE map", progress=progress))
    with clock("neighbour grids"):
        queries = rows[rng_for(seed, "grid queries").choice(len(rows), min(GRID_QUERIES, len(rows)), replace=False)]
        engines = {"pgvector (exact)": "pgvector", "Annoy": "annoy"}
        files += plot_neighbour_grids(out, grid_queries(coll, queries, images, engines, k), k)
    with clock("PCA, quality and speed figures"):
        files.append(plot_variance(out, curve, coll.dims, coll.name))
        if quality["per_label"]:
            files.append(plot_labels(out, quality, k))
        files.append(plot_latency(out, latency, len(images.ids), k))
    explained = float(curve[min(coll.dims, len(curve)) - 1])
    summary = ReportSummary(
        coll.name, out, len(images.ids), len(rows), len({x for x in images.labels if x is not None}), k, seed,
        coll.dims, explained, tsne_text, quality["exact"], quality["annoy"], quality["recall"], agreement,
        quality["best"], quality["worst"], latency, clock.timings, [], xy,
    )
    if compare_with:
        with clock("hold-out comparison"):
            summary.comparison = compare_holdout(coll, compare_with, k)
    summary.files = [write_html(out / "index.html", summary, files)] + files
    return summary


def compare_holdout(base: Collection, tuned_name: str, k: int) -> dict:
    """Leave-one-out precision@k of a fine-tuning run's hold-out images, in the base and in the tuned collection.

    The hold-out images were never trained on; they are matched across the two collections by sha256, and
    their neighbours are searched among all images of each collection (exact, leaving the query out).
    """
    tuned = Collection.named(base.db, base.settings, tuned_name)
    holdout = holdout_hashes(base.db, base, tuned.name)
    if not holdout:
        raise RisError(f"no fine-tuning hold-out of {base.name!r} is recorded for {tuned.name!r}; run `ingest finetune --into {tuned.name}`")
    result = {"base": base.name, "tuned": tuned.name, "k": k, "holdout_images": len(holdout)}
    for key, coll in (("base_precision", base), ("tuned_precision", tuned)):
        images = load_images(coll)
        rows = np.array([r for r, sha in enumerate(images.sha256) if sha in holdout], np.int64)
        found = exact_neighbours(images.ids, images.vectors, rows, k)
        label_of = dict(zip(images.ids.tolist(), images.labels))
        result[key] = float(np.mean([precision_at_k(images.labels[r], [label_of[i] for i in n], k) for r, n in zip(rows, found.tolist())]))
    return result


def load_images(coll: Collection) -> Images:
    """Every searchable image: id, embedding, path, label and sha256."""
    ids, vectors = coll.read_vectors("embedding")
    rows = coll.details(ids.tolist())
    return Images(ids, vectors, *([rows[i][n] for i in ids.tolist()] for n in range(3)))


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


def measure_latency(coll: Collection, *, images: Images, rows: np.ndarray,
                    exact: np.ndarray, k: int, seed: int, progress: bool = False) -> tuple[list[Latency], float]:
    """p50/p95 per query of each engine on the same stored vectors, and how often pgvector agreed with numpy."""
    picks = rng_for(seed, "latency queries").choice(len(rows), min(LATENCY_QUERIES, len(rows)), replace=False)
    annoy_index = coll.engine("annoy").index
    searches = {
        PGVECTOR: lambda row: [h.id for h in coll.similar(images.vectors[row], k, exclude=int(images.ids[row]))],
        "Annoy (engine, with row lookup)": lambda row: coll.similar(images.vectors[row], k, engine="annoy", exclude=int(images.ids[row])),
        "Annoy (index only)": lambda row: annoy_index.get_nns_by_vector(images.vectors[row].tolist(), k + 1),
        "numpy brute force": lambda row: brute_force(images.ids, images.vectors, images.vectors[row], k + 1),
    }
    answers, times = time_interleaved(searches, rows[picks].tolist(), progress=progress)
    agree = sum(answer == want for answer, want in zip(answers[PGVECTOR], exact[picks].tolist()))
    return [latency_of(name, ms) for name, ms in times.items()], agree / len(picks)


def variance_curve(coll: Collection, ids: np.ndarray, seed: int) -> np.ndarray:
    """Cumulative explained variance of a full PCA refit on the images' stored raw features (normalised, as at load)."""
    raw_ids, raw = coll.read_vectors("raw")
    return explained_variance_curve(normalize(raw[np.isin(raw_ids, ids)]), seed)


def grid_queries(coll: Collection, queries: np.ndarray, images: Images, engines: dict[str, str], k: int) -> list[GridQuery]:
    """Each grid query's k nearest other images from every engine (title -> engine name), as `search similar` finds them."""
    grids = []
    for row in queries.tolist():
        vector, item = images.vectors[row], int(images.ids[row])
        answers = [(title, coll.similar(vector, k, engine=engine, exclude=item)) for title, engine in engines.items()]
        grids.append(GridQuery(item, images.paths[row], images.labels[row], answers))
    return grids


# The page


def table(header: list[str] | None, rows: list[list]) -> str:
    """An HTML table, every value escaped; without a header the first column is set as row headings."""
    cells = lambda tag, row: "".join(f"<{tag}>{html.escape(str(v))}</{tag}>" for v in row)  # noqa: E731
    head = f"<tr>{cells('th', header)}</tr>" if header else ""
    body = "".join(f"<tr>{cells('td', r) if header else cells('th', r[:1]) + cells('td', r[1:])}</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def figure(path: Path, caption: str) -> str:
    """A PNG linked to itself, so a reader can open the full-size picture from the page."""
    name = html.escape(path.name)
    return f'<figure><a href="{name}"><img src="{name}" alt="{html.escape(caption)}"></a><figcaption>{html.escape(caption)}</figcaption></figure>'


def fmt(x: float | None) -> str:
    """Three decimals, or n/a where a number does not exist (no labelled image)."""
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
