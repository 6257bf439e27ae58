"""--precision and --runtime: TensorFlow's fp32 features unchanged, bf16 close to them and float32, `auto` decided by
the hardware both ways (precision and runtime), the hardware found without TensorFlow, a collection's precision
recorded and enforced, and a GPU's feeding (larger batch, a decode thread per core).
OpenVINO against Keras, picture by picture, is tests/test_runtime.py."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from ingest import feeding as feeding_module
from ingest import precision as precision_module
from ingest.cli import cli as ingest_cli
from ingest.collection import Collection
from ingest.errors import RisError, WeightsError
from ingest.features import register_extractor
from ingest.feeding import Feeding, feeding
from ingest.precision import Hardware, choose, choose_runtime, cpu_flags, nvidia_gpus
from search.cli import cli as search_cli
from tests.helpers import collection_row, FakeExtractor, make_folder

GPU = Hardware(gpus=("/physical_device:GPU:0",), gpu_bf16=True)
BF16_CPU = Hardware(cpu_bf16=True)
PLAIN_CPU = Hardware()


def pixels(n=4, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


# --- the model -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf_extractor(settings):
    """The TensorFlow extractor (`--runtime tensorflow`) of the random weights at fp32."""
    from ingest.features import extractor_for

    return extractor_for("random", "fp32", "tensorflow", models_dir=settings.models_dir)


def test_fp32_features_equal_the_plain_keras_computation(tf_extractor):
    """TensorFlow's fp32 extractor is what it was before precisions existed: ResNet50(seed 0) on preprocess_input."""
    import keras
    from keras.applications.resnet50 import preprocess_input

    extractor = tf_extractor
    keras.utils.set_random_seed(0)
    plain = keras.applications.ResNet50(include_top=False, pooling="avg", weights=None)
    x = pixels()
    want = plain(preprocess_input(x.astype(np.float32)), training=False).numpy()
    got = extractor.embed(x)
    assert (extractor.precision, extractor.runtime) == ("fp32", "tensorflow") and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bf16_features_are_float32_close_to_fp32_and_share_the_fingerprint(tf_extractor, settings):
    import keras

    from ingest.features import extractor_for

    extractor = tf_extractor
    bf16 = extractor_for("random", "bf16", "tensorflow", models_dir=settings.models_dir)
    assert bf16 is extractor_for("random", "bf16", "tensorflow") and bf16 is not extractor
    assert bf16.fingerprint == extractor.fingerprint  # the same weights; the precision is recorded on its own
    assert keras.config.dtype_policy().name == "float32"  # a per-model policy: the process default is untouched
    x = pixels()
    fp32, low = extractor.embed(x), bf16.embed(x)
    assert low.dtype == np.float32 and low.shape == fp32.shape
    assert np.linalg.norm(low - fp32) / np.linalg.norm(fp32) < 0.02
    cosines = (low * fp32).sum(1) / np.linalg.norm(low, axis=1) / np.linalg.norm(fp32, axis=1)
    assert cosines.min() > 0.999
    np.testing.assert_array_equal(extractor.embed(x), fp32)  # the fp32 model is unchanged by its bf16 twin


# --- deciding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw, want", [(BF16_CPU, "bf16"), (PLAIN_CPU, "fp32"), (GPU, "bf16"),
                                      (Hardware(cpu_bf16=True, gpus=("old",), gpu_bf16=False), "fp32")])
def test_auto_follows_native_bf16(hw, want):
    assert choose("auto", None, hw) == want


@pytest.mark.parametrize("hw, precision, want", [(PLAIN_CPU, "fp32", "openvino"), (BF16_CPU, "bf16", "openvino"),
                                                   (PLAIN_CPU, "bf16", "tensorflow"), (GPU, "fp32", "tensorflow"),
                                                   (GPU, "bf16", "tensorflow")])
def test_auto_runtime_is_openvino_on_processors_and_tensorflow_on_gpus(hw, precision, want):
    """bf16 on a processor without it: TensorFlow, which emulates it, so a bf16 collection stays bf16 there."""
    assert choose_runtime("auto", precision, hw) == want


def test_explicit_runtime_wins_and_openvino_refuses_bf16_it_cannot_compute():
    assert choose_runtime("tensorflow", "fp32", BF16_CPU) == "tensorflow"
    assert choose_runtime("openvino", "fp32", GPU) == "openvino"
    with pytest.raises(RisError, match="OpenVINO computes bf16 only on processors that do it natively"):
        choose_runtime("openvino", "bf16", PLAIN_CPU)
    with pytest.raises(RisError, match="runtime must be one of auto, openvino, tensorflow"):
        choose_runtime("onnx", "fp32", PLAIN_CPU)


