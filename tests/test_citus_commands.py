"""Every user command on a Citus cluster (a coordinator and two workers on loopback, tests/citus.py), run the way a
user runs it with DATABASE_URL pointing at the coordinator, on a small folder embedded by the real ResNet50 (seeded
random weights): `ingest load folder` here and through Ray (the same pictures, reruns counted right), `ingest status`,
`ingest index` (Annoy, HNSW), `search similar` with each engine, the raw space and filters (answers equal numpy's),
`ingest reduce`, `search sql` as the reader, `search duplicates`, `search report`, `search audit`, `search serve` (by id
and by upload), `ingest watch` (a new file becomes searchable) and `ingest remove`; and loads, new collections and
removals at once (no deadlock, each picture counted once). Skipped, saying why, where Citus cannot be built; the Ray
load where Ray is not installed. `ingest finetune` is left out: one epoch on a dozen pictures took 131 s on two cores
(tests/test_finetune.py covers it on one server)."""
from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import psycopg
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from PIL import Image

from ingest.cli import cli as ingest_cli
from ingest.collection import Collection
from ingest.config import Settings
from ingest.db import connect
from ingest.load import load_collection
from ingest.reduce import normalize
from ingest.sources import walk_folder
from search.cli import cli as search_cli
from search.duplicates import DEFAULT_THRESHOLD
from tests.citus import cluster_or_skip
from tests.helpers import COLOURS, make_folder, make_picture, sha256_of
from tests.live_server import LiveServer

SHARDS = 4
NAME, THROUGH_RAY, WATCHED = "citus-cmd", "citus-cmd-ray", "citus-cmd-watch"
WEIGHTS = ("--weights", "random")
K = 5


@contextmanager
def commands_on(cluster, ris_home):
    """Commands run in this process talk to the coordinator; for module fixtures, which run before the autouse
    fixture that sets RIS_HOME."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DATABASE_URL", cluster.url)
        mp.setenv("RIS_HOME", str(ris_home))
        yield


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray for the module, started before this process could load TensorFlow; None where Ray is missing."""
    try:
        import ray
    except ImportError:
        yield None
        return
    from ingest import distributed

    distributed.start(distributed.LOCAL)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with cluster_or_skip(tmp_path_factory) as started:
        yield started


@pytest.fixture(scope="module")
def distributed(cluster, ris_home):
    """`ingest db upgrade --shards 4` on the coordinator, then the library's pool on it."""
    with commands_on(cluster, ris_home):
        done = CliRunner().invoke(ingest_cli, ["db", "upgrade", "--shards", str(SHARDS)])
    assert done.exit_code == 0, done.output
    assert f"distributed into {SHARDS} shards" in done.output
    db = connect(Settings(home=ris_home, database_url=cluster.url))
    yield db
    db.dispose()


