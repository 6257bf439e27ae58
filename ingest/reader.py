"""The reader: its own pool of connections that log in as a least-privilege role, for SQL users write.

`search sql` and every `--where` run here, never on the tool's own connection: a role switch inside a privileged
session is no boundary (a DO block or set_config('role', ...) undoes it), a separate login is. The role,
`ris_reader`, may SELECT the project's tables (and tables made later, by default privileges) and nothing else:
no superuser or CREATEROLE/CREATEDB/REPLICATION/BYPASSRLS, no membership in pg_read_server_files,
pg_execute_server_program, pg_signal_backend and the like, no CREATE on the database or a schema, no TEMP. The
role carries a statement timeout, a temp_file_limit (which only a superuser can raise) and read-only transactions.

Where it comes from:
- `--reader-url` / DATABASE_READER_URL: the operator's reader login, used as given once checked;
- otherwise the tool makes `ris_reader` a login itself, on the embedded server or wherever its own login may
  (superuser or CREATEROLE), idempotently, with a random password kept in $RIS_HOME/reader.json (mode 0600).
  On a read replica the reader logs in with those same credentials: roles replicate from the primary.
A reader that cannot be set up, or a login that turns out to be privileged, refuses user SQL with one line
saying what to configure.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa

from ingest import locks
from ingest.atomic import temporary_name
from ingest.db import Database, describe, register_vector_type, sqlalchemy_url
from ingest.errors import DatabaseError, first_line

READER_ROLE = "ris_reader"  # made by migration 0001 (NOLOGIN); given a login here
CREDENTIALS_FILE = "reader.json"
ROLE_SETTINGS = {  # the role's own defaults: what a reader's session starts with, whatever the client asks
    "statement_timeout": "30s",
    "temp_file_limit": "1GB",  # a superuser-only setting: a reader cannot raise it
    "default_transaction_read_only": "on",
    "standard_conforming_strings": "on",  # the checked --where is written back for this reading of strings
}
# Predefined roles whose members reach beyond the tables: server files and programs, other sessions, all data.
POWERFUL_ROLES = ("pg_read_server_files", "pg_write_server_files", "pg_execute_server_program", "pg_signal_backend",
                  "pg_signal_autovacuum_worker", "pg_read_all_data", "pg_write_all_data", "pg_create_subscription",
                  "pg_checkpoint", "pg_maintain", "pg_use_reserved_connections")
REPLICA_WAIT_SECONDS = 30  # a role just set up on the primary reaches a replica when the replica replays it
HINT = ("give a least-privilege login with --reader-url / DATABASE_READER_URL, or connect as a superuser or a role "
        "with CREATEROLE so the tool can make one")


def open_reader(db: Database) -> Database:
    """The reader pool for `db`'s server, checked to be least-privilege; a DatabaseError (one line) if none can be."""
    settings = db.settings
    if settings is None:
        raise DatabaseError("user SQL needs the settings the database was opened with (ingest.db.connect)")
    if settings.database_reader_url:
        reader = reader_pool(sqlalchemy_url(settings.database_reader_url), pre_ping=True)
        problem = problem_of(reader)
        if problem:
            reader.dispose()
            raise DatabaseError(f"user SQL refused: the --reader-url login {problem}")
        return reader
    password = stored_password(settings.home)
    reader = reader_pool(db.engine.url.set(username=READER_ROLE, password=password), pre_ping=db.kind != "embedded")
    if problem_of(reader) is None:
        return reader
    set_up(db, password)
    reader.dispose()  # connections that failed to log in or saw the role before its set-up
    problem = problem_of(reader, wait=REPLICA_WAIT_SECONDS if db.kind == "replica" else 0)
    if problem:
        reader.dispose()
        raise DatabaseError(f"user SQL refused: the reader role {READER_ROLE} {problem}")
    return reader


def reader_pool(url: sa.URL, *, pre_ping: bool) -> Database:
    """A pool whose connections know the vector type and open read-only transactions (BEGIN READ ONLY). Like the
    tool's own pools, it checks a connection before lending it only on a server that may go away under it."""
    engine = sa.create_engine(url, pool_pre_ping=pre_ping)
    sa.event.listen(engine, "connect", prepare_connection)
    return Database(engine, "reader")


def prepare_connection(dbapi_connection, record) -> None:
    """Once per connection: the vector type, and a session that reads strings as the checked --where was written
    and whose every transaction is read-only, explicit (BEGIN READ ONLY) or not (autocommit)."""
    register_vector_type(dbapi_connection, record)
    dbapi_connection.execute("SELECT set_config('default_transaction_read_only', 'on', false), "
                             "set_config('standard_conforming_strings', 'on', false)")
    dbapi_connection.commit()
    dbapi_connection.read_only = True


@contextmanager
def reading(db: Database, timeout: str | None = None) -> Iterator[sa.Connection]:
    """A connection of `db`'s reader whose statements are bounded by `timeout` (a PostgreSQL interval; None: 30 s;
    '0': none); its transaction is read-only and rolled back when the block ends. On a pooled
    connection that already has this timeout it costs no round trip: a --where search pays nothing more."""
    with db.reader().connect() as conn:
        limit_session(conn, timeout or ROLE_SETTINGS["statement_timeout"])
        try:
            yield conn
        finally:
            conn.rollback()