def test_auto_keeps_a_collections_precision_and_explicit_wins(monkeypatch):
    monkeypatch.setattr(precision_module, "hardware", lambda: pytest.fail("no need to look at the hardware"))
    assert choose("auto", "fp32") == "fp32"
    assert choose("auto", "bf16") == "bf16"
    assert choose("bf16", "fp32") == "bf16"  # refused later, by the collection


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu amx_bf16\n")
    assert {"avx512_bf16", "amx_bf16", "fpu"} <= cpu_flags(cpuinfo)
    assert cpu_flags(tmp_path / "missing") == set()


def test_hardware_is_found_without_tensorflow():
    """What OpenVINO says of the processor, and the NVIDIA driver's GPUs, in a process that never imports TensorFlow."""
    code = ("import sys; from ingest.precision import hardware, openvino_cpu_bf16; hw = hardware(); "
            "print(hw.cpu_bf16 == openvino_cpu_bf16(), hw.gpus == () or 'nvidia', 'tensorflow' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    if nvidia_gpus():  # TensorFlow tells the GPUs' compute capability, and runs on them
        pytest.skip("this machine has an NVIDIA GPU")
    assert run.stdout.split() == ["True", "True", "False"]


def test_openvino_and_cpuinfo_agree_on_bf16():
    import openvino

    assert ("BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")) == precision_module.hardware().cpu_bf16
    if precision_module.hardware().cpu_bf16:
        assert {"avx512_bf16", "amx_bf16"} & cpu_flags()


def test_nvidia_gpus_are_read_from_the_drivers_files(tmp_path):
    (tmp_path / "0000:3b:00.0").mkdir()
    (tmp_path / "0000:3b:00.0" / "information").write_text("Model: \t\t NVIDIA A100-SXM4-40GB\nIRQ: \t\t 42\n")
    (tmp_path / "0000:af:00.0").mkdir()
    assert nvidia_gpus(tmp_path) == ("NVIDIA A100-SXM4-40GB", "0000:af:00.0")
    assert nvidia_gpus(tmp_path / "missing") == ()


def test_gpu_feeding_uses_bigger_batches_and_every_core(monkeypatch):
    monkeypatch.setattr(feeding_module.os, "cpu_count", lambda: 16)
    assert feeding(PLAIN_CPU, "fp32") == Feeding(32, 2, None)
    gpu = feeding(GPU, "bf16", runtime="tensorflow")
    assert (gpu.batch_size, gpu.workers) == (128, 16)
    assert "GPU" in gpu.device_line and "/physical_device:GPU:0" in gpu.device_line
    assert feeding(GPU, "bf16", runtime="openvino") == Feeding(32, 2, None)  # OpenVINO asked for: the processor's feeding
    tf = dict(runtime="tensorflow")
    assert (feeding(GPU, "bf16", batch_size=8, workers=3, **tf).batch_size, feeding(GPU, "bf16", workers=3, **tf).workers) == (8, 3)


# --- through the commands ------------------------------------------------------------------------


def fake(precision: str, runtime: str = "openvino") -> FakeExtractor:
    made = FakeExtractor()
    made.precision, made.runtime = precision, runtime
    return made


@pytest.fixture
def fakes(fake_extractor):
    """The fake extractor at both precisions, registered as the process's, so loads cost no ResNet50."""
    bf16 = fake("bf16")
    unregister = register_extractor(bf16, ("openvino", "tensorflow"))
    yield {"fp32": fake_extractor, "bf16": bf16}
    unregister()


def load(folder, name, *extra):
    return CliRunner().invoke(ingest_cli, ["load", "folder", str(folder), "-c", name, "--weights", "fake", "--pca-dims", "4", *extra])


@pytest.mark.parametrize("hw, want", [(BF16_CPU, "bf16"), (PLAIN_CPU, "fp32")])
def test_auto_load_records_what_the_hardware_chose(db, tmp_path, fakes, monkeypatch, hw, want):
    monkeypatch.setattr(precision_module, "hardware", lambda: hw)
    name = f"auto-{want}"
    result = load(make_folder(tmp_path / "pics", per_label=2), name, "--precision", "auto")
    assert result.exit_code == 0, result.output
    assert collection_row(db, name).precision == want
    assert "GPU" not in result.output


