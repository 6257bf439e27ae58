"""Robustness: real `ingest` / `search` processes killed, interrupted, run side by side, and cut off
from their database; the real embedded PostgreSQL, the real ResNet50 (random weights), real Annoy files.

Every process gets RIS_HOME = the session's home (so it shares the embedded server) and no DATABASE_URL,
unless a test points it at its own external server. Every wait has a timeout.
"""
from __future__ import annotations

import gzip
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from ingest.annoy_index import read_sidecar
from ingest.db import sqlalchemy_url
from ingest import locks
from ingest.collection import Collection
from ingest.batches import LoadSummary, prepare, store_batch
from ingest.load import load_collection
from ingest.reduce import fit_pca
from ingest.sources import walk_folder
from ingest.projections import save_pca
from ingest.store import read_vectors
from tests.helpers import BIN, CLASSES, COLOURS, LOAD_OPTIONS, PROCESS_TIMEOUT, check_consistent, child_env, cli, collection_id, collection_row, Finished, hostile_tar, load_args, make_caltech_tree, make_folder, make_load_folder, make_tar_gz, pg_ctl, restart, Running, sha256_of
from tests.pg import TcpPostgres

INTERRUPTED = "interrupted: what was stored is kept; run the same command again to finish"


# --- running the commands ------------------------------------------------------------------------


# --- what the tables must look like ------------------------------------------------------------


def valid_among_first(folder: Path, n: int, valid: set[str]) -> set[str]:
    """The valid pictures among the first n files a load of folder goes through: stored once the bar shows n."""
    return {sha256_of(c.path) for c in walk_folder(folder)[0][:n]} & valid


def check_complete(engine, ris_home: Path, name: str, valid: set[str], database_url: str | None = None) -> None:
    """A finished collection: exactly the unique valid pictures, all embedded, and a fresh Annoy index of them."""
    assert check_consistent(engine, name, valid) == len(valid)
    with engine.connect() as conn:
        embedded = conn.execute(
            sa.text("SELECT count(*) FROM images WHERE collection_id = :c AND vector_dims(embedding) = 4"),
            {"c": collection_id(engine, name)},
        ).scalar()
    assert embedded == len(valid)
    status = cli(ris_home, "ingest", "status", "--json", database_url=database_url)
    assert status.returncode == 0, status.stderr
    entry = next(c for c in json.loads(status.stdout)["collections"] if c["name"] == name)
    assert entry["images"] == len(valid)
    assert entry["annoy"]["fresh"] is True and entry["annoy"]["items"] == len(valid)


def waiting_on_lock(engine, kind: str) -> int:
    """Sessions blocked on a lock of this kind (pg_stat_activity's wait_event): 'advisory' for a collection lock,
    'transactionid' for a row another transaction holds. A fresh transaction each time: the view is a snapshot."""
    with engine.connect() as conn:
        return conn.execute(
            sa.text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND wait_event = :kind"), {"kind": kind}
        ).scalar()


def block_one_insert(engine, name: str, folder: Path):
    """Open a transaction holding an uncommitted row with the sha256 of the first picture the collection
    lacks: the load's INSERT of that batch then waits inside its transaction until this one ends."""
    cid = collection_id(engine, name)
    with engine.connect() as conn:
        stored = set(conn.execute(sa.text("SELECT sha256 FROM images WHERE collection_id = :c"), {"c": cid}).scalars())
    candidates = [c.path for c in walk_folder(folder)[0] if c.path.name != "broken.jpg"]
    sha = next(h for h in map(sha256_of, candidates) if h not in stored)
    conn = engine.connect()
    conn.begin()
    conn.execute(
        sa.text("INSERT INTO images (collection_id, path, sha256, width, height, bytes) VALUES (:c, 'blocker', :s, 1, 1, 1)"),
        {"c": cid, "s": sha},
    )
    return conn


# --- kill -9 -------------------------------------------------------------------------------------