def limit_session(conn: sa.Connection, timeout: str) -> None:
    """Give the connection's session `timeout`, unless it has it already. A user's statement cannot change it for
    the next one: whatever it sets, its transaction is rolled back, and a --where cannot call set_config."""
    if conn.connection.info.get("statement_timeout") != timeout:
        conn.exec_driver_sql("SELECT set_config('statement_timeout', %s, false)", (timeout,))
        conn.commit()  # a SET in a transaction that is rolled back is undone with it
        conn.connection.info["statement_timeout"] = timeout


def limit_statements(conn: sa.Connection, timeout: str | None) -> None:
    """Bound the transaction's next statement by `timeout` again: run before each FETCH of a cursor, since the
    query may have lifted its own limit meanwhile (set_config('statement_timeout', '0', false) in its first rows)."""
    conn.exec_driver_sql("SELECT set_config('statement_timeout', %s, true)", (timeout or ROLE_SETTINGS["statement_timeout"],))


def problem_of(reader: Database, *, wait: float = 0) -> str | None:
    """What makes the reader's login unfit to run user SQL (it cannot log in, it can do more than read the tables,
    its limits are missing), or None. A fresh connection: it sees the role's own settings. Waits up to `wait`
    seconds for a login that fails (a replica replaying the role's set-up)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with reader.engine.connect() as conn:
                facts = conn.execute(sa.text(FACTS_SQL), {"powerful": list(POWERFUL_ROLES), "tables": project_tables()}).one()
            break
        except sa.exc.DBAPIError as e:
            if time.monotonic() >= deadline:
                return f"cannot log in to {describe(reader.engine)}: {first_line(str(e.orig))}"
            reader.dispose()
            time.sleep(0.2)
    return problem_in(facts)


FACTS_SQL = """
SELECT current_user AS login, (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS superuser,
  (SELECT string_agg(r.rolname, ', ' ORDER BY r.rolname) FROM pg_roles r
     WHERE pg_has_role(current_user, r.oid, 'MEMBER')
       AND (r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication OR r.rolbypassrls
            OR r.rolname = ANY(CAST(:powerful AS text[])))) AS powers,
  has_database_privilege(current_database(), 'CREATE') AS create_database,
  has_database_privilege(current_database(), 'TEMP') AS temp,
  current_database() AS database,
  (SELECT string_agg(nspname, ', ' ORDER BY nspname) FROM pg_namespace WHERE has_schema_privilege(oid, 'CREATE')) AS create_schemas,
  current_setting('temp_file_limit') AS temp_file_limit,
  current_setting('statement_timeout') AS statement_timeout,
  (SELECT string_agg(t, ', ' ORDER BY t) FROM unnest(CAST(:tables AS text[])) AS t
     WHERE to_regclass(t) IS NOT NULL AND NOT has_table_privilege(t, 'SELECT')) AS unreadable,
  (SELECT string_agg(t, ', ' ORDER BY t) FROM unnest(CAST(:tables AS text[])) AS t
     WHERE to_regclass(t) IS NOT NULL AND has_table_privilege(t, 'INSERT, UPDATE, DELETE, TRUNCATE, TRIGGER')) AS writable
"""


def problem_in(facts) -> str | None:
    """The first thing wrong with a reader's privileges and settings, as what to change."""
    who = facts.login
    if facts.superuser:
        return f"{who} is a superuser: give a login that can only read the tables"
    if facts.powers:
        return f"{who} is or may become more than a reader ({facts.powers}): give it none of these attributes or roles"
    if facts.writable:
        return f"{who} may write {facts.writable}: REVOKE ALL ON those tables FROM {who}, then GRANT SELECT"
    if facts.create_database or facts.temp:
        return (f"{who} may create objects in database {facts.database}: "
                f"REVOKE CREATE, TEMP ON DATABASE {facts.database} FROM PUBLIC, {who}")
    if facts.create_schemas:
        return f"{who} may create objects in schema {facts.create_schemas}: REVOKE CREATE ON SCHEMA ... FROM PUBLIC, {who}"
    if facts.temp_file_limit == "-1":
        return f"{who} has no temp_file_limit: as a superuser, ALTER ROLE {who} SET temp_file_limit = '1GB'"
    if facts.statement_timeout == "0":
        return f"{who} has no statement timeout: ALTER ROLE {who} SET statement_timeout = '30s'"
    if facts.unreadable:
        return f"{who} cannot read {facts.unreadable}: GRANT SELECT ON them TO {who}"
    return None


def project_tables() -> list[str]:
    """The tables users may read: those of the models (ingest.models), the schema's single source of truth."""
    from ingest.models import Base

    return sorted(Base.metadata.tables)


def stored_password(home: Path) -> str:
    """The reader's password in $RIS_HOME/reader.json, made (random, mode 0600) the first time. Concurrent first
    uses agree: the file is linked into place whole, and a process that loses the race reads the winner's."""
    path = home / CREDENTIALS_FILE
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"user": READER_ROLE, "password": secrets.token_urlsafe(32)}, f)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
    try:
        return json.loads(path.read_text())["password"]
    except (ValueError, KeyError, TypeError):
        raise DatabaseError(f"{path} is not the reader's credentials; delete it and run again to make new ones") from None


