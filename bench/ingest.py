"""How fast is the forward pass on each runtime, and `ingest load` around it?

One run on the Caltech 101 archive measures, with one set of weights:
  forward  the bare batched forward pass on pre-decoded batches, warmed up: TensorFlow fp32 (what every pass ran on
           before OpenVINO), then OpenVINO at fp32 and, where the processor offers it, at bf16;
  load     the whole load path as `ingest load` runs it, `load_collection` into a fresh collection (read, hash and
           decode in threads, OpenVINO's async infer queue, COPY by the writer thread, then PCA and the Annoy file),
           at the precision `auto` picks, model start-up included, with where its time went;
  naive    decode and TensorFlow's `model.predict(x[None])` one image at a time, what weaker projects do.
Ratios: every forward pass over TensorFlow fp32's; the load over its own bare forward pass (target >= 85%: decoding
and storing hide behind the model) and over the naive loop (target >= 2.5x). The first line names the processor,
its SIMD flags and what OpenVINO says it computes. A cold `search similar` is bench/query.py; OpenVINO's answers
against TensorFlow's on Caltech 101, bench/runtime.py.

Example: python -m bench.ingest --limit-per-class 5
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: bench/ is then sys.path[0] and this file would shadow the ingest package
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import json
import os
import platform
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager

import click
import numpy as np

from bench.distributed import ray_options
from bench.machine import CpuWatch, cpu_model, peak_rss_mib
from ingest import load as load_module
from ingest import sources, store
from ingest.batches import LoadSummary
from ingest.caltech101 import EXCLUDED_CALTECH_LABELS, prepare_caltech101
from ingest.collection import Collection
from ingest.config import DEFAULT_BATCH_SIZE, Settings
from ingest.db import connect, stop_embedded
from ingest.errors import ImageError, RisError
from ingest.feeding import CPU_WORKERS
from ingest.images import decode_image, read_file
from ingest.load import DEFAULT_PCA_DIMS, load_collection
from ingest.precision import CPU_BF16_FLAGS, choose, cpu_flags, hardware

FORWARD_TARGET = 0.85  # load images/s over its own bare forward images/s, at least
NAIVE_TARGET = 2.5  # load images/s over per-image predict images/s, at least
NOISY_NEIGHBOURS = 0.25  # cores other processes may use on average before the figures are called unreliable
SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", *CPU_BF16_FLAGS, "amx_tile", "amx_int8")
BASELINE = "tensorflow fp32"
# (object, attribute) of each stage timed: looked up at call time, so wrapping the attribute times every call.
LOAD_STAGES = {"prepare": load_module, "embed_batch": load_module, "write_batch": load_module, "insert_images": store,
               "record_failures": store, "finish": Collection}


# --- the machine ---------------------------------------------------------------------------------


def machine() -> dict:
    """Processor, its SIMD flags and OpenVINO's view of it, cores and library versions: figures mean little without them."""
    from importlib import metadata

    import openvino

    core = openvino.Core()
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "cpu_flags": [f for f in SIMD_FLAGS if f in cpu_flags()],
        "openvino_capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
        "python": platform.python_version(), "openvino": openvino.__version__,
        **{name: metadata.version(name) for name in ("tensorflow", "keras", "numpy", "pillow")},
    }


# --- the whole load path -------------------------------------------------------------------------


class StageTimes:
    """Seconds spent inside chosen functions, summed over calls; threads add up, so theirs is thread-seconds."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.first: dict[str, float] = {}  # the first call's seconds
        self._lock = threading.Lock()

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                with self._lock:
                    self.seconds[name] += elapsed
                    self.first.setdefault(name, elapsed)
                    self.calls[name] += 1

        return timed


@contextmanager
def timed_stages(extractor, times: StageTimes):
    """Time load_collection's stages by wrapping the functions it looks up at call time; restored after."""
    saved = {name: getattr(owner, name) for name, owner in LOAD_STAGES.items()}
    for name, fn in saved.items():
        setattr(LOAD_STAGES[name], name, times.wrap(name, fn))
    extractor.embed = times.wrap("embed", extractor.embed)  # an instance attribute shadows the method
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(LOAD_STAGES[name], name, fn)
        del extractor.embed