@pytest.fixture
def on_cluster(cluster, monkeypatch):
    """Commands run in this process talk to the coordinator."""
    monkeypatch.setenv("DATABASE_URL", cluster.url)
    return cluster


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 labels x 4 pictures, an exact copy of red_0 (one picture, two files) and a near copy of green_1 (saved again
    at JPEG quality 50): 13 pictures in 14 files."""
    root = make_folder(tmp_path_factory.mktemp("citus-cmd") / "pics", per_label=4, seed=7)
    shutil.copy(root / "red" / "red_0.jpg", root / "red" / "red_9.jpg")
    Image.open(root / "green" / "green_1.jpg").save(root / "green" / "green_8.jpg", quality=50)
    return root


@pytest.fixture(scope="module")
def loaded(distributed, cluster, ris_home, folder, ray_address):
    """`ingest load folder` on the coordinator, after Ray started (TensorFlow, which converts the model the first
    time, must not load in this process before Ray); returns its --json summary."""
    with commands_on(cluster, ris_home):
        done = CliRunner().invoke(ingest_cli, ["load", "folder", str(folder), "-c", NAME, *WEIGHTS, "--pca-dims", "6", "--json"])
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def indexed(loaded, distributed, cluster, ris_home):
    """`ingest index` (Annoy) and `ingest index --no-annoy --hnsw` on the coordinator; the collection."""
    coll = Collection.named(distributed, distributed.settings, NAME)
    with commands_on(cluster, ris_home):
        annoy = CliRunner().invoke(ingest_cli, ["index", "-c", NAME, "--trees", "20"])
        hnsw = CliRunner().invoke(ingest_cli, ["index", "-c", NAME, "--no-annoy", "--hnsw"])
    assert annoy.exit_code == 0 and hnsw.exit_code == 0, annoy.output + hnsw.output
    assert annoy.stdout == f"{NAME}: Annoy index of 13 items, 20 trees, 6 dims\n"
    assert hnsw.stdout == f"{NAME}: HNSW index images_p{coll.id}_hnsw_6 on 6 dims\n"
    return coll.reload()


def run(group, *args) -> dict | list:
    """A command run in this process (DATABASE_URL set by `on_cluster`), its --json output parsed."""
    done = CliRunner().invoke(group, [*map(str, args), "--json"])
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


def stored_hashes(db, name: str) -> set[str]:
    with db.connect() as conn:
        return set(conn.execute(sa.text("SELECT i.sha256 FROM images i JOIN collections c ON c.id = i.collection_id"
                                        " WHERE c.name = :n"), {"n": name}).scalars())


def numpy_nearest(ids: np.ndarray, matrix: np.ndarray, vector: np.ndarray, k: int) -> list[int]:
    """The k nearest ids by euclidean distance, ties by id: pgvector's order."""
    d = np.linalg.norm(matrix.astype(np.float64) - vector, axis=1)
    return [int(ids[i]) for i in np.lexsort((ids, d))[:k]]


def hit_ids(hits: list[dict]) -> list[int]:
    return [h["id"] for h in hits]


def labels_of(coll: Collection) -> dict[int, str]:
    with coll.db.connect() as conn:
        return dict(conn.execute(sa.text(f"SELECT id, label FROM images WHERE collection_id = {coll.id}")).all())


def distances(matrix: np.ndarray) -> np.ndarray:
    """Every pair's euclidean distance."""
    return np.linalg.norm(matrix[:, None].astype(np.float64) - matrix[None], axis=2)


# --- loading ---------------------------------------------------------------------------------------


def test_load_stores_every_picture_once_and_a_rerun_finds_them_present(loaded, distributed, folder, on_cluster):
    assert {k: loaded[k] for k in ("ingested", "present", "duplicates", "failed")} == {
        "ingested": 13, "present": 0, "duplicates": 1, "failed": 0}
    assert stored_hashes(distributed, NAME) == {sha256_of(p) for p in folder.rglob("*.jpg")}
    again = run(ingest_cli, "load", "folder", folder, "-c", NAME, *WEIGHTS)
    assert (again["ingested"], again["present"], again["duplicates"], again["failed"]) == (0, 14, 0, 0)


def test_load_through_ray_stores_the_same_and_counts_a_rerun(loaded, distributed, folder, on_cluster, ray_address):
    if ray_address is None:
        pytest.skip("ray is not installed (pip install -e '.[ray]')")
    first = run(ingest_cli, "load", "folder", folder, "-c", THROUGH_RAY, *WEIGHTS, "--pca-dims", "6", "--ray", "local")
    assert {k: first[k] for k in ("ingested", "present", "duplicates", "failed")} == {
        k: loaded[k] for k in ("ingested", "present", "duplicates", "failed")}
    assert stored_hashes(distributed, THROUGH_RAY) == stored_hashes(distributed, NAME)
    rerun = run(ingest_cli, "load", "folder", folder, "-c", THROUGH_RAY, *WEIGHTS, "--ray", "local")
    assert (rerun["ingested"], rerun["present"], rerun["duplicates"], rerun["failed"]) == (0, 14, 0, 0)


