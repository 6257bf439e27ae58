"""Alembic environment: the connection comes from our own configuration, never from alembic.ini.

Two callers: `ingest db upgrade` (and any command's first use) passes its connection in cfg.attributes, inside
its own transaction and migration lock; Alembic's command line (`alembic -c migrations/alembic.ini ...`, for a
developer writing the next migration) gets a connection here, to DATABASE_URL or the embedded server in $RIS_HOME.
"""
from logging.config import fileConfig

from alembic import context
from alembic.util import CommandError

from ingest import locks
from ingest.config import Settings
from ingest.errors import DatabaseError
from ingest.models import Base

target_metadata = Base.metadata


def run_with(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    """Use the connection passed in cfg.attributes (ingest db upgrade), else DATABASE_URL/the embedded server."""
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_with(connection)
        return
    from ingest.db import connect

    if context.config.config_file_name is not None:  # the alembic command line: its ini's logging, not a caller's
        fileConfig(context.config.config_file_name, disable_existing_loggers=False)
    try:
        db = connect(Settings.load(), migrate=False)
    except DatabaseError as e:  # Alembic prints a CommandError as `FAILED: ...`, no traceback
        raise CommandError(str(e)) from None
    try:
        with db.begin() as conn:
            locks.lock_in_transaction(conn, locks.MIGRATION)  # as `ingest db upgrade`: no race with a first use
            run_with(conn)
    finally:
        db.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run `ingest db upgrade`")
run_online()
