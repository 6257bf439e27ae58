"""`search report`: one HTML page (index.html with PNGs and summary.json beside it) that compares the
three methods of chapter 4 of Koul, Ganju and Kasam's *Practical Deep Learning for Cloud, Mobile, and Edge*
(O'Reilly, 2019) on a collection: exact KNN on the raw 2048-d features, exact KNN after
PCA (pgvector) and Annoy, with how their quality changes with the dims and what each costs a query.

The images a report looks at are the whole collection, or `--sample N` of them drawn with the seed: they
are the points of the t-SNE maps, the queries of the quality numbers and their candidate neighbours, and
only their vectors are read (ids first, 8 bytes a row, then the sample's vectors a chunk at a time), so
memory follows the sample, not the collection. The neighbour grids and the latency queries are real
`search similar` calls over the whole collection.

Exact neighbours of every query come from numpy (brute force, ties broken by id as in SQL); that is
pgvector's answer, and when the report covers the whole collection it checks that on the latency queries.
Annoy's come from the collection's Annoy file. Rows without raw features (a collection of embeddings only)
skip the raw sections with a note. Everything random is seeded, so one seed gives the same numbers and maps.

This module reads the collection, runs the parts in order and writes the page; the measures are in
search.evaluation (shared with bench/search.py), the dims sweep in search.sweep, the map in search.tsne,
the PNGs in search.figures and the HTML in search.page.
"""
from __future__ import annotations

import json
import math
import sys
import time
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ingest import Collection, Database, EngineName, Settings, holdout_hashes, normalize, to_json
from ingest.errors import RisError
from search.audit_page import AUDIT_FOLDER
from search.evaluation import (
    LabelScore, Latency, brute_force, engine_neighbours, exact_neighbours, latency_of, precision_at_k, score, time_interleaved,
)
from search.figures import (
    GridQuery, plot_labels, plot_latency, plot_method_grid, plot_neighbour_grids, plot_sweep, plot_thumbnail_map, plot_tsne,
    plot_variance,
)
from search.page import write_html
from search.split_rule import SplitRule
from search.sweep import NUMPY, REFERENCE_K, SweepRow, fit_full_pca, mean_precision, run_sweep
from search.tsne import run_tsne, tsne_neighbours

GRID_QUERIES = 5
LATENCY_QUERIES = 50
MIN_IMAGES = 5
RAW_SQL_MAX_ROWS = 200_000  # raw SQL scans 8 KB a row: beyond this, its grid and timing are left out of a report
PGVECTOR = "pgvector (exact, SQL)"  # the latency row whose answers are checked against numpy
RAW_SQL = "pgvector raw 2048-d (exact, SQL)"
ANNOY = "Annoy (engine, with row lookup)"
METHODS = {"raw": "KNN, raw 2048-d (exact)", "pca": "KNN after PCA (pgvector, exact)", "annoy": "Annoy (approximate)"}


@dataclass
class ReportSummary:
    """The numbers of a report and the files it wrote (index.html first, then the PNGs; summary.json beside them)."""

    collection: str
    out: Path
    images: int  # searchable images in the collection
    sampled: int  # images the report looks at
    labels: int
    k: int
    seed: int
    pca_dims: int
    explained_variance: float | None  # share of variance the stored dims keep in a PCA refit (None without raw features)
    tsne: str
    precision_exact: float | None  # None when no image has a label
    precision_annoy: float | None
    annoy_recall: float
    pgvector_agreement: float | None  # share of latency queries where pgvector returned the numpy neighbours (whole collection only)
    best_labels: list[LabelScore]
    worst_labels: list[LabelScore]
    latency: list[Latency]
    timings: dict[str, float]
    files: list[Path]
    tsne_xy: np.ndarray = field(repr=False)
    comparison: dict | None = None  # hold-out precision@k, this collection against a fine-tuned one
    precision_raw: float | None = None  # exact KNN on the normalised raw features
    raw_agreement: float | None = None  # the same check for `--space raw`
    raw_note: str | None = None  # why the raw sections were skipped, or None
    sweep: list[SweepRow] = field(default_factory=list)  # quality against dims, then the engines as deployed
    engine_names: dict = field(default_factory=lambda: {"raw": RAW_SQL, "pca": PGVECTOR, "annoy": ANNOY})
    tsne_raw_xy: np.ndarray | None = field(default=None, repr=False)
    audit_page: str | None = None  # the audit page in the report's folder, linked when there is one

    def to_dict(self) -> dict:
        """What `search report --json` prints and summary.json holds: plain JSON types, without the maps' coordinates."""
        d = asdict(self)
        del d["tsne_xy"], d["tsne_raw_xy"], d["engine_names"]
        return d | {"out": str(self.out), "files": [str(f) for f in self.files]}