def test_two_loads_at_once_count_each_picture_once(distributed, tmp_path, fake_extractor, monkeypatch):
    """Both loads of a new collection embed every picture before either writes (a barrier before each one's only
    batch), so the second's INSERT ... ON CONFLICT DO NOTHING meets every row of the first: Citus reports the rows it
    sent, the load counts the rows RETURNING gives back. (Making the collection twice at once deadlocked here.)"""
    import ingest.load as loading

    root = make_folder(tmp_path / "twice", per_label=3, seed=17)
    barrier, real = threading.Barrier(2, timeout=120), loading.write_batch
    monkeypatch.setattr(loading, "write_batch", lambda *args: (barrier.wait(), real(*args))[1])
    with ThreadPoolExecutor(2) as pool:
        loads = [pool.submit(load_collection, distributed, distributed.settings, "citus-cmd-twice", walk_folder(root)[0],
                             fake_extractor, pca_dims=3, progress=False) for _ in range(2)]
        summaries = [f.result(180) for f in loads]
    assert sorted((s.ingested, s.present) for s in summaries) == [(0, 9), (9, 0)]
    assert len(stored_hashes(distributed, "citus-cmd-twice")) == 9


@pytest.mark.parametrize("where", ["one server", "cluster"])
@pytest.mark.parametrize("action", ["make", "remove"])
def test_a_collection_made_or_removed_while_a_batch_holds_its_row_waits_instead_of_deadlocking(
        where, action, request, tmp_path, fake_extractor, monkeypatch):
    """A batch takes its collection's row, then writes the pictures' tables; making or removing another collection's
    partitions takes those tables, then `collections`. The batch is held after taking its row until the other
    command waits for a lock: that command must wait for the batch, not take the tables first and deadlock."""
    import ingest.store as store
    from ingest.remove import remove_collection

    database = request.getfixturevalue("db" if where == "one server" else "distributed")
    tag = f"{action}-{where.replace(' ', '-')}"
    other, settings = f"ddl-{tag}", database.settings
    if action == "remove":
        Collection.create(database, settings, other, fake_extractor, pca_dims=2)
    root = make_folder(tmp_path / "held", labels=("red",), per_label=2, seed=19)
    held, go, real = threading.Event(), threading.Event(), store.bump_embedding_seq
    monkeypatch.setattr(store, "bump_embedding_seq", lambda *args: (real(*args), held.set(), go.wait(120))[0])
    with ThreadPoolExecutor(2) as pool, database.connect() as conn:
        load = pool.submit(load_collection, database, settings, f"held-{tag}", walk_folder(root)[0], fake_extractor, pca_dims=2,
                           progress=False)
        assert held.wait(120)
        command = pool.submit(Collection.create, database, settings, other, fake_extractor, pca_dims=2) if action == "make" \
            else pool.submit(lambda: remove_collection(Collection.named(database, settings, other)))
        deadline = time.monotonic() + 60
        while not conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                       " AND datname = current_database()")).scalar():
            assert time.monotonic() < deadline and not command.done(), command.result()
            conn.rollback()
            time.sleep(0.05)
        go.set()
        assert load.result(120).ingested == 2
        command.result(120)
        conn.rollback()
        exists = conn.execute(sa.text("SELECT count(*) FROM collections WHERE name = :n"), {"n": other}).scalar()
    assert exists == (action == "make")


def test_status_reports_the_collection_and_its_indexes(indexed, on_cluster):
    status = run(ingest_cli, "status")
    assert status["database"] == "external"
    found = {c["name"]: c for c in status["collections"]}[NAME]
    assert {k: found[k] for k in ("images", "paths", "duplicates", "missing", "labels", "dims", "failures", "hnsw")} == {
        "images": 13, "paths": 14, "duplicates": 1, "missing": 0, "labels": 3, "dims": 6, "failures": 0, "hnsw": True}
    assert found["weights"] == "random" and (found["annoy"]["items"], found["annoy"]["fresh"], found["annoy"]["delta"]) == (13, True, 0)


# --- searching -------------------------------------------------------------------------------------


def check_engines_equal_numpy(coll: Collection) -> None:
    """`search similar --id` with each engine answers numpy's k nearest, for a few stored pictures."""
    ids, matrix = coll.read_vectors("embedding")
    for row in (0, 5, 11):
        truth = numpy_nearest(ids, matrix, matrix[row], K)
        for engine, extra in (("pgvector", ()), ("hnsw", ()), ("annoy", ("--search-k", "100000"))):
            hits = run(search_cli, "similar", "-c", NAME, "--id", ids[row], "-k", K, "-e", engine, *extra)
            assert hit_ids(hits) == truth, engine
            assert hits[0]["distance"] == pytest.approx(0, abs=1e-6)


