"""Fine-tuning: teach a collection's ResNet50 its labels, then re-embed the pictures into a new collection.

The backbone starts from the collection's own weights (checked by fingerprint). A small head
(pooled features -> Dropout -> Dense softmax) is trained first with the backbone frozen; with
`unfreeze='conv5'` the last ResNet block is then trained too, at a tenth of the learning rate.
BatchNorm layers stay in inference mode throughout. Images are split once per run into train and
hold-out (stratified, seeded, recorded in finetune_splits), so the hold-out loss that early stopping
watches never comes from a training image. After every epoch a checkpoint is written under
$RIS_HOME/models/<into>.ckpt/, and a rerun of the same command resumes from it.

The tuned backbone is saved as $RIS_HOME/models/<into>.weights.h5, an ordinary ResNet50 weights file:
the new collection records its path, so queries against it are embedded with the tuned weights.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from ingest.annoy_index import write_atomically
from ingest.config import Settings
from ingest.db import Database
from ingest.errors import CollectionError, WeightsError
from ingest.images import decode_image, read_file
from ingest.load import load_collection
from ingest.sources import Candidate
from ingest.store import CollectionInfo, get_collection

UNFREEZE_CHOICES = ("conv5",)
DROPOUT = 0.2
PATIENCE = 3  # epochs without a lower hold-out loss before early stopping
SPLITS = ("train", "holdout")


@dataclass
class FinetuneSummary:
    """What a fine-tuning run did. `history` holds every epoch's logs, including those of earlier (resumed) runs."""

    collection: str
    into: str
    weights_path: str
    initial_epoch: int  # the first epoch this call trained (0 unless it resumed)
    epochs_run: int  # epochs trained by this call
    train_size: int
    holdout_size: int
    initial_loss: float  # the untrained head on the train split (no augmentation, no dropout)
    loss: float  # the final model on the train split, measured the same way
    accuracy: float
    holdout_loss: float
    holdout_accuracy: float
    images_per_second: float  # training throughput of this call (train images x epochs / seconds)
    history: list[dict] = field(default_factory=list)
    train_ids: list[int] = field(default_factory=list)
    holdout_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class LabelledImage:
    id: int
    path: str
    label: str


def finetune(
    db: Database,
    settings: Settings,
    collection: str,
    into: str | None = None,
    epochs: int = 10,
    unfreeze: str | None = None,
    augment: bool = True,
    holdout: float = 0.2,
    seed: int = 0,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    progress: bool = True,
    callbacks: list | None = None,
) -> FinetuneSummary:
    """Fine-tune the backbone of `collection` on its labels and re-embed its pictures into collection `into`.

    `callbacks` are extra Keras callbacks for every fit (tests use one to interrupt a run).
    """
    check_options(epochs, unfreeze, holdout, batch_size, learning_rate)
    coll = get_collection(db.engine, collection)
    into = into or f"{coll.name}-ft"
    if into == coll.name:
        raise CollectionError(f"--into must name a new collection, not the source {coll.name!r}")
    train, held, labels = split_images(db, coll, into, holdout, seed)

    models_dir = settings.models_dir
    models_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = Checkpoint(models_dir / f"{into}.ckpt")
    config = {"collection": coll.name, "weights_fingerprint": coll.weights_fingerprint, "labels": labels,
              "unfreeze": unfreeze, "augment": augment, "seed": seed, "batch_size": batch_size, "learning_rate": learning_rate}
    state = checkpoint.read(config)

    keras = seed_everything(seed)
    backbone, model = build_models(coll, len(labels), augment, seed)
    if state["epoch"] or state["done"]:
        model.load_weights(checkpoint.weights)
    train_ds = dataset(train, labels, batch_size, shuffle=True, seed=seed)
    train_eval_ds = dataset(train, labels, batch_size, shuffle=False, seed=seed)
    held_ds = dataset(held, labels, batch_size, shuffle=False, seed=seed)
    if state.get("initial_loss") is None:  # the untrained head's loss on the train split, to judge training by
        compile_model(keras, model, learning_rate)
        state["initial_loss"] = float(model.evaluate(train_eval_ds, verbose=0)[0])

    initial_epoch = state["epoch"]
    started = time.perf_counter()
    extra = list(callbacks or [])
    if not state["phase1_done"]:
        set_trainable(backbone, None)
        compile_model(keras, model, learning_rate)
        fit(keras, model, train_ds, held_ds, epochs, state, checkpoint, extra, progress)
        state["phase1_done"] = True
        checkpoint.save(model, state)
    if unfreeze and not state["done"]:
        if state["phase2_start"] is None:
            state["phase2_start"] = state["epoch"]
        set_trainable(backbone, unfreeze)
        compile_model(keras, model, learning_rate / 10)
        fit(keras, model, train_ds, held_ds, state["phase2_start"] + epochs, state, checkpoint, extra, progress)
    state["done"] = True
    checkpoint.save(model, state)
    seconds = time.perf_counter() - started
    epochs_run = state["epoch"] - initial_epoch

    weights_path = save_backbone(backbone, models_dir / f"{into}.weights.h5")
    compile_model(keras, model, learning_rate)  # evaluation needs a compiled model whatever phase ran last
    loss, accuracy = model.evaluate(train_eval_ds, verbose=0)
    holdout_loss, holdout_accuracy = model.evaluate(held_ds, verbose=0)
    reembed(db, settings, coll, into, weights_path, backbone, progress)
    return FinetuneSummary(
        coll.name, into, str(weights_path), initial_epoch, epochs_run, len(train), len(held),
        state["initial_loss"], float(loss), float(accuracy), float(holdout_loss), float(holdout_accuracy),
        len(train) * epochs_run / seconds if epochs_run else 0.0,
        state["history"], [i.id for i in train], [i.id for i in held],
    )


