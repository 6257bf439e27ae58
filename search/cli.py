"""`search`: the nearest images to a picture, ad-hoc SQL, and reports."""
from __future__ import annotations

from pathlib import Path

import click

from ingest import (
    ENGINES,
    ErrorHandlingGroup,
    collection_option,
    database_option,
    json_option,
    open_database,
    print_json,
    read_url_option,
    timeout_option,
    to_json,
)


@click.group(cls=ErrorHandlingGroup)
@click.version_option(package_name="reverse-image-search")
def cli():
    """Find the images of a collection most similar to a picture: exactly (pgvector) or fast (Annoy, HNSW)."""


@cli.command("similar")
@click.argument("image", required=False, type=click.Path(path_type=Path))
@click.option("--id", "image_id", type=int, help="Search with an image already stored (no CNN run).")
@click.option("--engine", "-e", type=click.Choice(ENGINES), default="pgvector", show_default=True,
              help="pgvector: exact SQL; annoy: fast approximate file (+ exact search of rows added since); "
                   "hnsw: pgvector's approximate index (`ingest index --hnsw`).")
@click.option("--space", type=click.Choice(["pca", "raw"]), default="pca", show_default=True,
              help="pca: the stored embeddings; raw: exact KNN over the 2048-d ResNet50 features (pgvector engine only).")
@click.option("-k", type=click.IntRange(1, 10_000), default=10, show_default=True, help="How many neighbours.")
@click.option("--label", help="Only neighbours with this label.")
@click.option("--where", metavar="SQL", help="Only neighbours matching this SQL condition on images (read-only, within the collection).")
@click.option("--exclude-self", is_flag=True, help="Leave the query image itself out of the results.")
@click.option("--search-k", type=int, default=-1, show_default=True, help="Annoy's search_k (-1: 2 x trees x k).")
@click.option("--ef-search", type=click.IntRange(1, 1000), default=None, metavar="N",
              help="HNSW candidate list per query (default 800; lower: faster, worse recall).")
@click.option("--plot", type=click.Path(path_type=Path, dir_okay=False), help="Write a PNG of the query and its neighbours.")
@collection_option
@database_option
@read_url_option
@timeout_option
@json_option
def similar_command(image, image_id, engine, space, k, label, where, exclude_self, search_k, ef_search, plot, collection, database_url,
                    read_url, statement_timeout, as_json):
    """The k images most similar to IMAGE (a file) or to --id N.

    Example: search similar query.jpg --engine annoy -k 20
    """
    from ingest import Collection

    settings, db = open_database(database_url, statement_timeout, read_url=read_url)
    coll = Collection.named(db, settings, collection)
    if space == "raw":
        coll.raw_engine(engine)  # refuses an approximate engine before any work
    coll.check_searchable(engine)
    query = coll.query(image=image, image_id=image_id, space=space)
    hits = coll.similar(query, k, engine=engine, label=label, where=where, exclude=query.image_id if exclude_self else None,
                        search_k=search_k, ef_search=ef_search, space=space)
    if plot:
        from search.plot import plot_neighbours

        plot_neighbours(plot, query.path, query.label, hits, f"{coll.name} · {engine if space == 'pca' else 'raw 2048-d, exact'}")
    print_hits(hits, as_json)
    if len(hits) < k and (label is not None or where is not None):
        click.echo(f"note: only {len(hits)} of {k} neighbours match the filter", err=True)


def print_hits(hits, as_json: bool) -> None:
    if as_json:
        print_json([h.to_dict() for h in hits])
    else:
        print_table(["rank", "distance", "label", "path"], [(str(h.rank), f"{h.distance:.4f}", h.label or "", h.path) for h in hits])