def test_similar_with_each_engine_equals_numpy(indexed, on_cluster):
    check_engines_equal_numpy(indexed)


def test_similar_by_file_raw_space_label_and_where(indexed, folder, on_cluster):
    by_file = run(search_cli, "similar", "-c", NAME, folder / "blue" / "blue_2.jpg", "-k", 3)
    assert by_file[0]["path"] == str(folder / "blue" / "blue_2.jpg") and by_file[0]["distance"] == pytest.approx(0, abs=1e-4)

    ids, raw = indexed.read_vectors("raw")
    unit = normalize(raw)
    query = int(ids[3])
    raw_hits = run(search_cli, "similar", "-c", NAME, "--id", query, "-k", K, "--space", "raw")
    assert hit_ids(raw_hits) == numpy_nearest(ids, unit, unit[3], K)

    ids, matrix = indexed.read_vectors("embedding")
    labels = labels_of(indexed)
    blue = np.array([labels[i] == "blue" for i in ids.tolist()])
    for engine in ("pgvector", "hnsw", "annoy"):
        found = run(search_cli, "similar", "-c", NAME, "--id", query, "-k", 10, "-e", engine, "--label", "blue", "--search-k", 100000)
        assert hit_ids(found) == numpy_nearest(ids[blue], matrix[blue], matrix[3], 10), engine
        where = run(search_cli, "similar", "-c", NAME, "--id", query, "-k", 3, "-e", engine, "--search-k", 100000,
                    "--where", "label IN ('red', 'green') AND width > 40")
        assert len(where) == 3 and {h["label"] for h in where} <= {"red", "green"}, engine
        assert hit_ids(where) == [i for i in numpy_nearest(ids, matrix, matrix[3], 13) if labels[i] in ("red", "green")][:3]


def test_sql_runs_as_the_reader(loaded, on_cluster):
    rows = run(search_cli, "sql", "SELECT current_user = 'postgres' AS admin, label, count(*) AS n FROM images i JOIN"
                                  f" collections c ON c.id = i.collection_id WHERE c.name = '{NAME}' GROUP BY 1, 2 ORDER BY 2")
    assert rows == [{"admin": False, "label": label, "n": n} for label, n in (("blue", 4), ("green", 5), ("red", 4))]
    refused = CliRunner().invoke(search_cli, ["sql", "DELETE FROM images"])
    assert refused.exit_code == 1 and "Traceback" not in refused.output


def numpy_stars(ids: np.ndarray, matrix: np.ndarray, threshold: float) -> list[set[int]]:
    """Near-duplicate groups as `search duplicates` forms them, from all pairs in numpy: in id order, each image not
    yet grouped gathers every ungrouped image within the threshold of it."""
    d = distances(matrix)
    grouped, groups = set(), []
    for row in np.argsort(ids):
        if int(ids[row]) in grouped:
            continue
        members = {int(ids[j]) for j in np.nonzero(d[row] <= threshold)[0]} - grouped
        if len(members) > 1:
            groups.append(members)
            grouped |= members
    return groups


