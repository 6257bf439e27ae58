"""ResNet50 features: the pooled 2048-float vector of a 224x224 image, and the extractors that compute it.

The Keras model is the definition: `FeatureExtractor` runs it batched inside one compiled TensorFlow function,
preprocessing part of that graph (the `tensorflow` runtime: NVIDIA GPUs, fine-tuning); OpenVINO runs the same
function converted once (ingest/inference.py, the `openvino` runtime: every processor). One extractor per weights,
precision and runtime serves ingest and queries alike (`extractor_for`), so a query becomes a vector exactly as
stored images did. TensorFlow is imported only when a Keras model is built.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from ingest.errors import RisError, WeightsError, first_line
from ingest.images import INPUT_SIZE

MODEL_NAME = "ResNet50"
RAW_DIMS = 2048
RANDOM_SEED = 0
INPUT_SHAPE = (INPUT_SIZE, INPUT_SIZE, 3)  # what ingest.images decodes every picture to
WEIGHTS_HELP = "pass --weights random (offline, seeded) or --weights PATH to a local ResNet50 weights file"


def parse_weights(value: str) -> str:
    """Normalise a --weights value into what a collection records: 'imagenet', 'random' or an absolute file path."""
    if value in ("imagenet", "random"):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights must be imagenet, random or a file; no such file: {value}")
    return str(path.resolve())


def quiet_tensorflow():
    """Import TensorFlow without its start-up chatter: its C++ side writes to fd 2 before any log level applies.
    Devices are listed here too, because the full `tensorflow` wheel tries CUDA then and logs an error on any
    machine with the CUDA libraries but no GPU driver. A missing or broken TensorFlow is one line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow as tf

            tf.config.list_physical_devices()
    except Exception as e:  # ImportError, or a wheel that does not match the machine
        sys.modules.pop("tensorflow", None)
        raise RisError(f"TensorFlow cannot be loaded ({first_line(str(e)) or type(e).__name__}); it builds the model the "
                       f"first time its weights are used: reinstall it (pip install tensorflow)") from None
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    tf.get_logger().setLevel("ERROR")
    return tf


def build_resnet50(weights: str):
    """ResNet50 without its classifier, global average pooling: the 2048-d features of the reference project."""
    quiet_tensorflow()
    import keras

    if weights == "random":
        keras.utils.set_random_seed(RANDOM_SEED)
        return keras.applications.ResNet50(include_top=False, pooling="avg", weights=None)
    try:
        return keras.applications.ResNet50(include_top=False, pooling="avg", weights=weights)
    except Exception as e:  # keras raises plain Exception/ValueError/OSError for download and file problems
        what = "download the ImageNet weights" if weights == "imagenet" else f"load weights from {weights}"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"cannot {what} ({reason}); {WEIGHTS_HELP}") from None


def at_precision(model, precision: str):
    """The model itself for fp32; for bf16 a twin whose layers compute in bfloat16 (Keras `mixed_bfloat16`:
    weights stay float32, so the fingerprint is the same) holding the same weights. A per-model policy, not
    the global one, so fp32 and bf16 models live side by side in one process."""
    if precision == "fp32":
        return model
    import keras

    def bf16_layer(layer):
        return layer.__class__.from_config({**layer.get_config(), "dtype": keras.DTypePolicy("mixed_bfloat16")})

    twin = keras.models.clone_model(model, clone_function=bf16_layer)
    twin.set_weights(model.get_weights())
    return twin


def preprocess(pixels):
    """uint8 or float RGB pixels (0..255) -> what ResNet50 was trained on; the one copy ingest, queries and fine-tuning use."""
    import tensorflow as tf
    from keras.applications.resnet50 import preprocess_input

    return preprocess_input(tf.cast(pixels, tf.float32))


def fingerprint(model) -> str:
    """sha256 over every weight tensor: two extractors agree on vectors exactly when this agrees."""
    digest = hashlib.sha256()
    for w in model.weights:
        digest.update(np.ascontiguousarray(w.numpy()).tobytes())
    return digest.hexdigest()