def print_table(columns: list[str], rows: list[tuple]) -> None:
    """A plain aligned text table; newlines inside values are shown as \\n so each row stays one line."""
    cells = [[cell_text(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    click.echo("  ".join("-" * w for w in widths))
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def cell_text(value) -> str:
    """One table cell: vectors as [a, b, ...], None as empty, newlines shown as \\n."""
    if value is None:
        return ""
    if not isinstance(value, (str, int, float)):
        value = to_json(value)
    return str(value).replace("\n", "\\n")


@cli.command("duplicates")
@click.option("--threshold", "-t", type=click.FloatRange(0), default=None, metavar="D",
              help="Largest embedding distance of a near-duplicate; 0: identical files only. [default: 0.045, measured on Caltech 101]")
@click.option("--neighbours", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Candidates per picture from the Annoy index (more: slower, finds larger groups).")
@click.option("--search-k", type=int, default=-1, show_default=True, help="Annoy's search_k (-1: trees x neighbours).")
@collection_option
@database_option
@read_url_option
@json_option
def duplicates_command(threshold, neighbours, search_k, collection, database_url, read_url, as_json):
    """Groups of identical files (same content, several paths) and of near-duplicates (resized, re-encoded).

    Example: search duplicates --collection photos --threshold 0.1
    """
    from ingest import Collection
    from search.duplicates import DEFAULT_THRESHOLD, find_duplicates

    settings, db = open_database(database_url, read_url=read_url)
    coll = Collection.named(db, settings, collection)
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    if threshold > 0:
        coll.check_searchable("annoy")
    report = find_duplicates(coll, threshold, neighbours=neighbours, search_k=search_k, progress=not as_json)
    if as_json:
        print_json([g.to_dict() for g in report.groups])
        return
    print_table(["group", "kind", "id", "distance", "path"],
                [(str(g.group), g.kind, str(m.id), f"{m.distance:.4f}", m.path) for g in report.groups for m in g.members])
    click.echo(f"{coll.name}: {len(report.groups)} groups ({sum(g.kind == 'near' for g in report.groups)} near, threshold "
               f"{threshold:g}) among {report.images} images searched in {report.seconds:.1f} s", err=True)


@cli.command("sql")
@click.argument("query", required=False)
@click.option("-f", "--file", "sql_file", type=click.File("r"), help="Read the SQL from a file (e.g. sql/near_duplicates.sql).")
@database_option
@read_url_option
@timeout_option
@json_option
def sql_command(query, sql_file, database_url, read_url, statement_timeout, as_json):
    """Run one read-only SQL statement against the tables.

    Example: search sql "SELECT label, count(*) FROM images GROUP BY 1 ORDER BY 2 DESC"
    """
    if (query is None) == (sql_file is None):
        raise click.UsageError("give either a SQL statement or -f FILE")
    from search.sql import run_sql

    settings, db = open_database(database_url, statement_timeout, read_url=read_url)
    table = run_sql(db, sql_file.read() if sql_file else query, timeout=settings.statement_timeout)
    if as_json:
        print_json(table.records())
    else:
        print_table(table.columns, table.rows)


@cli.command("report")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Folder for index.html and its PNGs (created if missing).")
@click.option("--sample", type=click.IntRange(1), metavar="N", help="Look at N images drawn with --seed. Default: all.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the sample, the example queries and t-SNE.")
@click.option("-k", type=click.IntRange(1, 100), default=4, show_default=True, help="Neighbours per query (precision@k, grids).")
@click.option("--compare-with", metavar="NAME", help="A collection made by `ingest finetune` from this one: compare hold-out precision@k.")
@collection_option
@database_option
@read_url_option
@json_option
def report_command(out, sample, seed, k, compare_with, collection, database_url, read_url, as_json):
    """Write an HTML report comparing KNN on raw features, KNN after PCA and Annoy: t-SNE maps, neighbour grids,
    quality against dims, precision@k and speed; summary.json beside it holds the numbers.

    Example: search report --collection caltech101 --out report/ && open report/index.html
    """
    from search.report import build_report

    settings, db = open_database(database_url, read_url=read_url)
    summary = build_report(db, settings, collection, out, sample=sample, seed=seed, k=k, progress=not as_json, compare_with=compare_with)
    if as_json:
        print_json(summary.to_dict())
        return
    click.echo(f"{summary.collection}: {summary.sampled} of {summary.images} images, {summary.labels} labels, k={k}; {summary.tsne}")
    quality = [("precision@k, raw features (exact)", summary.precision_raw), ("precision@k, pgvector (exact)", summary.precision_exact),
               ("precision@k, Annoy", summary.precision_annoy), ("Annoy recall@k", summary.annoy_recall)]
    if summary.comparison:
        c = summary.comparison
        quality += [(f"hold-out precision@k, {c['base']} (base)", c["base_precision"]),
                    (f"hold-out precision@k, {c['tuned']} (tuned)", c["tuned_precision"])]
    print_table(["measure", "value"], [(name, "n/a" if v is None else f"{v:.3f}") for name, v in quality])
    if summary.raw_note:
        click.echo(f"raw features: skipped; {summary.raw_note}")
    print_table(["method", "dims", "precision@k", "reference p@4", "p50 ms", "timed as"],
                [(r.method, str(r.dims), "n/a" if r.precision is None else f"{r.precision:.3f}",
                  "" if r.reference is None else f"{r.reference:.3f}", f"{r.p50_ms:.2f}", r.timed_with) for r in summary.sweep])
    print_table(["engine", "p50 ms", "p95 ms"], [(t.engine, f"{t.p50_ms:.2f}", f"{t.p95_ms:.2f}") for t in summary.latency])
    print_table(["part", "seconds"], [(p, f"{t:.1f}") for p, t in summary.timings.items()] + [("total", f"{sum(summary.timings.values()):.1f}")])
    click.echo(f"wrote {summary.files[0]}, {len(summary.files) - 1} PNGs and {summary.out / 'summary.json'}")


@cli.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on; 0.0.0.0 lets other machines in.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Server processes; each opens its own database pool and builds the CNN on its first upload.")
@click.option("--max-upload-mb", type=click.FloatRange(0.01, 1000), default=None, metavar="MB",
              help="Largest picture accepted for upload.  [default: 20]")
@collection_option
@database_option
@read_url_option
def serve_command(host, port, workers, max_upload_mb, collection, database_url, read_url):
    """A web page and a JSON API to search collections by picture (read-only); API docs at /docs.

    Example: search serve --collection caltech101 --port 8080
    """
    import os

    from ingest import Collection
    from search.serve import run

    settings, db = open_database(database_url, read_url=read_url)
    name = Collection.named(db, settings, collection).name  # a missing collection is one line here, not a stack in each worker
    db.dispose()
    for variable, url in (("DATABASE_URL", database_url), ("DATABASE_READ_URL", read_url)):
        if url:
            os.environ[variable] = url  # workers are new processes: they read both from the environment
    click.echo(f"search serve: {name} at http://{host}:{port}/ ({workers} worker{'s' if workers > 1 else ''}; Ctrl-C stops)", err=True)
    run(host=host, port=port, workers=workers, collection=name, max_upload_mb=max_upload_mb)
