"""The tool on a Citus cluster (a coordinator and two workers on loopback, tests/citus.py): `ingest db upgrade --shards`
distributes the tables, and the single-node suite's end-to-end checks hold there on a small collection: exact search
equals numpy, HNSW finds the exact neighbours, Annoy with its delta, filters (also a user's --where, as the reader),
sync and prune, remove; plus rows spread over both workers, a worker stopped mid-query (one line, no partial answer),
a worker stopped mid-load (nothing lost once it is back and the load is rerun), and an Annoy build during a load
(its watermark never misses a row stamped at or below it). Skipped, saying why, where Citus cannot be built."""
from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import psycopg
import pytest
from click.testing import CliRunner

from ingest.cli import cli as ingest_cli
from ingest.config import Settings
from ingest.db import connect
from ingest.load import load_collection
from ingest.sources import walk_folder
from search.cli import cli as search_cli
from tests.citus import cluster_or_skip
from tests.helpers import make_folder

SHARDS = 4
NAME, OTHER = "citus-pictures", "citus-other"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with cluster_or_skip(tmp_path_factory) as started:
        yield started


@pytest.fixture
def on_cluster(cluster, monkeypatch):
    """Commands of this test talk to the coordinator."""
    monkeypatch.setenv("DATABASE_URL", cluster.url)
    return cluster


