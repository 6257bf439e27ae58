"""`ingest load --ray`: the same rows and features as one machine, and no row lost or doubled when an
actor or the driver is killed. One local Ray (this machine's CPUs) serves the whole module; the real ResNet50
(random weights) runs in its actors; the real embedded PostgreSQL stores the rows.
"""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from ingest.distributed import LOCAL, Cluster
from ingest.load import load_collection
from ingest.sources import walk_folder
from ingest.store import read_vectors
from tests.helpers import COLOURS, STEP_TIMEOUT, check_consistent, cli, collection_row, load_args, make_folder, make_load_folder

ACTOR = "MapBatches(Embedder)"  # in the process title Ray gives an embedding actor


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray for the module, started before this process loads TensorFlow for a test, and stopped after."""
    import ray

    from ingest import distributed

    distributed.start(LOCAL)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def stored_rows(db, name: str) -> dict[str, tuple[str, str | None]]:
    """sha256 -> (path, label) of a collection's images."""
    with db.connect() as conn:
        rows = conn.execute(sa.text("SELECT i.sha256, i.path, i.label FROM images i JOIN collections c ON c.id = i.collection_id"
                                    " WHERE c.name = :n"), {"n": name})
        return {r.sha256: (r.path, r.label) for r in rows}


def raw_by_sha(db, name: str) -> dict[str, np.ndarray]:
    coll = collection_row(db, name)
    ids, raw = read_vectors(db, coll.id, "raw")
    with db.connect() as conn:
        sha = dict(conn.execute(sa.text("SELECT id, sha256 FROM images WHERE collection_id = :c"), {"c": coll.id}).all())
    return {sha[i]: v for i, v in zip(ids.tolist(), raw)}


def failures(db, name: str) -> set[tuple[str, str]]:
    with db.connect() as conn:
        return set(conn.execute(sa.text("SELECT f.path, f.reason FROM ingest_failures f JOIN collections c ON c.id = f.collection_id"
                                        " WHERE c.name = :n"), {"n": name}).all())


