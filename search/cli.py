"""`search`: the nearest images to a picture, ad-hoc SQL, and reports."""
from __future__ import annotations

from pathlib import Path

import click

from ingest import (
    ENGINES,
    EngineName,
    ErrorHandlingGroup,
    collection_option,
    database_option,
    json_option,
    open_database,
    print_json,
    read_url_option,
    reader_url_option,
    runtime_option,
    timeout_option,
    to_json,
)


@click.group(cls=ErrorHandlingGroup)
@click.version_option(package_name="reverse-image-search")
def cli():
    """Find the images of a collection most similar to a picture: exactly (pgvector) or fast (Annoy, HNSW)."""


@cli.command("similar")
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--id", "image_ids", type=int, multiple=True, metavar="N", help="Search with an image already stored (no CNN run); repeatable.")
@click.option("--not", "negative_files", type=click.Path(path_type=Path), multiple=True, metavar="PICTURE",
              help="Move the query away from this picture (repeatable): q = mean(pictures) - 0.5 x mean(--not pictures).")
@click.option("--not-id", "negative_ids", type=int, multiple=True, metavar="N", help="Move away from this stored image (repeatable).")
@click.option("--crop", metavar="X,Y,W,H", help="Search with this region of the first picture only (its pixels after EXIF rotation).")
@click.option("--engine", "-e", type=click.Choice(ENGINES), default=EngineName.PGVECTOR.value, show_default=True,
              help="pgvector: exact SQL; annoy: fast approximate file (+ exact search of rows added since); "
                   "hnsw: pgvector's approximate index (`ingest index --hnsw`).")
@click.option("--space", type=click.Choice(["pca", "raw"]), default="pca", show_default=True,
              help="pca: the stored embeddings; raw: exact KNN over the 2048-d ResNet50 features (pgvector engine only).")
@click.option("-k", type=click.IntRange(1, 10_000), default=10, show_default=True, help="How many neighbours.")
@click.option("--label", help="Only neighbours with this label.")
@click.option("--where", metavar="SQL", help="Only neighbours matching this SQL condition on images (read-only, within the collection).")
@click.option("--exclude-self/--keep-self", default=None,
              help="Leave the query's stored pictures out of the results, or keep them. [default: left out when the query has "
                   "several pictures or a --not; kept for one picture]")
@click.option("--search-k", type=int, default=-1, show_default=True, help="Annoy's search_k (-1: 2 x trees x k).")
@click.option("--ef-search", type=click.IntRange(1, 1000), default=None, metavar="N",
              help="HNSW candidate list per query (default 800; lower: faster, worse recall).")
@click.option("--plot", type=click.Path(path_type=Path, dir_okay=False), help="Write a PNG of the query and its neighbours.")
@collection_option
@runtime_option
@database_option
@read_url_option
@reader_url_option
@timeout_option
@json_option
def similar_command(images, image_ids, negative_files, negative_ids, crop, engine, space, k, label, where, exclude_self, search_k,
                    ef_search, plot, collection, runtime, database_url, read_url, reader_url, statement_timeout, as_json):
    """The k images most similar to IMAGE (a file) or --id N; to several (their mean), away from --not ones.

    Example: search similar room.jpg --crop 120,40,300,260 --engine annoy -k 20
    """
    from ingest import Collection, Crop, compose, pictures_of
    from search.searcher import stored_bytes

    settings, db = open_database(database_url, statement_timeout, read_url=read_url, reader_url=reader_url, runtime=runtime)
    coll = Collection.named(db, settings, collection)
    if space == "raw":
        coll.raw_engine(engine)  # refuses an approximate engine before any work
    coll.check_searchable(engine)
    composed = compose(coll, pictures_of(images, image_ids, crop=Crop.parse(crop) if crop is not None else None),
                       pictures_of(negative_files, negative_ids), space=space, read_stored=lambda i: stored_bytes(coll, i))
    hits = coll.similar(composed.query, k, engine=engine, label=label, where=where, exclude=composed.exclude(exclude_self),
                        search_k=search_k, ef_search=ef_search, space=space)
    if plot:
        from search.figures import plot_neighbours

        first = composed.pictures[0]
        plot_neighbours(plot, first.path, first.label, hits, f"{coll.name} · {engine if space == 'pca' else 'raw 2048-d, exact'}")
    if as_json and not (composed.single and crop is None):  # a query of one whole picture prints the hits alone, as ever
        print_json({"query": composed.to_dict(), "hits": [h.to_dict() for h in hits]})
    else:
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
@click.option("--search-k", type=int, default=-1, show_default=True, help="Annoy's search_k (-1: 2 x trees x neighbours).")
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
        coll.check_searchable(EngineName.ANNOY)
    report = find_duplicates(coll, threshold, neighbours=neighbours, search_k=search_k, progress=not as_json)
    if as_json:
        print_json([g.to_dict() for g in report.groups])
        return
    print_table(["group", "kind", "id", "distance", "path"],
                [(str(g.group), g.kind, str(m.id), f"{m.distance:.4f}", m.path) for g in report.groups for m in g.members])
    click.echo(f"{coll.name}: {len(report.groups)} groups ({sum(g.kind == 'near' for g in report.groups)} near, threshold "
               f"{threshold:g}) among {report.images} images searched in {report.seconds:.1f} s", err=True)


