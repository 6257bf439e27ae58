"""`ingest db upgrade` on a database the previous schema (revision 0006) wrote: other commands refuse it in one line;
the upgrade moves every row into a partition per collection with ids, vectors and watermarks kept (raw features
rounded to half precision, nothing else changed) and the HNSW index built again; a copy killed midway goes on from
where it stopped; a disk too small, or raw features half precision cannot hold, stop it in one line with nothing
changed; a downgrade gives the old layout back. Each test has a database of its own on the session's server."""
from __future__ import annotations

import json
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from itertools import zip_longest
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from ingest.annoy_index import ANNOY_SEED, METRIC, Sidecar, sidecar_path
from ingest.cli import cli as ingest_cli
from ingest.collection import Collection
from ingest.config import Settings
from ingest.db import connect, current_revision, downgrade, libpq_url, upgrade
from ingest.images import decode_image, read_file
from ingest.load import load_collection
from ingest.names import file_stem
from ingest.sources import walk_folder
from migrations.partitioned_layout import TABLES, converted
from search.evaluation import brute_force
from tests.helpers import STEP_TIMEOUT, Finished, cli, make_folder, make_load_folder, scratch_database

OLD, NEW = "0006", "0007"
APPLES, PEARS, EMPTY = "upgrade-apples", "upgrade-pears", "upgrade-empty"  # collections of the 0006 databases
SOURCES = {APPLES: "upgrade-src-apples", PEARS: "upgrade-src-pears"}  # the real loads (session database) they copy
RUN = "upgrade-run"  # a fine-tuning run's split
COLLECTION_FIELDS = ("name", "model", "weights", "weights_fingerprint", "pca_dims", "pca_version", "pca_mean", "pca_components",
                     "pca_explained_variance", "embedding_seq", "removed_rows", "hnsw", "precision", "runtime",
                     "created_at", "updated_at")


# --- what is stored, read the same way from either layout -------------------------------------------


def snapshot(engine) -> dict:
    """Every stored row (the tables of both layouts share these columns but for features, found by images.id here)."""
    with engine.connect() as conn:
        features = ("SELECT i.id, f.raw::real[] FROM features f JOIN images i USING (collection_id, sha256)" if converted(conn)
                    else "SELECT image_id, raw::real[] FROM features")
        rows = {
            "collections": "SELECT id, " + ", ".join(COLLECTION_FIELDS) + " FROM collections",
            "images": "SELECT id, collection_id, sha256, path, label, width, height, bytes, ingested_at, embedding::real[],"
                      " embedding_seq FROM images",
            "image_paths": "SELECT image_id, collection_id, path FROM image_paths",
            "finetune_splits": "SELECT run, image_id, collection_id, split FROM finetune_splits",
            "ingest_failures": "SELECT id, collection_id, path, reason, at FROM ingest_failures",
        }
        found = {k: sorted(tuple(tuple(v) if isinstance(v, list) else v for v in r) for r in conn.execute(sa.text(q)))
                 for k, q in rows.items()}
        found["raw"] = {i: np.asarray(v, np.float32) for i, v in conn.execute(sa.text(features))}
    return found


def assert_kept(before: dict, after: dict, *, raw_exact: bool = False) -> None:
    """Every row, id and value as it was; raw features as half precision rounds the old ones (or exactly)."""
    for table in ("collections", "images", "image_paths", "finetune_splits", "ingest_failures"):
        assert after[table] == before[table], table
    assert after["raw"].keys() == before["raw"].keys()
    for i, raw in before["raw"].items():
        want = raw if raw_exact else raw.astype(np.float16).astype(np.float32)
        assert np.array_equal(after["raw"][i], want), f"raw features of image {i}"


def url_of(engine) -> str:
    return libpq_url(engine.url.render_as_string(hide_password=False))


def scratch_settings(tmp_path: Path, engine) -> Settings:
    return Settings(home=tmp_path / "home", database_url=url_of(engine))


def assert_refused(ris_home, engine) -> None:
    """An ordinary command on a database holding pictures in the old layout: one line naming the upgrade, exit 1."""
    run = cli(ris_home, "ingest", "status", database_url=url_of(engine))
    assert run.returncode != 0 and not run.stdout
    one_line(run.stderr, "before revision 0007", "`ingest db upgrade`")


def one_line(stderr: str, *words: str) -> str:
    """The one line a failed command said (progress bars aside), holding `words`."""
    lines = Finished(1, "", stderr).messages
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


# --- a database as revision 0006 left it ------------------------------------------------------------


