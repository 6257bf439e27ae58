"""SQL users write is contained by PostgreSQL: one test per attack, made as an attacker would make it, through the
real `search sql` and `search similar --where` commands against the real embedded server.

The statements run on the reader (ingest.reader), a login of its own that can only read the tables; `--where` is
parsed by PostgreSQL's grammar (pglast) and only an allow-listed expression, written back as SQL, runs.
"""
from __future__ import annotations

import json
import os
import time
import uuid

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from ingest.cli import cli as ingest_cli
from ingest.reader import CREDENTIALS_FILE, POWERFUL_ROLES, READER_ROLE, ROLE_SETTINGS, project_tables
from search.cli import cli as search_cli
from tests.helpers import make_folder

GUARDED, HIDDEN = "sql-guarded", "sql-hidden"  # searched, and one beside it a filter must never reach (names unique across test files)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, ris_home, db) -> int:
    """Two collections loaded through the CLI (real ResNet50, random weights), the first with an HNSW index too;
    the id of the guarded collection's first image, which the --where searches start from."""
    root = tmp_path_factory.mktemp("security")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RIS_HOME", str(ris_home))
        mp.delenv("DATABASE_URL", raising=False)
        for name, labels, seed in ((GUARDED, ("red", "green", "blue"), 1), (HIDDEN, ("yellow", "blue"), 2)):
            folder = make_folder(root / name, labels=labels, per_label=3, seed=seed)
            args = ["load", "folder", str(folder), "-c", name, "--weights", "random", "--pca-dims", "4"]
            result = CliRunner().invoke(ingest_cli, args)
            assert result.exit_code == 0, result.output
        result = CliRunner().invoke(ingest_cli, ["index", "--hnsw", "-c", GUARDED])
        assert result.exit_code == 0, result.output
    return owner_scalar(db, "SELECT min(i.id) FROM images i JOIN collections c ON c.id = i.collection_id WHERE c.name = :n", n=GUARDED)


def search(*args: str):
    return CliRunner().invoke(search_cli, list(args))


def sql(statement: str, *options: str):
    return search("sql", statement, *options)


def where(first: int, condition: str, *options: str):
    """`search similar --where` over the guarded collection, from its image `first`, every row asked for."""
    return search("similar", "-c", GUARDED, "--id", str(first), "-k", "100", "--json", "--where", condition, *options)