def test_kill_9_at_six_moments_then_a_rerun_completes(db, ris_home, tmp_path, spawn):
    """Six loads of one folder killed at different points, then a seventh that finishes: the table holds each
    valid picture once, with its features and embedding, and the Annoy index matches it."""
    folder, valid = make_load_folder(tmp_path / "kill", per_label=9)  # 36 valid + a copy + a broken file
    name, total = "killed", len(valid) + 2
    args = load_args(folder, name, "--batch-size", "4")
    stored = [0]

    def killed(run: Running, may_have_finished: bool = False) -> None:
        assert may_have_finished or run.running(), "the load ended before it could be killed"
        run.proc.kill()
        result = run.finish()
        assert result.returncode in ((-signal.SIGKILL, 0) if may_have_finished else (-signal.SIGKILL,)), result.stderr
        now = check_consistent(db.engine, name, valid)
        assert now >= stored[-1], "a kill lost committed rows"
        stored.append(now)

    # 1. While Python imports and the model is built: nothing written yet.
    run = spawn("ingest", *args)
    time.sleep(1.0)
    killed(run)

    # 2. As soon as the progress bar appears: the first batch is being read and embedded.
    run = spawn("ingest", *args)
    run.wait_for(lambda: run.progress() >= 0, "the progress bar")
    killed(run)

    # 3. Inside a batch's transaction: its rows are COPYed and the INSERT waits on a row lock we hold.
    blocker = block_one_insert(db.engine, name, folder)
    try:
        run = spawn("ingest", *args)
        run.wait_for(lambda: waiting_on_lock(db.engine, "transactionid") > 0, "the batch INSERT to wait")
        killed(run)
    finally:
        blocker.rollback()
        blocker.close()

    # 4. In the middle of the folder, a moment after a batch was committed.
    run = spawn("ingest", *args)
    run.wait_for(lambda: run.progress() >= 20, "20 images")
    time.sleep(0.3)
    killed(run)
    assert stored[-1] >= len(valid_among_first(folder, 20, valid))

    # 5. After every row is stored, waiting for the end-of-load lock (before PCA and the Annoy file).
    with db.engine.connect() as holder, locks.holding(holder, locks.COLLECTION, of=collection_id(db.engine, name)):
        run = spawn("ingest", *args)
        run.wait_for(lambda: waiting_on_lock(db.engine, "advisory") > 0, "the end-of-load lock")
        killed(run)
    assert stored[-1] == len(valid)

    # 6. When the bar is full: fitting PCA, writing embeddings or building the index (it may just finish).
    run = spawn("ingest", *args)
    run.wait_for(lambda: run.progress() >= total, "the full bar")
    killed(run, may_have_finished=True)

    # 7. The same command again, to the end.
    final = cli(ris_home, "ingest", *args, "--json")
    assert final.returncode == 0, final.stderr
    summary = json.loads(final.stdout)
    assert summary["ingested"] + summary["present"] + summary["duplicates"] == total - 1 and summary["failed"] == 1
    check_complete(db.engine, ris_home, name, valid)


# --- Ctrl-C --------------------------------------------------------------------------------------


def test_ctrl_c_is_one_line_exit_130_and_a_rerun_finishes(db, ris_home, tmp_path, spawn):
    folder, valid = make_load_folder(tmp_path / "sigint", per_label=4)
    args = load_args(folder, "interrupted", "--batch-size", "2")
    run = spawn("ingest", *args)
    run.wait_for(lambda: run.progress() >= 4, "4 images")
    run.proc.send_signal(signal.SIGINT)
    result = run.finish()
    assert result.returncode == 130, result.stderr
    assert result.messages == [INTERRUPTED] and "Traceback" not in result.stderr
    kept = check_consistent(db.engine, "interrupted", valid)
    assert kept >= 4

    rerun = cli(ris_home, "ingest", *args, "--json")
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["present"] >= kept and summary["ingested"] + summary["present"] + summary["duplicates"] == len(valid) + 1
    check_complete(db.engine, ris_home, "interrupted", valid)


def test_ctrl_c_while_the_command_starts_is_one_line_exit_130(tmp_path, spawn):
    """`-X importtime` reports each import as it completes: interrupt as soon as SQLAlchemy is being imported."""
    run = spawn("ingest", "load", "folder", tmp_path, *LOAD_OPTIONS, python_options=("-X", "importtime"))
    run.wait_for(lambda: b"sqlalchemy" in bytes(run.err), "the SQLAlchemy import", timeout=60)
    run.proc.send_signal(signal.SIGINT)
    result = run.finish()
    lines = [line for line in result.messages if not line.startswith("import time:")]
    assert (result.returncode, lines) == (130, [INTERRUPTED]), result.stderr[-3000:]


# --- two loads at once ---------------------------------------------------------------------------


