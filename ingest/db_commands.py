"""`ingest db`: the database's URL, its migrations (and, on a Citus coordinator, distributing its tables), and the
embedded server. A group of its own module; ingest/cli.py adds it to `ingest`."""
from __future__ import annotations

import click

from ingest.options import ErrorHandlingGroup, database_option, json_option, open_database, print_json


@click.group(cls=ErrorHandlingGroup)
def db():
    """The database: its URL, migrations, the embedded server."""


@db.command("url")
@database_option
def db_url(database_url):
    """Print a URL that psql accepts (starts the embedded server if needed).

    Example: psql "$(ingest db url)"
    """
    _, database = open_database(database_url)
    click.echo(database.url)


@db.command("upgrade")
@click.option("--batch-size", type=click.IntRange(100), default=10_000, show_default=True, metavar="N",
              help="Pictures copied per committed batch when a migration rewrites them.")
@click.option("--shards", type=click.IntRange(1, 4096), default=32, show_default=True, metavar="N",
              help="On a Citus coordinator: shards of the pictures' tables, when they are distributed (once).")
@database_option
@json_option
def db_upgrade(batch_size, shards, database_url, as_json):
    """Apply migrations up to the newest (idempotent). Every command applies those that only add; one that rewrites
    stored pictures runs only here: disk checked first, committed batches with progress, rerun after a crash to go on.
    docs/migrations.md.

    Example: ingest db upgrade
    """
    from dataclasses import asdict

    from ingest.config import Settings
    from ingest.db import connect
    from ingest.upgrade import upgrade_database

    database = connect(Settings.load(database_url), migrate=False)
    report = upgrade_database(database, batch=batch_size, progress=not as_json, shards=shards)
    if as_json:
        print_json(asdict(report))
        return
    if report.disk:
        click.echo(f"disk: {report.disk}", err=True)
    moved = f", {report.copied} pictures moved into per-collection partitions" if report.copied else ""
    rebuilt = f", {report.hnsw_rebuilt} HNSW index(es) built again" if report.hnsw_rebuilt else ""
    spread = f", tables distributed into {report.distributed} shards" if report.distributed else ""
    click.echo(f"database at revision {report.after} (was {report.before or 'empty'}){moved}{spread}{rebuilt}")


@db.command("stop")
def db_stop():
    """Stop the embedded PostgreSQL server, if it runs.

    Example: ingest db stop
    """
    from ingest.config import Settings
    from ingest.db import stop_embedded

    stopped = stop_embedded(Settings.load().pgdata)
    click.echo("embedded server stopped" if stopped else "embedded server was not running")
