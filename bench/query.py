"""How long does a cold `search similar NEW.jpg` take, and how much memory: a new process each time, as a user runs it.

    python -m bench.query --ris-home H [--collection NAME] [--repeat 5] [--json]

The collection's model is cached first (its OpenVINO IR, converted here if it is not yet) and the database is left
running, so each run pays what a user pays on every query: Python, the command's imports, opening the database,
reading and compiling the IR, decoding and embedding one picture it has never seen, and the search.
Targets: <= 1.5 s wall and <= 600 MB peak resident memory (the slowest and largest of the runs).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: bench/ is then sys.path[0] and this file would shadow the ingest package
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import json
import os
import statistics
import subprocess
import tempfile
import time

import click
import numpy as np
from PIL import Image

from bench.machine import CpuWatch, cpu_model
from ingest.collection import Collection
from ingest.config import Settings
from ingest.db import connect
from ingest.errors import RisError

SECONDS_TARGET, RSS_TARGET_MB = 1.5, 600


def new_picture(path: Path) -> Path:
    """A picture no collection holds (seeded noise under a gradient), so the query runs the CNN."""
    rng = np.random.default_rng(int(time.time()))
    down, across = np.mgrid[0:240, 0:320]
    pixels = np.stack([across % 256, down % 256, rng.integers(0, 256, (240, 320))], -1).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def one_query(picture: Path, collection: str, home: Path) -> dict:
    """Wall seconds and peak RSS of `search similar PICTURE` in a process of its own (os.wait4 gives its own rusage)."""
    search = Path(sys.executable).parent / "search"
    env = os.environ | {"RIS_HOME": str(home)}
    started = time.perf_counter()
    proc = subprocess.Popen([str(search), "similar", str(picture), "-c", collection, "-k", "10"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    error = proc.stderr.read().decode().strip()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RisError(f"search similar failed: {error.splitlines()[-1] if error else proc.returncode}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}


def run(ris_home: Path, collection: str | None, repeat: int) -> dict:
    settings = Settings.load(home=ris_home)
    db = connect(settings)  # starts the embedded server if it is not running; it is left running for the queries
    try:
        coll = Collection.named(db, settings, collection)
        started = time.perf_counter()
        extractor = coll.extractor()  # caches the IR if needed, as the first query after a load would
        warm_up = time.perf_counter() - started
    finally:
        db.dispose()
    watch, runs = CpuWatch(), []
    with tempfile.TemporaryDirectory(prefix="ris-query-") as tmp:
        for i in range(repeat):
            runs.append(one_query(new_picture(Path(tmp) / f"new-{i}.jpg"), coll.name, settings.home))
    seconds, rss = [r["seconds"] for r in runs], [r["peak_rss_mb"] for r in runs]
    return {"cpu": cpu_model(), "collection": coll.name, "runtime": extractor.runtime, "precision": coll.precision,
            "model_ready_seconds_here": warm_up, "runs": runs, "seconds_median": statistics.median(seconds),
            "seconds_max": max(seconds), "peak_rss_mb_max": max(rss), "other_cores": watch.cores()["other_cores"],
            "targets": {"seconds": {"target": SECONDS_TARGET, "pass": max(seconds) <= SECONDS_TARGET},
                        "peak_rss_mb": {"target": RSS_TARGET_MB, "pass": max(rss) <= RSS_TARGET_MB}}}


def report(r: dict) -> None:
    click.echo(f"cold `search similar NEW.jpg -c {r['collection']}` ({r['runtime']} {r['precision']}, {r['cpu']}), "
               f"{len(r['runs'])} new processes: " + ", ".join(f"{x['seconds']:.2f} s / {x['peak_rss_mb']:.0f} MB" for x in r["runs"]))
    t = r["targets"]
    click.echo(f"wall: median {r['seconds_median']:.2f} s, slowest {r['seconds_max']:.2f} s (target <= {SECONDS_TARGET} s): "
               f"{'PASS' if t['seconds']['pass'] else 'FAIL'}")
    click.echo(f"peak RSS: largest {r['peak_rss_mb_max']:.0f} MB (target <= {RSS_TARGET_MB} MB): "
               f"{'PASS' if t['peak_rss_mb']['pass'] else 'FAIL'}")
    if r["other_cores"] > 0.25:
        click.echo(f"warning: other processes kept {r['other_cores']:.2f} cores busy meanwhile; rerun on a quiet machine", err=True)


@click.command()
@click.option("--ris-home", type=click.Path(path_type=Path, file_okay=False, exists=True), required=True,
              help="A RIS_HOME with a loaded collection (e.g. the one bench.runtime or bench.ingest --ris-home filled).")
@click.option("--collection", "-c", metavar="NAME", help="Collection to query. Default: the only one, else caltech101.")
@click.option("--repeat", type=click.IntRange(1, 100), default=5, show_default=True, help="New processes to time.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for programs.")
def main(ris_home, collection, repeat, as_json):
    """Wall time and peak memory of a cold `search similar` of a new picture, with PASS/FAIL.

    Example: python -m bench.query --ris-home ~/ris-bench -c runtime-default
    """
    try:
        result = run(ris_home.resolve(), collection, repeat)
    except RisError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(result, indent=2)) if as_json else report(result)


if __name__ == "__main__":
    main()