@cli.command("audit")
@click.option("--run", metavar="NAME", help="Splits of this fine-tuning run (`ingest finetune --into NAME`). Default: the latest.")
@click.option("--split-by", metavar="REGEX", help="Splits from the path instead: the first group names the split, e.g. '/(train|val|test)/'.")
@click.option("-k", type=click.IntRange(1, 100), default=10, show_default=True, help="Neighbours per picture.")
@click.option("--agreement", type=click.FloatRange(0, 1, min_open=True), default=0.6, show_default=True,
              help="Share of the neighbours that must carry one other label for a label suspect.")
@click.option("--threshold", "-t", type=click.FloatRange(0), default=None, metavar="D",
              help="Largest distance of a near-identical leak. [default: 0.045, as search duplicates]")
@click.option("--outlier-score", type=click.FloatRange(0, min_open=True), default=4.0, show_default=True,
              help="Outlier when its distance to its label's 3 nearest members is this many times the label's median of it.")
@click.option("--limit", type=click.IntRange(1), metavar="N",
              help="Cases per section. [default: 20 on the terminal and page, all in --json and --export]")
@click.option("--out", "-o", type=click.Path(path_type=Path, file_okay=False), help="Also write an HTML page with thumbnails here.")
@click.option("--export", type=click.Choice(["ids", "csv"]), help="Print the suspects and leaks to act on: their ids, or CSV rows.")
@collection_option
@database_option
@read_url_option
@json_option
def audit_command(run, split_by, k, agreement, threshold, outlier_score, limit, out, export, collection, database_url, read_url, as_json):
    """What cannot be trusted in a labelled collection: leaks across splits, label suspects, outliers, per-label precision@k.

    Example: search audit --collection shop --split-by '/(train|val|test)/' --out audit/
    """
    from ingest import Collection
    from search.audit import audit
    from search.audit_page import export_csv, export_ids, summary_line, text_sections, write_page
    from search.duplicates import DEFAULT_THRESHOLD

    if as_json and export:
        raise click.ClickException("give --json or --export, not both")
    settings, db = open_database(database_url, read_url=read_url)
    coll = Collection.named(db, settings, collection)
    found = audit(coll, k=k, run=run, split_by=split_by, agreement=agreement, outlier_score=outlier_score,
                  threshold=DEFAULT_THRESHOLD if threshold is None else threshold, progress=not (as_json or export))
    for note in found.notes:
        click.echo(f"note: {note}", err=True)
    if out:
        page = write_page(out, found, found.limited(limit or 20))
        click.echo(f"wrote {page}", err=True)
    if as_json:
        print_json(found.limited(limit).to_dict())
    elif export == "csv":
        click.echo(export_csv(found.limited(limit)), nl=False)
    elif export == "ids":
        click.echo("".join(f"{i}\n" for i in export_ids(found.limited(limit))), nl=False)
    else:
        click.echo(summary_line(found))
        for heading, columns, rows in text_sections(found, found.limited(limit or 20)):
            click.echo(f"\n{heading}")
            if rows:
                print_table(columns, rows)


@cli.command("sql")
@click.argument("query", required=False)
@click.option("-f", "--file", "sql_file", type=click.File("r"), help="Read the SQL from a file (e.g. sql/near_duplicates.sql).")
@click.option("--max-rows", type=click.IntRange(0), default=10_000, show_default=True, metavar="N",  # search.sql.DEFAULT_MAX_ROWS
              help="Print at most N rows (0: all); a note on stderr says when more were left out.")