def actor_pids() -> list[int]:
    """Embedding actors of this process's Ray: its raylet's children whose title names the Embedder stage."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            grandparent = int((Path("/proc") / str(parent) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ACTOR in title and grandparent == os.getpid():
            found.append(int(entry.name))
    return found


def wait_until(condition, what: str, timeout: float = STEP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def count_rows(db, name: str) -> int:
    coll = collection_row(db, name)
    if coll is None:
        return 0
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM images WHERE collection_id = :c"), {"c": coll.id}).scalar()


def test_ray_load_stores_what_one_machine_stores(db, settings, tmp_path, ray_address):
    """The same folder and weights, loaded here and through Ray: the same rows, failures and counts, and raw
    features equal within float tolerance (the batches differ, so the sums run in another order)."""
    from ingest.features import extractor_for

    folder = make_folder(tmp_path / "same", labels=tuple(COLOURS), per_label=3)
    shutil.copy(folder / "red" / "red_0.jpg", folder / "red" / "copy.jpg")
    (folder / "blue" / "broken.jpg").write_bytes((folder / "blue" / "blue_0.jpg").read_bytes()[:300])
    candidates = walk_folder(folder)[0]
    extractor = extractor_for("random")
    here = load_collection(db, settings, "ray-here", candidates, extractor, pca_dims=4, progress=False, root=folder)
    there = load_collection(db, settings, "ray-there", candidates, extractor, pca_dims=4, progress=False, root=folder,
                            cluster=Cluster(ray_address, actors=1, batch_size=5))

    counts = lambda s: (s.ingested, s.present, s.duplicates, s.failed)  # noqa: E731
    assert counts(there) == counts(here) == (12, 0, 1, 1)
    assert sorted(there.failures) == sorted(here.failures)
    assert stored_rows(db, "ray-there") == stored_rows(db, "ray-here") and len(stored_rows(db, "ray-here")) == 12
    assert failures(db, "ray-there") == failures(db, "ray-here")
    raw_here, raw_there = raw_by_sha(db, "ray-here"), raw_by_sha(db, "ray-there")
    assert raw_here.keys() == raw_there.keys()
    for sha, vector in raw_here.items():
        np.testing.assert_allclose(raw_there[sha], vector, rtol=1e-4, atol=1e-4)
    coll = collection_row(db, "ray-there")
    assert coll.pca is not None and coll.precision == collection_row(db, "ray-here").precision
    with db.connect() as conn:
        unembedded = conn.execute(sa.text("SELECT count(*) FROM images WHERE collection_id = :c AND embedding IS NULL"), {"c": coll.id}).scalar()
    assert unembedded == 0


def test_killed_driver_then_killed_actor_lose_and_double_nothing(db, settings, tmp_path, ray_address, spawn):  # noqa: F811 (the fixture imported above)
    """`ingest load --ray ADDRESS` killed with kill -9 after a batch committed: Ray ends the dead driver's job and
    its actors, committed rows stay. The same load run again, with its embedding actor killed (kill -9) after a
    batch committed: Ray restarts the actor and retries the batch it held (Ray Data's max_restarts=-1,
    max_task_retries=-1), so that load itself completes, each picture once, embedded."""
    from ingest.features import extractor_for

    folder, valid = make_load_folder(tmp_path / "killed", per_label=5)  # 20 valid + a copy + a broken file
    name = "ray-killed"
    run = spawn("ingest", *load_args(folder, name, "--batch-size", "2", "--ray", ray_address))
    run.wait_for(lambda: count_rows(db, name) > 0, "a first committed batch")
    run.proc.kill()
    assert run.finish().returncode == -signal.SIGKILL
    wait_until(lambda: not actor_pids(), "Ray to stop the killed driver's actors")
    kept = check_consistent(db.engine, name, valid)
    assert 1 <= kept < len(valid) - 4, "the driver was killed too late to leave work for the rerun"

    result = {}

    def rerun():
        try:
            result["summary"] = load_collection(db, settings, name, walk_folder(folder)[0], extractor_for("random"), pca_dims=4,
                                                progress=False, root=folder, cluster=Cluster(ray_address, actors=1, batch_size=2))
        except BaseException as e:  # reported by the assertion below
            result["error"] = e

    loader = threading.Thread(target=rerun, daemon=True)
    loader.start()
    wait_until(lambda: count_rows(db, name) > kept or not loader.is_alive(), "a batch of the rerun to commit")
    pids = actor_pids()
    assert loader.is_alive() and len(pids) == 1, f"no actor to kill mid-load: {pids}, {result}"
    os.kill(pids[0], signal.SIGKILL)
    loader.join(STEP_TIMEOUT)
    assert not loader.is_alive() and "error" not in result, result

    summary = result["summary"]
    assert summary.present >= kept and summary.failed == 1
    assert summary.ingested <= len(valid) - kept  # a batch retried after it committed adds nothing
    assert check_consistent(db.engine, name, valid) == len(valid)
    with db.connect() as conn:
        embedded = conn.execute(sa.text("SELECT count(*) FROM images WHERE collection_id = :c AND embedding IS NOT NULL"),
                                {"c": collection_row(db, name).id}).scalar()
    assert embedded == len(valid)


def test_ray_without_the_extra_says_how_to_install(ris_home, tmp_path, monkeypatch):
    """Without Ray importable, --ray is one line naming the extra, exit 1, before any model is built."""
    folder = make_folder(tmp_path / "noray", per_label=1)
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "ray.py").write_text("raise ImportError('No module named ray')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")])))
    result = cli(ris_home, "ingest", "load", "folder", folder, "-c", "no-ray", "--weights", "random", "--ray", "local")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.messages == ["Error: --ray needs Ray: pip install 'reverse-image-search[ray]' (in a checkout: pip install -e '.[ray]')"]


@pytest.mark.parametrize("address, error", [
    ("127.0.0.1:1", "Error: cannot reach the Ray cluster at 127.0.0.1:1: "),  # in seconds: Ray alone retries for minutes
    ("nonsense", "Error: --ray takes local, auto, HOST:PORT or ray://HOST:PORT, not 'nonsense'"),
])
def test_bad_ray_address_is_one_line(ris_home, tmp_path, address, error):
    folder = make_folder(tmp_path / "bad-address", per_label=1)
    result = cli(ris_home, "ingest", "load", "folder", folder, "-c", "bad-ray", "--weights", "random", "--ray", address)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.messages) == 1 and result.messages[0].startswith(error), result.messages
