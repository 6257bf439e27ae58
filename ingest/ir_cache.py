"""The OpenVINO IR of a ResNet50: converted from the Keras model once per weights, kept under $RIS_HOME/models/openvino.

The Keras model stays the definition. The first time some weights are used, TensorFlow builds them and OpenVINO
converts the extractor's own compiled function (uint8 pixels in, `preprocess_input` in the graph, so nothing outside
the model can be forgotten) from the fp32 model, never a bf16 twin; the precision is chosen when the IR is compiled
(ingest/inference.py), so one IR serves both. Weights are saved as float32 (`compress_to_fp16=False`).

The cache is found without TensorFlow: its key is the weights' *spec* (`weights_key`: 'random' with its seed and
the Keras and TensorFlow versions that draw it, else the sha256 of the weights file, ImageNet's in ~/.keras
included). Beside the .xml and .bin a .json records the key, the Keras fingerprint (ingest.features.fingerprint,
what collections record and check) and the sha256 of both files; it is written last, so a file missing, cut short
or altered since is found out (`read_cached`) and the IR converted again. Each file is renamed into place whole
(ingest/atomic.py).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ingest.atomic import remove_leftovers, replacing, temporary_name, write_atomically
from ingest.features import MODEL_NAME, RANDOM_SEED

IR_FORMAT = 1  # bump when what is converted changes (inputs, preprocessing, outputs): older IRs are then ignored
IMAGENET_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"  # as keras.applications.ResNet50 caches it


@dataclass(frozen=True)
class IrFiles:
    """Where one IR lives: the graph, its weights, and what they were made from."""

    xml: Path
    bin: Path
    meta: Path

    @classmethod
    def of(cls, models_dir: Path, key: dict) -> "IrFiles":
        name = f"{MODEL_NAME.lower()}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]}"
        folder = Path(models_dir) / "openvino"
        return cls(folder / f"{name}.xml", folder / f"{name}.bin", folder / f"{name}.json")


@dataclass(frozen=True)
class CachedIr:
    """An IR read back and checked: its graph and weights as bytes (what Core.read_model takes) and its metadata."""

    xml: bytes
    bin: bytes
    fingerprint: str  # the Keras model's (ingest.features.fingerprint)
    files: IrFiles


def keras_home() -> Path:
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def weights_key(weights: str) -> dict | None:
    """What identifies `weights` (as ingest.features.parse_weights normalises them) without TensorFlow; None for
    ImageNet weights Keras has not downloaded yet (building the model fetches them, then the key exists)."""
    key: dict = {"model": MODEL_NAME, "format": IR_FORMAT}
    if weights == "random":
        return key | {"weights": "random", "seed": RANDOM_SEED, "keras": metadata.version("keras"),
                      "tensorflow": metadata.version("tensorflow")}
    path = keras_home() / "models" / IMAGENET_FILE if weights == "imagenet" else Path(weights)
    if not path.is_file():
        return None
    return key | {"weights": "imagenet" if weights == "imagenet" else "file", "sha256": file_sha256(path)}


def read_cached(files: IrFiles, key: dict) -> CachedIr | None:
    """The IR of `key` if it is there whole: metadata for this key, both files with the recorded sha256."""
    try:
        meta = json.loads(files.meta.read_text())
        xml, weights = files.xml.read_bytes(), files.bin.read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != key or not isinstance(meta.get("fingerprint"), str):
        return None
    if hashlib.sha256(xml).hexdigest() != meta.get("xml_sha256") or hashlib.sha256(weights).hexdigest() != meta.get("bin_sha256"):
        return None
    return CachedIr(xml, weights, meta["fingerprint"], files)


def convert(models_dir: Path, weights: str) -> CachedIr:
    """Build the fp32 Keras extractor, convert its compiled function with OpenVINO and cache the IR (TensorFlow runs here)."""
    import openvino

    from ingest.features import FeatureExtractor

    definition = FeatureExtractor(weights, "fp32")
    model = openvino.convert_model(definition.forward)
    key = weights_key(definition.weights) or {"model": MODEL_NAME, "format": IR_FORMAT, "fingerprint": definition.fingerprint}
    files = IrFiles.of(models_dir, key)
    xml, data = save(model, files)
    meta = {"key": key, "fingerprint": definition.fingerprint, "weights": definition.weights, "openvino": openvino.__version__,
            "xml_sha256": hashlib.sha256(xml).hexdigest(), "bin_sha256": hashlib.sha256(data).hexdigest()}
    write_atomically(files.meta, json.dumps(meta, indent=1))
    return CachedIr(xml, data, definition.fingerprint, files)


def save(model, files: IrFiles) -> tuple[bytes, bytes]:
    """Write the IR's two files, each renamed into place whole (the metadata, written after, vouches for the pair);
    returns their bytes as written."""
    import openvino

    files.xml.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(files.xml, ".bin")  # the .bin a killed writer left beside its temporary .xml
    with replacing(files.xml, ".xml") as tmp_xml:
        tmp_bin = temporary_name(files.xml, ".bin")  # where save_model puts the weights of tmp_xml
        try:
            openvino.save_model(model, str(tmp_xml), compress_to_fp16=False)
            xml, data = tmp_xml.read_bytes(), tmp_bin.read_bytes()
            with replacing(files.bin) as final_bin:
                os.replace(tmp_bin, final_bin)
        finally:
            tmp_bin.unlink(missing_ok=True)
    return xml, data


def cached_ir(models_dir: Path, weights: str) -> CachedIr:
    """The IR of `weights`: read from the cache when it is there and whole, else converted (with TensorFlow) and cached."""
    key = weights_key(weights)
    found = read_cached(IrFiles.of(models_dir, key), key) if key is not None else None
    return found or convert(models_dir, weights)
