"""The reader login on servers other than the embedded one: a second PostgreSQL on loopback (tests/pg.py) where the
tool makes the reader itself (its login is a superuser, or has CREATEROLE and a superuser sets temp_file_limit), is
given one (--reader-url / DATABASE_READER_URL), refuses a given login that can do more than read, and refuses
users' SQL, saying what to configure, where its own login may not create roles. And on the embedded server: tables
made after the reader exists are readable by it.
"""
from __future__ import annotations

import json

import psycopg
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from ingest.cli import cli as ingest_cli
from ingest.reader import CREDENTIALS_FILE, READER_ROLE
from search.cli import cli as search_cli
from tests.helpers import make_folder
from tests.pg import TcpPostgres


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("external")
    pg = TcpPostgres(folder, password="s3cret")
    pg.start()
    yield pg
    pg.stop()


def run(server: TcpPostgres, statements: list[str], database: str = "postgres") -> None:
    """Statements as the server's superuser (the operator), each on its own (CREATE DATABASE cannot be in a transaction)."""
    with psycopg.connect(server.url().rsplit("/", 1)[0] + f"/{database}", autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def url_of(server: TcpPostgres, user: str, password: str, database: str = "postgres") -> str:
    return f"postgresql://{user}:{password}@127.0.0.1:{server.port}/{database}"


def search(home, database_url: str, *args: str, **env: str):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RIS_HOME", str(home))
        mp.setenv("DATABASE_URL", database_url)
        for name, value in env.items():
            mp.setenv(name, value)
        return CliRunner().invoke(search_cli, list(args))


def test_external_server_the_tool_makes_the_reader(server, tmp_path):
    result = search(tmp_path, server.url(), "sql", "SELECT session_user AS who", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [{"who": READER_ROLE}]
    credentials = tmp_path / CREDENTIALS_FILE
    assert credentials.stat().st_mode & 0o777 == 0o600
    password = json.loads(credentials.read_text())["password"]
    # A real password login: the stored password opens it, another does not.
    with psycopg.connect(url_of(server, READER_ROLE, password)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (READER_ROLE,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(url_of(server, READER_ROLE, "not-" + password))
    # And a second run finds it set up: the same login, nothing to redo.
    again = search(tmp_path, server.url(), "sql", "SELECT session_user AS who", "--json")
    assert json.loads(again.stdout) == [{"who": READER_ROLE}]


def test_external_server_reader_url_is_used_as_given(server, tmp_path):
    assert search(tmp_path, server.url(), "sql", "SELECT 1").exit_code == 0  # the schema exists
    run(server, ["CREATE ROLE analyst LOGIN PASSWORD 'a-secret'", "ALTER ROLE analyst SET temp_file_limit = '100MB'",
                 "ALTER ROLE analyst SET statement_timeout = '10s'", "GRANT SELECT ON ALL TABLES IN SCHEMA public TO analyst",
                 "REVOKE TEMP ON DATABASE postgres FROM PUBLIC"])
    analyst = url_of(server, "analyst", "a-secret")
    for args, env in [(["--reader-url", analyst], {}), ([], {"DATABASE_READER_URL": analyst})]:
        result = search(tmp_path, server.url(), "sql", "SELECT session_user AS who, count(*) AS n FROM collections", "--json",
                        *args, **env)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout) == [{"who": "analyst", "n": 0}]
    refused = search(tmp_path, server.url(), "sql", "SELECT pg_read_file('postgresql.conf')", "--reader-url", analyst)
    assert refused.exit_code == 1 and "permission denied" in refused.output


@pytest.mark.parametrize("login, named", [
    ("postgres", "is a superuser"),
    ("snoop", "pg_read_server_files"),
    ("maker", "may create objects in schema"),
])
def test_external_server_privileged_reader_url_is_refused(server, tmp_path, login, named):
    run(server, ["DO $$BEGIN CREATE ROLE snoop LOGIN PASSWORD 'x' IN ROLE pg_read_server_files; "
                 "EXCEPTION WHEN duplicate_object THEN NULL; END$$",
                 "DO $$BEGIN CREATE ROLE maker LOGIN PASSWORD 'x'; EXCEPTION WHEN duplicate_object THEN NULL; END$$",
                 "ALTER ROLE snoop SET temp_file_limit = '1GB'", "ALTER ROLE maker SET temp_file_limit = '1GB'",
                 "GRANT CREATE ON SCHEMA public TO maker", "REVOKE TEMP ON DATABASE postgres FROM PUBLIC"])
    reader = server.url() if login == "postgres" else url_of(server, login, "x")
    result = search(tmp_path, server.url(), "sql", "SELECT 1", "--reader-url", reader)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "user SQL refused" in result.output and named in result.output


def test_external_server_without_createrole_refuses_user_sql(server, tmp_path):
    """The tool's login owns its database but may not create roles: searches work, users' SQL is refused with
    what to configure, and nothing runs on the tool's own connection instead."""
    run(server, ["CREATE ROLE app LOGIN PASSWORD 'app-secret'", "CREATE DATABASE appdb OWNER app"])
    run(server, ["CREATE EXTENSION vector"], database="appdb")  # pgvector is not a trusted extension
    app = url_of(server, "app", "app-secret", "appdb")
    folder = make_folder(tmp_path / "pics", labels=("red", "blue"), per_label=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RIS_HOME", str(tmp_path))
        mp.setenv("DATABASE_URL", app)
        loaded = CliRunner().invoke(ingest_cli, ["load", "folder", str(folder), "-c", "app", "--weights", "random", "--pca-dims", "2"])
    assert loaded.exit_code == 0, loaded.output
    similar = ("similar", "-c", "app", "--id", "1", "--json")
    labelled = search(tmp_path, app, *similar, "--label", "red")
    assert labelled.exit_code == 0 and {h["label"] for h in json.loads(labelled.stdout)} == {"red"}, labelled.output
    for args in (["sql", "SELECT 1"], [*similar, "--where", "label = 'red'"]):
        result = search(tmp_path, app, *args)
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert "user SQL refused" in result.output and "--reader-url" in result.output and "CREATEROLE" in result.output


def test_external_server_createrole_login_makes_the_reader_and_a_superuser_sets_its_temp_file_limit(tmp_path):
    """A login with CREATEROLE (not a superuser) that owns its database makes the reader, but only a superuser may
    set temp_file_limit: until one does, users' SQL is refused with the statement to run; then it runs as the reader."""
    (tmp_path / "pg").mkdir()
    pg = TcpPostgres(tmp_path / "pg", password="s3cret")
    pg.start()
    try:
        run(pg, ["CREATE ROLE manager LOGIN CREATEROLE PASSWORD 'm-secret'", "CREATE DATABASE mgrdb OWNER manager"])
        run(pg, ["CREATE EXTENSION vector"], database="mgrdb")
        manager = url_of(pg, "manager", "m-secret", "mgrdb")
        refused = search(tmp_path, manager, "sql", "SELECT 1")
        assert refused.exit_code == 1 and len(refused.output.strip().splitlines()) == 1, refused.output
        assert f"ALTER ROLE {READER_ROLE} SET temp_file_limit" in refused.output
        run(pg, [f"ALTER ROLE {READER_ROLE} SET temp_file_limit = '1GB'"])
        result = search(tmp_path, manager, "sql", "SELECT session_user AS who, count(*) AS n FROM images", "--json")
        assert result.exit_code == 0 and json.loads(result.stdout) == [{"who": READER_ROLE, "n": 0}], result.output
    finally:
        pg.stop()


def test_tables_created_later_are_readable_by_the_reader(db):
    """Default privileges: a table (or partition) the tool's login makes after the reader exists is readable by it."""
    assert CliRunner().invoke(search_cli, ["sql", "SELECT 1"]).exit_code == 0  # the reader is set up
    with db.begin() as conn:
        conn.execute(sa.text("CREATE TABLE later_parent (id int) PARTITION BY RANGE (id)"))
        conn.execute(sa.text("CREATE TABLE later_part PARTITION OF later_parent FOR VALUES FROM (0) TO (10)"))
        conn.execute(sa.text("INSERT INTO later_parent VALUES (1), (2)"))
    try:
        for table in ("later_parent", "later_part"):
            result = CliRunner().invoke(search_cli, ["sql", f"SELECT count(*) AS n FROM {table}", "--json"])
            assert result.exit_code == 0 and json.loads(result.stdout) == [{"n": 2}], result.output
    finally:
        with db.begin() as conn:
            conn.execute(sa.text("DROP TABLE later_parent"))