class FeatureExtractor:
    """A loaded ResNet50 and its compiled TensorFlow forward pass at one precision ('fp32' or 'bf16'; see
    ingest/precision.py). Features are float32 either way. Build once per process; it costs seconds.
    `forward` (uint8 pixels in, features out, preprocessing inside) is also what OpenVINO converts."""

    runtime = "tensorflow"

    def __init__(self, weights: str = "imagenet", precision: str = "fp32"):
        tf = quiet_tensorflow()

        if precision not in ("fp32", "bf16"):
            raise WeightsError(f"an extractor runs at fp32 or bf16, not {precision!r}")
        self.weights = parse_weights(weights)
        self.precision = precision
        self.model = at_precision(build_resnet50(self.weights), precision)
        self.fingerprint = fingerprint(self.model)
        model = self.model

        @tf.function(input_signature=[tf.TensorSpec([None, *INPUT_SHAPE], tf.uint8)], reduce_retracing=True)
        def forward(pixels):
            return tf.cast(model(preprocess(pixels), training=False), tf.float32)

        self.forward = forward

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 224, 224, 3) uint8 RGB -> (n, 2048) float32, in one compiled call."""
        if len(pixels) == 0:
            return np.zeros((0, RAW_DIMS), np.float32)
        return self.forward(np.ascontiguousarray(pixels, dtype=np.uint8)).numpy().astype(np.float32, copy=False)


class Extractor(Protocol):
    """What every extractor offers (FeatureExtractor, ingest.inference.OpenVinoExtractor, a test's stand-in)."""

    weights: str
    precision: str
    runtime: str
    fingerprint: str

    def embed(self, pixels: np.ndarray) -> np.ndarray: ...


# (weights, precision) -> runtime -> the process's extractor
_extractors: dict[tuple[str, str], dict[str, Extractor]] = {}


def register_extractor(extractor: Extractor, runtimes: tuple[str, ...] | None = None) -> Callable[[], None]:
    """Make `extractor` the process's one for its weights and precision on its runtime (or on each of `runtimes`: a
    test's stand-in answers for any); `extractor_for` finds it, and registers what it builds here. Returns what
    undoes it (whatever it replaced comes back)."""
    registered = _extractors.setdefault((extractor.weights, extractor.precision), {})
    keys = runtimes or (extractor.runtime,)
    replaced = {runtime: registered.get(runtime) for runtime in keys}
    registered.update(dict.fromkeys(keys, extractor))

    def undo() -> None:
        for runtime, before in replaced.items():
            if registered.get(runtime) is extractor:
                registered.pop(runtime)
                if before is not None:
                    registered[runtime] = before

    return undo


def extractor_for(weights: str, precision: str = "fp32", runtime: str = "auto", *, models_dir: Path | None = None,
                  threads: int | None = None, latency: bool = False) -> Extractor:
    """The process's one extractor for these weights at this precision ('fp32' or 'bf16'; ingest.precision.choose
    decides 'auto') on this runtime (ingest.precision.choose_runtime decides 'auto'). Built once: it costs a second
    (OpenVINO, from its cached IR in `models_dir`, default $RIS_HOME/models) or several (TensorFlow, or OpenVINO
    the first time). `threads` caps OpenVINO's inference threads (a Ray actor's CPUs); `latency` compiles it for one
    picture at a time (queries) rather than for batches (loads): the first build in a process decides both."""
    from ingest.precision import choose_runtime

    found = _extractors.get((weights, precision))
    if not found:
        weights = parse_weights(weights)
        found = _extractors.get((weights, precision), {})
    runtime = choose_runtime(runtime, precision)
    if runtime in found:
        return found[runtime]
    extractor = build_extractor(weights, precision, runtime, models_dir=models_dir, threads=threads, latency=latency)
    register_extractor(extractor)
    return extractor


def build_extractor(weights: str, precision: str, runtime: str, *, models_dir: Path | None = None,
                    threads: int | None = None, latency: bool = False) -> Extractor:
    """A new extractor, outside the process's registry (fine-tuning's re-embedding: its weights file is rewritten
    by a rerun)."""
    if runtime == "tensorflow":
        return FeatureExtractor(weights, precision)
    from ingest.config import Settings
    from ingest.inference import OpenVinoExtractor

    return OpenVinoExtractor(weights, precision, models_dir=models_dir or Settings.load().models_dir, threads=threads,
                             latency=latency)


def check_weights(fingerprint: str, weights: str, *, collection: str, recorded_weights: str, recorded_fingerprint: str,
                  remedy: str) -> None:
    """Refuse weights other than those a collection's vectors were made with: two models' vectors never mix.

    The one check behind loads, queries and fine-tuning; `remedy` says what the user can do in that case.
    """
    if fingerprint != recorded_fingerprint:
        raise WeightsError(
            f"the weights {weights} (fingerprint {fingerprint[:12]}) differ from those collection {collection!r} was built with "
            f"({recorded_weights}, fingerprint {recorded_fingerprint[:12]}); {remedy}"
        )
