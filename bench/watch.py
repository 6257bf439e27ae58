"""How soon does `ingest watch` make a landed picture searchable, how fast does it take a burst, and what does a
polling watcher cost while nothing happens?

  latency  pictures landing one at a time (renamed into the folder, as a finished copy lands) in a folder a real
           `ingest watch` process watches, each timed from landing to searchable (its row has an embedding, which every
           engine finds): p50/p95 under inotify (target p95 <= 5 s) and under --poll (target p95 <= interval + 5 s);
  burst    1,000 pictures landing at once: pictures/s from landing to the last one searchable, over `ingest load
           folder` of the same files into a fresh collection (its own timing, model start-up left out; target >= 0.8x);
  idle     CPU of a --poll 60 watcher over 100k tiny files (they fail to decode but are walked and stat'ed like any)
           while nothing changes (target <= 5% of a core), and one scan's CPU measured in this process.
Everything runs against a private RIS_HOME (its own embedded server) with --weights random, so it needs no network.
Each figure carries the machine's load average: on a shared machine a busy neighbour slows every one.

Example: python -m bench.watch --parts latency,burst --json
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: bench/ is then sys.path[0] and this file would shadow the ingest package
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time

import click
import numpy as np
import sqlalchemy as sa
from PIL import Image

from bench.machine import cpu_model
from ingest.config import Settings
from ingest.db import connect, stop_embedded
from ingest.patterns import PathFilter
from ingest.folder_changes import FolderScanner

BIN = Path(sys.executable).parent
LATENCY_TARGET = 5.0  # seconds from landing to searchable, p95, under inotify (plus the interval when polling)
BURST_TARGET = 0.8  # the watcher's pictures/s on a burst over the load's, at least
IDLE_TARGET = 0.05  # cores a polling watcher uses while nothing changes, at most
START_TIMEOUT = 900.0
RUN = time.strftime("%Y%m%d%H%M%S")  # names this run's collections: pictures stored by an earlier run would be found at once


def picture(path: Path, seed: int, size=(160, 120)) -> None:
    """A small distinct JPEG: noise plus a block of colour, different for every seed."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    pixels[20:60, 30:90] = rng.integers(0, 255, 3, dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=85)


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


