"""Robustness: real `ingest` / `search` processes killed, interrupted, run side by side, and cut off
from their database; the real embedded PostgreSQL, the real ResNet50 (random weights), real Annoy files.

Every process gets RIS_HOME = the session's home (so it shares the embedded server) and no DATABASE_URL,
unless a test points it at its own external server. Every wait has a timeout.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from ingest.annoy_index import read_sidecar
from ingest.db import sqlalchemy_url
from ingest import locks
from ingest.collection import Collection
from ingest.load import LoadSummary, load_collection, prepare, store_batch
from ingest.reduce import fit_pca
from ingest.sources import walk_folder
from ingest.store import find_row, read_vectors, save_pca
from tests.conftest import COLOURS, collection_row, make_folder
from tests.pg import TcpPostgres
from tests.test_sources import CLASSES, hostile_tar, make_caltech_tree, make_tar_gz

BIN = Path(sys.executable).parent  # .venv/bin: ingest and search next to the interpreter running the tests
PROCESS_TIMEOUT = 300  # seconds for one whole command; the model alone takes 5-20 s on a busy machine
STEP_TIMEOUT = 180  # seconds to reach one point of a run (a progress count, a lock wait)
PROGRESS = re.compile(rb"\| *(\d+)/(\d+) \[")  # tqdm: "  13%|#3   | 8/60 [00:05<00:31, ...]"
INTERRUPTED = "interrupted: what was stored is kept; run the same command again to finish"
LOAD_OPTIONS = ("--weights", "random", "--pca-dims", "4")


# --- running the commands ------------------------------------------------------------------------


def child_env(ris_home: Path, database_url: str | None = None) -> dict[str, str]:
    """The environment of a command under test: the session's RIS_HOME; DATABASE_URL only if given."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["RIS_HOME"] = str(ris_home)
    if database_url:
        env["DATABASE_URL"] = database_url
    return env


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str

    @property
    def messages(self) -> list[str]:
        """stderr without progress bars and blank lines: what a user reads."""
        return [line for line in re.split(r"[\r\n]", self.stderr) if line.strip() and not PROGRESS.search(line.encode())]


def default_sigint() -> None:
    """preexec_fn of every command under test: SIGINT back to its default action before exec.

    A shell without job control starts background jobs (`pytest ... &`, nohup under a script) with SIGINT
    ignored, an ignored signal stays ignored across fork and exec, and a Python started with SIGINT ignored
    never raises KeyboardInterrupt: the Ctrl-C tests would then test nothing but the launch."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(ris_home: Path, program: str, *args, database_url: str | None = None, timeout: float = PROCESS_TIMEOUT) -> Finished:
    """Run `ingest ...` or `search ...` to the end."""
    done = subprocess.run(
        [str(BIN / program), *map(str, args)], env=child_env(ris_home, database_url),
        capture_output=True, encoding="utf-8", timeout=timeout, preexec_fn=default_sigint,
    )
    return Finished(done.returncode, done.stdout, done.stderr)


class Running:
    """A command whose output is collected while it runs, so a test can act at a given point of its progress."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
        self.out, self.err = bytearray(), bytearray()
        self.readers = [
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
            for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _pump(stream, sink: bytearray) -> None:
        while chunk := stream.read1(65536):
            sink.extend(chunk)

    def progress(self) -> int:
        """Images the progress bar has counted so far; -1 before the bar appears."""
        counts = PROGRESS.findall(bytes(self.err))
        return int(counts[-1][0]) if counts else -1

    def wait_for(self, condition, what: str, timeout: float = STEP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"the command ended (exit {self.proc.returncode}) before {what}: {bytes(self.err)[-2000:]!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {bytes(self.err)[-2000:]!r}")
            time.sleep(0.05)

    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout: float = PROCESS_TIMEOUT) -> Finished:
        self.proc.wait(timeout)
        for reader in self.readers:
            reader.join(30)
        return Finished(self.proc.returncode, self.out.decode("utf-8"), self.err.decode("utf-8"))


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


# --- what the tables must look like ------------------------------------------------------------


