"""Web server benchmark: N concurrent clients against a local `search serve` for a bounded time.

    RIS_HOME=... python bench/serve.py --collection caltech101 --clients 16 --seconds 20 [--json]

Three phases on one server (`--workers` processes, default 2): searches by id only (no CNN; the figure the
target is about: p95 under 50 ms with 16 clients on 2 cores), then mixed: `--uploaders` of the clients upload
pictures (re-encoded copies of stored ones, so the CNN runs) while the rest search by id, then one client uploading
alone (the time a new picture takes when the server is not busy with others). Each client keeps one
HTTP/1.1 connection. Per kind: requests/s, p50/p95/p99 and errors (any answer but 200). The baseline is the
same search by id through the library in this process, one at a time, so the ratio is what HTTP, JSON and
sharing the machine with the server cost. The clients run in this process and share the 2 cores with the
server: figures are for the pair, and `other cores` says how busy the machine was meanwhile.
`--screenshot PATH` also saves a picture of the page after an upload (README's docs/serve.png).
"""
from __future__ import annotations

import http.client
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import click
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import CpuWatch, cpu_model  # noqa: E402
from ingest.collection import Collection  # noqa: E402
from ingest.engines import ENGINES, EngineName  # noqa: E402
from ingest.options import open_database  # noqa: E402
from search.evaluation import percentiles  # noqa: E402

BOUNDARY = "ris-bench-boundary"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(collection: str, port: int, workers: int) -> subprocess.Popen:
    """`search serve` in its own process group, waited for until it answers."""
    command = [str(Path(sys.executable).parent / "search"), "serve", "-c", collection, "--port", str(port), "--workers", str(workers)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=2).read()
            return server
        except OSError:
            if server.poll() is not None:
                raise click.ClickException(f"search serve exited with {server.returncode}")
            time.sleep(0.3)
    raise click.ClickException("search serve did not answer within 180 s")


def multipart(data: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def upload_bodies(coll: Collection, n: int, seed: int) -> list[bytes]:
    """Stored pictures re-encoded (other bytes, so the server runs the CNN instead of finding them by sha256)."""
    ids = np.random.default_rng(seed).choice(coll.image_ids(), n, replace=False).tolist()
    bodies = []
    for path in (d.path for d in coll.details(ids).values()):
        out = io.BytesIO()
        Image.open(path).convert("RGB").save(out, "JPEG", quality=87)
        bodies.append(multipart(out.getvalue()))
    return bodies


class Client(threading.Thread):
    """One user: a kept-alive connection, requests back to back until the deadline; (kind, ms, ok) per request."""

    def __init__(self, port: int, collection: str, kind: str, ids: list[int], bodies: list[bytes], params: str, deadline: float,
                 seed: int):
        super().__init__(daemon=True)
        self.port, self.collection, self.kind, self.ids, self.bodies = port, collection, kind, ids, bodies
        self.params, self.deadline = params, deadline
        self.rng = random.Random(seed)
        self.results: list[tuple[str, float, bool]] = []

    def request(self, conn: http.client.HTTPConnection) -> bool:
        if self.kind == "by id":
            conn.request("GET", f"/api/collections/{self.collection}/images/{self.rng.choice(self.ids)}/similar?{self.params}")
        else:
            conn.request("POST", f"/api/collections/{self.collection}/similar?{self.params}", body=self.rng.choice(self.bodies),
                         headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        response = conn.getresponse()
        response.read()
        return response.status == 200

    def run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        while time.perf_counter() < self.deadline:
            started = time.perf_counter()
            try:
                ok = self.request(conn)
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            self.results.append((self.kind, (time.perf_counter() - started) * 1000, ok))
        conn.close()


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds used so far by the live processes of a process group (the server and its workers)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def run_phase(port: int, server_pid: int, collection: str, kinds: list[str], ids, bodies, params: str, seconds: float) -> dict:
    """Every client at once for `seconds`; per kind: requests, errors, req/s, p50/p95/p99 ms; and the cores the
    clients (this process), the server and everything else (PostgreSQL, other users of the machine) kept busy."""
    deadline = time.perf_counter() + seconds
    clients = [Client(port, collection, kind, ids, bodies, params, deadline, seed) for seed, kind in enumerate(kinds)]
    watch, server_cpu, started = CpuWatch(), group_cpu_seconds(server_pid), time.perf_counter()
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    cores = watch.cores()
    server_cores = (group_cpu_seconds(server_pid) - server_cpu) / (time.perf_counter() - started)
    out = {"clients": dict((k, kinds.count(k)) for k in sorted(set(kinds))), "client_cores": round(cores["own_cores"], 2),
           "server_cores": round(server_cores, 2), "other_cores": round(max(cores["other_cores"] - server_cores, 0), 2)}
    requests = sum(len(c.results) for c in clients)
    out["server_cpu_ms_per_request"] = round(server_cores * seconds * 1000 / max(requests, 1), 2)  # load-independent
    for kind in sorted(set(kinds)):
        rows = [(ms, ok) for c in clients for k, ms, ok in c.results if k == kind]
        ms = np.array([m for m, ok in rows if ok]) if rows else np.array([])
        out[kind] = {"requests": len(rows), "errors": sum(not ok for _, ok in rows), "per_second": round(len(rows) / seconds, 1),
                     **({f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in (50, 95, 99)} if len(ms) else {})}
    return out


def warm_up(port: int, collection: str, ids, bodies, params: str, workers: int) -> None:
    """Every worker builds its CNN on its first upload: upload, each time on a new connection (which the kernel
    hands to any worker), until 4 per worker in a row are fast. Then open the engine in every worker likewise."""
    uploads, by_id = (Client(port, collection, kind, ids, bodies, params, 0, 0) for kind in ("upload", "by id"))
    fast, deadline = 0, time.monotonic() + 300
    while fast < 4 * workers and time.monotonic() < deadline:
        started = time.perf_counter()
        ok = uploads.request(http.client.HTTPConnection("127.0.0.1", port, timeout=300))
        fast = fast + 1 if ok and time.perf_counter() - started < 2 else 0
    for _ in range(10 * workers):
        by_id.request(http.client.HTTPConnection("127.0.0.1", port, timeout=60))


def library_baseline(coll: Collection, ids: list[int], engine: str, k: int) -> dict:
    """The same searches by id through the library, in this process, one at a time (ms)."""
    ms = []
    for image_id in ids:
        started = time.perf_counter()
        coll.similar(coll.query(image_id=image_id), k, engine=engine)
        ms.append((time.perf_counter() - started) * 1000)
    return {name: round(v, 2) for name, v in percentiles(np.array(ms[20:])).items()}


def screenshot(port: int, picture: Path, out: Path) -> None:
    """The page after uploading `picture`, as a phone-free desktop window sees it."""
    import shutil

    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium", args=args)
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(f"http://127.0.0.1:{port}/")
        page.select_option("#engine", EngineName.ANNOY.value)
        page.set_input_files("#file", str(picture))
        try:
            expect(page.locator("#results li")).to_have_count(12, timeout=60_000)
        except AssertionError:
            page.screenshot(path=str(out.with_suffix(".failed.png")))
            raise click.ClickException(f"no results on the page: {page.locator('#message').inner_text()!r} (see {out.with_suffix('.failed.png')})")
        page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete)", timeout=60_000)
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))
        browser.close()