class Watcher:
    """A real `ingest watch --json` process and the events it printed."""

    def __init__(self, home: Path, folder: Path, name: str, *extra: str):
        env = {**os.environ, "RIS_HOME": str(home)}
        env.pop("DATABASE_URL", None)
        self.proc = subprocess.Popen([str(BIN / "ingest"), "watch", str(folder), "-c", name, "--weights", "random", "--json", *extra],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                pass

    def wait_started(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not any(e.get("event") == "batch" and e.get("start") for e in self.events):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise click.ClickException(f"the watcher did not start (exit {self.proc.poll()}): {self.events[-3:]}")
            time.sleep(0.1)

    def cpu_seconds(self) -> float:
        """user + system CPU of the process so far (/proc/PID/stat fields 14 and 15)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def searchable(db, name: str, hashes: list[str]) -> int:
    """How many of these pictures the collection holds with an embedding."""
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM images i JOIN collections c ON c.id = i.collection_id"
                                    " WHERE c.name = :n AND i.sha256 = ANY(:h) AND i.embedding IS NOT NULL"),
                            {"n": name, "h": hashes}).scalar()


def wait_searchable(db, name: str, hashes: list[str], timeout: float) -> float:
    """Seconds until every one of `hashes` is searchable (inf at the timeout)."""
    began = time.monotonic()
    while searchable(db, name, hashes) < len(hashes):
        if time.monotonic() - began > timeout:
            return float("inf")
        time.sleep(0.02)
    return time.monotonic() - began


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def latency(db, home: Path, work: Path, n: int, *extra: str, label: str) -> dict:
    """Land `n` pictures one at a time in a watched folder; seconds from each landing to searchable."""
    folder, staging = work / f"latency-{label}" / "photos", work / f"latency-{label}" / "staging"
    for d in (folder / "seed", staging):
        d.mkdir(parents=True)
    for i in range(4):
        picture(folder / "seed" / f"{i}.jpg", 10_000 + i)
    name = f"bench-latency-{label}-{RUN}"
    watcher = Watcher(home, folder, name, *extra)
    try:
        watcher.wait_started()
        times = []
        for i in range(n):
            staged = staging / f"{i}.jpg"
            picture(staged, 20_000 + i)
            h = sha256(staged)
            staged.rename(folder / "seed" / f"landed_{i}.jpg")
            times.append(wait_searchable(db, name, [h], 120))
            time.sleep(0.3)
    finally:
        watcher.stop()
    return {"pictures": n, "p50_s": percentile(times, 50), "p95_s": percentile(times, 95), "max_s": max(times)}


def burst(db, home: Path, work: Path, n: int) -> dict:
    """`n` pictures landing at once in a watched folder, against `ingest load folder` of the same files."""
    folder, staging = work / "burst" / "photos", work / "burst" / "staging" / "burst"
    for d in (folder / "seed", staging):
        d.mkdir(parents=True)
    for i in range(4):
        picture(folder / "seed" / f"{i}.jpg", 30_000 + i)
    for i in range(n):
        picture(staging / f"{i:05d}.jpg", 40_000 + i)
    hashes = [sha256(p) for p in staging.iterdir()]
    env = {**os.environ, "RIS_HOME": str(home)}
    env.pop("DATABASE_URL", None)
    subprocess.run([str(BIN / "ingest"), "load", "folder", str(folder / "seed"), "-c", f"bench-burst-warm-{RUN}", "--weights",
                    "random"], env=env, capture_output=True, check=True)  # converts the model once, as the watcher finds it
    began = time.perf_counter()
    done = subprocess.run([str(BIN / "ingest"), "load", "folder", str(staging), "-c", f"bench-burst-load-{RUN}", "--weights", "random", "--json"],
                          env=env, capture_output=True, text=True, check=True)
    load_wall = time.perf_counter() - began  # the command as a user times it: start-up, model, PCA and Annoy included
    load = json.loads(done.stdout)
    watcher = Watcher(home, folder, f"bench-burst-watch-{RUN}")
    try:
        watcher.wait_started()
        staging.rename(folder / "burst")
        seconds = wait_searchable(db, f"bench-burst-watch-{RUN}", hashes, 3600)
    finally:
        watcher.stop()
    load_rate = load["ingested"] / load_wall
    watch_rate = n / seconds
    batches = [{k: e[k] for k in ("added", "seconds", "refit_dims")} for e in watcher.events if e.get("event") == "batch" and not e["start"]]
    return {"pictures": n, "load_seconds": load_wall, "load_per_s": load_rate, "watch_seconds": seconds,
            "watch_per_s": watch_rate, "ratio": watch_rate / load_rate, "watch_batches": batches,
            "load_reported_seconds": load["seconds"], "ratio_to_load_reported": watch_rate / (load["ingested"] / load["seconds"])}


def idle(home: Path, work: Path, files: int, poll: float, seconds: float) -> dict:
    """CPU of a --poll watcher over `files` tiny files while nothing changes, and one scan's CPU in-process."""
    folder = work / "idle" / "photos"
    for i in range(files):
        sub = folder / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True)
        (sub / f"f{i:06d}.jpg").write_bytes(b"not a picture %d" % i)
    scanner = FolderScanner(folder, PathFilter())
    began = time.process_time()
    scan = scanner.scan()
    walk_cpu = time.process_time() - began
    time.sleep(2.5)  # past MTIME_TICK: the folders' mtimes can be trusted
    scanner.forget()
    scanner.scan()
    began = time.process_time()
    scanner.scan()
    scan_cpu = time.process_time() - began
    watcher = Watcher(home, folder, f"bench-idle-{RUN}", "--poll", str(poll))
    try:
        started = time.monotonic()
        watcher.wait_started()
        start_seconds = time.monotonic() - started
        before, wall = watcher.cpu_seconds(), time.monotonic()
        time.sleep(seconds)
        used = watcher.cpu_seconds() - before
        wall = time.monotonic() - wall
    finally:
        watcher.stop()
    return {"files": len(scan.files), "poll_s": poll, "start_seconds": start_seconds, "walk_cpu_s": walk_cpu, "scan_cpu_s": scan_cpu,
            "scan_share_of_core": scan_cpu / poll, "idle_wall_s": wall, "idle_cpu_s": used, "idle_cores": used / wall}


@click.command()
@click.option("--parts", default="latency,burst,idle", show_default=True, help="Which parts to run (comma-separated).")
@click.option("--latency-pictures", default=20, show_default=True)
@click.option("--latency-poll", default=5.0, show_default=True, help="--poll of the polling latency run.")
@click.option("--burst-pictures", default=1000, show_default=True)
@click.option("--idle-files", default=100_000, show_default=True)
@click.option("--idle-poll", default=60.0, show_default=True)
@click.option("--idle-seconds", default=125.0, show_default=True, help="How long to measure the idle watcher (two polls).")
@click.option("--home", type=click.Path(path_type=Path, file_okay=False), help="RIS_HOME to use (default: a fresh one, removed after).")
@click.option("--json", "as_json", is_flag=True)
def main(parts, latency_pictures, latency_poll, burst_pictures, idle_files, idle_poll, idle_seconds, home, as_json):
    """Print landed-to-searchable p50/p95, burst pictures/s against a load, and a polling watcher's idle CPU."""
    parts = {p.strip() for p in parts.split(",") if p.strip()}
    work = Path(tempfile.mkdtemp(prefix="bench-watch-"))
    own_home = home is None
    home = home or work / "home"
    db = connect(Settings.load(home=home))
    results: dict = {"machine": f"{cpu_model()}, {os.cpu_count()} cores", "load_average_before": os.getloadavg()[0]}
    try:
        if "latency" in parts:
            results["latency_inotify"] = latency(db, home, work, latency_pictures, label="inotify")
            results["latency_poll"] = latency(db, home, work, max(4, latency_pictures // 2), "--poll", str(latency_poll),
                                              label="poll") | {"poll_s": latency_poll}
        if "burst" in parts:
            results["burst"] = burst(db, home, work, burst_pictures)
        if "idle" in parts:
            results["idle"] = idle(home, work, idle_files, idle_poll, idle_seconds)
    finally:
        remove_collections(db, home)
        db.dispose()
        if own_home:
            stop_embedded(home / "pgdata")
        shutil.rmtree(work, ignore_errors=True)
    results["load_average_after"] = os.getloadavg()[0]
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    report(results, latency_poll)


def remove_collections(db, home: Path) -> None:
    """Remove this run's collections (a --home kept for the next run stays small)."""
    from ingest.collection import Collection
    from ingest.remove import remove_collection

    settings = Settings.load(home=home)
    for coll in Collection.all(db, settings):
        if coll.name.startswith("bench-") and coll.name.endswith(RUN):
            remove_collection(coll)


def report(r: dict, poll: float) -> None:
    click.echo(f"{r['machine']}, load average {r['load_average_before']:.1f} before, {r['load_average_after']:.1f} after")
    for key, target in (("latency_inotify", LATENCY_TARGET), ("latency_poll", poll + LATENCY_TARGET)):
        if key in r:
            x = r[key]
            verdict = "ok" if x["p95_s"] <= target else "MISSED"
            click.echo(f"{key}: {x['pictures']} pictures, landed to searchable p50 {x['p50_s']:.2f} s, p95 {x['p95_s']:.2f} s, "
                       f"max {x['max_s']:.2f} s (target p95 <= {target:g} s: {verdict})")
    if "burst" in r:
        x = r["burst"]
        click.echo(f"burst: {x['pictures']} pictures, watcher {x['watch_per_s']:.1f}/s ({x['watch_seconds']:.1f} s, landing to "
                   f"searchable), `ingest load folder` {x['load_per_s']:.1f}/s ({x['load_seconds']:.1f} s, the command's wall "
                   f"time): {x['ratio']:.2f}x (target >= {BURST_TARGET}: {'ok' if x['ratio'] >= BURST_TARGET else 'MISSED'}); "
                   f"against the {x['load_reported_seconds']:.1f} s the load reports for its own loop: {x['ratio_to_load_reported']:.2f}x")
    if "idle" in r:
        x = r["idle"]
        click.echo(f"idle: {x['files']} files at --poll {x['poll_s']:g}: {100 * x['idle_cores']:.2f}% of a core over "
                   f"{x['idle_wall_s']:.0f} s (target <= {100 * IDLE_TARGET:g}%: {'ok' if x['idle_cores'] <= IDLE_TARGET else 'MISSED'}); "
                   f"a scan {x['scan_cpu_s']:.2f} s CPU ({100 * x['scan_share_of_core']:.2f}% of a core), {x['walk_cpu_s']:.2f} s when it walks; "
                   f"start-up {x['start_seconds']:.0f} s")


if __name__ == "__main__":
    main()