def insert_collection(conn, **fields) -> int:
    return conn.execute(sa.text(f"INSERT INTO collections ({', '.join(fields)}) VALUES ({', '.join(':' + k for k in fields)})"
                                " RETURNING id"), fields).scalar()


@dataclass
class Picture:
    sha256: str
    path: str
    label: str | None
    width: int
    height: int
    bytes: int
    ingested_at: object
    embedding: list[float]
    embedding_seq: int
    raw: list[float]  # as the 0006 code stored them: float32, not rounded
    paths: list[str]


def read_source(db, fake_extractor, name: str) -> tuple[dict, list[Picture], list[tuple]]:
    """A real load's collection row, pictures (raw features computed again in float32 from the files, as the code of
    0006 stored them) and failures."""
    with db.connect() as conn:
        c = conn.execute(sa.text(f"SELECT id, {', '.join(COLLECTION_FIELDS)} FROM collections WHERE name = :n"),
                         {"n": name}).one()
        rows = conn.execute(sa.text(
            "SELECT sha256, path, label, width, height, bytes, ingested_at, embedding, embedding_seq, f.raw"
            " FROM images JOIN features f USING (collection_id, sha256) WHERE collection_id = :c ORDER BY id"), {"c": c.id}).all()
        paths = conn.execute(sa.text("SELECT sha256, path FROM image_paths WHERE collection_id = :c ORDER BY path"),
                             {"c": c.id}).all()
        failures = conn.execute(sa.text("SELECT path, reason, at FROM ingest_failures WHERE collection_id = :c"),
                                {"c": c.id}).all()
    pictures = []
    for r in rows:
        raw = fake_extractor.embed(decode_image(read_file(Path(r.path))).pixels[np.newaxis])[0]
        # the loaded ones before rounding (up to the order a batch sums in)
        np.testing.assert_allclose(raw, r.raw.to_numpy(), rtol=1e-3, atol=1e-3)
        pictures.append(Picture(*r[:7], r.embedding.to_numpy().tolist(), r.embedding_seq, raw.tolist(),
                                [p for sha, p in paths if sha == r.sha256]))
    return c._asdict(), pictures, [tuple(f) for f in failures]


def insert_picture(conn, collection_id: int, p: Picture) -> int:
    """A picture as 0006 stored it: images (id from the sequence), features by image_id in float32, its paths."""
    image_id = conn.execute(sa.text(
        "INSERT INTO images (collection_id, path, label, sha256, width, height, bytes, ingested_at, embedding, embedding_seq)"
        " VALUES (:c, :path, :label, :sha256, :width, :height, :bytes, :ingested_at, CAST(:embedding AS real[])::vector,"
        " :embedding_seq) RETURNING id"), asdict(p) | {"c": collection_id}).scalar()
    conn.execute(sa.text("INSERT INTO features (image_id, raw) VALUES (:i, CAST(:raw AS real[])::vector(2048))"),
                 {"i": image_id, "raw": p.raw})
    for path in p.paths:
        conn.execute(sa.text("INSERT INTO image_paths (image_id, collection_id, path) VALUES (:i, :c, :p)"),
                     {"i": image_id, "c": collection_id, "p": path})
    return image_id


def write_0006(engine, sources: dict) -> dict[str, int]:
    """The real loads' rows written with the 0006 layout's own SQL: pictures of two collections with interleaved ids,
    a fine-tuning split, failures, watermarks, an HNSW index of the old kind, and an empty collection."""
    upgrade(engine, OLD)
    ids = {}
    with engine.begin() as conn:
        for name, (row, _, failures) in sources.items():
            fields = {k: row[k] for k in COLLECTION_FIELDS} | {"name": name}
            if name == APPLES:
                fields |= {"hnsw": True, "removed_rows": 3}
            ids[name] = insert_collection(conn, **fields)
            for path, reason, at in failures:
                conn.execute(sa.text("INSERT INTO ingest_failures (collection_id, path, reason, at) VALUES (:c, :p, :r, :a)"),
                             {"c": ids[name], "p": path, "r": reason, "a": at})
        ids[EMPTY] = insert_collection(conn, name=EMPTY, model="ResNet50", weights="fake", weights_fingerprint="f", pca_dims=2)
        for a, b in zip_longest(sources[APPLES][1], sources[PEARS][1]):
            for name, picture in ((APPLES, a), (PEARS, b)):
                if picture is not None:
                    image_id = insert_picture(conn, ids[name], picture)
                    if name == APPLES:
                        conn.execute(sa.text("INSERT INTO finetune_splits (run, image_id, collection_id, split) VALUES"
                                             " (:r, :i, :c, :s)"), {"r": RUN, "i": image_id, "c": ids[name],
                                                                    "s": "holdout" if image_id % 3 == 0 else "train"})
        dims = sources[APPLES][0]["pca_dims"]
        conn.execute(sa.text(f"CREATE INDEX images_hnsw_{ids[APPLES]}_{dims} ON images USING hnsw ((embedding::vector({dims}))"
                             f" vector_l2_ops) WHERE collection_id = {ids[APPLES]}"))
    return ids


