"""`python -m bench.ingest --ray ADDRESS`: a load through Ray against the one-process load, in the same run.

Both load the same Caltech 101 candidates with the same weights into two fresh collections of one temporary
RIS_HOME: first `load_collection` here (decode threads, the model in this process), then the same call with a
`Cluster` (Ray Data decode tasks, an actor pool of models). Each is timed as `ingest load` reports it, from
the first file read to the Annoy file written: the Ray figure includes starting its actors and building a
model in each, which a long load pays once. Target on our 2-core machines with `--ray local`: >= 0.8x.
Ray starts before this process imports TensorFlow.
"""
from __future__ import annotations

import functools
import json
import time

import click

from bench.machine import CpuWatch
from ingest.caltech101 import EXCLUDED_CALTECH_LABELS, prepare_caltech101
from ingest.config import Settings
from ingest.load import DEFAULT_PCA_DIMS, load_collection
from ingest.sources import limit_per_label, walk_folder

RAY_TARGET = 0.8  # Ray load images/s over one-process load images/s, at least


def run_ray_bench(source, home, address: str, actors: int | None, weights: str, limit_per_class: int | None, batch_size: int,
                  workers: int, progress: bool) -> dict:
    """Load the candidates twice, here and through Ray; images/s of each and their ratio."""
    from ingest import distributed

    started = time.perf_counter()
    distributed.start(address)
    ray_start = time.perf_counter() - started
    import ray

    from ingest.db import connect
    from ingest.features import extractor_for

    settings = Settings.load(home=home)
    db = connect(settings)
    root = prepare_caltech101(source, settings.datasets_dir)
    candidates, skipped = walk_folder(root, exclude_labels=EXCLUDED_CALTECH_LABELS)
    if limit_per_class:
        candidates = limit_per_label(candidates, limit_per_class)
    extractor = extractor_for(weights, models_dir=settings.models_dir)
    dims = min(DEFAULT_PCA_DIMS, len(candidates))
    cluster = distributed.Cluster(address, actors, batch_size)
    runs = {}
    for kind, extra in (("one_process", {"workers": workers}), ("ray", {"cluster": cluster})):
        watch = CpuWatch()
        summary = load_collection(db, settings, f"bench-{kind}", candidates, extractor, pca_dims=dims, batch_size=batch_size,
                                  skipped=skipped, progress=progress, **extra)
        runs[kind] = {"images": summary.ingested + summary.present, "failed": summary.failed, "seconds": summary.seconds,
                      "images_per_second": summary.images_per_second, "cpu": watch.cores()}
    db.dispose()
    ratio = runs["ray"]["images_per_second"] / runs["one_process"]["images_per_second"]
    return {"address": address, "ray_start_seconds": ray_start, "ray_cpus": ray.cluster_resources().get("CPU"),
            "actors": cluster.plan()[0], "batch_size": batch_size, "limit_per_class": limit_per_class, **runs,
            "ray_over_one_process": ratio, "target": {"target": RAY_TARGET, "pass": ratio >= RAY_TARGET}}


def report_ray(r: dict) -> None:
    for kind, what in (("one_process", "load_collection here, decode threads"),
                       ("ray", f"--ray {r['address']}: {r['actors']} actor(s), Ray Data decode tasks")):
        m = r[kind]
        click.echo(f"{kind:12} {m['images']} images in {m['seconds']:.1f} s = {m['images_per_second']:.2f} images/s ({what}; "
                   f"{m['cpu']['other_cores']:.2f} cores busy in other processes)")
    click.echo(f"Ray started in {r['ray_start_seconds']:.1f} s with {r['ray_cpus']:g} CPUs (not in the figures); batch {r['batch_size']}")
    verdict = "PASS" if r["target"]["pass"] else "FAIL"
    click.echo(f"ray / one process = {r['ray_over_one_process']:.2f}x (target >= {RAY_TARGET}x): {verdict}")


def ray_options(command):
    """`--ray ADDRESS` and `--ray-actors N` on bench.ingest's command: with --ray, this module's comparison runs
    instead of the command (before anything imports TensorFlow), in the same fresh or given RIS_HOME."""

    @functools.wraps(command)
    def run(ray_address, ray_actors, **options):
        if not ray_address:
            return command(**options)
        from bench.ingest import bench_home

        o = options
        with bench_home(o["ris_home"]) as home:
            result = run_ray_bench(o["source"], home, ray_address, ray_actors, o["weights"], o["limit_per_class"], o["batch_size"],
                                   o["workers"], not o["as_json"])
        click.echo(json.dumps(result, indent=2)) if o["as_json"] else report_ray(result)

    run = click.option("--ray-actors", type=click.IntRange(1), metavar="N", help="Embedding actors with --ray (default: one per two CPUs).")(run)
    return click.option("--ray", "ray_address", metavar="ADDRESS",
                        help="Instead: a load through Ray (e.g. local) against the one-process load, in one run (bench/distributed.py).")(run)