def make_load_folder(root: Path, per_label: int) -> tuple[Path, set[str]]:
    """Pictures in 4 labels, plus a copy of one (same sha256) and a broken file; returns the folder and
    the sha256 of its unique valid pictures."""
    make_folder(root, labels=tuple(COLOURS), per_label=per_label)
    valid = {sha256_of(p) for p in root.rglob("*.jpg")}
    shutil.copy(root / "red" / "red_0.jpg", root / "red" / "copy_of_red_0.jpg")
    whole = (root / "blue" / "blue_0.jpg").read_bytes()
    (root / "blue" / "broken.jpg").write_bytes(whole[: len(whole) // 2])
    return root, valid


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_args(folder: Path, name: str, *extra) -> list:
    return ["load", "folder", folder, "--collection", name, *LOAD_OPTIONS, *extra]


def valid_among_first(folder: Path, n: int, valid: set[str]) -> set[str]:
    """The valid pictures among the first n files a load of folder goes through: stored once the bar shows n."""
    return {sha256_of(c.path) for c in walk_folder(folder)[0][:n]} & valid


def collection_id(engine, name: str) -> int | None:
    with engine.connect() as conn:
        found = find_row(conn, name)
    return found.id if found else None


def check_consistent(engine, name: str, valid: set[str]) -> int:
    """What an interrupted load may leave: some of the valid pictures, each once, each with its features.
    Returns how many are stored."""
    cid = collection_id(engine, name)
    if cid is None:
        return 0
    with engine.connect() as conn:
        hashes = conn.execute(sa.text("SELECT sha256 FROM images WHERE collection_id = :c"), {"c": cid}).scalars().all()
        without_features = conn.execute(
            sa.text("SELECT count(*) FROM images i LEFT JOIN features f ON f.image_id = i.id WHERE i.collection_id = :c AND f.image_id IS NULL"),
            {"c": cid},
        ).scalar()
        orphan_features = conn.execute(
            sa.text("SELECT count(*) FROM features f LEFT JOIN images i ON i.id = f.image_id WHERE i.id IS NULL")
        ).scalar()
    assert len(hashes) == len(set(hashes)), "a picture is stored twice"
    assert set(hashes) <= valid, "something other than the folder's valid pictures is stored"
    assert without_features == 0 and orphan_features == 0
    return len(hashes)


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
        now = check_consistent(db.sqlalchemy, name, valid)
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
    blocker = block_one_insert(db.sqlalchemy, name, folder)
    try:
        run = spawn("ingest", *args)
        run.wait_for(lambda: waiting_on_lock(db.sqlalchemy, "transactionid") > 0, "the batch INSERT to wait")
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
    with db.sqlalchemy.connect() as holder, locks.holding(holder, locks.COLLECTION, of=collection_id(db.sqlalchemy, name)):
        run = spawn("ingest", *args)
        run.wait_for(lambda: waiting_on_lock(db.sqlalchemy, "advisory") > 0, "the end-of-load lock")
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
    check_complete(db.sqlalchemy, ris_home, name, valid)


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
    kept = check_consistent(db.sqlalchemy, "interrupted", valid)
    assert kept >= 4

    rerun = cli(ris_home, "ingest", *args, "--json")
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["present"] >= kept and summary["ingested"] + summary["present"] + summary["duplicates"] == len(valid) + 1
    check_complete(db.sqlalchemy, ris_home, "interrupted", valid)


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
    check_complete(db.sqlalchemy, ris_home, "twice", valid)


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


def pg_ctl(server: TcpPostgres, *args: str) -> None:
    server.run(str(server.bin / "pg_ctl"), "-D", str(server.data), "-w", *args)


def restart(server: TcpPostgres) -> None:
    """Start a stopped server again on its port (crash recovery replays the WAL)."""
    pg_ctl(server, "-l", str(server.dir / "log"), "-o", f"-h 127.0.0.1 -p {server.port} -k ''", "start")


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
    with db.sqlalchemy.connect() as conn:
        ids = conn.execute(
            sa.text("SELECT id FROM images WHERE collection_id = :c ORDER BY id LIMIT 8"), {"c": collection_id(db.sqlalchemy, "crowd")}
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
    assert collection_id(db.sqlalchemy, "evil") is None


def test_truncated_archive_then_good_archive(db, ris_home, tmp_path):
    good = make_tar_gz(make_caltech_tree(tmp_path / "src"), tmp_path / "archives" / "101_ObjectCategories.tar.gz")
    truncated = tmp_path / "archives" / "cut.tar.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    args = ("load", "caltech101", "-c", "caltech-cli", *LOAD_OPTIONS)

    cut = cli(ris_home, "ingest", *args, "--source", truncated)
    assert cut.returncode == 1 and "Traceback" not in cut.stderr
    assert len(cut.messages) == 1 and "truncated or not a valid archive" in cut.messages[0], cut.stderr
    assert collection_id(db.sqlalchemy, "caltech-cli") is None

    whole = cli(ris_home, "ingest", *args, "--source", good, "--json")
    assert whole.returncode == 0, whole.stderr
    summary = json.loads(whole.stdout)
    assert (summary["ingested"], summary["failed"]) == (2 * len(CLASSES), 0)  # BACKGROUND_Google left out
