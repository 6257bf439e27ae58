"""Migrations: upgrade -> downgrade -> upgrade works, and the models agree with the migrated schema."""
from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from ingest.config import Settings
from ingest.db import HEAD_REVISION, alembic_config, connect, current_revision, downgrade, upgrade
from ingest.models import Base


def test_head_revision_constant_matches_alembic():
    assert ScriptDirectory.from_config(alembic_config()).get_current_head() == HEAD_REVISION


def test_upgrade_downgrade_upgrade_and_models_match(tmp_path, ris_home):
    # A database of its own on the session's server, so other tests' tables are untouched.
    db = connect(Settings(home=ris_home))
    with db.sqlalchemy.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("DROP DATABASE IF EXISTS ris_migrations"))
        conn.execute(sa.text("CREATE DATABASE ris_migrations"))
    engine = sa.create_engine(db.sqlalchemy.url.set(database="ris_migrations"))
    try:
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
    finally:
        engine.dispose()
