"""Migrations: upgrade -> downgrade -> upgrade works, the models agree with the migrated schema, and Alembic's own
command line finds the database the way every command does."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from ingest.db import HEAD_REVISION, alembic_config, current_revision, downgrade, upgrade
from ingest.models import Base
from tests.helpers import scratch_database


def test_head_revision_constant_matches_alembic():
    assert ScriptDirectory.from_config(alembic_config()).get_current_head() == HEAD_REVISION


def test_upgrade_downgrade_upgrade_and_models_match(tmp_path, ris_home):
    with scratch_database(ris_home, "ris_migrations") as engine:
        upgrade(engine)
        assert current_revision(engine) == HEAD_REVISION
        downgrade(engine, "base")
        with engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
        assert tables <= {"alembic_version"}
        upgrade(engine)
        upgrade(engine)  # idempotent
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == []


ALEMBIC_INI = Path(__file__).resolve().parent.parent / "migrations" / "alembic.ini"


@pytest.mark.parametrize("found_by", ["DATABASE_URL", "RIS_HOME"])
def test_alembic_command_line_sees_the_head_revision(db, ris_home, found_by):
    """`alembic -c migrations/alembic.ini current`, as a developer writing the next migration runs it, connects to
    DATABASE_URL or else to the embedded server in $RIS_HOME, and reports the schema at head."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"} | {"RIS_HOME": str(ris_home)}
    if found_by == "DATABASE_URL":
        env |= {"DATABASE_URL": db.url, "RIS_HOME": str(ris_home / "unused")}  # no embedded server there
    run = subprocess.run([sys.executable, "-m", "alembic", "-c", str(ALEMBIC_INI), "current"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [HEAD_REVISION, "(head)"]
    assert not (ris_home / "unused").exists()  # DATABASE_URL won: no embedded server was started for it


def test_alembic_command_line_with_an_unreachable_database_is_one_line(ris_home):
    env = os.environ | {"DATABASE_URL": "postgresql://ris:wrong@127.0.0.1:1/ris"}
    run = subprocess.run([sys.executable, "-m", "alembic", "-c", str(ALEMBIC_INI), "current"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    assert "FAILED: cannot connect to PostgreSQL at 127.0.0.1:1/ris" in run.stdout + run.stderr