def refused(result, *words: str) -> str:
    """The one-line error (on stderr) of a refused command; `words` must be in it. Rows a query streamed before
    it failed may be on stdout."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1, result.output
    for word in words:
        assert word in result.stderr, result.output
    return result.output


def owner_scalar(db, statement: str, **params):
    with db.connect() as conn:
        return conn.execute(sa.text(statement), params).scalar()


def paths_of(db, collection: str) -> list[str]:
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT i.path FROM images i JOIN collections c ON c.id = i.collection_id "
                                    "WHERE c.name = :n"), {"n": collection}).scalars().all()


# ---- search sql ----


def test_do_block_that_resets_role_cannot_copy_to_a_program(loaded, db):
    target = f"/tmp/ris-pwned-{uuid.uuid4().hex}"
    attack = f"DO $$BEGIN RESET ROLE; COPY (SELECT 1) TO PROGRAM 'touch {target}'; END$$"
    try:
        refused(sql(attack), "refused")
        assert not os.path.exists(target)
        with db.begin() as conn:  # the same text on the tool's own (superuser) connection does write the file
            conn.execute(sa.text(attack))
        assert os.path.exists(target)
    finally:
        if os.path.exists(target):
            os.unlink(target)


@pytest.mark.parametrize("statement", [
    "SELECT set_config('role', 'postgres', false)",
    "DO $$BEGIN PERFORM set_config('role', 'postgres', true); DELETE FROM images; END$$",
    "SET ROLE postgres",
])
def test_set_config_role_cannot_become_the_owner(loaded, db, statement):
    before = owner_scalar(db, "SELECT count(*) FROM images")
    refused(sql(statement), "refused")
    assert owner_scalar(db, "SELECT count(*) FROM images") == before
    assert json.loads(sql("SELECT session_user AS s, current_user AS c", "--json").stdout) == [{"s": READER_ROLE, "c": READER_ROLE}]


@pytest.mark.parametrize("statement", [
    "SELECT pg_read_file('postgresql.conf')",
    "SELECT pg_read_binary_file('/etc/hostname')",
    "SELECT pg_ls_dir('.')",
    "SELECT lo_import('/etc/hostname')",
    "SELECT current_setting('data_directory')",
])
def test_pg_read_file_and_other_server_files_are_refused(loaded, statement):
    refused(sql(statement))


def test_pg_terminate_backend_of_another_session_is_refused(loaded, db):
    with db.connect() as victim:
        pid = victim.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        refused(sql(f"SELECT pg_terminate_backend({pid})"), "refused", "permission denied")
        refused(sql(f"SELECT pg_cancel_backend({pid})"), "refused")
        assert victim.execute(sa.text("SELECT 1")).scalar() == 1  # still connected


@pytest.mark.parametrize("statement", [
    "UPDATE images SET label = 'x'",
    "WITH gone AS (DELETE FROM images RETURNING id) SELECT count(*) FROM gone",
    "DO $$BEGIN SET LOCAL transaction_read_only = off; DELETE FROM images; END$$",
    "SELECT set_config('transaction_read_only', 'off', false), count(*) FROM images",
    "TRUNCATE images",
    "SELECT setval('images_id_seq', 1)",
])
def test_writing_a_table_is_refused(loaded, db, statement):
    before = owner_scalar(db, "SELECT (SELECT count(*) FROM images) + (SELECT last_value FROM images_id_seq)")
    refused(sql(statement))
    assert owner_scalar(db, "SELECT (SELECT count(*) FROM images) + (SELECT last_value FROM images_id_seq)") == before


def test_create_temp_table_is_refused(loaded, db):
    refused(sql("CREATE TEMP TABLE scratch AS SELECT 1"), "refused")
    refused(sql("CREATE TABLE scratch (a int)"), "refused")
    # Not only the read-only transaction: the role itself may not create temporary tables or anything else.
    assert owner_scalar(db, "SELECT has_database_privilege(:r, current_database(), 'TEMP') "
                            "OR has_database_privilege(:r, current_database(), 'CREATE')", r=READER_ROLE) is False


@pytest.mark.parametrize("statement", ["SELECT 1; DROP TABLE images", "SELECT 1; SELECT pg_sleep(0)", "SELECT 1;; DROP TABLE images"])
def test_a_second_statement_is_refused(loaded, db, statement):
    refused(sql(statement), "refused", "one statement")
    assert owner_scalar(db, "SELECT to_regclass('images') IS NOT NULL") is True


def test_a_query_past_temp_file_limit_is_stopped(loaded, db):
    settings = "SELECT setconfig FROM pg_db_role_setting WHERE setrole = to_regrole(:r) AND setdatabase = 0"
    assert f"temp_file_limit={ROLE_SETTINGS['temp_file_limit']}" in owner_scalar(db, settings, r=READER_ROLE)
    refused(sql("SELECT set_config('temp_file_limit', '-1', false)"), "permission denied")  # a reader cannot lift it
    with db.begin() as conn:  # a limit small enough that the sort below passes it in a moment
        conn.execute(sa.text(f"ALTER ROLE {READER_ROLE} SET temp_file_limit = '1MB'"))
    try:
        refused(sql("SELECT g FROM generate_series(1, 2000000) g ORDER BY g DESC"), "temp_file_limit")
    finally:
        with db.begin() as conn:
            conn.execute(sa.text(f"ALTER ROLE {READER_ROLE} SET temp_file_limit = '{ROLE_SETTINGS['temp_file_limit']}'"))


def test_a_query_past_the_statement_timeout_is_stopped(loaded, monkeypatch):
    monkeypatch.setenv("RIS_STATEMENT_TIMEOUT", "300ms")
    started = time.monotonic()
    refused(sql("SELECT pg_sleep(3)"), "statement timeout")
    # Lifting the timeout in the first rows does not free the next fetch of the cursor: each starts bounded again.
    lift = ("SELECT g, CASE WHEN g = 1 THEN set_config('statement_timeout', '0', false) "
            "WHEN g > 1500 THEN pg_sleep(3)::text END AS x FROM generate_series(1, 1501) g")
    refused(sql(lift, "--max-rows", "0"), "statement timeout")
    assert time.monotonic() - started < 5


def test_session_state_a_statement_leaves_dies_with_its_connection(loaded, db):
    """An advisory lock held past the statement would block the tool's own migrations and loads (ingest.locks);
    a PREPAREd name would collide with the driver's own. The statement's connection is closed, not pooled."""
    from ingest import locks
    from ingest.config import Settings
    from ingest.db import connect
    from search.sql import run_sql

    assert sql(f"SELECT pg_advisory_lock({locks.MIGRATION}, 0)").exit_code == 0
    assert owner_scalar(db, f"SELECT pg_try_advisory_lock({locks.MIGRATION}, 0)") is True
    owner_scalar(db, "SELECT pg_advisory_unlock_all()")
    library = connect(Settings.load())  # a long-running program: one pool, many statements
    try:
        for statement in ["PREPARE _pg3_1 AS SELECT 1", "SHOW work_mem", "SHOW work_mem", "EXPLAIN SELECT 1",
                          "SELECT pg_advisory_lock(1, 2) IS NULL AS held"]:
            with run_sql(library, statement) as result:
                list(result.rows)
        assert owner_scalar(db, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
    finally:
        library.dispose()


# ---- search similar --where ----


def test_where_e_string_after_a_name_is_refused(loaded, db):
    output = refused(where(loaded, "label = éE'\\' ) OR (true --'"))
    assert not any(p in output for p in paths_of(db, HIDDEN))


def test_where_sub_select_over_another_collection_is_refused(loaded, db):
    hidden = owner_scalar(db, "SELECT id FROM collections WHERE name = :n", n=HIDDEN)
    refused(where(loaded, f"id IN (SELECT id FROM images WHERE collection_id = {hidden})"), "may not contain a sub-select")
    refused(where(loaded, f"EXISTS (SELECT 1 FROM images WHERE collection_id = {hidden})"), "may not contain a sub-select")


def test_where_error_message_cannot_leak_another_collection(loaded, db):
    hidden_paths = paths_of(db, HIDDEN)
    leak = f"CAST((SELECT path FROM images WHERE path <> '' ORDER BY collection_id DESC LIMIT 1) AS int) = 1"
    assert not any(p in refused(where(loaded, leak), "sub-select") for p in hidden_paths)
    # A cast that fails on the collection's own rows names one of them, never another collection's.
    output = refused(where(loaded, "CAST(path AS int) = 1"), "invalid input syntax")
    assert any(p in output for p in paths_of(db, GUARDED)) and not any(p in output for p in hidden_paths)


@pytest.mark.parametrize("condition", ["set_config('role', 'postgres', false) IS NOT NULL",
                                       "pg_catalog.set_config('transaction_read_only', 'off', true) IS NULL"])
def test_where_set_config_is_refused(loaded, condition):
    refused(where(loaded, condition), "may not call", "set_config")


@pytest.mark.parametrize("condition", ["ctid IS NOT NULL", "xmin::text <> ''", "tableoid > 0", "images.xmax::text = '0'"])
def test_where_system_columns_are_refused(loaded, condition):
    refused(where(loaded, condition), "has no column")


def test_where_comments_cannot_hide_the_rest(loaded):
    for condition in ["label = 'red' -- ) OR (true", "label = 'red' /* ) OR (true */", "/* x */ label = 'red'"]:
        result = where(loaded, condition)
        assert result.exit_code == 0, result.output
        assert {h["label"] for h in json.loads(result.stdout)} == {"red"}, condition


@pytest.mark.parametrize("condition", ["label = 'red'; DROP TABLE images", "label = 'red';", "true; SELECT 1"])
def test_where_semicolon_is_refused(loaded, condition):
    refused(where(loaded, condition), "may not contain ';'")


def test_where_dollar_quotes_are_only_strings(loaded):
    assert {h["label"] for h in json.loads(where(loaded, "label = $$red$$").stdout)} == {"red"}
    for condition in ["label = $q$x') OR (true$q$", "label = $$x$$ OR label = $$') OR (true --$$"]:
        result = where(loaded, condition)
        assert result.exit_code == 0 and json.loads(result.stdout) == [], result.output


def test_where_unicode_escapes_are_only_strings(loaded):
    assert {h["label"] for h in json.loads(where(loaded, "label = U&'\\0072ed'").stdout)} == {"red"}
    for condition in ["label = U&'\\0027) OR (true'", "label = U&'!0027) OR (true' UESCAPE '!'"]:
        result = where(loaded, condition)
        assert result.exit_code == 0 and json.loads(result.stdout) == [], result.output


@pytest.mark.parametrize("condition, named", [
    ("pg_sleep(1) IS NULL", "pg_sleep"),
    ("pg_read_file('postgresql.conf') <> ''", "pg_read_file"),
    ("lo_import('/etc/hostname') > 0", "lo_import"),
    ("pg_terminate_backend(1)", "pg_terminate_backend"),
    ("current_setting('data_directory') <> ''", "current_setting"),
    ("count(*) > 0", "count"),
    ("lower(label) = 'red' AND dblink('x', 'y') IS NULL", "dblink"),
    ("label::regclass IS NOT NULL", "regclass"),
    ("label::pg_catalog.regproc IS NOT NULL", "regproc"),
])
def test_where_functions_not_allowed_are_refused(loaded, condition, named):
    refused(where(loaded, condition), named)


@pytest.mark.parametrize("engine", ["pgvector", "annoy", "hnsw", "raw"])
def test_where_runs_on_the_reader_for_every_engine(loaded, db, engine):
    """With the reader unable to log in, every engine's --where fails (it never falls back to the tool's own
    connection) while a --label search, which needs no reader, still answers."""
    args = ["--space", "raw"] if engine == "raw" else ["--engine", engine]
    assert where(loaded, "label = 'red'", *args).exit_code == 0
    with db.begin() as conn:
        conn.execute(sa.text(f"ALTER ROLE {READER_ROLE} CONNECTION LIMIT 0"))
    try:
        refused(where(loaded, "label = 'red'", *args), "user SQL refused", READER_ROLE)
        labelled = search("similar", "-c", GUARDED, "--id", str(loaded), "--json", "--label", "red", *args)
        assert labelled.exit_code == 0 and {h["label"] for h in json.loads(labelled.stdout)} == {"red"}, labelled.output
    finally:
        with db.begin() as conn:
            conn.execute(sa.text(f"ALTER ROLE {READER_ROLE} CONNECTION LIMIT -1"))


# ---- the reader role ----


def test_reader_role_is_not_superuser_and_has_no_powerful_roles(loaded, db):
    assert sql("SELECT 1").exit_code == 0  # the reader exists once a user's SQL has run
    with db.connect() as conn:
        role = conn.execute(sa.text("SELECT * FROM pg_roles WHERE rolname = :r"), {"r": READER_ROLE}).mappings().one()
        assert role["rolcanlogin"] is True
        assert not any(role[a] for a in ("rolsuper", "rolcreaterole", "rolcreatedb", "rolreplication", "rolbypassrls"))
        member_of = conn.execute(sa.text("SELECT r.rolname FROM pg_roles r WHERE r.rolname <> :r "
                                         "AND pg_has_role(:r, r.oid, 'MEMBER')"), {"r": READER_ROLE}).scalars().all()
        assert member_of == [] and not set(member_of) & set(POWERFUL_ROLES)
        assert conn.execute(sa.text("SELECT count(*) FROM pg_namespace WHERE has_schema_privilege(:r, oid, 'CREATE')"),
                            {"r": READER_ROLE}).scalar() == 0
        for table in project_tables():
            assert conn.execute(sa.text("SELECT has_table_privilege(:r, :t, 'SELECT')"), {"r": READER_ROLE, "t": table}).scalar()
            assert not conn.execute(sa.text("SELECT has_table_privilege(:r, :t, 'INSERT, UPDATE, DELETE, TRUNCATE')"),
                                    {"r": READER_ROLE, "t": table}).scalar()
        setconfig = conn.execute(sa.text("SELECT setconfig FROM pg_db_role_setting WHERE setrole = to_regrole(:r)"),
                                 {"r": READER_ROLE}).scalar()
    assert {f"{k}={v}" for k, v in ROLE_SETTINGS.items()} <= set(setconfig)


def test_reader_credentials_file_is_private(loaded, ris_home):
    path = ris_home / CREDENTIALS_FILE
    assert sql("SELECT 1").exit_code == 0
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text())["user"] == READER_ROLE


def test_a_reader_role_given_more_is_put_back_before_it_runs_anything(loaded, db):
    """Someone made the reader a superuser, a member of pg_read_server_files and a writer of images: the next
    process that opens the reader finds it and takes it all back before running the user's statement."""
    with db.begin() as conn:
        for grant in (f"ALTER ROLE {READER_ROLE} SUPERUSER", f"GRANT pg_read_server_files TO {READER_ROLE}",
                      f"GRANT INSERT, DELETE ON images TO {READER_ROLE}"):
            conn.execute(sa.text(grant))
    result = sql("SELECT current_setting('is_superuser') AS su, pg_has_role('pg_read_server_files', 'MEMBER') AS files, "
                 "has_table_privilege('images', 'INSERT') AS writes", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [{"su": "off", "files": False, "writes": False}]
    refused(sql("SELECT pg_read_file('postgresql.conf')"), "permission denied")