@database_option
@read_url_option
@reader_url_option
@timeout_option
@json_option
def sql_command(query, sql_file, max_rows, database_url, read_url, reader_url, statement_timeout, as_json):
    """Run one read-only SQL statement against the tables, as a login that can only read them; rows stream out.

    Example: search sql "SELECT label, count(*) FROM images GROUP BY 1 ORDER BY 2 DESC"
    """
    if (query is None) == (sql_file is None):
        raise click.UsageError("give either a SQL statement or -f FILE")
    from search.sql import run_sql, write_json, write_table

    settings, db = open_database(database_url, statement_timeout, read_url=read_url, reader_url=reader_url)
    with run_sql(db, sql_file.read() if sql_file else query, timeout=settings.statement_timeout, max_rows=max_rows) as result:
        (write_json if as_json else write_table)(result)
    if result.cut:
        click.echo(f"note: printed the first {max_rows} rows; more were left out (--max-rows 0 prints all)", err=True)


@cli.command("report")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Folder for index.html and its PNGs (created if missing).")
@click.option("--sample", type=click.IntRange(1), metavar="N", help="Look at N images drawn with --seed. Default: all.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the sample, the example queries and t-SNE.")
@click.option("-k", type=click.IntRange(1, 100), default=4, show_default=True, help="Neighbours per query (precision@k, grids).")
@click.option("--compare-with", metavar="NAME", help="A collection made by `ingest finetune` from this one: compare hold-out precision@k.")
@click.option("--split-by", metavar="REGEX", help="Labels without the split folder this pattern's first group matches, as `search audit --split-by`.")
@collection_option
@database_option
@read_url_option
@json_option
def report_command(out, sample, seed, k, compare_with, split_by, collection, database_url, read_url, as_json):
    """Write an HTML report comparing KNN on raw features, KNN after PCA and Annoy: t-SNE maps, neighbour grids,
    quality against dims, precision@k and speed; summary.json beside it holds the numbers.

    Example: search report --collection caltech101 --out report/ && open report/index.html
    """
    from search.report import build_report

    settings, db = open_database(database_url, read_url=read_url)
    summary = build_report(db, settings, collection, out, sample=sample, seed=seed, k=k, progress=not as_json, compare_with=compare_with,
                           split_by=split_by)
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
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 lets other machines in (anything beyond loopback needs a token).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Server processes; each opens its own database pool and builds the CNN on its first upload.")
@click.option("--max-upload-mb", type=click.FloatRange(0.01, 1000), default=None, metavar="MB",
              help="Largest picture accepted for upload.  [default: 20]")
@click.option("--max-pixels", type=click.IntRange(1_000_000, 100_000_000), default=None, metavar="N",
              help="Most pixels a picture may decode to (uploads, thumbnails), and decoded at once per process.  [default: 40000000]")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME", envvar="RIS_SERVE_ALLOWED_HOSTS",
              help="Also answer to this name (a reverse proxy's), besides localhost, 127.0.0.1 and [::1]; repeatable.")
@click.option("--token", envvar="RIS_SERVE_TOKEN", metavar="TEXT",
              help="Every request must show it (Bearer header, or the cookie the printed link sets). Beyond loopback one is "
                   "made up when not given.")
@click.option("--no-auth", is_flag=True, help="Beyond loopback, serve without a token: anyone who reaches the port sees every picture.")
@collection_option
@runtime_option
@database_option
@read_url_option
def serve_command(host, port, workers, max_upload_mb, max_pixels, allowed_hosts, token, no_auth, collection, runtime, database_url,
                  read_url):
    """A web page and a JSON API to search collections by picture (read-only); the API's schema at /openapi.json.

    Example: search serve --collection caltech101 --port 8080
    """
    import os

    from ingest import Collection
    from search.guards import is_loopback, link, new_token, served_names, token_problem
    from search.serve import run

    if token and no_auth:
        raise click.UsageError("give --token or --no-auth, not both")
    if token and token_problem(token):
        raise click.BadParameter(token_problem(token), param_hint="--token")
    settings, db = open_database(database_url, read_url=read_url)
    name = Collection.named(db, settings, collection).name  # a missing collection is one line here, not a stack in each worker
    db.dispose()
    for variable, url in (("DATABASE_URL", database_url), ("DATABASE_READ_URL", read_url)):
        if url:
            os.environ[variable] = url  # workers are new processes: they read both from the environment
    os.environ["RIS_RUNTIME"] = runtime  # and what runs the CNN for uploads (ingest.config.Settings)
    token = token or (None if no_auth or is_loopback(host) else new_token())
    names = served_names(host, allowed_hosts)
    click.echo(f"search serve: {name} at {link(host, port, names, token)} ({workers} worker{'s' if workers > 1 else ''}; Ctrl-C stops)",
               err=True)
    if no_auth and not is_loopback(host):
        click.echo(f"warning: no token: anyone who reaches port {port} can search and see every picture", err=True)
    run(host=host, port=port, workers=workers, collection=name, max_upload_mb=max_upload_mb, max_pixels=max_pixels,
        allowed_hosts=names, token=token)