def prepare(db: Database) -> None:
    """Set the reader up right after a migration, so a read replica has the role before anyone asks (roles
    replicate). Where the tool's login may not, nothing changes here: user SQL later says what to configure."""
    if db.settings is None or db.settings.database_reader_url:
        return
    try:
        set_up(db, stored_password(db.settings.home))
    except DatabaseError:
        pass


def set_up(db: Database, password: str) -> None:
    """Make `ris_reader` a least-privilege login with `password`, on the server that takes writes (a replica's
    primary). Idempotent, and serialised with migrations by their advisory lock."""
    if db.kind != "replica":
        set_up_on(db.engine, password)
        return
    from ingest.db import connect

    primary = connect(db.settings)
    try:
        set_up_on(primary.engine, password)
    finally:
        primary.dispose()


def set_up_on(sqla: sa.Engine, password: str) -> None:
    try:
        with sqla.begin() as conn:
            locks.lock_in_transaction(conn, locks.MIGRATION, of=READER_ROLE)
            me = conn.execute(sa.text("SELECT rolsuper, rolcreaterole FROM pg_roles WHERE rolname = current_user")).one()
            if not (me.rolsuper or me.rolcreaterole):
                raise DatabaseError(f"user SQL refused: no reader login is configured and {describe(sqla)}'s login "
                                    f"may not create one; {HINT}")
            grant_reader(conn, password, superuser=me.rolsuper)
    except sa.exc.DBAPIError as e:
        raise DatabaseError(f"user SQL refused: cannot set up the reader role {READER_ROLE} on {describe(sqla)} "
                            f"({first_line(str(e.orig))}); {HINT}") from None


def grant_reader(conn: sa.Connection, password: str, *, superuser: bool) -> None:
    """The statements that make the role what problem_in checks, each a no-op when already so."""
    from psycopg import sql

    raw = conn.connection.driver_connection
    role = sql.Identifier(READER_ROLE)

    def run(statement, *args) -> None:
        conn.exec_driver_sql(sql.SQL(statement).format(*args).as_string(raw))

    exists = conn.execute(sa.text("SELECT to_regrole(:r) IS NOT NULL"), {"r": READER_ROLE}).scalar()
    # The server stores a SCRAM verifier computed here: the password itself never travels or reaches a log.
    verifier = raw.pgconn.encrypt_password(password.encode(), READER_ROLE.encode(), b"scram-sha-256").decode()
    # Only a superuser may name the attributes below, even to switch them off.
    attributes = " NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS" if superuser else ""
    run(f"{'ALTER' if exists else 'CREATE'} ROLE {{}} LOGIN PASSWORD {{}}{attributes}", role, sql.Literal(verifier))
    for name, value in ROLE_SETTINGS.items():
        if name == "temp_file_limit" and not superuser:
            continue  # only a superuser may; problem_in then names what to run
        run("ALTER ROLE {} SET {} = {}", role, sql.Identifier(name), sql.Literal(value))
    for (granted,) in conn.execute(sa.text(
            "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
            "WHERE m.member = to_regrole(:r)"), {"r": READER_ROLE}):
        run("REVOKE {} FROM {}", sql.Identifier(granted), role)
    tables = conn.execute(sa.text("SELECT t FROM unnest(CAST(:t AS text[])) AS t WHERE to_regclass(t) IS NOT NULL"),
                          {"t": project_tables()}).scalars().all()
    if tables:
        names = sql.SQL(", ").join(map(sql.Identifier, tables))
        run("REVOKE ALL ON {} FROM {}", names, role)
        run("GRANT SELECT ON {} TO {}", names, role)
    schema = conn.execute(sa.text("SELECT current_schema()")).scalar()
    run("ALTER DEFAULT PRIVILEGES IN SCHEMA {} GRANT SELECT ON TABLES TO {}", sql.Identifier(schema), role)
    database = sql.Identifier(conn.execute(sa.text("SELECT current_database()")).scalar())
    if conn.execute(sa.text("SELECT has_database_privilege(:r, current_database(), 'CREATE') "
                            "OR has_database_privilege(:r, current_database(), 'TEMP')"), {"r": READER_ROLE}).scalar():
        run("REVOKE CREATE, TEMP ON DATABASE {} FROM PUBLIC, {}", database, role)
    for (name,) in conn.execute(sa.text("SELECT nspname FROM pg_namespace WHERE has_schema_privilege(:r, oid, 'CREATE')"),
                                {"r": READER_ROLE}):
        run("REVOKE CREATE ON SCHEMA {} FROM PUBLIC, {}", sql.Identifier(name), role)
