"""Search from a read replica (`--read-url` / DATABASE_READ_URL) while writes go to the primary.

A real streaming replica (pg_basebackup -R of a second PostgreSQL): its WAL replay is paused to make it lag,
which shows as fewer rows (the newest are not there yet), never as wrong ones; resumed, it catches up.
The fake extractor stands in for ResNet50: the subject is where queries go.
"""
from __future__ import annotations

import json
import time

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from ingest.config import Settings
from ingest.db import connect, sqlalchemy_url
from ingest.load import load_collection
from ingest.options import open_database
from ingest.sources import walk_folder
from search.serve import create_app
from tests.helpers import COLOURS, cli, make_folder
from tests.pg import TcpPostgres


@pytest.fixture
def primary_and_replica(tmp_path):
    servers = []
    for name in ("primary", "replica"):
        (tmp_path / name).mkdir()
        servers.append(TcpPostgres(tmp_path / name, password="s3cret"))
    primary, replica = servers
    primary.start()
    try:
        replica.start_replica(primary)
        yield primary, replica
    finally:
        for server in reversed(servers):
            if server.port is not None:
                server.stop()


def scalar(url: str, sql: str):
    engine = sa.create_engine(sqlalchemy_url(url), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(sql)).scalar()
    finally:
        engine.dispose()


def caught_up(primary: TcpPostgres, replica: TcpPostgres, timeout: float = 60) -> None:
    """Wait until the replica has replayed everything the primary has written."""
    target = scalar(primary.url(), "SELECT pg_current_wal_lsn()::text")
    deadline = time.monotonic() + timeout
    while scalar(replica.url(), f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn") is not True:
        assert time.monotonic() < deadline, "the replica did not catch up"
        time.sleep(0.1)


def test_queries_go_to_the_replica_and_its_lag_shows_as_fewer_rows(ris_home, tmp_path, fake_extractor, primary_and_replica, monkeypatch):
    primary, replica = primary_and_replica
    settings = Settings(home=ris_home, database_url=primary.url())
    db = connect(settings)
    first = make_folder(tmp_path / "first", labels=tuple(COLOURS), per_label=3)
    load_collection(db, settings, "replicated", walk_folder(first)[0], fake_extractor, pca_dims=4, progress=False)
    caught_up(primary, replica)

    # Commands that write open the primary even with DATABASE_READ_URL set; reading commands given it open the replica.
    monkeypatch.setenv("DATABASE_READ_URL", replica.url())
    _, writer = open_database(primary.url())
    _, reader = open_database(primary.url(), read_url=replica.url())
    assert writer.kind == "external" and writer.url == connect(settings).url
    assert reader.kind == "replica" and reader.url.endswith(f":{replica.port}/postgres")
    with reader.connect() as conn:
        assert conn.execute(sa.text("SELECT pg_is_in_recovery()")).scalar() is True

    scalar(replica.url(), "SELECT pg_wal_replay_pause()")
    second = make_folder(tmp_path / "second", labels=("red",), per_label=4, seed=7)
    load_collection(db, settings, "replicated", walk_folder(second)[0], fake_extractor, progress=False)
    count = "SELECT count(*) FROM images"
    assert scalar(primary.url(), count) == 16

    monkeypatch.delenv("DATABASE_READ_URL")
    assert search(ris_home, primary, "sql", count, "--read-url", replica.url()) == [{"count": 12}]  # 4 rows not replayed yet
    assert search(ris_home, primary, "sql", count) == [{"count": 16}]  # without a read URL: the primary
    monkeypatch.setenv("DATABASE_READ_URL", replica.url())
    similar = ("similar", "--id", "1", "-k", "100", "-c", "replicated", "--engine")
    for engine in ("pgvector", "annoy"):
        assert len(search(ris_home, primary, *similar, engine)) == 12, engine  # the replica's rows, each once
    app = create_app(Settings.load(primary.url()), collection="replicated")  # DATABASE_READ_URL set
    with TestClient(app, base_url="http://127.0.0.1") as client:  # a Host the server answers to
        hits = client.get("/api/collections/replicated/images/1/similar", params={"k": 100, "engine": "pgvector"}).json()["hits"]
    assert len(hits) == 12  # `search serve` reads from the replica too

    scalar(replica.url(), "SELECT pg_wal_replay_resume()")
    caught_up(primary, replica)
    for engine in ("pgvector", "annoy"):  # the Annoy file predates the 4 rows: they are its delta, searched exactly
        assert len(search(ris_home, primary, *similar, engine)) == 16, engine
    db.dispose()


def search(ris_home, primary: TcpPostgres, *args) -> list:
    """`search ... --json` with the primary's DATABASE_URL (and this process's DATABASE_READ_URL, if set)."""
    result = cli(ris_home, "search", *args, "--json", database_url=primary.url())
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