def check_options(epochs: int, unfreeze: str | None, holdout: float, batch_size: int, learning_rate: float) -> None:
    if epochs < 1:
        raise CollectionError(f"epochs must be at least 1, got {epochs}")
    if unfreeze is not None and unfreeze not in UNFREEZE_CHOICES:
        raise CollectionError(f"--unfreeze must be one of {', '.join(UNFREEZE_CHOICES)}, got {unfreeze!r}")
    if not 0 < holdout < 1:
        raise CollectionError(f"--holdout must be between 0 and 1, got {holdout}")
    if batch_size < 1 or learning_rate <= 0:
        raise CollectionError("--batch-size and --learning-rate must be positive")


def split_images(db: Database, coll: CollectionInfo, run: str, holdout: float, seed: int):
    """(train, holdout, labels) of run `run`: training only ever sees `train`."""
    images = labelled_images(db, coll)
    split = ensure_split(db, coll, run, images, holdout, seed)
    train = [i for i in images if split.get(i.id) == "train"]
    held = [i for i in images if split.get(i.id) == "holdout"]
    if not train or not held:
        raise CollectionError(f"the recorded split of run {run!r} has no train or no hold-out images; delete its rows in finetune_splits")
    check_files(train + held)
    return train, held, sorted({i.label for i in train + held})


def labelled_images(db: Database, coll: CollectionInfo) -> list[LabelledImage]:
    """The collection's pictures that have a label, in id order; fine-tuning needs at least two labels."""
    with db.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT id, path, label FROM images WHERE collection_id = :c AND label IS NOT NULL ORDER BY id"),
            {"c": coll.id},
        ).all()
    images = [LabelledImage(r.id, r.path, r.label) for r in rows]
    if len({i.label for i in images}) < 2:
        raise CollectionError(f"collection {coll.name!r} needs pictures of at least 2 labels to fine-tune on")
    return images


def ensure_split(db: Database, coll: CollectionInfo, run: str, images: list[LabelledImage], holdout: float, seed: int) -> dict[int, str]:
    """image id -> 'train'|'holdout' for run `run`: the recorded split, or a new stratified one, recorded now."""
    with db.engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7474203, hashtext(:r))"), {"r": run})
        rows = conn.execute(sa.text("SELECT image_id, split FROM finetune_splits WHERE run = :r"), {"r": run}).all()
        if rows:
            return {r.image_id: r.split for r in rows}
        split = stratified_split(coll, images, holdout, seed)
        conn.execute(
            sa.text("INSERT INTO finetune_splits (run, image_id, collection_id, split) VALUES (:r, :i, :c, :s)"),
            [{"r": run, "i": i, "c": coll.id, "s": s} for i, s in split.items()],
        )
    return split


