"""How fast is `ingest load`, next to the model alone and next to the naive way?

One run on the Caltech 101 archive measures, with one model (same weights throughout):
  load     the whole load path, `load_collection` into a fresh collection (read, hash, decode in
           threads, batched forward pass, COPY into PostgreSQL, then PCA and the Annoy file);
  forward  the bare batched forward pass, `FeatureExtractor.embed` on pre-decoded batches of the
           same size, warmed up first (the first call traces and compiles);
  naive    decode and `model.predict(x[None])` one image at a time, what weaker projects do.
The load and the forward pass run at fp32 (the baseline) and again at bf16 (`--precisions`).
Targets on our 2-core machines: load >= 85% of forward (decoding and storing hide behind the model),
>= 2.5x naive, and the bf16 load >= 1.25x the fp32 forward pass (AVX512_BF16 processors).
The load is timed as `ingest load` runs it, cold model included; a breakdown
(seconds inside the model, the database, the decode threads, PCA + Annoy) says where time went.

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
from bench.precision import PRECISIONS, over_baseline_forward, parse_precisions, precision_targets, report_precisions
from ingest import load as load_module
from ingest import sources, store
from ingest.caltech101 import EXCLUDED_CALTECH_LABELS, prepare_caltech101
from ingest.collection import Collection
from ingest.config import Settings
from ingest.db import connect, stop_embedded
from ingest.errors import ImageError, RisError
from ingest.images import decode_image, read_file
from ingest.load import DEFAULT_BATCH_SIZE, DEFAULT_PCA_DIMS, LoadSummary, load_collection

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "caltech101" / "101_ObjectCategories.tar.gz"
FORWARD_TARGET = 0.85  # load images/s over bare forward images/s, at least
NAIVE_TARGET = 2.5  # load images/s over per-image predict images/s, at least
NOISY_NEIGHBOURS = 0.25  # cores other processes may use on average before the figures are called unreliable
# (object, attribute) of each stage timed: looked up at call time, so wrapping the attribute times every call.
LOAD_STAGES = {"prepare": load_module, "store_batch": load_module, "insert_images": store, "record_failures": store,
               "finish": Collection}


# --- the machine ---------------------------------------------------------------------------------


def machine() -> dict:
    """CPU model, cores and library versions: figures mean little without them. Call after TensorFlow is imported."""
    import keras
    import PIL

    tf = sys.modules["tensorflow"]
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(), "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


# --- the whole load path -------------------------------------------------------------------------


class StageTimes:
    """Seconds spent inside chosen functions, summed over calls; decode threads add up, so theirs is thread-seconds."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.first: dict[str, float] = {}  # the first call's seconds: the model's includes tracing and compiling
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
        "images": images,
        "ingested": summary.ingested,
        "failed": summary.failed,
        "seconds": summary.seconds,
        "images_per_second": summary.images_per_second,
        "batch_size": batch_size,
        "workers": workers,
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_before_mib": rss_before,
        "cpu": watch.cores(),
        "breakdown_seconds": {
            "model": s["embed"],
            "first_model_call": times.first.get("embed", 0.0),
            "database": s["insert_images"] + s["record_failures"],
            "batch_other": s["store_batch"] - s["embed"] - s["insert_images"] - s["record_failures"],
            "finish_pca_annoy": s["finish"],
            "waiting_for_decode": summary.seconds - s["store_batch"] - s["finish"],
            "decode_threads": s["prepare"],
        },
        "model_images_per_second": images / s["embed"] if s["embed"] else 0.0,
        "batches": times.calls["store_batch"],
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
    """FeatureExtractor.embed on ready batches, after one warm-up call per batch shape."""
    batches = [pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size)]
    for shape_example in {len(b): b for b in batches}.values():
        extractor.embed(shape_example)
    watch, started = CpuWatch(), time.perf_counter()
    for batch in batches:
        extractor.embed(batch)
    seconds = time.perf_counter() - started
    return {
        "images": len(pixels), "seconds": seconds, "images_per_second": len(pixels) / seconds,
        "batch_size": batch_size, "cpu": watch.cores(),
    }


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