def write_annoy_file(engine, settings: Settings, name: str) -> None:
    """The Annoy file and sidecar a 0006 build leaves: items in id order, the collection's watermarks recorded."""
    from annoy import AnnoyIndex

    with engine.connect() as conn:
        c = conn.execute(sa.text("SELECT id, pca_dims, pca_version, embedding_seq, removed_rows FROM collections"
                                 " WHERE name = :n"), {"n": name}).one()
        rows = conn.execute(sa.text("SELECT id, embedding::real[] FROM images WHERE collection_id = :c ORDER BY id"),
                            {"c": c.id}).all()
    index = AnnoyIndex(c.pca_dims, METRIC)
    index.set_seed(ANNOY_SEED)
    for item, (_, vector) in enumerate(rows):
        index.add_item(item, vector)
    index.build(10, n_jobs=1)
    settings.annoy_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{file_stem(name)}.1"
    index.save(str(settings.annoy_dir / f"{stem}.ann"))
    np.save(settings.annoy_dir / f"{stem}.ids.npy", np.array([r.id for r in rows], np.int64))
    sidecar = Sidecar(name, f"{stem}.ann", f"{stem}.ids.npy", len(rows), c.pca_dims, c.pca_version, c.embedding_seq,
                      c.removed_rows, 10, METRIC, time.time())
    sidecar_path(settings.annoy_dir, name).write_text(json.dumps(asdict(sidecar)))


def write_bulk_0006(engine, names: tuple[str, ...], rows: int) -> None:
    """A 0006 database of `rows` small pictures over collections `names` (ids interleaved), each with a path, every
    25th with raw features (not all half-exact), every 4th in a fine-tuning split."""
    upgrade(engine, OLD)
    with engine.begin() as conn:
        ids = [insert_collection(conn, name=n, model="ResNet50", weights="fake", weights_fingerprint="f", pca_dims=3)
               for n in names]
        conn.execute(sa.text(
            "INSERT INTO images (collection_id, path, label, sha256, width, height, bytes, embedding, embedding_seq)"
            " SELECT (CAST(:ids AS int[]))[1 + g % :n], 'bulk/' || g || '.jpg', 'label' || g % 5,"
            " encode(sha256(g::text::bytea), 'hex'), 8, 8, 100 + g, ARRAY[g, g % 7, 1]::real[]::vector, 1"
            " FROM generate_series(1, :rows) g ORDER BY g"), {"ids": ids, "n": len(ids), "rows": rows})
        conn.execute(sa.text("INSERT INTO image_paths (image_id, collection_id, path) SELECT id, collection_id, path FROM images"))
        conn.execute(sa.text("INSERT INTO features (image_id, raw)"
                             " SELECT id, array_fill((id % 97)::real / 10, ARRAY[2048])::vector FROM images WHERE id % 25 = 0"))
        conn.execute(sa.text("INSERT INTO finetune_splits (run, image_id, collection_id, split) SELECT :r, id, collection_id,"
                             " CASE WHEN id % 3 = 0 THEN 'holdout' ELSE 'train' END FROM images WHERE id % 4 = 0"), {"r": RUN})


# --- the tests ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(db, settings, fake_extractor, tmp_path_factory) -> dict:
    """Two real loads of the fake model (one with a copy of a picture and a broken file), as 0006 would hold them."""
    root = tmp_path_factory.mktemp("upgrade")
    apples, _ = make_load_folder(root / "apples", per_label=5)
    pears = make_folder(root / "pears", labels=("red", "green"), per_label=6, seed=31)
    for folder, (name, source), dims in ((apples, (APPLES, SOURCES[APPLES]), 4), (pears, (PEARS, SOURCES[PEARS]), 3)):
        load_collection(db, settings, source, walk_folder(folder)[0], fake_extractor, pca_dims=dims, progress=False)
    return {name: read_source(db, fake_extractor, source) for name, source in SOURCES.items()}