def stratified_split(coll: CollectionInfo, images: list[LabelledImage], holdout: float, seed: int) -> dict[int, str]:
    """A seeded split keeping each label's share in both parts; refused when a label is too small to split."""
    from sklearn.model_selection import train_test_split

    counts: dict[str, int] = {}
    for i in images:
        counts[i.label] = counts.get(i.label, 0) + 1
    small = sorted(label for label, n in counts.items() if n < 2)
    if small:
        raise CollectionError(f"collection {coll.name!r}: labels with fewer than 2 pictures cannot be split: {', '.join(small[:5])}")
    try:
        train, held = train_test_split(
            [i.id for i in images], test_size=holdout, stratify=[i.label for i in images], random_state=seed
        )
    except ValueError as e:  # e.g. fewer hold-out pictures than labels
        raise CollectionError(f"collection {coll.name!r} cannot be split with --holdout {holdout}: {e}") from None
    return {int(i): "train" for i in train} | {int(i): "holdout" for i in held}


def check_files(images: list[LabelledImage]) -> None:
    """Fail before training, not in the middle of an epoch, when stored pictures have gone."""
    missing = [i.path for i in images if not Path(i.path).is_file()]
    if missing:
        raise CollectionError(f"{len(missing)} stored picture(s) are missing, e.g. {missing[0]}")


def seed_everything(seed: int):
    from ingest.features import quiet_tensorflow

    quiet_tensorflow()
    import keras

    keras.utils.set_random_seed(seed)
    return keras


def build_models(coll: CollectionInfo, n_labels: int, augment: bool, seed: int):
    """(backbone, classifier): the collection's ResNet50, checked by fingerprint, under a new softmax head.

    The classifier takes 224x224 RGB pixels (0..255, as ingest.images decodes them); augmentation
    layers act only while training, and the backbone is always called with training=False so its
    BatchNorm statistics stay as they are.
    """
    import keras
    from keras.applications.resnet50 import preprocess_input

    from ingest.features import build_resnet50, fingerprint

    backbone = build_resnet50(coll.weights)
    if fingerprint(backbone) != coll.weights_fingerprint:
        raise WeightsError(
            f"the weights {coll.weights} differ from those collection {coll.name!r} was built with; restore them to fine-tune"
        )
    keras.utils.set_random_seed(seed)  # build_resnet50('random') reseeds with its own seed
    inputs = keras.Input((224, 224, 3), name="pixels")
    x = augmentation(keras, seed)(inputs) if augment else inputs
    x = keras.layers.Lambda(preprocess_input, name="preprocess")(x)
    x = backbone(x, training=False)
    x = keras.layers.Dropout(DROPOUT, seed=seed)(x)
    outputs = keras.layers.Dense(n_labels, activation="softmax", name="labels")(x)
    return backbone, keras.Model(inputs, outputs, name="finetune")


def augmentation(keras, seed: int):
    """Random flips, turns, zooms, shifts and contrast: active in training only."""
    layers = keras.layers
    return keras.Sequential(
        [
            layers.RandomFlip("horizontal", seed=seed),
            layers.RandomRotation(0.05, seed=seed),
            layers.RandomZoom(0.1, seed=seed),
            layers.RandomTranslation(0.1, 0.1, seed=seed),
            layers.RandomContrast(0.2, value_range=(0, 255), seed=seed),
        ],
        name="augment",
    )


def set_trainable(backbone, unfreeze: str | None) -> None:
    """Freeze the backbone, or let the layers whose names start with `unfreeze` learn (BatchNorm stays frozen)."""
    import keras

    backbone.trainable = unfreeze is not None
    if unfreeze is None:
        return
    for layer in backbone.layers:
        layer.trainable = layer.name.startswith(unfreeze) and not isinstance(layer, keras.layers.BatchNormalization)


