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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ingest import store
from ingest.atomic import replacing, write_atomically
from ingest.collection import Collection
from ingest.config import Settings
from ingest.db import Database
from ingest.errors import CollectionError, WeightsError
from ingest.features import INPUT_SHAPE
from ingest.images import decode_image, read_file
from ingest.load import load_collection
from ingest.names import check_name
from ingest.precision import choose
from ingest.sources import Candidate
from ingest.splits import LabelledImage, split_images

UNFREEZE_CHOICES = ("conv5",)
DROPOUT = 0.2
PATIENCE = 3  # epochs without a lower hold-out loss before early stopping


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


@dataclass
class TrainingState:
    """What a checkpoint records besides the weights: the options it was made with and how far it got."""

    config: dict
    initial_loss: float | None = None  # the untrained head's loss on the train split, to judge training by
    epoch: int = 0  # epochs completed, over both phases
    phase1_done: bool = False
    phase2_start: int | None = None  # the epoch phase 2 began at
    done: bool = False
    history: list[dict] = field(default_factory=list)


def finetune(
    db: Database,
    settings: Settings,
    collection: str,
    *,
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
    precision: str = "auto",
) -> FinetuneSummary:
    """Fine-tune the backbone of `collection` on its labels and re-embed its pictures into collection `into`.

    Training runs at fp32; `precision` is that of the re-embedding ('auto': the source collection's).
    `callbacks` are extra Keras callbacks for every fit (tests use one to interrupt a run).
    """
    check_options(epochs, unfreeze, holdout, batch_size, learning_rate)
    coll = Collection.named(db, settings, collection)
    precision = choose(precision, coll.precision)
    into = check_name(into or f"{coll.name}-ft")  # it names files under models_dir too
    if into == coll.name:
        raise CollectionError(f"--into must name a new collection, not the source {coll.name!r}")
    train, held, labels = split_images(db, coll, into, holdout, seed)

    models_dir = settings.models_dir
    checkpoint = Checkpoint(models_dir / f"{into}.ckpt")
    state = checkpoint.read({"collection": coll.name, "weights_fingerprint": coll.row.weights_fingerprint, "labels": labels,
                             "unfreeze": unfreeze, "augment": augment, "seed": seed, "batch_size": batch_size,
                             "learning_rate": learning_rate})

    keras = seed_everything(seed)
    backbone, model = build_models(coll, len(labels), augment=augment, seed=seed)
    if state.epoch or state.done:
        model.load_weights(checkpoint.weights)
    train_ds = dataset(train, labels, batch_size, shuffle=True, seed=seed)
    train_eval_ds = dataset(train, labels, batch_size, shuffle=False, seed=seed)
    held_ds = dataset(held, labels, batch_size, shuffle=False, seed=seed)
    if state.initial_loss is None:
        compile_model(keras, model, learning_rate)
        state.initial_loss = float(model.evaluate(train_eval_ds, verbose=0)[0])

    initial_epoch = state.epoch
    started = time.perf_counter()
    training = Training(keras, model, train_ds, held_ds, state, checkpoint, list(callbacks or []), progress)
    if not state.phase1_done:
        set_trainable(backbone, None)
        compile_model(keras, model, learning_rate)
        training.fit(until=epochs)
        state.phase1_done = True
        checkpoint.save(model, state)
    if unfreeze and not state.done:
        if state.phase2_start is None:
            state.phase2_start = state.epoch
        set_trainable(backbone, unfreeze)
        compile_model(keras, model, learning_rate / 10)
        training.fit(until=state.phase2_start + epochs)
    state.done = True
    checkpoint.save(model, state)
    seconds = time.perf_counter() - started
    epochs_run = state.epoch - initial_epoch

    weights_path = save_backbone(backbone, models_dir / f"{into}.weights.h5")
    compile_model(keras, model, learning_rate)  # evaluation needs a compiled model whatever phase ran last
    loss, accuracy = model.evaluate(train_eval_ds, verbose=0)
    holdout_loss, holdout_accuracy = model.evaluate(held_ds, verbose=0)
    reembed(db, settings, coll, into=into, weights_path=weights_path, backbone=backbone, precision=precision, progress=progress)
    return FinetuneSummary(
        collection=coll.name, into=into, weights_path=str(weights_path), initial_epoch=initial_epoch, epochs_run=epochs_run,
        train_size=len(train), holdout_size=len(held), initial_loss=state.initial_loss, loss=float(loss), accuracy=float(accuracy),
        holdout_loss=float(holdout_loss), holdout_accuracy=float(holdout_accuracy),
        images_per_second=len(train) * epochs_run / seconds if epochs_run else 0.0,
        history=state.history, train_ids=[i.id for i in train], holdout_ids=[i.id for i in held],
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


def seed_everything(seed: int):
    from ingest.features import quiet_tensorflow

    quiet_tensorflow()
    import keras

    keras.utils.set_random_seed(seed)
    return keras


def build_models(coll: Collection, n_labels: int, *, augment: bool, seed: int):
    """(backbone, classifier): the collection's ResNet50, checked by fingerprint, under a new softmax head.

    The classifier takes 224x224 RGB pixels (0..255, as ingest.images decodes them); augmentation
    layers act only while training, and the backbone is always called with training=False so its
    BatchNorm statistics stay as they are.
    """
    import keras

    from ingest.features import build_resnet50, check_weights, fingerprint, preprocess

    backbone = build_resnet50(coll.weights)
    check_weights(fingerprint(backbone), coll.weights, collection=coll.name, recorded_weights=coll.weights,
                  recorded_fingerprint=coll.row.weights_fingerprint, remedy="restore them to fine-tune")
    keras.utils.set_random_seed(seed)  # build_resnet50('random') reseeds with its own seed
    inputs = keras.Input(INPUT_SHAPE, name="pixels")
    x = augmentation(keras, seed)(inputs) if augment else inputs
    x = keras.layers.Lambda(preprocess, name="preprocess")(x)
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
        pixels.set_shape(INPUT_SHAPE)
        return pixels, target

    ds = tf.data.Dataset.from_tensor_slices((paths, targets))
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch_size).prefetch(2)


