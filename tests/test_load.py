"""ingest load: the real ResNet50 (random weights), the real embedded PostgreSQL, a real Annoy file."""
from __future__ import annotations

import json
import shutil

import numpy as np
import sqlalchemy as sa
from click.testing import CliRunner

from ingest.annoy_index import index_path, read_sidecar
from ingest.cli import cli as ingest_cli
from ingest.collection import Collection
from ingest.load import load_collection
from ingest.sources import walk_folder
from ingest.store import read_vectors
from tests.helpers import collection_row, make_folder


def run(*args):
    result = CliRunner().invoke(ingest_cli, list(args))
    return result


def load_args(folder, name, *extra):
    return ["load", "folder", str(folder), "--collection", name, "--weights", "random", "--pca-dims", "4", *extra]


def count(db, sql, **params):
    with db.engine.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar()


def test_load_folder_stores_images_features_embeddings_and_index(db, settings, picture_folder):
    result = run(*load_args(picture_folder, "shapes", "--json"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["ingested"], summary["present"], summary["failed"]) == (12, 0, 0)
    coll = collection_row(db, "shapes")
    assert coll.pca is not None and coll.pca_dims == 4 and coll.weights == "random"
    assert count(db, "SELECT count(*) FROM images WHERE collection_id = :c", c=coll.id) == 12
    assert count(db, "SELECT count(DISTINCT label) FROM images WHERE collection_id = :c", c=coll.id) == 3
    assert count(db, "SELECT count(*) FROM features f JOIN images i ON f.collection_id = i.collection_id AND f.sha256 = i.sha256 WHERE i.collection_id = :c", c=coll.id) == 12
    assert count(db, "SELECT count(*) FROM images WHERE collection_id = :c AND vector_dims(embedding) = 4", c=coll.id) == 12
    paths = {p for p in db.engine.connect().execute(sa.text("SELECT path FROM images WHERE collection_id = :c"), {"c": coll.id}).scalars()}
    assert paths == {str(c.path) for c in walk_folder(picture_folder)[0]}
    # Embeddings are the stored PCA applied to the stored raw features.
    ids, raw = read_vectors(db, coll.id, "raw")
    ids2, emb = read_vectors(db, coll.id, "embedding")
    assert (ids == ids2).all()
    np.testing.assert_allclose(emb, coll.pca.project(raw), atol=1e-4)
    # The Annoy file holds the same ids, as dense items.
    sidecar = read_sidecar(settings.annoy_dir, "shapes")
    assert sidecar.items == 12 and sidecar.dims == 4 and sidecar.embedding_seq == coll.embedding_seq
    assert np.load(settings.annoy_dir / sidecar.ids_file).tolist() == ids.tolist()


def test_rerun_adds_nothing_and_status_reports_fresh_index(db, picture_folder):
    assert run(*load_args(picture_folder, "again")).exit_code == 0
    result = run(*load_args(picture_folder, "again", "--json"))
    summary = json.loads(result.stdout)
    assert (summary["ingested"], summary["present"]) == (0, 12)
    status = json.loads(run("status", "--json").stdout)
    entry = next(c for c in status["collections"] if c["name"] == "again")
    assert status["database"] == "embedded"
    assert entry["images"] == 12 and entry["labels"] == 3 and entry["dims"] == 4 and entry["weights"] == "random"
    assert entry["annoy"]["items"] == 12 and entry["annoy"]["fresh"] is True


def test_images_added_later_use_the_existing_pca(db, tmp_path, extractor, settings):
    folder = make_folder(tmp_path / "grow", per_label=3)
    candidates, _ = walk_folder(folder)
    load_collection(db, settings, "grow", candidates[:6], extractor, pca_dims=4, progress=False)
    before = collection_row(db, "grow")
    load_collection(db, settings, "grow", candidates, extractor, progress=False)
    after = collection_row(db, "grow")
    assert after.pca_version == before.pca_version
    np.testing.assert_array_equal(after.pca.components, before.pca.components)
    ids, raw = read_vectors(db, after.id, "raw")
    _, emb = read_vectors(db, after.id, "embedding")
    assert len(ids) == 9
    np.testing.assert_allclose(emb, before.pca.project(raw), atol=1e-4)
    # The file built by the first load stays; the three new rows are its delta, found by the Annoy engine.
    assert read_sidecar(settings.annoy_dir, "grow").items == 6
    coll = Collection.named(db, settings, "grow")
    assert coll.index_delta(100) == 3
    for image_id, vector in zip(ids[6:], emb[6:]):
        assert coll.similar(vector, 1, engine="annoy")[0].id == image_id


def test_duplicate_files_are_stored_once(db, picture_folder):
    shutil.copy(picture_folder / "red" / "red_0.jpg", picture_folder / "green" / "copy_of_red.jpg")
    summary = json.loads(run(*load_args(picture_folder, "dupes", "--json")).stdout)
    assert summary["ingested"] == 12 and summary["duplicates"] == 1 and summary["present"] == 0


def test_bad_files_are_recorded_and_strict_fails(db, picture_folder):
    (picture_folder / "red" / "empty.jpg").write_bytes(b"")
    (picture_folder / "red" / "text.jpg").write_text("not a picture")
    result = run(*load_args(picture_folder, "bad", "--json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["failed"] == 2
    coll = collection_row(db, "bad")
    with db.engine.connect() as conn:
        reasons = dict(conn.execute(sa.text("SELECT path, reason FROM ingest_failures WHERE collection_id = :c"), {"c": coll.id}).all())
    assert reasons[str(picture_folder / "red" / "empty.jpg")] == "empty file"
    assert "not an image" in reasons[str(picture_folder / "red" / "text.jpg")]
    strict = run(*load_args(picture_folder, "bad", "--strict"))
    assert strict.exit_code == 1 and "2 file(s) could not be ingested" in strict.output
    assert count(db, "SELECT count(*) FROM ingest_failures WHERE collection_id = :c", c=coll.id) == 2


def test_pca_dims_are_checked(db, picture_folder):
    too_many = run("load", "folder", str(picture_folder), "--collection", "dims", "--weights", "random", "--pca-dims", "50")
    assert too_many.exit_code == 1 and "more than the 12 images" in too_many.output
    assert count(db, "SELECT count(*) FROM images i JOIN collections c ON c.id = i.collection_id WHERE c.name = 'dims'") == 0
    fixed = run(*load_args(picture_folder, "dims", "--json"))
    assert fixed.exit_code == 0 and json.loads(fixed.stdout)["ingested"] == 12
    assert collection_row(db, "dims").pca_dims == 4
    assert run("load", "folder", str(picture_folder), "--pca-dims", "2001").exit_code == 2


def test_default_pca_dims_shrink_to_a_small_collection(db, picture_folder):
    result = run("load", "folder", str(picture_folder), "--collection", "small", "--weights", "random")
    assert result.exit_code == 0, result.output
    coll = collection_row(db, "small")
    assert coll.pca_dims == 12 and coll.pca.dims == 12


def test_reduce_refits_without_the_cnn_and_index_rebuilds(db, settings, picture_folder):
    assert run(*load_args(picture_folder, "refit")).exit_code == 0
    before = collection_row(db, "refit")
    result = run("reduce", "--pca-dims", "3", "--collection", "refit")
    assert result.exit_code == 0, result.output
    after = collection_row(db, "refit")
    assert after.pca_dims == 3 and after.pca_version == before.pca_version + 1
    _, emb = read_vectors(db, after.id, "embedding")
    assert emb.shape == (12, 3)
    sidecar = read_sidecar(settings.annoy_dir, "refit")
    assert sidecar.dims == 3 and sidecar.pca_version == after.pca_version
    index_path(settings.annoy_dir, "refit").unlink()
    assert run("index", "--collection", "refit", "--trees", "5").exit_code == 0
    assert read_sidecar(settings.annoy_dir, "refit").trees == 5


def test_other_weights_are_refused_for_an_existing_collection(db, picture_folder, tmp_path, extractor):
    assert run(*load_args(picture_folder, "mixed")).exit_code == 0
    weights = tmp_path / "other.weights.h5"
    import keras

    keras.utils.set_random_seed(1)
    keras.applications.ResNet50(include_top=False, pooling="avg", weights=None).save_weights(weights)
    result = run("load", "folder", str(picture_folder), "--collection", "mixed", "--weights", str(weights))
    assert result.exit_code == 1 and "would mix two models" in result.output


def test_unknown_weights_and_missing_folder_are_one_line(tmp_path):
    result = run("load", "folder", str(tmp_path), "--weights", str(tmp_path / "nope.h5"))
    assert result.exit_code == 1 and "no such file" in result.output and "Traceback" not in result.output
    result = run("load", "folder", str(tmp_path / "missing"), "--weights", "random")
    assert result.exit_code == 1 and result.output.startswith("Error:")


def test_imagenet_weights_that_cannot_be_downloaded_fail_before_any_work(db, picture_folder, tmp_path, monkeypatch):
    # Keras downloads with urllib: a closed local proxy makes the download fail at once, online or not.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    result = run("load", "folder", str(picture_folder), "--collection", "imagenet-offline")
    assert result.exit_code == 1
    assert "cannot download the ImageNet weights" in result.output and "--weights" in result.output
    assert result.stderr.count("\n") == 1  # Keras's own "Downloading data from ..." goes to stdout
    assert count(db, "SELECT count(*) FROM collections WHERE name = 'imagenet-offline'") == 0


def test_unavailable_weights_fail_before_an_archive_is_extracted(db, settings, picture_folder, tmp_path, monkeypatch):
    import tarfile

    archive = tmp_path / "101_ObjectCategories.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(picture_folder, arcname="101_ObjectCategories")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    shutil.rmtree(settings.datasets_dir / "caltech101", ignore_errors=True)
    result = run("load", "caltech101", "--source", str(archive), "--collection", "never")
    assert result.exit_code == 1 and "--weights" in result.stderr
    assert not (settings.datasets_dir / "caltech101").exists()
    missing = run("load", "caltech101", "--source", str(tmp_path / "nope.tar.gz"), "--weights", "random")
    assert missing.exit_code == 1 and "no such file or folder" in missing.output