def compile_model(keras, model, learning_rate: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def dataset(images: list[LabelledImage], labels: list[str], batch_size: int, shuffle: bool, seed: int):
    """(pixels float32 0..255, label index) batches, decoded by ingest.images so pixels match what ingest embedded."""
    import tensorflow as tf

    index = {label: n for n, label in enumerate(labels)}
    paths = np.array([i.path for i in images])
    targets = np.array([index[i.label] for i in images], np.int32)

    def decode(path):
        return decode_image(read_file(Path(path.decode()))).pixels.astype(np.float32)

    def load(path, target):
        pixels = tf.numpy_function(decode, [path], tf.float32, stateful=False)
        pixels.set_shape((224, 224, 3))
        return pixels, target

    ds = tf.data.Dataset.from_tensor_slices((paths, targets))
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch_size).prefetch(2)


def fit(keras, model, train_ds, held_ds, until: int, state: dict, checkpoint: "Checkpoint", extra: list, progress: bool) -> None:
    """Train from the checkpoint's epoch up to epoch `until`, stopping early on hold-out loss."""
    if state["epoch"] >= until:
        return
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=PATIENCE, restore_best_weights=True)
    model.fit(
        train_ds,
        validation_data=held_ds,
        epochs=until,
        initial_epoch=state["epoch"],
        shuffle=False,  # the dataset shuffles itself, seeded
        callbacks=[stopper, SaveEpoch(keras, checkpoint, state), *extra],
        verbose=1 if progress else 0,
    )


def SaveEpoch(keras, checkpoint: "Checkpoint", state: dict):
    """A callback that writes the checkpoint at the end of every epoch."""

    class _SaveEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            state["epoch"] = epoch + 1
            seconds = time.perf_counter() - self.started  # training and the hold-out evaluation of this epoch
            state["history"].append({"epoch": epoch, **{k: float(v) for k, v in (logs or {}).items()}, "seconds": seconds})
            checkpoint.save(self.model, state)

    return _SaveEpoch()


class Checkpoint:
    """<into>.ckpt/: the classifier's weights and state.json (epochs done, phase, history, options)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.weights = directory / "model.weights.h5"
        self.state = directory / "state.json"

    def read(self, config: dict) -> dict:
        """The saved state, or a fresh one; a checkpoint made with other options is refused, not mixed in."""
        fresh = {"config": config, "initial_loss": None, "epoch": 0, "phase1_done": False, "phase2_start": None, "done": False, "history": []}
        if not self.state.is_file() or not self.weights.is_file():
            return fresh
        state = json.loads(self.state.read_text())
        if state.get("config") != config:
            raise CollectionError(
                f"the checkpoint in {self.directory} was made with other options; rerun with those, "
                f"or delete that directory (or pick another --into) to start over"
            )
        return state

    def save(self, model, state: dict) -> None:
        """Weights then state, each written under a temporary name and renamed, so a crash leaves the last good pair."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / "model.tmp.weights.h5"
        model.save_weights(tmp)
        os.replace(tmp, self.weights)
        write_atomically(self.state, json.dumps(state, indent=1))


def save_backbone(backbone, path: Path) -> Path:
    """The tuned ResNet50 (no top, average pooling) as a weights file, renamed into place when complete."""
    tmp = path.with_name(f".{path.name.removesuffix('.weights.h5')}.tmp.weights.h5")
    backbone.save_weights(tmp)
    os.replace(tmp, path)
    return path


def reembed(db: Database, settings: Settings, coll: CollectionInfo, into: str, weights_path: Path, backbone, progress: bool) -> None:
    """Embed every picture of the source collection with the tuned weights into collection `into` (own PCA and Annoy file)."""
    from ingest.features import FeatureExtractor, fingerprint

    extractor = FeatureExtractor(str(weights_path))
    if extractor.fingerprint != fingerprint(backbone):
        raise WeightsError(f"{weights_path} does not load back as the tuned backbone")
    with db.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT path, label FROM images WHERE collection_id = :c ORDER BY id"), {"c": coll.id}
        ).all()
    candidates = [Candidate(Path(r.path), r.label) for r in rows]
    load_collection(
        db, settings.annoy_dir, into, candidates, extractor, pca_dims=min(coll.pca_dims, len(candidates)), progress=progress
    )