def measure_load(settings, db, name, candidates, skipped, extractor, batch_size, workers, progress) -> dict:
    """Run the library load as `ingest load` does, and say where its time went. PCA keeps the default dims,
    fewer only when a quick run has fewer images than that (PCA cannot fit more dims than images)."""
    times = StageTimes()
    rss_before, watch = peak_rss_mib(), CpuWatch()
    with timed_stages(extractor, times):
        summary: LoadSummary = load_collection(
            db, settings, name, candidates, extractor, pca_dims=min(DEFAULT_PCA_DIMS, len(candidates)), batch_size=batch_size,
            workers=workers, skipped=skipped, progress=progress,
        )
    images = summary.ingested + summary.present
    s = times.seconds
    return {
        "images": images, "ingested": summary.ingested, "failed": summary.failed, "seconds": summary.seconds,
        "images_per_second": summary.images_per_second, "batch_size": batch_size, "workers": workers,
        "peak_rss_mib": peak_rss_mib(), "peak_rss_before_mib": rss_before, "cpu": watch.cores(),
        "breakdown_seconds": {
            "model": s["embed"],
            "first_model_call": times.first.get("embed", 0.0),
            "main_thread_not_in_model": summary.seconds - s["finish"] - s["embed"],  # waiting for decode or the writer
            "writer_thread": s["write_batch"],  # beside the model: COPY and commit
            "database": s["insert_images"] + s["record_failures"],
            "finish_pca_annoy": s["finish"],
            "decode_threads": s["prepare"],
        },
        "model_images_per_second": images / s["embed"] if s["embed"] else 0.0,
        "batches": times.calls["embed_batch"],
    }


# --- the bare forward pass and the naive loop ----------------------------------------------------


def spread_sample(candidates: list, n: int) -> list:
    """n candidates evenly spread over the (path-sorted) list, so every class has its share; deterministic."""
    if n >= len(candidates):
        return list(candidates)
    return [candidates[i] for i in np.linspace(0, len(candidates) - 1, n).round().astype(int)]


def decode_sample(candidates: list) -> tuple[np.ndarray, list, float]:
    """Pixels of the sample that decodes (in one thread), the candidates kept, and seconds per image spent decoding."""
    pixels, kept = [], []
    started = time.perf_counter()
    for candidate in candidates:
        try:
            pixels.append(decode_image(read_file(candidate.path)).pixels)
            kept.append(candidate)
        except ImageError:
            continue
    per_image = (time.perf_counter() - started) / max(len(candidates), 1)
    return np.stack(pixels), kept, per_image


def measure_forward(extractor, pixels: np.ndarray, batch_size: int) -> dict:
    """`embed` on ready batches, after one warm-up call per batch shape."""
    batches = [pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size)]
    for shape_example in {len(b): b for b in batches}.values():
        extractor.embed(shape_example)
    watch, started = CpuWatch(), time.perf_counter()
    for batch in batches:
        extractor.embed(batch)
    seconds = time.perf_counter() - started
    return {"images": len(pixels), "seconds": seconds, "images_per_second": len(pixels) / seconds, "batch_size": batch_size,
            "cpu": watch.cores()}


def measure_naive(model, candidates: list) -> dict:
    """Per image: read, decode, preprocess, model.predict(x[None]). Warmed up once, as the forward pass is."""
    from keras.applications.resnet50 import preprocess_input

    def one(candidate):
        pixels = decode_image(read_file(candidate.path)).pixels
        return model.predict(preprocess_input(pixels[None].astype(np.float32)), verbose=0)

    one(candidates[0])
    watch, started = CpuWatch(), time.perf_counter()
    for candidate in candidates:
        one(candidate)
    seconds = time.perf_counter() - started
    return {"images": len(candidates), "seconds": seconds, "images_per_second": len(candidates) / seconds, "cpu": watch.cores()}


# --- one run -------------------------------------------------------------------------------------


@contextmanager
def bench_home(ris_home: Path | None):
    """The given RIS_HOME (kept), or a fresh temporary one (removed afterwards)."""
    if ris_home is not None:
        yield Path(ris_home).expanduser().resolve()
        return
    home = Path(tempfile.mkdtemp(prefix="ris-bench-"))
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def bench_database(settings: Settings):
    """Connect; stop the embedded server afterwards only if this run started it (leave others' servers be)."""
    started_here = not settings.database_url and not (settings.pgdata / "postmaster.pid").exists()
    db = connect(settings)
    try:
        yield db
    finally:
        db.dispose()
        if started_here:
            stop_embedded(settings.pgdata)


def caltech_candidates(source, settings: Settings, limit_per_class: int | None) -> tuple[list, int]:
    """The Caltech 101 pictures as `ingest load caltech101` finds them (extracted into the RIS_HOME once)."""
    root = prepare_caltech101(source, settings.datasets_dir)
    candidates, skipped = sources.walk_folder(root, exclude_labels=EXCLUDED_CALTECH_LABELS)
    if limit_per_class:
        candidates = sources.limit_per_label(candidates, limit_per_class)
    if not candidates:
        raise click.ClickException(f"no images found in {root}")
    return candidates, skipped


