"""Which database: the embedded server, and an external PostgreSQL over TCP through DATABASE_URL."""
from __future__ import annotations

import json
import socket
import subprocess

import pytest
from click.testing import CliRunner

from ingest.cli import cli as ingest_cli
from ingest.config import Settings
from ingest.db import HEAD_REVISION, connect
from ingest.errors import DatabaseError
from tests.pg import TcpPostgres, postgres_bin


def test_embedded_url_works_with_psql(db):
    psql = postgres_bin() / "psql"
    result = CliRunner().invoke(ingest_cli, ["db", "url"])
    assert result.exit_code == 0, result.output
    url = result.output.strip()
    out = subprocess.run([str(psql), url, "-Atc", "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables WHERE schemaname='public'"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert set(out.split(",")) >= {"collections", "features", "images", "ingest_failures"}


def test_two_connections_share_one_embedded_server(settings):
    first = connect(settings)
    second = connect(Settings(home=settings.home))
    assert first.url == second.url


@pytest.fixture(scope="module")
def tcp_server(tmp_path_factory):
    server = TcpPostgres(tmp_path_factory.mktemp("tcp-pg"), password="s3cret")
    server.start()
    yield server
    server.stop()


def test_external_server_through_database_url(tcp_server, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", tcp_server.url())
    result = CliRunner().invoke(ingest_cli, ["status", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"database": "external", "collections": []}
    result = CliRunner().invoke(ingest_cli, ["db", "upgrade"])
    assert result.exit_code == 0 and HEAD_REVISION in result.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "make_url, expected",
    [
        (lambda srv: f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/postgres", "cannot connect to PostgreSQL at 127.0.0.1"),
        (lambda srv: srv.url(password="wrong"), "password authentication failed"),
        (lambda srv: "mysql://x@localhost/db", "must be a postgresql:// URL"),
    ],
)
def test_bad_database_url_is_one_line(tcp_server, make_url, expected):
    result = CliRunner().invoke(ingest_cli, ["status", "--database-url", make_url(tcp_server)])
    assert result.exit_code == 1
    assert expected in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_bad_database_url_raises_database_error(tcp_server):
    with pytest.raises(DatabaseError):
        connect(Settings(home=tcp_server.dir, database_url=tcp_server.url(password="wrong")))


def test_every_connection_knows_the_vector_type(db):
    """Vectors come back as vectors on any pooled connection, registered once when it opened, not per query."""
    import sqlalchemy as sa

    for _ in range(3):
        with db.connect() as conn:
            value = conn.exec_driver_sql("SELECT '[1,2,3]'::vector").scalar()
            assert not isinstance(value, str) and list(value.to_numpy()) == [1.0, 2.0, 3.0]
            assert conn.execute(sa.text("SELECT CAST(:v AS vector) <-> '[0,0,0]'"), {"v": value}).scalar() == pytest.approx(14 ** 0.5)