def check_0006_fixture(before: dict, ids: dict) -> None:
    """What the old database must hold for the test to mean something."""
    owner = {r[0]: r[1] for r in before["images"]}
    apples, pears = ([i for i, c in owner.items() if c == ids[name]] for name in (APPLES, PEARS))
    assert min(pears) < max(apples) and min(apples) < max(pears), "ids of the two collections are not interleaved"
    paths = [image_id for image_id, _, _ in before["image_paths"]]
    assert max(paths.count(i) for i in set(paths)) == 2, "no picture with two paths"
    assert before["finetune_splits"] and before["ingest_failures"]
    assert any(not np.array_equal(r, r.astype(np.float16).astype(np.float32)) for r in before["raw"].values())
    fields = {r[1]: dict(zip(COLLECTION_FIELDS, r[1:])) for r in before["collections"]}
    assert fields[APPLES]["embedding_seq"] > 0 and fields[APPLES]["removed_rows"] == 3 and fields[APPLES]["pca_mean"]


def check_partitions(engine, ids: dict, before: dict) -> None:
    """A partition of each table per collection (the empty one too), each holding its collection's pictures; no
    staging table and no index of the old kind left."""
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT relkind FROM pg_class WHERE oid = 'images'::regclass")).scalar() == "p"
        for c in ids.values():
            for table in TABLES:
                name = f"{table}_p{c}"
                assert conn.execute(sa.text("SELECT to_regclass(:t) IS NOT NULL"), {"t": name}).scalar(), name
            held = conn.execute(sa.text(f"SELECT count(*) FROM ONLY images_p{c}")).scalar()
            assert held == sum(1 for r in before["images"] if r[1] == c)
        left = conn.execute(sa.text("SELECT relname FROM pg_class"
                                    " WHERE relname LIKE '%\\_\\_next' OR relname LIKE 'images\\_hnsw\\_%'")).scalars().all()
        assert left == []


def embeddings_of(before: dict, collection_id: int) -> tuple[np.ndarray, np.ndarray]:
    rows = sorted((r[0], r[9]) for r in before["images"] if r[1] == collection_id)
    return np.array([i for i, _ in rows]), np.array([v for _, v in rows], np.float32)


def test_a_0006_database_is_refused_then_converted_with_every_row_kept(ris_home, tmp_path, sources, fake_extractor):
    with scratch_database(ris_home, "ris_upgrade_loads") as engine:
        ids = write_0006(engine, sources)
        settings = scratch_settings(tmp_path, engine)
        write_annoy_file(engine, settings, APPLES)
        before = snapshot(engine)
        check_0006_fixture(before, ids)
        assert_refused(ris_home, engine)

        run = cli(ris_home, "ingest", "db", "upgrade", database_url=url_of(engine))
        assert run.returncode == 0, run.stderr
        assert f"database at revision {NEW} (was {OLD}), {len(before['images'])} pictures moved" in run.stdout, run.stdout
        assert "1 HNSW index(es) built again" in run.stdout and "GiB free" in run.stderr
        assert current_revision(engine) == NEW
        assert_kept(before, snapshot(engine))
        check_partitions(engine, ids, before)
        status = cli(ris_home, "ingest", "status", "--json", database_url=url_of(engine))
        assert status.returncode == 0, status.stderr
        counts = {c["name"]: c["images"] for c in json.loads(status.stdout)["collections"]}
        assert counts == {name: sum(1 for r in before["images"] if r[1] == c) for name, c in ids.items()}

        db = connect(settings)
        try:
            search_after_upgrade(db, settings, before, ids)
            more = make_folder(tmp_path / "more", labels=("yellow",), per_label=2, seed=77)
            load_collection(db, settings, APPLES, walk_folder(more)[0], fake_extractor, progress=False)
            with db.connect() as conn:
                new = conn.execute(sa.text("SELECT id FROM images WHERE collection_id = :c AND path LIKE :p"),
                                   {"c": ids[APPLES], "p": f"{more}%"}).scalars().all()
            assert len(new) == 2 and min(new) > max(r[0] for r in before["images"])
        finally:
            db.dispose()