def test_duplicates_finds_the_exact_copy_and_groups_as_numpy_does(indexed, folder, on_cluster):
    copy = [str(folder / "red" / f) for f in ("red_0.jpg", "red_9.jpg")]
    identical = run(search_cli, "duplicates", "-c", NAME, "--threshold", "0")
    assert [(g["kind"], sorted(m["path"] for m in g["members"])) for g in identical] == [("identical", copy)]

    # Every other image is a candidate (--neighbours 12 of 13), so the groups are numpy's over all pairs.
    groups = run(search_cli, "duplicates", "-c", NAME, "--neighbours", 12, "--search-k", 100000)
    ids, matrix = indexed.read_vectors("embedding")
    expected = numpy_stars(ids, matrix, DEFAULT_THRESHOLD)
    twice = identical[0]["members"][0]["id"]
    expected = sorted(expected + ([] if any(twice in g for g in expected) else [{twice}]), key=min)  # an identical group
    assert [{m["id"] for m in g["members"]} for g in groups] == expected
    near_copy = [ids.tolist().index(indexed.query(image=folder / "green" / f).image_id) for f in ("green_1.jpg", "green_8.jpg")]
    assert np.linalg.norm(matrix[near_copy[0]] - matrix[near_copy[1]]) <= DEFAULT_THRESHOLD
    assert any(set(copy) <= {m["path"] for m in g["members"]} for g in groups)
    for group in groups:
        centre = ids.tolist().index(group["members"][0]["id"])
        for m in group["members"]:
            assert m["distance"] == pytest.approx(np.linalg.norm(matrix[ids.tolist().index(m["id"])] - matrix[centre]), abs=1e-5)


def test_report_writes_its_folder(indexed, tmp_path, on_cluster):
    out = tmp_path / "report"
    summary = run(search_cli, "report", "-c", NAME, "--sample", 13, "-k", 4, "--out", out)
    written = json.loads((out / "summary.json").read_text())
    assert written == summary
    assert (summary["images"], summary["sampled"], summary["labels"], summary["pca_dims"]) == (13, 13, 3, 6)
    assert summary["pgvector_agreement"] == 1.0  # the latency queries through the coordinator returned numpy's neighbours
    assert (out / "index.html").is_file() and all((out / f).is_file() for f in summary["files"])
    ids, matrix = indexed.read_vectors("embedding")
    labels = labels_of(indexed)
    precision = [sum(labels[j] == labels[int(i)] for j in numpy_nearest(ids, matrix, v, 5)[1:]) / 4 for i, v in zip(ids, matrix)]
    assert summary["precision_exact"] == pytest.approx(np.mean(precision))


def test_audit_finds_the_leaks_numpy_finds(indexed, folder, on_cluster):
    """Splits from the number in the file name: red_0 and its copy red_9 are one picture in two splits (a leak at
    distance 0), and every pair of pictures within the threshold whose files sit in different splits leaks."""
    found = run(search_cli, "audit", "-c", NAME, "--split-by", r"_(\d)\.jpg$", "-k", 12)
    identical = [sorted((leak["a"]["path"], leak["b"]["path"])) for leak in found["leaks"] if leak["a"]["id"] == leak["b"]["id"]]
    assert identical == [[str(folder / "red" / "red_0.jpg"), str(folder / "red" / "red_9.jpg")]]
    ids, matrix = indexed.read_vectors("embedding")
    with indexed.db.connect() as conn:
        paths = conn.execute(sa.text(f"SELECT image_id, path FROM image_paths WHERE collection_id = {indexed.id}")).all()
    splits: dict[int, set[str]] = {}
    for image_id, path in paths:
        splits.setdefault(image_id, set()).add(path[-5])  # the digit before .jpg
    d = distances(matrix)
    expected = {frozenset((int(ids[a]), int(ids[b]))) for a, b in zip(*np.nonzero(d <= DEFAULT_THRESHOLD)) if a < b
                and any(x != y for x in splits[int(ids[a])] for y in splits[int(ids[b])])}
    assert {frozenset((leak["a"]["id"], leak["b"]["id"])) for leak in found["leaks"] if leak["a"]["id"] != leak["b"]["id"]} == expected
    assert {row["label"] for row in found["labels"]} == {"red", "green", "blue"}


def test_serve_answers_by_id_and_by_upload(indexed, folder, cluster, ris_home, tmp_path):
    ids, matrix = indexed.read_vectors("embedding")
    query = int(ids[4])
    with LiveServer("-c", NAME, "--database-url", cluster.url, home=ris_home, log=tmp_path / "serve.log") as server:
        base = f"http://127.0.0.1:{server.port}/api/collections/{NAME}"
        by_id = httpx.get(f"{base}/images/{query}/similar", params={"k": K, "engine": "hnsw"}, timeout=60)
        assert by_id.status_code == 200, by_id.text
        assert hit_ids(by_id.json()["hits"]) == numpy_nearest(ids, matrix, matrix[4], K)
        picture = folder / "green" / "green_3.jpg"
        upload = httpx.post(f"{base}/similar", params={"k": 3}, files={"image": (picture.name, picture.read_bytes(), "image/jpeg")},
                            timeout=120)
        assert upload.status_code == 200, upload.text
        answer = upload.json()
        stored = indexed.query(image=picture).image_id
        assert answer["query"]["id"] == stored and answer["hits"][0]["id"] == stored
        assert hit_ids(answer["hits"]) == numpy_nearest(ids, matrix, matrix[ids.tolist().index(stored)], 3)


