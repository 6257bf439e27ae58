"""--precision: fp32 features unchanged, bf16 close to them and float32, `auto` decided by the hardware both ways,
a collection's precision recorded and enforced, and a GPU's feeding (larger batch, a decode thread per core)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ingest import precision as precision_module
from ingest.cli import cli as ingest_cli
from ingest.collection import Collection
from ingest.errors import WeightsError
from ingest.precision import Feeding, Hardware, choose, cpu_flags, feeding
from search.cli import cli as search_cli
from tests.conftest import FakeExtractor, collection_row, make_folder

GPU = Hardware(gpus=("/physical_device:GPU:0",), gpu_bf16=True)
BF16_CPU = Hardware(cpu_bf16=True)
PLAIN_CPU = Hardware()


def pixels(n=4, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


# --- the model -----------------------------------------------------------------------------------


def test_fp32_features_equal_the_plain_keras_computation(extractor):
    """The fp32 extractor is what it was before precisions existed: ResNet50(seed 0) on preprocess_input."""
    import keras
    from keras.applications.resnet50 import preprocess_input

    keras.utils.set_random_seed(0)
    plain = keras.applications.ResNet50(include_top=False, pooling="avg", weights=None)
    x = pixels()
    want = plain(preprocess_input(x.astype(np.float32)), training=False).numpy()
    got = extractor.embed(x)
    assert extractor.precision == "fp32" and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bf16_features_are_float32_close_to_fp32_and_share_the_fingerprint(extractor):
    import keras

    from ingest.features import extractor_for

    bf16 = extractor_for("random", "bf16")
    assert bf16 is extractor_for("random", "bf16") and bf16 is not extractor
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


def test_hardware_reports_this_machine():
    hw = precision_module.hardware()
    assert hw.cpu_bf16 == bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    assert isinstance(hw.gpus, tuple)


def test_gpu_feeding_uses_bigger_batches_and_every_core(monkeypatch):
    monkeypatch.setattr(precision_module.os, "cpu_count", lambda: 16)
    assert feeding(PLAIN_CPU, "fp32") == Feeding(32, 2, None)
    gpu = feeding(GPU, "bf16")
    assert (gpu.batch_size, gpu.workers) == (128, 16)
    assert "GPU" in gpu.device_line and "/physical_device:GPU:0" in gpu.device_line
    assert (feeding(GPU, "bf16", batch_size=8, workers=3).batch_size, feeding(GPU, "bf16", workers=3).workers) == (8, 3)


# --- through the commands ------------------------------------------------------------------------


@pytest.fixture
def fakes(fake_extractor):
    """The fake extractor at both precisions, in the process's cache, so loads cost no ResNet50."""
    from ingest import features

    bf16 = FakeExtractor()
    bf16.precision = "bf16"
    features._extractors["fake", "bf16"] = bf16
    yield {"fp32": fake_extractor, "bf16": bf16}
    features._extractors.pop(("fake", "bf16"), None)


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


def test_a_gpu_load_says_so_first_and_feeds_it_more(db, tmp_path, fakes, monkeypatch):
    from ingest import load as load_module

    monkeypatch.setattr(precision_module, "hardware", lambda: GPU)
    monkeypatch.setattr(precision_module.os, "cpu_count", lambda: 6)
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