def test_two_loads_of_one_folder_at_once(db, ris_home, tmp_path, spawn):
    folder, valid = make_load_folder(tmp_path / "twice", per_label=5)
    args = load_args(folder, "twice", "--batch-size", "4", "--json")
    first, second = spawn("ingest", *args), spawn("ingest", *args)
    results = [first.finish(), second.finish()]
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    summaries = [json.loads(r.stdout) for r in results]
    for summary in summaries:
        assert summary["ingested"] + summary["present"] + summary["duplicates"] == len(valid) + 1 and summary["failed"] == 1
    assert sum(s["ingested"] for s in summaries) == len(valid)
    check_complete(db.engine, ris_home, "twice", valid)


# --- a load and `ingest reduce` at once ----------------------------------------------------------


@pytest.mark.parametrize("moment", ["after", "during"])
def test_a_batch_stored_while_ingest_reduce_refits_gets_the_new_pca(db, settings, tmp_path, extractor, moment):
    """A running load opened the collection at PCA version 1; `ingest reduce --pca-dims 3` refits it before
    ("after") or while ("during": between reading the raw features and saving) the load stores its next batch.
    The interleaving is replayed step by step with the library calls both commands make."""
    name = f"reduce-race-{moment}"
    candidates = walk_folder(make_folder(tmp_path / "race", per_label=4))[0]
    load_collection(db, settings, name, candidates[:8], extractor, pca_dims=4, progress=False)
    opened = Collection.named(db, settings, name, extractor=extractor)  # what the running load holds
    batch = [prepare(c, set()) for c in candidates[8:]]
    if moment == "after":
        Collection.named(db, settings, name).refit(3)
        store_batch(opened, batch, LoadSummary(name))
    else:
        ids, raw = read_vectors(db, opened.id, "raw")
        store_batch(opened, batch, LoadSummary(name))
        pca = fit_pca(raw, 3)
        save_pca(db, opened.id, pca)
    Collection.named(db, settings, name).finish()  # the load's own end

    coll = collection_row(db, name)
    ids, raw = read_vectors(db, coll.id, "raw")
    embedded, embeddings = read_vectors(db, coll.id, "embedding")
    assert coll.pca_dims == 3 and len(ids) == 12 and np.array_equal(ids, embedded)
    np.testing.assert_allclose(embeddings, coll.pca.project(raw), atol=1e-4)
    # Every row is searchable through Annoy: in the file, or in its delta (rows embedded since the build).
    finished = Collection.named(db, settings, name)
    assert finished.index_problem() is None and read_sidecar(settings.annoy_dir, name).items + finished.index_delta(100) == 12


# --- the database goes away ----------------------------------------------------------------------


def assert_one_line_database_error(result: Finished) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.messages) == 1, result.messages
    assert re.match(r"Error: (database error|cannot connect to PostgreSQL)", result.messages[0]), result.messages


def test_postgres_stopped_mid_load_is_one_line_and_a_rerun_finishes(db, ris_home, tmp_path, tcp_server, spawn):
    folder, valid = make_load_folder(tmp_path / "pgstop", per_label=8)  # enough left after 8 for the stop to land
    url = tcp_server.url()
    engine = sa.create_engine(sqlalchemy_url(url), poolclass=sa.pool.NullPool)
    args = load_args(folder, "pg-stopped", "--batch-size", "4")

    # Between batches: the server stops while the model runs on the next batch.
    run = spawn("ingest", *args, database_url=url)
    run.wait_for(lambda: run.progress() >= 8, "8 images")
    pg_ctl(tcp_server, "-m", "immediate", "stop")
    assert_one_line_database_error(run.finish())
    restart(tcp_server)
    kept = check_consistent(engine, "pg-stopped", valid)
    assert kept >= len(valid_among_first(folder, 8, valid)), "rows committed before the stop were lost"

    # Inside a batch's transaction: the server stops while the INSERT waits on a row lock we hold.
    blocker = block_one_insert(engine, "pg-stopped", folder)
    run = spawn("ingest", *args, database_url=url)
    run.wait_for(lambda: waiting_on_lock(engine, "transactionid") > 0, "the batch INSERT to wait")
    pg_ctl(tcp_server, "-m", "immediate", "stop")
    blocker.invalidate()
    blocker.close()
    assert_one_line_database_error(run.finish())
    restart(tcp_server)
    assert check_consistent(engine, "pg-stopped", valid) >= kept

    final = cli(ris_home, "ingest", *args, "--json", database_url=url)
    assert final.returncode == 0, final.stderr
    assert json.loads(final.stdout)["present"] >= kept
    check_complete(engine, ris_home, "pg-stopped", valid, database_url=url)
    engine.dispose()