@dataclass(frozen=True)
class Images:
    """The images a report looks at, ordered by id, with their embeddings and (normalised) raw features."""

    ids: np.ndarray
    vectors: np.ndarray
    paths: list[str]
    labels: list[str | None]
    sha256: list[str]
    raw: np.ndarray | None = None  # None when some have no raw features stored


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
    split_by: str | None = None,
) -> ReportSummary:
    """Write out/index.html, its PNGs and out/summary.json for a collection, and return the numbers shown there.

    With `compare_with` (a collection made by `ingest finetune` from this one), the report also gives the
    leave-one-out precision@k of the run's hold-out images in both collections. With `split_by` (a --split-by
    pattern), labels leave out the split's folder, as `search audit` counts them.
    """
    rule = SplitRule.parse(split_by) if split_by is not None else None
    clock = Stopwatch(progress)
    with clock("load vectors"):
        coll = Collection.named(db, settings, collection)
        coll.check_searchable(EngineName.ANNOY)
        all_ids = coll.image_ids("embedding")
        check_sizes(len(all_ids), sample, k)
        images, raw_note = load_images(coll, all_ids[sample_rows(len(all_ids), sample, seed)], with_raw=True)
        if rule is not None:
            images = replace(images, labels=[rule.label(p, x) for p, x in zip(images.paths, images.labels)])
    total, n = len(all_ids), len(images.ids)
    rows, whole = np.arange(n), n == total
    raw_sql = images.raw is not None and total <= RAW_SQL_MAX_ROWS
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with clock("exact neighbours, PCA (numpy)"):
        exact = exact_neighbours(images.ids, images.vectors, rows, k, progress=progress)
    with clock("Annoy neighbours"):  # a sample holds about n/total of the file's items: ask for enough to keep k
        approx = engine_neighbours(coll.engine(EngineName.ANNOY), images.ids, rows, k, fetch=(k + 1) * math.ceil(total / n),
                                   progress=progress)
    quality = score(exact, approx, ids=images.ids, labels=images.labels, rows=rows, k=k)
    raw_found = raw_near = None
    if images.raw is not None:
        with clock("exact neighbours, raw (numpy)"):  # found once: for precision@k and for the raw map's affinities
            near, distances = exact_neighbours(rows, images.raw, rows, max(k, tsne_neighbours(n)), progress=progress, distances=True)
            raw_found, raw_near = images.ids[near[:, :k]], (near[:, :tsne_neighbours(n)], distances[:, :tsne_neighbours(n)])
    with clock("latency (SQL, Annoy, numpy)"):
        latency, agreement, raw_agreement = measure_latency(coll, images=images, exact=exact, raw_found=raw_found, k=k, seed=seed,
                                                            check=whole, raw_sql=raw_sql, progress=progress)
    precision_raw = mean_precision(raw_found, images.ids, images.labels, k) if raw_found is not None else None
    files, explained_variance, sweep, tsne_raw_xy = [], None, [], None
    if images.raw is not None:
        with clock("PCA variance curve"):
            mean, components, ratio = fit_full_pca(images.raw)
            curve = np.cumsum(ratio)
            explained_variance = float(curve[min(coll.dims, len(curve)) - 1])
        with clock("dims sweep"):
            sweep = run_sweep(images.ids, images.labels, images.raw, mean, components, k=k, raw_found=raw_found,
                              rng=rng_for(seed, "sweep"), progress=progress) + engine_rows(
                latency, total, coll.dims, precision_raw=precision_raw, precision_exact=quality["exact"], precision_annoy=quality["annoy"])
            numpy_rows = [r for r in sweep if r.timed_with == NUMPY]
            files.append(plot_sweep(out, numpy_rows, [r for r in sweep if r.timed_with != NUMPY], k, REFERENCE_K))
        files.append(plot_variance(out, curve, coll.dims, coll.name))
        made, tsne_raw_xy, _ = maps(clock, out, images, images.raw, "tsne_raw", f"{coll.name}: t-SNE of {n} raw feature vectors (2048-d)",
                                    seed, progress, neighbours=raw_near, init=(images.raw - mean) @ components[:2].T)
        files += made
    made, tsne_xy, tsne = maps(clock, out, images, images.vectors, "tsne", f"{coll.name}: t-SNE of {n} embeddings ({coll.dims}-d PCA)",
                               seed, progress)
    files += made
    with clock("neighbour grids"):
        picks = rows[rng_for(seed, "grid queries").choice(n, min(GRID_QUERIES, n), replace=False)]
        methods = {name: METHODS[name] for name in ("raw", "pca", "annoy") if name != "raw" or raw_sql}
        queries = grid_queries(coll, picks, images, methods, k)
        files += plot_neighbour_grids(out, queries, k)
        files += [plot_method_grid(out, f"grid_{name}.png", title, queries, k) for name, title in methods.items()]
    with clock("quality and speed figures"):
        if quality["per_label"]:
            files.append(plot_labels(out, quality, k))
        files.append(plot_latency(out, latency, total, k))
    comparison = None
    if compare_with:
        with clock("hold-out comparison"):
            comparison = compare_holdout(coll, compare_with, k)
    audit = out / AUDIT_FOLDER / "index.html"  # `search audit --out <this folder>/audit`
    summary = ReportSummary(
        collection=coll.name, out=out, images=total, sampled=n, labels=len({x for x in images.labels if x is not None}), k=k, seed=seed,
        pca_dims=coll.dims, explained_variance=explained_variance, tsne=tsne, precision_exact=quality["exact"],
        precision_annoy=quality["annoy"], annoy_recall=quality["recall"], pgvector_agreement=agreement, best_labels=quality["best"],
        worst_labels=quality["worst"], latency=latency, timings=clock.timings, files=[out / "index.html"] + files, tsne_xy=tsne_xy,
        comparison=comparison, precision_raw=precision_raw, raw_agreement=raw_agreement, raw_note=raw_note, sweep=sweep,
        tsne_raw_xy=tsne_raw_xy, audit_page=f"{AUDIT_FOLDER}/index.html" if audit.is_file() else None,
    )
    write_html(out / "index.html", summary, files)
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2, default=to_json), encoding="utf-8")
    return summary