def run_bench(source, ris_home, collection, weights, limit_per_class, batch_size, workers, sample, naive_sample, progress,
              precisions=PRECISIONS) -> dict:
    """Load, forward and naive at the first precision (the baseline); load (into `<collection>-<precision>`) and forward at the others."""
    from ingest.features import FeatureExtractor

    result: dict = {"source": str(source), "collection": collection, "weights": weights, "limit_per_class": limit_per_class}
    names = {p: collection if n == 0 else f"{collection}-{p}" for n, p in enumerate(precisions)}
    with bench_home(ris_home) as home:
        settings = Settings.load(home=home)
        result["ris_home"] = None if ris_home is None else str(home)
        with bench_database(settings) as db:
            if any(c.name in names.values() for c in Collection.all(db, settings)):
                raise click.ClickException(
                    f"collection {', '.join(names.values())} already exists in {home}; the bench loads into fresh ones: "
                    "pass another --ris-home or --collection"
                )
            started = time.perf_counter()
            root = prepare_caltech101(source, settings.datasets_dir)
            candidates, skipped = sources.walk_folder(root, exclude_labels=EXCLUDED_CALTECH_LABELS)
            if limit_per_class:
                candidates = sources.limit_per_label(candidates, limit_per_class)
            if not candidates:
                raise click.ClickException(f"no images found in {root}")
            result["prepare_source_seconds"] = time.perf_counter() - started
            result["classes"] = len({c.label for c in candidates})

            runs, extractors = {}, {}
            for precision in precisions:
                started = time.perf_counter()
                extractors[precision] = FeatureExtractor(weights, precision)
                runs[precision] = {"model_build_seconds": time.perf_counter() - started}
                result.setdefault("machine", machine())
                runs[precision]["load"] = measure_load(settings, db, names[precision], candidates, skipped, extractors[precision],
                                                       batch_size, workers, progress)

        pixels, kept, decode_per_image = decode_sample(spread_sample(candidates, sample))
        result["decode_ms_per_image"] = decode_per_image * 1000
        for precision in precisions:
            runs[precision]["forward"] = measure_forward(extractors[precision], pixels, batch_size)
        result["naive"] = measure_naive(extractors[precisions[0]].model, kept[:naive_sample])
    result |= {"baseline_precision": precisions[0], "precisions": runs, **runs[precisions[0]]}
    result["over_baseline_forward"] = over_baseline_forward(runs, precisions[0])
    load_rate = result["load"]["images_per_second"]
    result["load_over_forward"] = load_rate / result["forward"]["images_per_second"]
    result["load_over_naive"] = load_rate / result["naive"]["images_per_second"]
    result["load_over_forward_per_cpu_second"] = per_cpu_second(result["load"]) / per_cpu_second(result["forward"])
    result["busiest_neighbours_cores"] = max([result["naive"]["cpu"]["other_cores"]] + [
        run[k]["cpu"]["other_cores"] for run in runs.values() for k in ("load", "forward")])
    result["targets"] = {
        "load_over_forward": {"target": FORWARD_TARGET, "pass": result["load_over_forward"] >= FORWARD_TARGET},
        "load_over_naive": {"target": NAIVE_TARGET, "pass": result["load_over_naive"] >= NAIVE_TARGET},
    }
    result["targets"] |= precision_targets(result["over_baseline_forward"], precisions[0])
    return result


def per_cpu_second(measurement: dict) -> float:
    """Images per CPU-second this process used: less sensitive than images/s to what neighbours take."""
    return measurement["images"] / measurement["cpu"]["own_cpu_seconds"]