def run_bench(source, ris_home, collection, weights, limit_per_class, batch_size, workers, threads, sample, naive_sample,
              progress) -> dict:
    """The load on OpenVINO at `auto`'s precision, then the bare forward passes and the naive loop."""
    from ingest.features import FeatureExtractor, build_extractor

    hw = hardware()
    precision = choose("auto", None, hw)
    result: dict = {"source": str(source), "collection": collection, "weights": weights, "limit_per_class": limit_per_class,
                    "machine": machine(), "precision": precision}
    with bench_home(ris_home) as home:
        settings = Settings.load(home=home)
        result["ris_home"] = None if ris_home is None else str(home)
        with bench_database(settings) as db:
            if any(c.name == collection for c in Collection.all(db, settings)):
                raise click.ClickException(f"collection {collection} already exists in {home}; the bench loads into a fresh "
                                           "one: pass another --ris-home or --collection")
            started = time.perf_counter()
            candidates, skipped = caltech_candidates(source, settings, limit_per_class)
            result["prepare_source_seconds"], result["classes"] = time.perf_counter() - started, len({c.label for c in candidates})
            started = time.perf_counter()
            extractor = build_extractor(weights, precision, "openvino", models_dir=settings.models_dir, threads=threads)
            result["model_build_seconds"], result["openvino"] = time.perf_counter() - started, extractor.describe()
            result["load"] = measure_load(settings, db, collection, candidates, skipped, extractor, batch_size, workers, progress)

        pixels, kept, decode_per_image = decode_sample(spread_sample(candidates, sample))
        result["decode_ms_per_image"] = decode_per_image * 1000
        reference = FeatureExtractor(weights, "fp32")
        forward = {BASELINE: measure_forward(reference, pixels, batch_size)}
        for p in ("fp32", "bf16") if hw.cpu_bf16 else ("fp32",):
            forward[f"openvino {p}"] = measure_forward(build_extractor(weights, p, "openvino", models_dir=settings.models_dir),
                                                       pixels, batch_size)
        result["forward"] = forward
        result["naive"] = measure_naive(reference.model, kept[:naive_sample])
    return result | ratios(result)


def ratios(r: dict) -> dict:
    """Each forward pass over TensorFlow fp32's, the load over its own forward pass and over the naive loop, and how
    busy other processes kept the machine meanwhile."""
    base = r["forward"][BASELINE]["images_per_second"]
    load, own = r["load"]["images_per_second"], r["forward"][f"openvino {r['precision']}"]["images_per_second"]
    out = {"forward_over_tensorflow": {k: m["images_per_second"] / base for k, m in r["forward"].items()},
           "load_over_forward": load / own, "load_over_tensorflow_forward": load / base,
           "load_over_naive": load / r["naive"]["images_per_second"],
           "busiest_neighbours_cores": max(m["cpu"]["other_cores"] for m in [r["load"], r["naive"], *r["forward"].values()])}
    out["targets"] = {"load_over_forward": {"target": FORWARD_TARGET, "pass": out["load_over_forward"] >= FORWARD_TARGET},
                      "load_over_naive": {"target": NAIVE_TARGET, "pass": out["load_over_naive"] >= NAIVE_TARGET}}
    return out