@pytest.fixture(scope="module")
def distributed(cluster, ris_home):
    """`ingest db upgrade --shards 4` on the coordinator, then the library's pool on it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DATABASE_URL", cluster.url)
        mp.setenv("RIS_HOME", str(ris_home))
        done = CliRunner().invoke(ingest_cli, ["db", "upgrade", "--shards", str(SHARDS)])
    assert done.exit_code == 0, done.output
    assert f"distributed into {SHARDS} shards" in done.output
    db = connect(Settings(home=ris_home, database_url=cluster.url))
    yield db
    db.dispose()


@pytest.fixture(scope="module")
def pictures(distributed, tmp_path_factory, fake_extractor):
    """Two collections loaded through the coordinator: NAME (4 labels x 10 pictures, Annoy and HNSW) and OTHER."""
    root = make_folder(tmp_path_factory.mktemp("citus") / "pics", labels=("red", "green", "blue", "yellow"), per_label=10)
    other = make_folder(tmp_path_factory.mktemp("citus-other") / "pics", per_label=3, seed=5)
    settings = Settings(home=distributed.settings.home, database_url=distributed.settings.database_url)
    summary = load_collection(distributed, settings, NAME, walk_folder(root)[0], fake_extractor, pca_dims=6, root=root,
                              progress=False)
    assert summary.ingested == 40 and summary.failed == 0
    load_collection(distributed, settings, OTHER, walk_folder(other)[0], fake_extractor, pca_dims=3, progress=False)
    from ingest.collection import Collection

    coll = Collection.named(distributed, settings, NAME)
    coll.build_hnsw()
    return root, coll


def numpy_nearest(coll, vector: np.ndarray, k: int, exclude=()) -> list[int]:
    ids, matrix = coll.read_vectors("embedding")
    d = np.linalg.norm(matrix - vector, axis=1)
    order = [i for i in np.lexsort((ids, d)) if ids[i] not in exclude]
    return [int(ids[i]) for i in order[:k]]


def test_tables_are_distributed_by_content_and_colocated(distributed):
    with distributed.connect() as conn:
        rows = dict(conn.exec_driver_sql("SELECT logicalrelid::text, partmethod FROM pg_dist_partition").all())
        colocation = set(conn.exec_driver_sql(
            "SELECT colocationid FROM pg_dist_partition WHERE partmethod = 'h' AND logicalrelid::text IN"
            " ('images', 'features', 'image_paths', 'finetune_splits')").scalars())
    assert {t: rows.get(t) for t in ("images", "features", "image_paths", "finetune_splits")} == dict.fromkeys(
        ("images", "features", "image_paths", "finetune_splits"), "h")
    assert rows.get("collections") == rows.get("ingest_failures") == "n"
    assert len(colocation) == 1
    assert distributed.distributed


def test_upgrade_again_leaves_a_distributed_database_as_it_is(distributed, on_cluster):
    again = CliRunner().invoke(ingest_cli, ["db", "upgrade", "--shards", "8", "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["distributed"] == 0


def test_rows_spread_over_both_workers(pictures, distributed, cluster):
    _, coll = pictures
    per_worker = []
    for url in cluster.worker_urls:
        with psycopg.connect(url) as conn:
            conn.execute("SET citus.show_shards_for_app_name_prefixes = '*'")  # workers hide shards from other clients
            tables = [r[0] for r in conn.execute(
                "SELECT relname FROM pg_class WHERE relname ~ %s AND relkind = 'r'", (rf"^images_p{coll.id}_\d+$",))]
            per_worker.append(sum(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables))
    assert all(n > 0 for n in per_worker), per_worker
    assert sum(per_worker) == 40


def test_exact_search_equals_numpy_and_hnsw_and_annoy_find_the_same(pictures):
    _, coll = pictures
    ids, matrix = coll.read_vectors("embedding")
    for i in range(0, 40, 7):
        truth = numpy_nearest(coll, matrix[i], 5)
        assert [h.id for h in coll.similar(matrix[i], 5)] == truth
        assert [h.id for h in coll.similar(matrix[i], 5, engine="hnsw", ef_search=200)] == truth
        assert [h.id for h in coll.similar(matrix[i], 5, engine="annoy", search_k=10**5)] == truth


def test_raw_space_equals_numpy(pictures):
    _, coll = pictures
    from ingest.reduce import normalize

    ids, raw = coll.read_vectors("raw")
    unit = normalize(raw)
    for i in (0, 13, 27):
        d = np.linalg.norm(unit - unit[i], axis=1)
        truth = [int(ids[j]) for j in np.lexsort((ids, d))[:5]]
        assert [h.id for h in coll.similar(raw[i], 5, space="raw")] == truth


def test_hnsw_index_is_on_every_shard_and_ef_search_reaches_them(pictures, cluster):
    _, coll = pictures
    found = 0
    for url in cluster.worker_urls:
        with psycopg.connect(url) as conn:
            conn.execute("SET citus.show_shards_for_app_name_prefixes = '*'")
            found += conn.execute("SELECT count(*) FROM pg_indexes WHERE indexname ~ %s",
                                  (rf"^images_p{coll.id}_hnsw_6_\d+$",)).fetchone()[0]
    assert found == SHARDS
    _, matrix = coll.read_vectors("embedding")
    wide = [[h.id for h in coll.similar(v, 10, engine="hnsw", ef_search=400)] for v in matrix[:10]]
    assert wide == [numpy_nearest(coll, v, 10) for v in matrix[:10]]
    # The engine's settings reach the shards: each shard reports the values the query's transaction set.
    from ingest.engines import set_local
    from ingest.store import raw_cursor

    with coll.db.begin() as conn:
        cur = raw_cursor(conn)
        set_local(cur, coll.db, hnsw__ef_search=123, hnsw__iterative_scan="relaxed_order", enable_indexscan="off")
        cur.execute(f"SELECT DISTINCT current_setting('hnsw.ef_search'), current_setting('hnsw.iterative_scan'),"
                    f" current_setting('enable_indexscan') FROM images WHERE collection_id = {coll.id}")
        assert cur.fetchall() == [("123", "relaxed_order", "off")]


def test_filters_and_a_users_where_run_on_the_cluster(pictures):
    _, coll = pictures
    _, matrix = coll.read_vectors("embedding")
    for engine in ("pgvector", "annoy", "hnsw"):
        hits = coll.similar(matrix[0], 4, engine=engine, label="blue", search_k=10**5)
        assert len(hits) == 4 and {h.label for h in hits} == {"blue"}, engine
        where = coll.similar(matrix[0], 3, engine=engine, where="label IN ('red', 'yellow') AND width > 10", search_k=10**5)
        assert len(where) == 3 and {h.label for h in where} <= {"red", "yellow"}, engine


def test_search_sql_as_the_reader_reaches_the_workers(pictures, on_cluster):
    done = CliRunner().invoke(search_cli, ["sql", "--json", f"SELECT label, count(*) AS n FROM images i JOIN collections c"
                                                              f" ON c.id = i.collection_id WHERE c.name = '{NAME}' GROUP BY label ORDER BY label"])
    assert done.exit_code == 0, done.output
    assert {r["label"]: r["n"] for r in json.loads(done.stdout)} == dict.fromkeys(("blue", "green", "red", "yellow"), 10)
    refused = CliRunner().invoke(search_cli, ["sql", "DELETE FROM images"])
    assert refused.exit_code != 0


def test_annoy_delta_holds_rows_loaded_after_the_build(pictures, distributed, tmp_path, fake_extractor):
    root, coll = pictures
    extra = make_folder(tmp_path / "extra", labels=("red",), per_label=2, seed=99)
    for f in (extra / "red").iterdir():
        shutil.copy(f, root / "red" / f"late-{f.name}")
    settings = coll.settings
    summary = load_collection(distributed, settings, NAME, walk_folder(root)[0], fake_extractor, root=root, progress=False)
    assert summary.ingested == 2 and summary.present == 40
    coll.reload()
    ids, matrix = coll.read_vectors("embedding")
    newest = int(ids.max())
    vector = matrix[list(ids).index(newest)]
    assert coll.similar(vector, 1, engine="annoy")[0].id == newest
    assert coll.similar(vector, 1, engine="hnsw")[0].id == newest


def test_sync_moves_and_prune_on_the_cluster(distributed, tmp_path, fake_extractor):
    settings = Settings(home=distributed.settings.home, database_url=distributed.settings.database_url)
    root = make_folder(tmp_path / "sync", per_label=3, seed=3)
    name = "citus-sync"
    load_collection(distributed, settings, name, walk_folder(root)[0], fake_extractor, pca_dims=2, root=root, progress=False)
    moved = root / "green" / "moved.png"
    first = sorted((root / "red").iterdir())[0]
    first.rename(moved)
    gone = sorted((root / "blue").iterdir())[0]
    gone.unlink()
    summary = load_collection(distributed, settings, name, walk_folder(root)[0], fake_extractor, root=root, progress=False,
                              prune=True)
    assert summary.moved == 1 and summary.removed == 1 and summary.ingested == 0
    from ingest.image_paths import stored_paths

    with distributed.connect() as conn:
        cid = conn.exec_driver_sql("SELECT id FROM collections WHERE name = %s", (name,)).scalar()
    paths = stored_paths(distributed, cid, under=str(root))
    assert str(moved) in paths and str(first) not in paths and str(gone) not in paths and len(paths) == 8


def test_remove_drops_the_collections_shards(pictures, distributed, on_cluster, cluster):
    _, coll = pictures
    with distributed.connect() as conn:
        other = conn.exec_driver_sql("SELECT id FROM collections WHERE name = %s", (OTHER,)).scalar()
    done = CliRunner().invoke(ingest_cli, ["remove", "-c", OTHER, "--yes"])
    assert done.exit_code == 0, done.output
    for url in cluster.worker_urls:
        with psycopg.connect(url) as conn:
            conn.execute("SET citus.show_shards_for_app_name_prefixes = '*'")
            left = conn.execute("SELECT count(*) FROM pg_class WHERE relname ~ %s", (rf"^(images|features|image_paths)_p{other}_",)).fetchone()[0]
            assert left == 0
    _, matrix = coll.read_vectors("embedding")
    assert len(coll.similar(matrix[0], 3)) == 3


def test_a_worker_stopped_mid_query_gives_one_line_and_no_answer(pictures, on_cluster, cluster):
    _, coll = pictures
    first = str(int(coll.image_ids()[0]))
    cluster.stop_worker(0)
    try:
        done = CliRunner().invoke(search_cli, ["similar", "-c", NAME, "--id", first, "--json"])
    finally:
        cluster.start_worker(0)
        coll.db.engine.dispose()  # coordinator sessions that knew the stopped worker: new ones reconnect to it
    assert done.exit_code == 1
    assert "Traceback" not in done.output and done.stdout.strip() == ""
    assert "worker" in done.output.lower() or "remote node" in done.output.lower()
    again = CliRunner().invoke(search_cli, ["similar", "-c", NAME, "--id", first, "--json"])
    assert again.exit_code == 0 and len(json.loads(again.stdout)) == 10


def test_a_worker_stopped_mid_load_loses_nothing_once_rerun(distributed, cluster, tmp_path, fake_extractor, monkeypatch):
    settings = Settings(home=distributed.settings.home, database_url=distributed.settings.database_url)
    root = make_folder(tmp_path / "midload", labels=("red", "green", "blue", "yellow"), per_label=6, seed=21)
    import ingest.load as batches  # the load's own name for it

    written, real = [], batches.write_batch

    def stop_after_two(coll, embedded, summary):
        if len(written) == 2:
            cluster.stop_worker(1)
        written.append(1)
        return real(coll, embedded, summary)

    monkeypatch.setattr(batches, "write_batch", stop_after_two)
    try:
        with pytest.raises(Exception) as failed:
            load_collection(distributed, settings, "citus-midload", walk_folder(root)[0], fake_extractor, pca_dims=3,
                            root=root, progress=False, batch_size=4)
    finally:
        cluster.start_worker(1)
        distributed.engine.dispose()  # coordinator sessions that knew the stopped worker: new ones reconnect to it
    assert "remote node" in str(failed.value) or "essential" in str(failed.value) or "connection" in str(failed.value)
    monkeypatch.setattr(batches, "write_batch", real)
    distributed.engine.dispose()  # connections that saw the worker go
    summary = load_collection(distributed, settings, "citus-midload", walk_folder(root)[0], fake_extractor, root=root,
                              progress=False, batch_size=4)
    with distributed.connect() as conn:
        stored = conn.exec_driver_sql("SELECT count(*) FROM images i JOIN collections c ON c.id = i.collection_id"
                                      " WHERE c.name = 'citus-midload'").scalar()
    assert stored == 24 and summary.ingested + summary.present == 24


def test_an_annoy_build_during_a_load_never_misses_a_row_at_or_below_its_watermark(distributed, tmp_path, fake_extractor):
    from ingest.annoy_index import build_index, read_sidecar
    from ingest.collection import Collection

    settings = Settings(home=distributed.settings.home, database_url=distributed.settings.database_url)
    root = make_folder(tmp_path / "race", labels=("red", "green"), per_label=4, seed=31)
    name = "citus-race"
    load_collection(distributed, settings, name, walk_folder(root)[0], fake_extractor, pca_dims=3, root=root, progress=False)
    more = make_folder(tmp_path / "race-more", labels=("red", "green", "blue", "yellow"), per_label=15, seed=32)
    loading = threading.Thread(target=load_collection, args=(distributed, settings, name, walk_folder(more)[0], fake_extractor),
                               kwargs={"progress": False, "batch_size": 2})
    loading.start()
    builds = []
    while loading.is_alive():
        coll = Collection.named(distributed, settings, name)
        sidecar = build_index(distributed, settings.annoy_dir, coll.row)
        with distributed.connect() as conn:
            stamped = set(conn.exec_driver_sql(
                "SELECT id FROM images WHERE collection_id = %s AND embedding IS NOT NULL AND embedding_seq <= %s",
                (coll.id, sidecar.embedding_seq)).scalars())
        builds.append((sidecar, stamped))
        opened = Collection.named(distributed, settings, name).engine("annoy")
        if opened.ids is not None:
            assert stamped <= set(int(i) for i in opened.ids), "a row stamped at or below the watermark is missing"
    loading.join()
    assert len(builds) >= 2
    assert read_sidecar(settings.annoy_dir, name) is not None



def test_a_single_server_database_moves_onto_the_cluster_where_it_is(cluster, ris_home, tmp_path, fake_extractor):
    """Citus installed on a server that holds collections: `ingest db upgrade --shards` distributes the tables with
    their rows, refused commands work again, and searches give what they gave before."""
    from ingest.collection import Collection
    from ingest.db import upgrade

    urls = [u.rsplit("/", 1)[0] + "/moved" for u in (cluster.url, *cluster.worker_urls)]
    for url, moved in zip((cluster.url, *cluster.worker_urls), urls):
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS moved")
            conn.execute("CREATE DATABASE moved")
        if moved != urls[0]:
            with psycopg.connect(moved, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION citus")
    settings = Settings(home=ris_home, database_url=urls[0])
    single = connect(settings, migrate=False)
    upgrade(single.engine)  # the tables as one server has them, before Citus knows any worker
    single.dispose()  # connections opened before the vector types existed do not know them
    root = make_folder(tmp_path / "before", per_label=4, seed=41)
    load_collection(single, settings, "moved", walk_folder(root)[0], fake_extractor, pca_dims=3, root=root, progress=False)
    coll = Collection.named(single, settings, "moved")
    ids, matrix = coll.read_vectors("embedding")
    before = [[h.id for h in coll.similar(v, 5)] for v in matrix[:4]]
    single.dispose()
    with psycopg.connect(urls[0], autocommit=True) as conn:
        conn.execute("CREATE EXTENSION citus")
        conn.execute(f"SELECT citus_set_coordinator_host('127.0.0.1', {cluster.coordinator.port})")
        for worker in cluster.workers:
            conn.execute(f"SELECT citus_add_node('127.0.0.1', {worker.port})")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DATABASE_URL", urls[0])
        refused = CliRunner().invoke(ingest_cli, ["status"])
        assert refused.exit_code == 1 and "ingest db upgrade --shards" in refused.output
        moved = CliRunner().invoke(ingest_cli, ["db", "upgrade", "--shards", "4"])
        assert moved.exit_code == 0 and "distributed into 4 shards" in moved.output, moved.output
    db = connect(settings)
    coll = Collection.named(db, settings, "moved")
    assert db.distributed
    assert [[h.id for h in coll.similar(v, 5)] for v in matrix[:4]] == before
    on_workers = 0
    for url in urls[1:]:
        with psycopg.connect(url) as conn:
            conn.execute("SET citus.show_shards_for_app_name_prefixes = '*'")
            tables = [r[0] for r in conn.execute("SELECT relname FROM pg_class WHERE relname ~ %s AND relkind = 'r'",
                                                 (rf"^images_p{coll.id}_\d+$",))]
            on_workers += sum(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables)
    assert on_workers == len(ids)
    db.dispose()
