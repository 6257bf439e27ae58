"""The OpenVINO runtime: the same features as Keras picture by picture, queries without TensorFlow once the IR is
cached, the cache rebuilt when damaged, weights that changed refused, `--runtime tensorflow` still working (and its
collections answered by OpenVINO), a broken runtime said in one line, and the runtime recorded per collection."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from ingest.cli import cli as ingest_cli
from ingest.collection import Collection
from ingest.config import Settings
from ingest.db import upgrade
from ingest.features import build_extractor, extractor_for
from ingest.images import decode_image, read_file
from ingest.ir_cache import IrFiles, read_cached, weights_key
from ingest.load import load_collection
from ingest.precision import openvino_cpu_bf16
from ingest.sources import walk_folder
from search.cli import cli as search_cli
from tests.helpers import COLOURS, collection_row, make_folder, make_picture, scratch_database

F32_BOUND, BF16_BOUND = 0.9999, 0.999  # per picture, against Keras at fp32
needs_bf16 = pytest.mark.skipif(not openvino_cpu_bf16(), reason="OpenVINO computes no bf16 on this processor")
BIN = Path(sys.executable).parent


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def channel_pictures(n: int = 6) -> np.ndarray:
    """Pictures whose three channels hold different things (a ramp across, a ramp down, noise), so a picture read
    as BGR, or preprocessed the wrong way, gives other features."""
    rng = np.random.default_rng(7)
    down, across = np.mgrid[0:224, 0:224]
    return np.stack([np.stack([(across * (i + 1)) % 256, (down * (i + 3)) % 256, rng.integers(0, 256, (224, 224))], -1)
                     for i in range(n)]).astype(np.uint8)


@pytest.fixture(scope="module")
def keras_features():
    """Plain Keras, written out here rather than taken from ingest: ResNet50(seed 0), preprocess_input, fp32."""
    import keras
    from keras.applications.resnet50 import preprocess_input

    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(include_top=False, pooling="avg", weights=None)
    pixels = channel_pictures()
    return pixels, model(preprocess_input(pixels.astype(np.float32)), training=False).numpy(), model


def test_openvino_f32_equals_keras_picture_by_picture(extractor, keras_features):
    pixels, want, model = keras_features
    assert (extractor.runtime, extractor.precision) == ("openvino", "fp32")
    got = extractor.embed(pixels)
    assert got.dtype == np.float32 and got.shape == (len(pixels), 2048)
    assert cosines(got, want).min() >= F32_BOUND
    # The pictures can tell: swapped channels, or pixels fed without preprocess_input, miss even the bf16 bound.
    assert cosines(extractor.embed(pixels[..., ::-1]), want).max() < BF16_BOUND
    assert cosines(model(pixels.astype(np.float32), training=False).numpy(), want).max() < BF16_BOUND


@needs_bf16
def test_openvino_bf16_is_close_to_keras_picture_by_picture(settings, extractor, keras_features):
    pixels, want, _ = keras_features
    bf16 = extractor_for("random", "bf16", "openvino", models_dir=settings.models_dir)
    assert bf16.fingerprint == extractor.fingerprint  # one IR for both precisions
    got = bf16.embed(pixels)
    assert got.dtype == np.float32 and cosines(got, want).min() >= BF16_BOUND
    assert not np.array_equal(got, extractor.embed(pixels))  # bf16 was computed, not f32 again


def test_inference_threads_can_be_capped(settings):
    capped = build_extractor("random", "fp32", "openvino", models_dir=settings.models_dir, threads=1)
    assert capped.compiled.get_property("INFERENCE_NUM_THREADS") == 1


@pytest.fixture(scope="module")
def loaded(db, settings, extractor, tmp_path_factory):
    """A collection embedded by OpenVINO, and a picture it does not hold."""
    folder = make_folder(tmp_path_factory.mktemp("ov") / "pictures", per_label=3)
    load_collection(db, settings, "on-openvino", walk_folder(folder)[0], extractor, pca_dims=4, progress=False)
    new = tmp_path_factory.mktemp("query") / "new.jpg"
    make_picture(COLOURS["red"], "square", 4242).save(new)
    return folder, new


def test_a_collection_records_its_runtime(db, loaded):
    row = collection_row(db, "on-openvino")
    assert (row.runtime, row.precision) == ("openvino", "fp32")
    status = json.loads(CliRunner().invoke(ingest_cli, ["status", "--json"]).stdout)
    assert next(c for c in status["collections"] if c["name"] == "on-openvino")["runtime"] == "openvino"


COLD_QUERY = textwrap.dedent(
    """
    import sys
    from search.cli import cli
    try:
        cli.main(sys.argv[1:], prog_name="search", standalone_mode=False)
    finally:
        print("tensorflow imported" if "tensorflow" in sys.modules else "no tensorflow", file=sys.stderr)
    """
)


def test_a_cold_query_imports_no_tensorflow(settings, loaded, extractor):
    """`search similar NEW.jpg` in a new process: the cached IR is read, checked and compiled; TensorFlow never loads."""
    _, new = loaded
    meta = IrFiles.of(settings.models_dir, weights_key("random")).meta
    written = meta.stat().st_mtime_ns
    run = subprocess.run([sys.executable, "-c", COLD_QUERY, "similar", str(new), "-c", "on-openvino", "-k", "3", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip().splitlines()[-1] == "no tensorflow"
    hits = json.loads(run.stdout)
    assert len(hits) == 3 and hits[0]["label"] == "red"
    assert meta.stat().st_mtime_ns == written  # read, not converted again


@pytest.mark.parametrize("damage", ["weights altered", "metadata cut short"])
def test_a_damaged_ir_is_converted_again(settings, extractor, keras_features, loaded, damage):
    """The next query (a new process, as a user runs it) finds the damage, converts the IR again and answers."""
    _, new = loaded
    files = IrFiles.of(settings.models_dir, weights_key("random"))
    if damage == "weights altered":  # same size, one float changed: only the checksum can tell
        with open(files.bin, "r+b") as f:
            f.seek(files.bin.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    else:  # a writer killed mid-way, before the rename that makes a file whole
        files.meta.write_text(files.meta.read_text()[:40])
    assert read_cached(files, weights_key("random")) is None
    query = subprocess.run([str(BIN / "search"), "similar", str(new), "-c", "on-openvino", "-k", "3", "--json"],
                           capture_output=True, text=True, timeout=600)
    assert query.returncode == 0, query.stderr
    assert len(json.loads(query.stdout)) == 3
    cached = read_cached(files, weights_key("random"))
    assert cached is not None and cached.fingerprint == extractor.fingerprint
    assert not list(files.xml.parent.glob(".*.tmp*"))  # no temporary file left beside the IR
    rebuilt = build_extractor("random", "fp32", "openvino", models_dir=settings.models_dir)
    pixels, want, _ = keras_features
    assert cosines(rebuilt.embed(pixels), want).min() >= F32_BOUND


def test_weights_changed_since_the_load_are_refused(db, settings, tmp_path, loaded):
    """A weights file rewritten after its collection was loaded: its new IR carries another fingerprint, and a query
    (a new process, as a user runs it) is refused in one line instead of mixing two models' vectors."""
    from ingest.features import build_resnet50

    folder, new = loaded
    weights = tmp_path / "mine.weights.h5"
    model = build_resnet50("random")
    model.save_weights(weights)
    load = CliRunner().invoke(ingest_cli, ["load", "folder", str(folder), "-c", "own-weights", "--weights", str(weights),
                                           "--pca-dims", "4", "--json"])
    assert load.exit_code == 0, load.output
    assert collection_row(db, "own-weights").runtime == "openvino"
    model.weights[-1].assign(model.weights[-1] + 0.5)
    model.save_weights(weights)
    query = subprocess.run([str(BIN / "search"), "similar", str(new), "-c", "own-weights"], capture_output=True, text=True,
                           timeout=600)
    assert query.returncode == 1, query.stderr
    lines = query.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: the weights {weights} (fingerprint ")
    assert "differ from those collection 'own-weights' was built with" in lines[0]


@pytest.mark.parametrize("precision, bound", [("fp32", F32_BOUND), pytest.param("bf16", BF16_BOUND, marks=needs_bf16)])
def test_runtime_tensorflow_still_loads_and_openvino_answers_its_collection(db, settings, tmp_path, loaded, precision, bound):
    """A collection loaded by TensorFlow (as every collection was before OpenVINO): queried through OpenVINO at its
    precision, each stored picture's features agree with the ones TensorFlow stored, and the neighbours are the same."""
    folder, new = loaded
    name = f"on-tensorflow-{precision}"
    load = CliRunner().invoke(ingest_cli, ["load", "folder", str(folder), "-c", name, "--weights", "random", "--pca-dims", "4",
                                           "--runtime", "tensorflow", "--precision", precision, "--json"])
    assert load.exit_code == 0, load.output
    row = collection_row(db, name)
    assert (row.runtime, row.precision) == ("tensorflow", precision)

    through = {runtime: Collection.named(db, Settings(home=settings.home, runtime=runtime), name) for runtime in ("tensorflow", "openvino")}
    assert through["openvino"].extractor().runtime == "openvino" and through["openvino"].extractor().precision == precision
    ids, stored = through["openvino"].read_vectors("raw")
    pixels = np.stack([decode_image(read_file(Path(through["openvino"].details([i])[i].path))).pixels for i in ids.tolist()])
    assert cosines(through["openvino"].embed(pixels)[0], stored).min() >= bound
    hits = {runtime: [h.id for h in coll.similar(coll.query(image=new), 5)] for runtime, coll in through.items()}
    assert hits["openvino"] == hits["tensorflow"]
    via_cli = CliRunner().invoke(search_cli, ["similar", str(new), "-c", name, "-k", "5", "--runtime", "tensorflow", "--json"])
    assert via_cli.exit_code == 0, via_cli.output
    assert [h["id"] for h in json.loads(via_cli.stdout)] == hits["tensorflow"]


BROKEN = {
    "openvino": ("openvino", "ImportError('libopenvino.so.2540: cannot open shared object file')", "Error: OpenVINO cannot be loaded"),
    "tensorflow": ("tensorflow", "ImportError('libtensorflow_framework.so.2: cannot open shared object file')",
                   "Error: TensorFlow cannot be loaded"),
}


@pytest.mark.parametrize("runtime", sorted(BROKEN))
def test_a_broken_runtime_is_one_line(tmp_path, runtime):
    """A runtime whose import fails (a package shadowed by one that raises, as a broken install does): one line, exit 1."""
    package, error, said = BROKEN[runtime]
    (tmp_path / "shadow" / package).mkdir(parents=True)
    (tmp_path / "shadow" / package / "__init__.py").write_text(f"raise {error}\n")
    folder = make_folder(tmp_path / "pics", per_label=1)
    env = os.environ | {"PYTHONPATH": str(tmp_path / "shadow")}
    run = subprocess.run([str(BIN / "ingest"), "load", "folder", str(folder), "-c", f"broken-{runtime}", "--weights", "random",
                          "--runtime", runtime], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(said) and "cannot open shared object file" in lines[0], run.stderr


def test_collections_from_before_openvino_are_recorded_as_tensorflow(ris_home):
    """Migration 0006 on a database at 0005 holding a collection: the collection's runtime is 'tensorflow'."""
    with scratch_database(ris_home, "ris_runtime_migration") as engine:
        upgrade(engine, "0005")
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO collections (name, model, weights, weights_fingerprint, pca_dims, precision) "
                                 "VALUES ('old', 'ResNet50', 'random', 'f', 4, 'bf16')"))
        upgrade(engine)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT runtime, precision FROM collections WHERE name = 'old'")).one() == ("tensorflow", "bf16")