# --- changing the collection -------------------------------------------------------------------------


def test_reduce_rewrites_the_embeddings_and_searches_still_equal_numpy(indexed, on_cluster):
    done = CliRunner().invoke(ingest_cli, ["reduce", "-c", NAME, "--pca-dims", "4", "--trees", "20"])
    assert done.exit_code == 0, done.output
    assert done.stdout == f"{NAME}: PCA refitted to 4 dims (version 2); embeddings, Annoy and HNSW index rewritten\n"
    coll = indexed.reload()
    ids, matrix = coll.read_vectors("embedding")
    assert coll.dims == 4 and matrix.shape == (13, 4)
    check_engines_equal_numpy(coll)


def test_watch_makes_a_new_file_searchable(distributed, cluster, tmp_path, spawn, on_cluster):
    watched = make_folder(tmp_path / "watched", labels=("red", "blue"), per_label=2, seed=11)
    watcher = spawn("ingest", "watch", watched, "-c", WATCHED, *WEIGHTS, "--pca-dims", "3", database_url=cluster.url)
    watcher.wait_for(lambda: f"{WATCHED}: start: 4 added" in watcher.out.decode(), "the start line")
    new = watched / "blue" / "new.jpg"
    make_picture(COLOURS["yellow"], "circle", 777).save(new, quality=90)
    deadline = time.monotonic() + 60  # the watcher promises 10 s; a busy machine is slower
    while sha256_of(new) not in stored_hashes(distributed, WATCHED):
        assert watcher.running() and time.monotonic() < deadline, watcher.err.decode()[-2000:]
        time.sleep(0.2)
    hits = run(search_cli, "similar", "-c", WATCHED, new, "-k", 1)
    assert hits[0]["path"] == str(new) and hits[0]["distance"] == pytest.approx(0, abs=1e-4)
    watcher.proc.send_signal(signal.SIGTERM)
    assert watcher.finish().returncode == 0


def test_remove_drops_a_collection_and_leaves_the_others(distributed, cluster, indexed, tmp_path, fake_extractor, on_cluster):
    gone = "citus-cmd-gone"
    root = make_folder(tmp_path / "gone", labels=("red",), per_label=3, seed=13)
    load_collection(distributed, distributed.settings, gone, walk_folder(root)[0], fake_extractor, pca_dims=2, progress=False)
    with distributed.connect() as conn:
        gone_id = conn.execute(sa.text("SELECT id FROM collections WHERE name = :n"), {"n": gone}).scalar()
    done = CliRunner().invoke(ingest_cli, ["remove", "-c", gone, "--yes"])
    assert done.exit_code == 0 and f"{gone}: removed" in done.output, done.output
    names = {c["name"] for c in run(ingest_cli, "status")["collections"]}
    assert gone not in names and NAME in names
    for url in cluster.worker_urls:
        with psycopg.connect(url) as conn:
            conn.execute("SET citus.show_shards_for_app_name_prefixes = '*'")
            left = conn.execute("SELECT count(*) FROM pg_class WHERE relname ~ %s",
                                (rf"^(images|features|image_paths|finetune_splits)_p{gone_id}_",)).fetchone()[0]
            assert left == 0
    with distributed.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT count(*) FROM images WHERE collection_id = {gone_id}")).scalar()
    assert rows == 0
    ids, matrix = indexed.reload().read_vectors("embedding")
    assert hit_ids(run(search_cli, "similar", "-c", NAME, "--id", ids[0], "-k", 3)) == numpy_nearest(ids, matrix, matrix[0], 3)
