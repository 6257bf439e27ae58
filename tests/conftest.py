"""Shared fixtures: a private RIS_HOME with the real embedded PostgreSQL, the real ResNet50 (random weights),
a fake extractor for tests about storage and search rather than the model, commands started in the background,
and an external PostgreSQL a test may stop. Plain helpers are in tests/helpers.py.

The server and the model are started once per test session (the model through the process's own cache,
ingest.features.extractor_for, which CLI commands run in-process share); every test gets its own collection names.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ingest.config import Settings
from ingest.db import connect, stop_embedded
from tests.helpers import BIN, FakeExtractor, Running, child_env, make_folder, pg_ctl
from tests.pg import TcpPostgres

# Commands run the CNN at fp32 whatever the processor: `--precision auto` picks bf16 on some machines and not on
# others. Set for the whole process (module fixtures load collections before any function fixture runs) and
# inherited by the commands tests spawn; tests of `auto` pass --precision themselves.
os.environ["RIS_PRECISION"] = "fp32"


@pytest.fixture(scope="session")
def ris_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("ris")
    yield home
    stop_embedded(home / "pgdata")


@pytest.fixture(autouse=True)
def private_home(monkeypatch, ris_home):
    """Every test, and every command it runs, uses the session's RIS_HOME and the embedded server."""
    monkeypatch.setenv("RIS_HOME", str(ris_home))
    monkeypatch.delenv("DATABASE_URL", raising=False)


@pytest.fixture(scope="session")
def settings(ris_home) -> Settings:
    return Settings(home=ris_home)


@pytest.fixture(scope="session")
def db(settings):
    database = connect(settings)
    yield database
    database.dispose()


@pytest.fixture(scope="session")
def extractor(settings):
    """The real ResNet50 with seeded random weights on the runtime `auto` picks (OpenVINO on a processor), built once
    per process; its IR is cached in the session's RIS_HOME."""
    from ingest.features import extractor_for

    return extractor_for("random", models_dir=settings.models_dir)


@pytest.fixture(scope="session")
def fake_extractor():
    """The fake extractor, registered as the process's extractor of its weights on every runtime
    (ingest.features.register_extractor, as real ones are), so collections made with it answer queries by file like
    any other; removed after the session."""
    from ingest.features import register_extractor

    fake = FakeExtractor()
    unregister = register_extractor(fake, ("openvino", "tensorflow"))
    yield fake
    unregister()


@pytest.fixture
def picture_folder(tmp_path) -> Path:
    return make_folder(tmp_path / "pictures")


@pytest.fixture
def spawn(ris_home):
    """Start commands in the background; any still running when the test ends is killed (by its pid)."""
    started: list[Running] = []

    def start(program: str, *args, database_url: str | None = None, python_options: tuple[str, ...] = ()) -> Running:
        argv = [sys.executable, *python_options, str(BIN / program)] if python_options else [str(BIN / program)]
        run = Running([*argv, *map(str, args)], child_env(ris_home, database_url))
        started.append(run)
        return run

    yield start
    for run in started:
        if run.running():
            run.proc.kill()
            run.proc.wait(30)


@pytest.fixture
def tcp_server(tmp_path):
    """An external PostgreSQL (with pgvector) that the test may stop and start."""
    folder = tmp_path / "pg"
    folder.mkdir()
    server = TcpPostgres(folder, password="s3cret")
    server.start()
    yield server
    try:
        pg_ctl(server, "-m", "immediate", "stop")
    except subprocess.CalledProcessError:
        pass  # already stopped by the test