def search_after_upgrade(db, settings: Settings, before: dict, ids: dict) -> None:
    """Through the library: exact, HNSW (its index on the partition) and the Annoy file built before the upgrade all
    answer as numpy does; raw features answer their own picture."""
    apples = Collection.named(db, settings, APPLES)
    assert apples.row.hnsw and apples.index_problem() is None
    image_ids, vectors = embeddings_of(before, ids[APPLES])
    queries = [vectors[0], vectors[7], np.random.default_rng(5).normal(size=vectors.shape[1]).astype(np.float32)]
    for q in queries:
        want = brute_force(image_ids, vectors, q, 5)[0].tolist()
        for engine in ("pgvector", "hnsw", "annoy"):
            assert [h.id for h in apples.similar(q, 5, engine=engine, search_k=10_000)] == want, engine
    assert f"images_p{ids[APPLES]}_hnsw_{apples.dims}" in apples.engine("hnsw").explain(queries[0], 5)
    raw = before["raw"][int(image_ids[3])]
    assert apples.similar(raw, 1, space="raw")[0].id == image_ids[3]
    pears = Collection.named(db, settings, PEARS)
    image_ids, vectors = embeddings_of(before, ids[PEARS])
    assert [h.id for h in pears.similar(vectors[2], 4)] == brute_force(image_ids, vectors, vectors[2], 4)[0].tolist()


def staged(conn) -> int | None:
    """Pictures the copy has committed to the staging table (None before it exists)."""
    if not conn.execute(sa.text("SELECT to_regclass('images__next') IS NOT NULL")).scalar():
        return None
    return conn.execute(sa.text("SELECT count(*) FROM images__next")).scalar()


def kill_midway(engine, run, total: int) -> int | None:
    """SIGKILL `ingest db upgrade` once a third of the pictures are staged. A lock taken first stops its next batch
    where it stands (inside its transaction), so the kill lands between committed batches and loses one open one,
    whatever the machine's speed. Returns the copy's speed (rows/s), or None if it was done before it could be stopped."""
    with engine.connect() as conn:
        deadline, first = time.monotonic() + STEP_TIMEOUT, None
        while (n := staged(conn)) is None or n < total // 3:
            conn.rollback()  # each poll its own snapshot
            if not run.running():
                return None
            assert time.monotonic() < deadline, "the copy did not start"
            if n and first is None:
                first = (time.monotonic(), n)
            time.sleep(0.01)
        seen = (time.monotonic(), n)
        conn.execute(sa.text("SET lock_timeout = '60s'"))
        conn.execute(sa.text("LOCK TABLE images__next IN EXCLUSIVE MODE"))
        if staged(conn) == total:
            return None
        run.proc.send_signal(signal.SIGKILL)
        run.proc.wait(30)
        conn.rollback()
    return (seen[1] - first[1]) / (seen[0] - first[0]) if first else float("nan")


def wait_until_alone(engine) -> None:
    """Wait for the killed command's server processes to notice and end (its open batch rolled back)."""
    engine.dispose()
    with engine.connect() as conn:
        deadline = time.monotonic() + STEP_TIMEOUT
        while conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                                   " AND pid <> pg_backend_pid()")).scalar():
            conn.rollback()
            assert time.monotonic() < deadline, "the killed command's connections are still there"
            time.sleep(0.05)


def test_an_upgrade_killed_midway_goes_on_when_run_again(ris_home, spawn):
    rows = 4000
    for _ in range(3):  # a machine fast enough to finish before the kill gets more pictures to copy
        with scratch_database(ris_home, "ris_upgrade_killed") as engine:
            write_bulk_0006(engine, ("upgrade-bulk-a", "upgrade-bulk-b"), rows)
            before = snapshot(engine)
            run = spawn("ingest", "db", "upgrade", "--batch-size", "100", database_url=url_of(engine))
            speed = kill_midway(engine, run, rows)
            if speed is None:
                run.finish()
                rows *= 4
                continue
            wait_until_alone(engine)
            with engine.connect() as conn:
                copied = staged(conn)
            assert 0 < copied < rows and copied % 100 == 0, copied  # whole batches only
            assert current_revision(engine) == OLD
            assert_kept(before, snapshot(engine), raw_exact=True)  # the old tables, untouched
            assert_refused(ris_home, engine)

            started = time.perf_counter()
            again = cli(ris_home, "ingest", "db", "upgrade", "--json", "--batch-size", "100", database_url=url_of(engine))
            seconds = time.perf_counter() - started
            assert again.returncode == 0, again.stderr
            report = json.loads(again.stdout)
            assert (report["before"], report["after"], report["copied"]) == (OLD, NEW, rows - copied)
            assert_kept(before, snapshot(engine))
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT count(*), count(DISTINCT id) FROM images")).one() == (rows, rows)
            print(f"\nupgrade of {rows} pictures, batches of 100: {speed:.0f} rows/s while copying; killed at {copied}, "
                  f"the rerun copied {rows - copied} in {seconds:.1f} s (process start, swap included)")
            return
    pytest.fail(f"the copy of {rows // 4} pictures ended before it could be killed")