@click.command()
@click.option("--collection", "-c", default="caltech101", show_default=True)
@click.option("--clients", default=16, show_default=True, help="Concurrent clients in each phase.")
@click.option("--uploaders", default=2, show_default=True, help="Of the clients, how many upload in the mixed phase.")
@click.option("--seconds", default=20.0, show_default=True, help="Length of each phase.")
@click.option("--workers", default=2, show_default=True, help="search serve --workers.")
@click.option("--engine", type=click.Choice(ENGINES), default=EngineName.ANNOY.value, show_default=True)
@click.option("-k", default=10, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--screenshot", "shot", type=click.Path(path_type=Path, dir_okay=False), help="Also save a picture of the page here.")
@click.option("--json", "as_json", is_flag=True)
def main(collection, clients, uploaders, seconds, workers, engine, k, seed, shot, as_json):
    """Print requests/s, p50/p95/p99 and errors for searches by id and by upload."""
    settings, db = open_database(None)
    coll = Collection.named(db, settings, collection)
    ids = np.random.default_rng(seed).choice(coll.image_ids(), 500, replace=False).tolist()
    bodies = upload_bodies(coll, 20, seed)
    baseline = library_baseline(coll, ids[:220], engine, k)
    params = f"k={k}&engine={engine}"
    port = free_port()
    server = start_server(coll.name, port, workers)
    try:
        warm_up(port, coll.name, ids, bodies, params, workers)
        by_id = run_phase(port, server.pid, coll.name, ["by id"] * clients, ids, bodies, params, seconds)
        mixed = run_phase(port, server.pid, coll.name, ["upload"] * uploaders + ["by id"] * (clients - uploaders), ids, bodies, params, seconds)
        alone = run_phase(port, server.pid, coll.name, ["upload"], ids, bodies, params, seconds)  # one picture at a time
        if shot:
            path = next(iter(coll.details(ids[:1]).values())).path
            screenshot(port, Path(path), shot)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    summary = {"collection": coll.name, "images": len(coll.image_ids()), "engine": engine, "k": k, "workers": workers,
               "seconds": seconds, "machine": f"{cpu_model()}, {os.cpu_count()} cores", "load_average": os.getloadavg()[0],
               "library_by_id_ms": baseline, "by_id_only": by_id, "mixed": mixed, "uploads_alone": alone}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{coll.name}: {summary['images']} images, engine {engine}, k={k}, {workers} workers, {seconds:g} s a phase; "
               f"{summary['machine']}, load average {summary['load_average']:.1f}")
    click.echo(f"library, by id, one at a time: p50 {baseline['p50_ms']:.2f} ms, p95 {baseline['p95_ms']:.2f} ms (baseline)")
    click.echo("server CPU per request (ms, all kinds): " + ", ".join(f"{phase} {r['server_cpu_ms_per_request']}"
                                                                     for phase, r in (("by id only", by_id), ("mixed", mixed))))
    click.echo(f"{'phase':<12}{'kind':<8}{'clients':>8}{'req/s':>8}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'errors':>7}{'x base p50':>11}"
               "   cores: clients server others")
    for phase, result in (("by id only", by_id), ("mixed", mixed), ("upload one", alone)):
        for kind, n in result["clients"].items():
            r = result[kind]
            ratio = f"{r['p50_ms'] / baseline['p50_ms']:.1f}" if kind == "by id" and "p50_ms" in r else ""
            click.echo(f"{phase:<12}{kind:<8}{n:>8}{r['per_second']:>8}{r.get('p50_ms', '-'):>8}{r.get('p95_ms', '-'):>8}"
                       f"{r.get('p99_ms', '-'):>8}{r['errors']:>7}{ratio:>11}{result['client_cores']:>17}{result['server_cores']:>7}"
                       f"{result['other_cores']:>7}")


if __name__ == "__main__":
    main()
