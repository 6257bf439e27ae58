"""The report's page: index.html with its PNGs linked by file name, so the folder can be moved or opened as is.

It is laid out as chapter 4 of Koul, Ganju and Kasam's *Practical Deep Learning for Cloud, Mobile, and Edge*
(O'Reilly, 2019) compares its methods: a table that says which method to pick and at
what cost, then one section per method (KNN on the raw features, KNN after PCA, Annoy), each with its
neighbour grid of the same query images and, for the two exact ones, the t-SNE views of the space it searches;
then the three side by side, quality against dimensions, per-label quality, speed and the report's own timing.
"""
from __future__ import annotations

import html
from pathlib import Path

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }}
img {{ max-width: 100%; border: 1px solid #ddd; }} figure {{ margin: 1.5em 0; }} figcaption {{ color: #555; font-size: 0.9em; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }} td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
th {{ background: #f3f3f3; }} code {{ background: #f3f3f3; padding: 0 0.2em; }} .note {{ background: #fff6dd; padding: 0.5em; }}
</style></head><body>
<h1>{title}</h1>
{body}
</body></html>
"""


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
    """Three decimals, or n/a where a number does not exist (no labelled image, nothing measured)."""
    return "n/a" if x is None else f"{x:.3f}"


def para(text: str, cls: str | None = None) -> str:
    return f'<p class="{cls}">{html.escape(text)}</p>' if cls else f"<p>{html.escape(text)}</p>"


def tsne_views(by_name: dict, prefix: str, what: str) -> list[str]:
    """The three t-SNE views of one space: points by label, named clusters, tiled thumbnails."""
    return [figure(by_name[f"{prefix}_labels.png"], f"t-SNE of the {what}: each point is an image, coloured by its label."),
            figure(by_name[f"{prefix}_clusters.png"], "The same map; each label's name is written at the median of its points."),
            figure(by_name[f"{prefix}_thumbnails.png"], "The pictures, each snapped to its own cell of a grid laid over the map (click for full size).")]


def choice_rows(s) -> list[list]:
    """Which method to pick: each method's precision@k, recall against exact PCA, and per-query time as deployed."""
    ms = {t.engine: t for t in s.latency}
    def timing(name):  # noqa: E306
        t = ms.get(name)
        return [f"{t.p50_ms:.2f}", f"{t.p95_ms:.2f}"] if t else ["n/a", "n/a"]
    rows = []
    if s.raw_note is None:
        rows.append(["KNN, raw features (exact, SQL)", 2048, fmt(s.precision_raw), "n/a", *timing(s.engine_names["raw"])])
    rows.append(["KNN, PCA (exact, pgvector)", s.pca_dims, fmt(s.precision_exact), "1.000", *timing(s.engine_names["pca"])])
    rows.append(["Annoy (approximate)", s.pca_dims, fmt(s.precision_annoy), fmt(s.annoy_recall), *timing(s.engine_names["annoy"])])
    return rows


def write_html(path: Path, s, files: list[Path]) -> Path:
    """index.html for a ReportSummary `s` and the PNGs it wrote."""
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
        para("Queries are the images in this report, and so are their neighbours here (with a sample, the sample is the "
             "collection the numbers are measured on); the query itself is always left out. The grids show what "
             "`search similar` answers, over the whole collection."),
    ]
    if s.raw_note:
        parts.append(para(s.raw_note, "note"))
    if s.audit_page:
        parts.append(f'<p>What in this collection cannot be trusted (leaks across splits, label suspects, outliers): '
                     f'<a href="{html.escape(s.audit_page)}">the audit</a>.</p>')
    parts += [
        "<h2>Which method to pick</h2>",
        table(["method", "dims", f"precision@{k}", f"recall@{k} against exact PCA", "p50 ms", "p95 ms"], choice_rows(s)),
        para(f"precision@{k}: the share of a query's {k} nearest other images that carry its label (leave-one-out), averaged "
             "over the labelled queries. Times are per query as the engines run (SQL over the whole collection, Annoy with its "
             "row lookup). The three methods are those of chapter 4 (\"Building a Reverse Image Search Engine: Understanding "
             "Embeddings\") of Practical Deep Learning for Cloud, Mobile, and Edge by Anirudh Koul, Siddha Ganju and Meher "
             "Kasam (O'Reilly, 2019). Exact KNN on the raw features is the book's first method; PCA keeps most of its quality at a "
             "fraction of the cost, and Annoy answers fastest at the price of the recall shown."),
        "<h2>1. KNN on the raw 2048-d features</h2>",
    ]
    if s.raw_note is None:
        parts += [para(f"Exact KNN over the stored ResNet50 features, L2-normalised as at ingest (`search similar --space raw`). "
                       f"precision@{k}: {fmt(s.precision_raw)}."), *tsne_views(by_name, "tsne_raw", "raw features")]
        if "grid_raw.png" in by_name:
            parts.append(figure(by_name["grid_raw.png"], "KNN on the raw features: the neighbours of the grid queries."))
    else:
        parts.append(para("Skipped: " + s.raw_note, "note"))
    parts += [
        "<h2>2. KNN after PCA (pgvector, exact)</h2>",
        para(f"Exact KNN over the stored {s.pca_dims}-d PCA embeddings (`search similar`, the default). precision@{k}: "
             f"{fmt(s.precision_exact)}."),
        *tsne_views(by_name, "tsne", "PCA embeddings"),
        figure(by_name["grid_pca.png"], "KNN after PCA: the neighbours of the same grid queries."),
    ]
    if "pca_variance.png" in by_name:
        parts.append(figure(by_name["pca_variance.png"], f"A full PCA refit on the raw features of the report's images; the "
                            f"collection stores {s.pca_dims} dims, which keep {100 * s.explained_variance:.1f}% of the variance."))
    parts += [
        "<h2>3. Annoy (approximate, PCA embeddings)</h2>",
        para(f"The collection's Annoy file over the same embeddings (`search similar --engine annoy`). precision@{k}: "
             f"{fmt(s.precision_annoy)}; recall@{k} against exact KNN after PCA: {fmt(s.annoy_recall)}."),
        figure(by_name["grid_annoy.png"], "Annoy: the neighbours of the same grid queries."),
        "<h2>The three methods side by side</h2>",
        para(f"{len(grids)} queries drawn with the seed; one row per method. Each neighbour shows its label and euclidean "
             "distance; a red ✗ marks a label other than the query's."),
        *[figure(f, f"query {i}") for i, f in enumerate(grids, 1)],
        "<h2>Quality against dimensions</h2>",
    ]
    if s.sweep:
        parts += [table(["method", "dims", f"precision@{k}", "Koul et al. 2019, ch. 4: precision@4 (ImageNet weights)",
                         "p50 ms per query", "timed as"],
                        [[r.method, r.dims, fmt(r.precision), fmt(r.reference), f"{r.p50_ms:.2f}", r.timed_with] for r in s.sweep]),
                  para("PCA here is fitted on the report's images (the stored PCA is untouched); each dims keeps its first "
                       "components. The Koul et al. column is the book's table in chapter 4 (ResNet50 with ImageNet weights on "
                       "Caltech 101, precision@4): with random weights our numbers are far lower, with real weights they "
                       "should sit beside it."),
                  figure(by_name["dims_sweep.png"], "precision@k and query time against dims.")]
    else:
        parts.append(para("Skipped: the sweep refits PCA on raw features. " + (s.raw_note or ""), "note"))
    parts += quality_parts(s, by_name)
    parts += [
        "<h2>Speed</h2>",
        table(["engine", "queries", "p50 (ms)", "p95 (ms)"], [[t.engine, t.queries, f"{t.p50_ms:.2f}", f"{t.p95_ms:.2f}"] for t in s.latency]),
        figure(by_name["latency.png"], "Per-query latency on the same stored vectors."),
        "<h2>How long this report took</h2>",
        table(["part", "seconds"], [[p, f"{t:.1f}"] for p, t in s.timings.items()] + [["total", f"{sum(s.timings.values()):.1f}"]]),
    ]
    path.write_text(PAGE.format(title=html.escape(f"Report: {s.collection}"), body="\n".join(parts)), encoding="utf-8")
    return path


def quality_parts(s, by_name: dict) -> list[str]:
    """Exact and Annoy quality in numbers, per label, and the fine-tuning comparison if asked for."""
    k = s.k
    checked = lambda x, what: f"{100 * x:.0f}% of {s.latency[0].queries} queries" if x is not None else f"not checked ({what})"  # noqa: E731
    parts = [
        f"<h2>Quality: leave-one-out precision@{k}</h2>",
        table(["measure", "value"], [
            [f"precision@{k}, raw features (exact)", fmt(s.precision_raw)],
            [f"precision@{k}, pgvector (exact)", fmt(s.precision_exact)],
            [f"precision@{k}, Annoy", fmt(s.precision_annoy)],
            [f"Annoy recall@{k} against exact", fmt(s.annoy_recall)],
            ["pgvector returned the numpy neighbours", checked(s.pgvector_agreement, "a sample")],
            ["raw SQL returned the numpy neighbours", checked(s.raw_agreement, "a sample, or no raw features")],
        ]),
        para(f"Exact neighbours of every query come from numpy brute force over the vectors (pgvector's answer, checked on "
             f"the latency queries when the report covers the whole collection); recall@{k}: the share of those that Annoy "
             "also returns."),
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
                  para("The hold-out images were never trained on; their neighbours are all other images of each collection.")]
    return parts