def test_a_disk_too_small_is_refused_before_anything_is_copied(ris_home, monkeypatch):
    with scratch_database(ris_home, "ris_upgrade_disk") as engine:
        write_bulk_0006(engine, ("upgrade-disk",), 300)
        before = snapshot(engine)
        usage = type(shutil.disk_usage("/"))
        monkeypatch.setattr("ingest.upgrade.shutil.disk_usage", lambda path: usage(2**40, 2**40 - 4096, 4096))
        monkeypatch.setenv("DATABASE_URL", url_of(engine))
        result = CliRunner().invoke(ingest_cli, ["db", "upgrade"])
        assert result.exit_code == 1, result.output
        one_line(result.output, "the upgrade needs about", "which has 0.0 GiB", "`ingest db upgrade` again")
        with engine.connect() as conn:
            assert staged(conn) is None
        assert current_revision(engine) == OLD
        assert_kept(before, snapshot(engine), raw_exact=True)


def test_raw_features_beyond_half_precision_stop_the_upgrade_naming_the_collection(ris_home):
    with scratch_database(ris_home, "ris_upgrade_half") as engine:
        write_bulk_0006(engine, ("upgrade-fine", "upgrade-huge"), 400)
        with engine.begin() as conn:
            huge = conn.execute(sa.text(
                "UPDATE features SET raw = array_fill(1e5::real, ARRAY[2048])::vector WHERE image_id = (SELECT max(image_id)"
                " FROM features f JOIN images i ON i.id = f.image_id JOIN collections c ON c.id = i.collection_id"
                " WHERE c.name = 'upgrade-huge') RETURNING image_id")).scalar()
        before = snapshot(engine)
        run = cli(ris_home, "ingest", "db", "upgrade", database_url=url_of(engine))
        assert run.returncode == 1
        one_line(run.stderr, "'upgrade-huge'", "half precision")
        assert current_revision(engine) == OLD
        assert_kept(before, snapshot(engine), raw_exact=True)

        with engine.begin() as conn:  # what the line says to do
            conn.execute(sa.text("DELETE FROM features WHERE image_id = :i"), {"i": huge})
        before = snapshot(engine)
        run = cli(ris_home, "ingest", "db", "upgrade", database_url=url_of(engine))
        assert run.returncode == 0, run.stderr
        assert_kept(before, snapshot(engine))


def test_a_downgrade_gives_the_old_layout_back_and_upgrading_again_works(ris_home, tmp_path, fake_extractor):
    with scratch_database(ris_home, "ris_upgrade_downgrade") as engine:
        settings = scratch_settings(tmp_path, engine)
        db = connect(settings)
        try:
            folder, _ = make_load_folder(tmp_path / "pics", per_label=3)
            load_collection(db, settings, "upgrade-down-a", walk_folder(folder)[0], fake_extractor, pca_dims=3, progress=False)
            other = make_folder(tmp_path / "other", labels=("red",), per_label=4, seed=5)
            load_collection(db, settings, "upgrade-down-b", walk_folder(other)[0], fake_extractor, pca_dims=2, progress=False)
            with db.begin() as conn:
                conn.execute(sa.text("INSERT INTO finetune_splits (collection_id, run, sha256, image_id, split)"
                                     " SELECT collection_id, :r, sha256, id, 'holdout' FROM images WHERE id % 2 = 0"), {"r": RUN})
            at_head = snapshot(engine)
            downgrade(db.engine, OLD)
        finally:
            db.dispose()
        assert current_revision(engine) == OLD
        assert_kept(at_head, snapshot(engine), raw_exact=True)  # float32 again, holding what half precision kept
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT relkind FROM pg_class WHERE oid = 'images'::regclass")).scalar() == "r"
            assert conn.execute(sa.text("SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
                                        " WHERE attrelid = 'features'::regclass AND attname = 'raw'")).scalar() == "vector(2048)"
            assert conn.execute(sa.text("SELECT count(*) FROM pg_class WHERE relname ~ '^(images|features)_p[0-9]+$'")).scalar() == 0
        assert_refused(ris_home, engine)

        run = cli(ris_home, "ingest", "db", "upgrade", database_url=url_of(engine))
        assert run.returncode == 0, run.stderr
        assert_kept(at_head, snapshot(engine), raw_exact=True)