def test_a_collection_keeps_its_precision(db, settings, tmp_path, fakes, monkeypatch):
    monkeypatch.setattr(precision_module, "hardware", lambda: PLAIN_CPU)
    folder = make_folder(tmp_path / "pics", per_label=2)
    assert load(folder, "kept-bf16", "--precision", "bf16").exit_code == 0
    assert collection_row(db, "kept-bf16").precision == "bf16"

    refused = load(folder, "kept-bf16", "--precision", "fp32")
    assert refused.exit_code == 1
    assert refused.output.strip().splitlines() == [
        "Error: collection 'kept-bf16' was built at bf16 precision, not fp32 (--precision auto uses the collection's own); "
        "use another --collection for other vectors"
    ]
    make_folder(folder, labels=("yellow",), per_label=2)
    again = load(folder, "kept-bf16", "--precision", "auto", "--json")  # auto: the collection's, though this CPU lacks bf16
    assert again.exit_code == 0, again.output

    coll = Collection.named(db, settings, "kept-bf16")
    assert coll.extractor() is fakes["bf16"]  # queries by file run at the collection's precision
    with pytest.raises(WeightsError, match="built at bf16 precision, not fp32"):
        Collection.named(db, settings, "kept-bf16", extractor=fakes["fp32"])
    query = CliRunner().invoke(search_cli, ["similar", str(folder / "red" / "red_0.jpg"), "-c", "kept-bf16", "-k", "2"])
    assert query.exit_code == 0, query.output


@pytest.fixture
def tensorflow_fakes(fakes):
    """Fakes standing for TensorFlow at both precisions too: what `auto` runs on a GPU."""
    undo = [register_extractor(fake(precision, "tensorflow")) for precision in ("fp32", "bf16")]
    yield
    for unregister in undo:
        unregister()


def test_a_gpu_load_says_so_first_and_feeds_it_more(db, tmp_path, tensorflow_fakes, monkeypatch):
    from ingest import load as load_module

    monkeypatch.setattr(precision_module, "hardware", lambda: GPU)
    monkeypatch.setattr(feeding_module.os, "cpu_count", lambda: 6)
    seen = []
    real = load_module.add_pictures
    monkeypatch.setattr(load_module, "add_pictures", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    folder = make_folder(tmp_path / "pics", per_label=2)
    result = load(folder, "on-gpu", "--precision", "auto", "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0] == "using GPU /physical_device:GPU:0: bf16, batch 128, 6 decode threads"
    assert (seen[0]["batch_size"], seen[0]["workers"]) == (128, 6)
    assert collection_row(db, "on-gpu").precision == "bf16"
    assert load(folder, "on-gpu-2", "--workers", "3", "--precision", "fp32").exit_code == 0
    assert (seen[1]["batch_size"], seen[1]["workers"]) == (128, 3)


def test_precision_bench_compares_twin_collections(db, settings, tmp_path, fakes, monkeypatch):
    """bench/precision.py on an fp32 and a bf16 collection of the same pictures (the fakes agree exactly)."""
    from bench.precision import compare_space

    monkeypatch.setattr(precision_module, "hardware", lambda: PLAIN_CPU)
    folder = make_folder(tmp_path / "pics", per_label=4)
    for name, precision in (("twin-fp32", "fp32"), ("twin-bf16", "bf16")):
        assert load(folder, name, "--precision", precision).exit_code == 0
    fp32, bf16 = Collection.named(db, settings, "twin-fp32"), Collection.named(db, settings, "twin-bf16")
    raw = compare_space(fp32, bf16, "raw", 5, 4, False)
    assert raw["images"] == 12 and raw["overlap_mean"] == 1.0 and raw["cosine_min"] > 0.99999
    assert raw["precision_fp32"] == raw["precision_bf16"]
    assert compare_space(fp32, bf16, "embedding", 5, 4, False)["overlap_mean"] == 1.0


def test_status_shows_each_collections_precision(db, tmp_path, fakes):
    assert load(make_folder(tmp_path / "pics", per_label=2), "shown-bf16", "--precision", "bf16").exit_code == 0
    status = CliRunner().invoke(ingest_cli, ["status", "--json"])
    entry = next(c for c in json.loads(status.stdout)["collections"] if c["name"] == "shown-bf16")
    assert entry["precision"] == "bf16"
    assert "weights fake at bf16" in CliRunner().invoke(ingest_cli, ["status"]).stdout
