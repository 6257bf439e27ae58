"""Alembic environment: the connection comes from our own configuration, never from alembic.ini."""
from alembic import context

from ingest.config import Settings
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

    db = connect(Settings.load(), migrate=False)
    with db.engine.begin() as conn:
        run_with(conn)


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run `ingest db upgrade`")
run_online()