def maps(clock: Stopwatch, out: Path, images: Images, vectors: np.ndarray, prefix: str, title: str, seed: int, progress: bool,
         **known) -> tuple[list[Path], np.ndarray, str]:
    """The three t-SNE views of one space (points by label, named clusters, tiled thumbnails): (their files, the map,
    how it was made). `known`: neighbours and init already computed (run_tsne)."""
    what = "" if prefix == "tsne" else ", raw features"
    with clock(f"t-SNE{what}"):
        xy, made_how = run_tsne(vectors, seed, progress, **known)
    with clock(f"t-SNE figures{what}"):
        files = plot_tsne(out, xy, images.labels, title, prefix)
        files.append(plot_thumbnail_map(out, xy, images.paths, rng=rng_for(seed, "thumbnails"), title=f"{title}: thumbnails",
                                        progress=progress, name=f"{prefix}_thumbnails.png"))
    return files, xy, made_how


def engine_rows(latency: list[Latency], images: int, dims: int, *, precision_raw: float | None, precision_exact: float | None,
                precision_annoy: float | None) -> list[SweepRow]:
    """The three methods as deployed, for the sweep's table: their precision and their per-query time over all `images` rows."""
    ms = {t.engine: t.p50_ms for t in latency}
    where = f"over all {images} rows"
    rows = [SweepRow("KNN raw, SQL (--space raw)", 2048, precision_raw, ms[RAW_SQL], f"SQL {where}", None)] if RAW_SQL in ms else []
    return rows + [SweepRow("KNN PCA, pgvector (stored PCA)", dims, precision_exact, ms[PGVECTOR], f"SQL {where}", None),
                   SweepRow("Annoy (stored PCA)", dims, precision_annoy, ms[ANNOY], f"Annoy file + row lookup {where}", None)]


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
        images, _ = load_images(coll, coll.image_ids("embedding"))
        rows = np.array([r for r, sha in enumerate(images.sha256) if sha in holdout], np.int64)
        found = exact_neighbours(images.ids, images.vectors, rows, k)
        label_of = dict(zip(images.ids.tolist(), images.labels))
        result[key] = float(np.mean([precision_at_k(images.labels[r], [label_of[i] for i in n], k) for r, n in zip(rows, found.tolist())]))
    return result


