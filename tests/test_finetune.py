"""ingest finetune: the real ResNet50 (random weights) trained briefly on small coloured shapes, the real database."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from ingest.cli import cli as ingest_cli
from ingest.collection import Collection
from ingest.errors import CollectionError, WeightsError
from ingest.features import FeatureExtractor, fingerprint
from ingest.finetune import build_models, dataset, finetune
from ingest.splits import split_images
from ingest.images import decode_image, read_file
from ingest.load import load_collection
from ingest.sources import walk_folder

from tests.helpers import collection_row, make_folder

FAST = dict(epochs=2, batch_size=4, holdout=0.3, progress=False)


def load(db, settings, extractor, root, name, labels=("red", "green", "blue"), per_label=6):
    """A collection of coloured shapes embedded with the random-weights ResNet50, as `ingest load folder` makes it."""
    folder = make_folder(root / name, labels=labels, per_label=per_label)
    candidates, _ = walk_folder(folder)
    load_collection(db, settings, name, candidates, extractor, pca_dims=4, progress=False)
    return folder


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, db, settings, extractor):
    """One fine-tuning run shared by the tests that only look at its results.

    Module-scoped, so it runs before the autouse RIS_HOME fixture: it uses `settings` explicitly, never the environment.
    """
    load(db, settings, extractor, tmp_path_factory.mktemp("ft"), "ftshapes")
    return finetune(db, settings, "ftshapes", unfreeze="conv5", **FAST)


def test_training_loss_falls_and_summary_counts(tuned):
    assert (tuned.into, tuned.initial_epoch) == ("ftshapes-ft", 0)
    assert (tuned.train_size, tuned.holdout_size) == (12, 6)
    # Two phases of up to 2 epochs each (early stopping waits 3 epochs, so it cannot end one here).
    assert tuned.epochs_run == 4 and [h["epoch"] for h in tuned.history] == [0, 1, 2, 3]
    # Measured on the train split without augmentation or dropout, before and after training.
    assert tuned.loss < tuned.initial_loss
    assert tuned.images_per_second > 0 and 0 <= tuned.holdout_accuracy <= 1


def test_saved_weights_load_back_as_the_tuned_backbone(tuned, db, settings):
    extractor = FeatureExtractor(tuned.weights_path)
    coll = collection_row(db, "ftshapes-ft")
    assert coll.weights == tuned.weights_path and coll.weights_fingerprint == extractor.fingerprint
    # The features stored for the new collection are the tuned backbone's, up to float noise and half-precision rounding.
    with db.engine.connect() as conn:
        path, raw = conn.execute(
            sa.text("SELECT i.path, f.raw FROM images i JOIN features f ON f.collection_id = i.collection_id AND f.sha256 = i.sha256 WHERE i.collection_id = :c LIMIT 1"),
            {"c": coll.id},
        ).one()
    vector = extractor.embed(decode_image(read_file(path)).pixels[None])[0]
    stored = np.asarray(raw.to_numpy() if hasattr(raw, "to_numpy") else raw, dtype=np.float32)
    np.testing.assert_allclose(vector, stored, rtol=1e-3, atol=1e-4)  # stored in half precision: 2^-11 relative rounding
    source = collection_row(db, "ftshapes")
    assert source.weights_fingerprint != coll.weights_fingerprint  # conv5 was trained
    # The backbone inside the last checkpoint of the classifier is the one the weights file holds.
    backbone, model = build_models(Collection.named(db, settings, "ftshapes"), 3, augment=True, seed=0)
    model.load_weights(settings.models_dir / "ftshapes-ft.ckpt" / "model.weights.h5")
    assert fingerprint(backbone) == extractor.fingerprint
    pixels = decode_image(read_file(path)).pixels[None]
    from keras.applications.resnet50 import preprocess_input

    direct = backbone(preprocess_input(pixels.astype(np.float32)), training=False).numpy()[0]
    np.testing.assert_allclose(extractor.embed(pixels)[0], direct, atol=1e-5)


def test_new_collection_has_every_image_and_is_searchable_with_both_engines(tuned, db, settings):
    coll = collection_row(db, "ftshapes-ft")
    source = collection_row(db, "ftshapes")
    with db.engine.connect() as conn:
        count = lambda c: conn.execute(sa.text("SELECT count(*) FROM images WHERE collection_id = :c"), {"c": c}).scalar()
        assert count(coll.id) == count(source.id) == 18
        image_id = conn.execute(sa.text("SELECT min(id) FROM images WHERE collection_id = :c"), {"c": coll.id}).scalar()
    assert coll.pca_dims == 4 and coll.pca is not None
    tuned_collection = Collection.named(db, settings, "ftshapes-ft")
    for engine in ("pgvector", "annoy"):
        hits = tuned_collection.similar(tuned_collection.query(image_id=image_id), 3, engine=engine)
        assert hits[0].id == image_id and hits[0].distance == pytest.approx(0, abs=1e-5)


def test_holdout_images_never_reach_training(tuned, db, settings):
    coll = Collection.named(db, settings, "ftshapes")
    with db.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT image_id, split FROM finetune_splits WHERE run = 'ftshapes-ft'")).all()
    recorded = {s: {r.image_id for r in rows if r.split == s} for s in ("train", "holdout")}
    assert recorded["train"] == set(tuned.train_ids) and recorded["holdout"] == set(tuned.holdout_ids)
    assert not recorded["train"] & recorded["holdout"]
    # The split is stratified: every label in both parts.
    train, held, labels = split_images(db, coll, "ftshapes-ft", 0.3, 0)
    assert {i.label for i in train} == {i.label for i in held} == set(labels)
    # What the training dataset yields are exactly the train pictures' pixels.
    digest = lambda px: hashlib.sha256(np.asarray(px, np.float32).tobytes()).hexdigest()
    fed = [digest(px) for batch, _ in dataset(train, labels, 4, shuffle=True, seed=0) for px in batch.numpy()]
    expected = {digest(decode_image(read_file(i.path)).pixels.astype(np.float32)) for i in train}
    held_digests = {digest(decode_image(read_file(i.path)).pixels.astype(np.float32)) for i in held}
    assert len(fed) == len(train) and set(fed) == expected and not set(fed) & held_digests


def test_interrupted_run_resumes_from_last_completed_epoch(tmp_path, db, settings, extractor):
    import keras

    load(db, settings, extractor, tmp_path, "ftresume", labels=("red", "blue"), per_label=5)

    class StopAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(db, settings, "ftresume", callbacks=[StopAfterFirstEpoch()], **FAST)
    state = json.loads((settings.models_dir / "ftresume-ft.ckpt" / "state.json").read_text())
    assert state["epoch"] == 1 and not state["done"]
    summary = finetune(db, settings, "ftresume", **FAST)
    assert (summary.initial_epoch, summary.epochs_run) == (1, 1)
    assert [h["epoch"] for h in summary.history] == [0, 1]
    # A finished run, run again, trains nothing and keeps its collection.
    again = finetune(db, settings, "ftresume", **FAST)
    assert again.epochs_run == 0 and again.weights_path == summary.weights_path


def test_refuses_other_weights(tmp_path, db, settings, extractor):
    load(db, settings, extractor, tmp_path, "ftweights", labels=("red", "blue"), per_label=4)
    coll = Collection.named(db, settings, "ftweights")
    other = Collection(db, settings, dataclasses.replace(coll.row, weights_fingerprint="0" * 64))
    with pytest.raises(WeightsError, match="differ"):
        build_models(other, 2, augment=True, seed=0)


@pytest.mark.parametrize(
    "labels, per_label, options, error",
    [
        (("red",), 4, {}, "at least 2 labels"),
        (("red", "green", "blue", "yellow"), 1, {}, "fewer than 2 pictures"),
        (("red", "blue"), 4, {"holdout": 1.5}, "--holdout must be between"),
        (("red", "blue"), 4, {"unfreeze": "conv4"}, "--unfreeze must be one of"),
    ],
)
def test_errors(tmp_path, db, settings, extractor, labels, per_label, options, error):
    name = f"fterr{abs(hash((labels, per_label, tuple(options)))) % 10**6}"
    load(db, settings, extractor, tmp_path, name, labels=labels, per_label=per_label)
    with pytest.raises(CollectionError, match=error):
        finetune(db, settings, name, **{**FAST, **options})


@pytest.mark.parametrize(
    "args, error",
    [
        (["--collection", "no-such-collection"], "no collection named 'no-such-collection'"),
        (["--collection", "x", "--holdout", "1"], "Invalid value for '--holdout'"),
        (["--collection", "x", "--unfreeze", "conv4"], "Invalid value for '--unfreeze'"),
    ],
)
def test_cli_errors(args, error):
    result = CliRunner().invoke(ingest_cli, ["finetune", *args])
    assert result.exit_code in (1, 2) and error in result.output and "Traceback" not in result.output


def test_report_compares_holdout_precision_of_base_and_tuned(tuned, db, settings, tmp_path):
    from ingest.store import read_vectors
    from search.evaluation import brute_force
    from search.report import build_report

    summary = build_report(db, settings, "ftshapes", tmp_path / "report", k=2, progress=False,
                           compare_with="ftshapes-ft")
    c = summary.comparison
    assert (c["base"], c["tuned"], c["holdout_images"]) == ("ftshapes", "ftshapes-ft", 6)
    with db.engine.connect() as conn:
        holdout = set(conn.execute(sa.text(
            "SELECT i.sha256 FROM finetune_splits s JOIN images i ON i.collection_id = s.collection_id AND i.sha256 = s.sha256 "
            "WHERE s.run = 'ftshapes-ft' AND s.split = 'holdout'")).scalars())
    for name, key in (("ftshapes", "base_precision"), ("ftshapes-ft", "tuned_precision")):
        coll = collection_row(db, name)
        ids, vectors = read_vectors(db, coll.id, "embedding")
        with db.engine.connect() as conn:
            meta = {r.id: (r.sha256, r.label) for r in conn.execute(
                sa.text("SELECT id, sha256, label FROM images WHERE collection_id = :c"), {"c": coll.id})}
        scores = []
        for row, i in enumerate(ids.tolist()):
            if meta[i][0] in holdout:
                others = ids != i
                found = brute_force(ids[others], vectors[others], vectors[row], 2)[0]
                scores.append(sum(meta[j][1] == meta[i][1] for j in found.tolist()) / 2)
        assert c[key] == pytest.approx(np.mean(scores))
    assert "hold-out precision@2" in (tmp_path / "report" / "index.html").read_text()