def cores(measurement: dict) -> str:
    cpu = measurement["cpu"]
    return f"{cpu['own_cores']:.2f} cores busy here, {cpu['other_cores']:.2f} by other processes"


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def report(r: dict) -> None:
    m, load, naive = r["machine"], r["load"], r["naive"]
    b = load["breakdown_seconds"]
    click.echo(f"machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable); flags {' '.join(m['cpu_flags']) or 'none'}; "
               f"OpenVINO sees {', '.join(m['openvino_capabilities'])}")
    click.echo(f"         Python {m['python']}, OpenVINO {m['openvino']}, TensorFlow {m['tensorflow']}, Keras {m['keras']}, "
               f"NumPy {m['numpy']}, Pillow {m['pillow']}")
    limit = f", {r['limit_per_class']} per class" if r["limit_per_class"] else ""
    click.echo(f"source: {r['source']} ({load['images'] + load['failed']} images in {r['classes']} classes{limit}; ready in "
               f"{r['prepare_source_seconds']:.1f} s); weights {r['weights']}; {r['openvino']} ready in {r['model_build_seconds']:.1f} s")
    base = r["forward"][BASELINE]
    for name, fwd in r["forward"].items():
        click.echo(f"forward {name:15} {fwd['images_per_second']:7.2f} images/s = {r['forward_over_tensorflow'][name]:.2f}x "
                   f"TensorFlow fp32 ({fwd['images']} images, batch {fwd['batch_size']}, warm; {cores(fwd)})")
    click.echo(f"load ({r['precision']}):   {load['images']} images in {load['seconds']:.1f} s = {load['images_per_second']:.2f} images/s "
               f"(load_collection, batch {load['batch_size']}, {load['workers']} decode threads, {load['failed']} failed)")
    click.echo(f"         model {b['model']:.1f} s ({load['model_images_per_second']:.2f} images/s inside the load; first batch "
               f"{b['first_model_call']:.2f} s), main thread outside the model {b['main_thread_not_in_model']:.1f} s, "
               f"PCA + Annoy {b['finish_pca_annoy']:.1f} s; beside it: writer thread {b['writer_thread']:.1f} s "
               f"(database {b['database']:.1f} s), decode threads {b['decode_threads']:.1f} thread-s")
    click.echo(f"         {cores(load)}; peak RSS {load['peak_rss_mib']:.0f} MiB ({load['peak_rss_before_mib']:.0f} MiB before)")
    click.echo(f"         decoding alone: {r['decode_ms_per_image']:.1f} ms/image in one thread (read + Pillow, sample)")
    click.echo(f"naive:   {naive['images_per_second']:.2f} images/s (TensorFlow, decode + model.predict(x[None]) per image, "
               f"{naive['images']} images; {cores(naive)})")
    t = r["targets"]
    click.echo(f"load / its forward pass   = {r['load_over_forward']:.1%} (target >= {FORWARD_TARGET:.0%}): "
               f"{verdict(t['load_over_forward']['pass'])}")
    click.echo(f"load / TensorFlow forward = {r['load_over_tensorflow_forward']:.2f}x ({base['images_per_second']:.2f} images/s)")
    click.echo(f"load / naive              = {r['load_over_naive']:.2f}x (target >= {NAIVE_TARGET}x): {verdict(t['load_over_naive']['pass'])}")
    if r["busiest_neighbours_cores"] > NOISY_NEIGHBOURS:
        click.echo(f"warning: other processes kept up to {r['busiest_neighbours_cores']:.2f} of {m['usable_cores']} cores busy "
                   "during a measurement; images/s and their ratios are not comparable: rerun on a quiet machine", err=True)


DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "caltech101" / "101_ObjectCategories.tar.gz"


@click.command()
@click.option("--source", type=click.Path(path_type=Path), default=DEFAULT_SOURCE, show_default=True,
              help="Caltech 101: 101_ObjectCategories.tar.gz, caltech-101.zip, or the extracted folder.")
@click.option("--ris-home", type=click.Path(path_type=Path), help="Load into this RIS_HOME (kept). Default: a fresh temporary one, removed after.")
@click.option("--collection", default="caltech101", show_default=True, help="Collection to create; it must not exist yet.")
@click.option("--weights", default="random", show_default=True, metavar="imagenet|random|PATH")
@click.option("--limit-per-class", type=click.IntRange(1), metavar="N", help="At most N images per class (quick runs).")
@click.option("--batch-size", type=click.IntRange(1, 1024), default=DEFAULT_BATCH_SIZE, show_default=True)
@click.option("--workers", type=click.IntRange(1), default=CPU_WORKERS, show_default=True, help="Decode threads of the load.")
@click.option("--threads", type=click.IntRange(1), metavar="N", help="OpenVINO inference threads of the load (default: every core).")
@click.option("--sample", type=click.IntRange(1), default=256, show_default=True, help="Images for the bare forward passes.")
@click.option("--naive-sample", type=click.IntRange(1), default=100, show_default=True, help="Images for the per-image predict loop.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for programs.")
@ray_options
def main(source, ris_home, collection, weights, limit_per_class, batch_size, workers, threads, sample, naive_sample, as_json):
    """Images/s of the bare forward pass on TensorFlow and OpenVINO, and of `ingest load`, with PASS/FAIL.

    Example: python -m bench.ingest --limit-per-class 5 --json
    """
    try:
        result = run_bench(source, ris_home, collection, weights, limit_per_class, batch_size, workers, threads, sample,
                           naive_sample, not as_json)
    except RisError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        report(result)


if __name__ == "__main__":
    main()