# Closed port and wrong password (one line, exit 1) are covered by tests/test_db.py::test_bad_database_url_is_one_line.


@pytest.fixture(scope="module")
def bin_without_pgvector(tmp_path_factory) -> Path:
    """The bin/ folder of a copy of the package's PostgreSQL install with pgvector's files removed."""
    from tests.pg import install_without_pgvector

    return install_without_pgvector(tmp_path_factory.mktemp("pg-no-vector"))


def test_server_without_pgvector_is_one_line(ris_home, tmp_path, bin_without_pgvector):
    import psycopg

    folder = tmp_path / "pg-no-vector"
    folder.mkdir()
    server = TcpPostgres(folder, password="s3cret", bin_dir=bin_without_pgvector)
    server.start()
    try:
        with psycopg.connect(server.url(), connect_timeout=30) as conn:
            available = conn.execute("SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'").fetchone()[0]
        assert available == 0, "the server that should lack pgvector offers the vector extension"
        result = cli(ris_home, "ingest", "status", database_url=server.url())
    finally:
        server.stop()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.messages) == 1 and "pgvector" in result.messages[0], result.stderr


# --- many searches at once -----------------------------------------------------------------------


def test_eight_searches_at_once(db, settings, ris_home, tmp_path, extractor):
    folder = make_folder(tmp_path / "crowd", labels=tuple(COLOURS), per_label=3, seed=5)
    load_collection(db, settings, "crowd", walk_folder(folder)[0], extractor, pca_dims=4, progress=False)
    with db.engine.connect() as conn:
        ids = conn.execute(
            sa.text("SELECT id FROM images WHERE collection_id = :c ORDER BY id LIMIT 8"), {"c": collection_id(db.engine, "crowd")}
        ).scalars().all()
    env = child_env(ris_home)
    procs = [
        subprocess.Popen(
            [str(BIN / "search"), "similar", "--id", str(i), "-c", "crowd", "-k", "3", "--json", "--engine", ("pgvector", "annoy")[n % 2]],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8",
        )
        for n, i in enumerate(ids)
    ]
    try:
        outputs = [p.communicate(timeout=PROCESS_TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0] * 8, [err for _, err in outputs]
    for i, (out, _) in zip(ids, outputs):
        hits = json.loads(out)
        assert len(hits) == 3 and hits[0]["id"] == i and hits[0]["distance"] == pytest.approx(0, abs=1e-4)


# --- archives through the CLI (extraction itself: tests/test_sources.py) ------------------------


def test_hostile_archive_is_one_line(db, ris_home, tmp_path):
    tar = tmp_path / "evil.tar"
    hostile_tar(tar, tmp_path, "../evil")
    evil = tmp_path / "evil.tar.gz"
    evil.write_bytes(gzip.compress(tar.read_bytes()))
    result = cli(ris_home, "ingest", "load", "caltech101", "--source", evil, "-c", "evil", *LOAD_OPTIONS)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.messages) == 1 and "refused" in result.messages[0], result.stderr
    assert not list(ris_home.rglob("evil")) and not (tmp_path / "evil").exists()
    assert collection_id(db.engine, "evil") is None


def test_truncated_archive_then_good_archive(db, ris_home, tmp_path):
    good = make_tar_gz(make_caltech_tree(tmp_path / "src"), tmp_path / "archives" / "101_ObjectCategories.tar.gz")
    truncated = tmp_path / "archives" / "cut.tar.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    args = ("load", "caltech101", "-c", "caltech-cli", *LOAD_OPTIONS)

    cut = cli(ris_home, "ingest", *args, "--source", truncated)
    assert cut.returncode == 1 and "Traceback" not in cut.stderr
    assert len(cut.messages) == 1 and "truncated or not a valid archive" in cut.messages[0], cut.stderr
    assert collection_id(db.engine, "caltech-cli") is None

    whole = cli(ris_home, "ingest", *args, "--source", good, "--json")
    assert whole.returncode == 0, whole.stderr
    summary = json.loads(whole.stdout)
    assert (summary["ingested"], summary["failed"]) == (2 * len(CLASSES), 0)  # BACKGROUND_Google left out