def load_images(coll: Collection, ids: np.ndarray, *, with_raw: bool = False) -> tuple[Images, str | None]:
    """These images' ids, embeddings, paths, labels and sha256 (and their normalised raw features), read a chunk at a
    time; with a note saying why raw features are left out when some of them have none stored."""
    ids, vectors = coll.vectors_of("embedding", ids)
    rows = coll.details(ids.tolist())
    raw, note = None, None
    if with_raw and not coll.row.keeps_raw:
        note = (f"collection {coll.name!r} keeps no raw features (loaded with --raw-features none): KNN on the raw features, "
                "its t-SNE maps, the dims sweep and the PCA variance curve are left out.")
    elif with_raw:
        raw_ids, raw = coll.vectors_of("raw", ids)
        if len(raw_ids) < len(ids):
            raw, note = None, (f"{len(ids) - len(raw_ids)} of the {len(ids)} images in this report have no raw features stored "
                               "(a collection of embeddings only?): KNN on the raw features, its t-SNE maps, the dims sweep and "
                               "the PCA variance curve are left out.")
        else:
            raw = normalize(raw)
    found = [rows[i] for i in ids.tolist()]
    return Images(ids, vectors, [f.path for f in found], [f.label for f in found], [f.sha256 for f in found], raw=raw), note


def check_sizes(n: int, sample: int | None, k: int) -> None:
    """Refuse what cannot make a report: k other neighbours need k + 1 images, a map at least a handful."""
    if sample is not None and sample < MIN_IMAGES:
        raise RisError(f"--sample must be at least {MIN_IMAGES}, got {sample}")
    if k < 1:
        raise RisError(f"k must be at least 1, got {k}")
    if n < max(MIN_IMAGES, k + 1):
        raise RisError(f"a report needs at least {max(MIN_IMAGES, k + 1)} searchable images (k={k}); the collection has {n}")
    if sample is not None and min(sample, n) < k + 1:
        raise RisError(f"--sample {sample} leaves fewer than k + 1 = {k + 1} images")


def sample_rows(n: int, sample: int | None, seed: int) -> np.ndarray:
    """Row numbers of the images the report looks at: all, or `sample` of them drawn with the seed, in id order."""
    if sample is None or sample >= n:
        return np.arange(n)
    return np.sort(rng_for(seed, "sample").choice(n, sample, replace=False))


def measure_latency(coll: Collection, *, images: Images, exact: np.ndarray, raw_found: np.ndarray | None, k: int, seed: int,
                    check: bool, raw_sql: bool, progress: bool = False) -> tuple[list[Latency], float | None, float | None]:
    """p50/p95 per query of each engine on the same stored vectors, and (if `check`: the report covers the whole
    collection, as the SQL does) how often pgvector, and raw SQL, returned the numpy neighbours."""
    picks = rng_for(seed, "latency queries").choice(len(images.ids), min(LATENCY_QUERIES, len(images.ids)), replace=False)
    annoy_engine = coll.engine(EngineName.ANNOY)
    searches = {PGVECTOR: lambda row: [h.id for h in coll.similar(images.vectors[row], k, exclude=int(images.ids[row]))]}
    if raw_sql:
        searches[RAW_SQL] = lambda row: [h.id for h in coll.similar(images.raw[row], k, exclude=int(images.ids[row]), space="raw")]
    searches |= {
        ANNOY: lambda row: coll.similar(images.vectors[row], k, engine=EngineName.ANNOY, exclude=int(images.ids[row])),
        "Annoy (index only)": lambda row: annoy_engine.ids_near(images.vectors[row], k + 1),
        "numpy brute force": lambda row: brute_force(images.ids, images.vectors, images.vectors[row], k + 1),
    }
    answers, times = time_interleaved(searches, picks.tolist(), progress=progress)
    agree = lambda name, want: (sum(a == w for a, w in zip(answers[name], want[picks].tolist())) / len(picks)  # noqa: E731
                                if check and name in answers else None)
    return [latency_of(name, ms) for name, ms in times.items()], agree(PGVECTOR, exact), agree(RAW_SQL, raw_found)


def grid_queries(coll: Collection, queries: np.ndarray, images: Images, methods: dict[str, str], k: int) -> list[GridQuery]:
    """Each grid query's k nearest other images by every method (name -> title), as `search similar` finds them."""
    grids = []
    for row in queries.tolist():
        item = int(images.ids[row])
        answers = []
        for name, title in methods.items():
            if name == "raw":
                hits = coll.similar(images.raw[row], k, exclude=item, space="raw")
            else:
                engine = EngineName.PGVECTOR if name == "pca" else EngineName.ANNOY
                hits = coll.similar(images.vectors[row], k, engine=engine, exclude=item)
            answers.append((title, hits))
        grids.append(GridQuery(item, images.paths[row], images.labels[row], answers))
    return grids
