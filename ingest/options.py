"""Click pieces shared by the `ingest` and `search` commands: options, JSON output, and error handling.

Heavy modules (SQLAlchemy, the database layer) are imported when a command runs, not here, so that
`--help` answers at once.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import click

from ingest.config import DEFAULT_MAX_FILE_MB, DEFAULT_TREES, Settings
from ingest.errors import RisError
from ingest.precision import PRECISIONS, RUNTIMES

database_option = click.option(
    "--database-url",
    envvar="DATABASE_URL",
    metavar="URL",
    help="PostgreSQL with pgvector (env DATABASE_URL). Default: the embedded server in $RIS_HOME/pgdata.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for programs.")
collection_option = click.option(
    "--collection", "-c", metavar="NAME", help="Collection name. Default: the only one, else caltech101."
)


@dataclass(frozen=True)
class LoadOptions:
    """What `ingest load` is asked to do besides which pictures and where: the options of every load source, by name."""

    weights: str = "imagenet"
    pca_dims: int | None = None  # None: 128, or the collection's
    limit_per_class: int | None = None
    batch_size: int | None = None  # None: chosen for the hardware (ingest.feeding)
    workers: int | None = None
    precision: str = "auto"
    trees: int = DEFAULT_TREES
    strict: bool = False  # exit non-zero if any file failed
    max_file_mb: int = DEFAULT_MAX_FILE_MB
    prune: bool = False
    ray_address: str | None = None
    ray_actors: int | None = None
    raw_features: str = "half"  # a new collection's: 'half' keeps them, 'none' drops them once the PCA is fitted


def new_collection_name(ctx, param, value: str | None) -> str | None:
    """Callback of an option naming a collection to write into: refuses, before any work, a name a new collection
    may not have (ingest/names.py; one line, exit 1). Options naming a collection to read take any name."""
    from ingest.names import check_name

    return None if value is None else check_name(value)
precision_option = click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="auto",
    show_default=True,
    envvar="RIS_PRECISION",
    help="How the CNN computes (env RIS_PRECISION). auto: a collection's own; for a new one bf16 where the processor "
         "(AVX512_BF16, AMX) or GPU does it natively, else fp32.",
)
runtime_option = click.option(
    "--runtime",
    type=click.Choice(RUNTIMES),
    default="auto",
    show_default=True,
    envvar="RIS_RUNTIME",
    help="What runs the CNN (env RIS_RUNTIME). auto: OpenVINO on the processor, TensorFlow on an NVIDIA GPU.",
)
read_url_option = click.option(
    "--read-url",
    envvar="DATABASE_READ_URL",
    metavar="URL",
    help="A read-only replica that answers the queries (env DATABASE_READ_URL); writes still go to --database-url.",
)
reader_url_option = click.option(
    "--reader-url",
    envvar="DATABASE_READER_URL",
    metavar="URL",
    help="The least-privilege login that runs your SQL (--where, search sql) (env DATABASE_READER_URL). "
         "Default: a login the tool makes, with credentials in $RIS_HOME/reader.json.",
)
timeout_option = click.option(
    "--statement-timeout",
    envvar="RIS_STATEMENT_TIMEOUT",
    metavar="INTERVAL",
    help="Longest a user's SQL (--where, search sql) may run, as PostgreSQL reads it: 30s, 5min, 0 for none. Default: 30s.",
)


def open_database(database_url: str | None, statement_timeout: str | None = None, *, read_url: str | None = None,
                  reader_url: str | None = None, runtime: str | None = None):
    """Settings from the flags/environment, and a migrated database; for a command that only reads and has a
    `read_url` (--read-url / DATABASE_READ_URL), that replica instead (ingest.db.connect_for_queries).
    `reader_url` (--reader-url / DATABASE_READER_URL) is the login users' SQL runs as (ingest.reader).
    `runtime` (--runtime / RIS_RUNTIME) is what runs the CNN for the command's collections."""
    from dataclasses import replace

    from ingest.db import connect, connect_for_queries

    settings = Settings.load(database_url, statement_timeout=statement_timeout, read_url=read_url, reader_url=reader_url)
    settings = replace(settings, runtime=runtime) if runtime else settings
    return settings, (connect_for_queries(settings) if read_url else connect(settings))


def print_json(value) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False, default=to_json))


def to_json(value):
    """What json cannot encode itself: vectors and arrays become lists, Decimals floats, bytea hex (\\x...), the rest text."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()
    if hasattr(value, "to_numpy"):  # pgvector's Vector
        value = value.to_numpy()
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if type(value).__name__ == "Decimal":
        return float(value)
    return str(value)


class ErrorHandlingGroup(click.Group):
    """Turns errors a user can cause into one line and a non-zero exit, never a traceback.

    RisError and database errors: exit 1. Ctrl-C: exit 130 with a line saying a rerun resumes.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RisError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted: what was stored is kept; run the same command again to finish", err=True)
            sys.exit(130)
        except Exception as e:
            if is_database_error(e):
                from ingest.errors import first_line

                raise click.ClickException(f"database error: {first_line(str(getattr(e, 'orig', None) or e))}") from None
            raise


def is_database_error(e: Exception) -> bool:
    """An error the server or driver raised (a timeout, a lost connection): through SQLAlchemy, or from a raw
    psycopg cursor (COPY, binary reads), which SQLAlchemy does not wrap."""
    if "sqlalchemy" in sys.modules and isinstance(e, sys.modules["sqlalchemy"].exc.DBAPIError):
        return True
    return "psycopg" in sys.modules and isinstance(e, sys.modules["psycopg"].Error)