class Training:
    """One model's training across both phases: fits from the checkpoint's epoch and checkpoints every epoch."""

    def __init__(self, keras, model, train_ds, held_ds, state: TrainingState, checkpoint: "Checkpoint", extra: list, progress: bool):
        self.keras, self.model, self.train_ds, self.held_ds = keras, model, train_ds, held_ds
        self.state, self.checkpoint, self.extra, self.progress = state, checkpoint, extra, progress

    def fit(self, *, until: int) -> None:
        """Train from the checkpoint's epoch up to epoch `until`, stopping early on hold-out loss."""
        if self.state.epoch >= until:
            return
        stopper = self.keras.callbacks.EarlyStopping(monitor="val_loss", patience=PATIENCE, restore_best_weights=True)
        self.model.fit(
            self.train_ds,
            validation_data=self.held_ds,
            epochs=until,
            initial_epoch=self.state.epoch,
            shuffle=False,  # the dataset shuffles itself, seeded
            callbacks=[stopper, self.save_epoch_callback(), *self.extra],
            verbose=1 if self.progress else 0,
        )

    def save_epoch_callback(self):
        """A callback that records the epoch in the state and writes the checkpoint at the end of every epoch."""
        state, checkpoint = self.state, self.checkpoint

        class SaveEpoch(self.keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.started = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                state.epoch = epoch + 1
                seconds = time.perf_counter() - self.started  # training and the hold-out evaluation of this epoch
                state.history.append({"epoch": epoch, **{k: float(v) for k, v in (logs or {}).items()}, "seconds": seconds})
                checkpoint.save(self.model, state)

        return SaveEpoch()


class Checkpoint:
    """<into>.ckpt/: the classifier's weights and state.json (a TrainingState)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.weights = directory / "model.weights.h5"
        self.state = directory / "state.json"

    def read(self, config: dict) -> TrainingState:
        """The saved state, or a fresh one; a checkpoint made with other options is refused, not mixed in."""
        if not self.state.is_file() or not self.weights.is_file():
            return TrainingState(config)
        state = TrainingState(**json.loads(self.state.read_text()))
        if state.config != config:
            raise CollectionError(
                f"the checkpoint in {self.directory} was made with other options; rerun with those, "
                f"or delete that directory (or pick another --into) to start over"
            )
        return state

    def save(self, model, state: TrainingState) -> None:
        """Weights then state, each written under a temporary name and renamed, so a crash leaves the last good pair."""
        with replacing(self.weights, suffix=".weights.h5") as tmp:  # Keras insists on the ending
            model.save_weights(tmp)
        write_atomically(self.state, json.dumps(asdict(state), indent=1))


def save_backbone(backbone, path: Path) -> Path:
    """The tuned ResNet50 (no top, average pooling) as a weights file, renamed into place when complete."""
    with replacing(path, suffix=".weights.h5") as tmp:
        backbone.save_weights(tmp)
    return path


def reembed(db: Database, settings: Settings, coll: Collection, *, into: str, weights_path: Path, backbone, precision: str,
            progress: bool) -> None:
    """Embed every picture of the source collection with the tuned weights into collection `into` (own PCA and Annoy file),
    on the settings' runtime (OpenVINO converts the saved weights on a processor).

    A new extractor, not the process's cached one: a rerun writes the same path with other weights."""
    from ingest.features import build_extractor, fingerprint
    from ingest.precision import choose_runtime

    runtime = choose_runtime(settings.runtime, precision)
    extractor = build_extractor(str(weights_path), precision, runtime, models_dir=settings.models_dir)
    if extractor.fingerprint != fingerprint(backbone):
        raise WeightsError(f"{weights_path} does not load back as the tuned backbone")
    candidates = [Candidate(Path(path), label) for path, label in store.image_files(db, coll.id)]
    load_collection(db, settings, into, candidates, extractor, pca_dims=min(coll.dims, len(candidates)), progress=progress,
                    raw_features=coll.row.raw_features)  # the source's choice: no raw features kept stays so