def cores(measurement: dict) -> str:
    cpu = measurement["cpu"]
    return f"{cpu['own_cores']:.2f} cores busy here, {cpu['other_cores']:.2f} by other processes"


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def report(r: dict) -> None:
    m, load, fwd, naive = r["machine"], r["load"], r["forward"], r["naive"]
    b = load["breakdown_seconds"]
    click.echo(
        f"machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), Python {m['python']}, "
        f"TensorFlow {m['tensorflow']}, Keras {m['keras']}, NumPy {m['numpy']}, Pillow {m['pillow']}"
    )
    limit = f", {r['limit_per_class']} per class" if r["limit_per_class"] else ""
    click.echo(
        f"source: {r['source']} ({load['images'] + load['failed']} images in {r['classes']} classes{limit}; "
        f"ready in {r['prepare_source_seconds']:.1f} s); weights {r['weights']}; model built in {r['model_build_seconds']:.1f} s"
    )
    click.echo(
        f"load:    {load['images']} images in {load['seconds']:.1f} s = {load['images_per_second']:.2f} images/s "
        f"(load_collection, batch {load['batch_size']}, {load['workers']} decode threads, {load['failed']} failed)"
    )
    click.echo(
        f"         model {b['model']:.1f} s ({load['model_images_per_second']:.2f} images/s inside the load; "
        f"first batch {b['first_model_call']:.1f} s, compiling), "
        f"database {b['database']:.1f} s, other batch work {b['batch_other']:.1f} s, "
        f"waiting for decode {b['waiting_for_decode']:.1f} s, PCA + Annoy {b['finish_pca_annoy']:.1f} s; "
        f"decode threads busy {b['decode_threads']:.1f} thread-s"
    )
    click.echo(
        f"         {cores(load)}; peak RSS {load['peak_rss_mib']:.0f} MiB ({load['peak_rss_before_mib']:.0f} MiB before the load)"
    )
    click.echo(
        f"forward: {fwd['images']} images in {fwd['seconds']:.1f} s = {fwd['images_per_second']:.2f} images/s "
        f"(FeatureExtractor.embed, batch {fwd['batch_size']}, warm; {cores(fwd)})"
    )
    click.echo(f"         decoding alone: {r['decode_ms_per_image']:.1f} ms/image in one thread (read + Pillow, sample)")
    click.echo(
        f"naive:   {naive['images']} images in {naive['seconds']:.1f} s = {naive['images_per_second']:.2f} images/s "
        f"(decode + model.predict(x[None]) per image; {cores(naive)})"
    )
    t = r["targets"]
    click.echo(
        f"load / forward = {r['load_over_forward']:.1%} (target >= {FORWARD_TARGET:.0%}): "
        f"{verdict(t['load_over_forward']['pass'])}"
    )
    click.echo(
        f"load / naive   = {r['load_over_naive']:.2f}x (target >= {NAIVE_TARGET}x): {verdict(t['load_over_naive']['pass'])}"
    )
    click.echo(
        f"per CPU-second of this process: load {per_cpu_second(load):.2f}, forward {per_cpu_second(fwd):.2f} images "
        f"= {r['load_over_forward_per_cpu_second']:.1%}"
    )
    report_precisions(r)
    if r["busiest_neighbours_cores"] > NOISY_NEIGHBOURS:
        click.echo(
            f"warning: other processes kept up to {r['busiest_neighbours_cores']:.2f} of {m['usable_cores']} cores busy "
            "during a measurement; images/s and their ratios are not comparable: rerun on a quiet machine",
            err=True,
        )


@click.command()
@click.option("--source", type=click.Path(path_type=Path), default=DEFAULT_SOURCE, show_default=True,
              help="Caltech 101: 101_ObjectCategories.tar.gz, caltech-101.zip, or the extracted folder.")
@click.option("--ris-home", type=click.Path(path_type=Path), help="Load into this RIS_HOME (kept). Default: a fresh temporary one, removed after.")
@click.option("--collection", default="caltech101", show_default=True, help="Collection to create; it must not exist yet.")
@click.option("--weights", default="random", show_default=True, metavar="imagenet|random|PATH")
@click.option("--limit-per-class", type=click.IntRange(1), metavar="N", help="At most N images per class (quick runs).")
@click.option("--batch-size", type=click.IntRange(1, 1024), default=DEFAULT_BATCH_SIZE, show_default=True)
@click.option("--workers", type=click.IntRange(1), default=2, show_default=True, help="Decode threads of the load.")
@click.option("--sample", type=click.IntRange(1), default=256, show_default=True, help="Images for the bare forward pass.")
@click.option("--naive-sample", type=click.IntRange(1), default=100, show_default=True, help="Images for the per-image predict loop.")
@click.option("--precisions", default=",".join(PRECISIONS), show_default=True, metavar="P,P",
              help="Precisions to load and forward at (fp32, bf16); the first is the baseline of every ratio.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for programs.")
@ray_options
def main(source, ris_home, collection, weights, limit_per_class, batch_size, workers, sample, naive_sample, precisions, as_json):
    """Images/s of `ingest load` against the bare batched forward pass and a per-image predict loop, with PASS/FAIL.

    Example: python -m bench.ingest --limit-per-class 5 --json
    """
    try:
        result = run_bench(source, ris_home, collection, weights, limit_per_class, batch_size, workers, sample, naive_sample, not as_json,
                           parse_precisions(precisions))
    except RisError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        report(result)


if __name__ == "__main__":
    main()
