"""Helpers the test modules share: pictures and folders to load, a fake extractor, running the commands as
processes, reading what a load left in the tables, archives to extract.

Plain functions and constants only; fixtures are in tests/conftest.py. A test module imports from here, never from
another test module.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import sqlalchemy as sa
from PIL import Image, ImageDraw

from ingest.store import find_row
from tests.pg import TcpPostgres

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # .venv/bin: ingest and search next to the interpreter running the tests
PROCESS_TIMEOUT = 300  # seconds for one whole command; the model alone takes 5-20 s on a busy machine
STEP_TIMEOUT = 180  # seconds to reach one point of a run (a progress count, a lock wait)
PROGRESS = re.compile(rb"\| *(\d+)/(\d+) \[")  # tqdm: "  13%|#3   | 8/60 [00:05<00:31, ...]"
LOAD_OPTIONS = ("--weights", "random", "--pca-dims", "4")
CLASSES = ("airplanes", "Faces", "yin_yang")


# --- pictures and folders -------------------------------------------------------------------------


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40)}


def make_picture(colour: tuple[int, int, int], shape: str, seed: int, size=(96, 72)) -> Image.Image:
    """A small distinct picture: a coloured shape on a noisy background, different for every seed."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 60, (size[1], size[0], 3), dtype=np.uint8) + 100
    img = Image.fromarray(background.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    x0, y0 = rng.integers(5, 25, 2)
    box = (int(x0), int(y0), int(x0) + 50, int(y0) + 40)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
    return img


def make_folder(root: Path, labels=("red", "green", "blue"), per_label: int = 4, seed: int = 0) -> Path:
    """root/<label>/<label>_<i>.jpg pictures; each label has its own colour and shape."""
    for li, label in enumerate(labels):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_label):
            shape = "circle" if li % 2 else "square"
            make_picture(COLOURS[label], shape, seed * 1000 + li * 100 + i).save(root / label / f"{label}_{i}.jpg", quality=90)
    return root


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def gradient(width: int, height: int) -> Image.Image:
    """A smooth picture with a different colour in each corner, so a wrong rotation shows."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def png_announcing(width: int, height: int) -> bytes:
    """A 1-bit PNG whose header announces width x height but which holds only a few compressed rows:
    a bomb of a few hundred bytes. Decoding it would allocate width*height bytes before failing."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * 100_000)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


class FakeExtractor:
    """A deterministic stand-in for ResNet50 behind the same interface (weights, precision, runtime, fingerprint, embed): 2048 features
    from a fixed random projection of an 8x8 colour thumbnail, so similar pictures get similar vectors.

    For tests about storing and searching vectors; it costs microseconds where the real model costs seconds."""

    weights = "fake"
    precision = "fp32"
    runtime = "openvino"
    fingerprint = hashlib.sha256(b"tests.conftest.FakeExtractor v1").hexdigest()

    def __init__(self):
        self.projection = np.random.default_rng(0).normal(size=(8 * 8 * 3, 2048)).astype(np.float32)

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        n = len(pixels)
        small = np.asarray(pixels, np.float32).reshape(n, 8, 28, 8, 28, 3).mean(axis=(2, 4)) / 255
        return np.maximum(small.reshape(n, -1) @ self.projection, 0)


def collection_row(db, name: str):
    """The stored row of collection `name` (id, dims, PCA, weights), read afresh."""
    from ingest import store

    with db.connect() as conn:
        return store.find_row(conn, name)



# --- collections made straight through the write path (no CNN) --------------------------------------


def raw_features(n: int, *, clusters: int = 20, seed: int = 0, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered non-negative 2048-d vectors (like pooled CNN features) and the cluster of each."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, 2048)).astype(np.float32) + shift
    which = rng.integers(0, clusters, n)
    return np.maximum(centres[which] + 0.4 * rng.normal(size=(n, 2048)), 0).astype(np.float32), which


def add_rows(coll, raw: np.ndarray, labels: list[str], *, tag: str) -> np.ndarray:
    """Store rows as a load's batch does (embeddings projected with the current PCA, if any); returns their ids."""
    from ingest import store

    rows = [store.ImageRow(f"/synthetic/{coll.name}/{tag}{i}.jpg", labels[i],
                           hashlib.sha256(f"{coll.name}/{tag}{i}".encode()).hexdigest(), 1, 1, 1) for i in range(len(raw))]
    embeddings = coll.pca.project(raw) if coll.pca is not None else None
    store.insert_images(coll.db, coll.id, rows, raw, embeddings, pca_version=coll.row.pca_version)
    with coll.db.connect() as conn:
        ids = conn.execute(sa.text("SELECT id FROM images WHERE collection_id = :c AND sha256 = ANY(:s) ORDER BY id"),
                           {"c": coll.id, "s": [r.sha256 for r in rows]}).scalars().all()
    return np.array(ids, dtype=np.int64)


def synthetic(db, settings, name: str, n: int, *, dims: int = 8, labels: list[str] | None = None, trees: int = 10):
    """A finished collection of n clustered rows (PCA, Annoy file), labelled by cluster unless `labels` are given."""
    from ingest import store
    from ingest.collection import Collection

    raw, which = raw_features(n)
    coll = Collection(db, settings, store.create_row(db, name, "synthetic", "0" * 64, dims))
    add_rows(coll, raw, labels or [f"c{w}" for w in which], tag="r")
    return coll.finish(trees=trees)

# --- running the commands ---------------------------------------------------------------------------


def child_env(ris_home: Path, database_url: str | None = None) -> dict[str, str]:
    """The environment of a command under test: the session's RIS_HOME; DATABASE_URL only if given."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["RIS_HOME"] = str(ris_home)
    if database_url:
        env["DATABASE_URL"] = database_url
    return env


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str

    @property
    def messages(self) -> list[str]:
        """stderr without progress bars and blank lines: what a user reads."""
        return [line for line in re.split(r"[\r\n]", self.stderr) if line.strip() and not PROGRESS.search(line.encode())]


def default_sigint() -> None:
    """preexec_fn of every command under test: SIGINT back to its default action before exec.

    A shell without job control starts background jobs (`pytest ... &`, nohup under a script) with SIGINT
    ignored, an ignored signal stays ignored across fork and exec, and a Python started with SIGINT ignored
    never raises KeyboardInterrupt: the Ctrl-C tests would then test nothing but the launch."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(ris_home: Path, program: str, *args, database_url: str | None = None, timeout: float = PROCESS_TIMEOUT) -> Finished:
    """Run `ingest ...` or `search ...` to the end."""
    done = subprocess.run(
        [str(BIN / program), *map(str, args)], env=child_env(ris_home, database_url),
        capture_output=True, encoding="utf-8", timeout=timeout, preexec_fn=default_sigint,
    )
    return Finished(done.returncode, done.stdout, done.stderr)


class Running:
    """A command whose output is collected while it runs, so a test can act at a given point of its progress."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
        self.out, self.err = bytearray(), bytearray()
        self.readers = [
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
            for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _pump(stream, sink: bytearray) -> None:
        while chunk := stream.read1(65536):
            sink.extend(chunk)

    def progress(self) -> int:
        """Images the progress bar has counted so far; -1 before the bar appears."""
        counts = PROGRESS.findall(bytes(self.err))
        return int(counts[-1][0]) if counts else -1

    def wait_for(self, condition, what: str, timeout: float = STEP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"the command ended (exit {self.proc.returncode}) before {what}: {bytes(self.err)[-2000:]!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {bytes(self.err)[-2000:]!r}")
            time.sleep(0.05)

    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout: float = PROCESS_TIMEOUT) -> Finished:
        self.proc.wait(timeout)
        for reader in self.readers:
            reader.join(30)
        return Finished(self.proc.returncode, self.out.decode("utf-8"), self.err.decode("utf-8"))


def run_measured(argv: list[str], env: dict[str, str], out: Path, timeout: float = PROCESS_TIMEOUT) -> tuple[Finished, int]:
    """Run a command and return what it printed and its peak resident memory: the child's own VmHWM, read while it
    runs (os.wait4's ru_maxrss would also count the pytest process it was forked from, however large that is)."""
    with open(out.with_suffix(".out"), "wb") as stdout, open(out.with_suffix(".err"), "wb") as stderr:
        proc = subprocess.Popen(argv, env=env, stdout=stdout, stderr=stderr)
    deadline, peak = time.monotonic() + timeout, 0
    while proc.poll() is None:
        peak = max(peak, high_water_mark(proc.pid))
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{argv} did not finish in {timeout} s")
        time.sleep(0.05)
    text = [out.with_suffix(s).read_text(encoding="utf-8") for s in (".out", ".err")]
    return Finished(proc.returncode, *text), peak


def high_water_mark(pid: int) -> int:
    """The most resident memory the process has held so far, in bytes (0 once it has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(found[1]) * 1024 if found else 0


# --- loads and what they leave in the tables --------------------------------------------------------


def make_load_folder(root: Path, per_label: int) -> tuple[Path, set[str]]:
    """Pictures in 4 labels, plus a copy of one (same sha256) and a broken file; returns the folder and
    the sha256 of its unique valid pictures."""
    make_folder(root, labels=tuple(COLOURS), per_label=per_label)
    valid = {sha256_of(p) for p in root.rglob("*.jpg")}
    shutil.copy(root / "red" / "red_0.jpg", root / "red" / "copy_of_red_0.jpg")
    whole = (root / "blue" / "blue_0.jpg").read_bytes()
    (root / "blue" / "broken.jpg").write_bytes(whole[: len(whole) // 2])
    return root, valid


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_args(folder: Path, name: str, *extra) -> list:
    return ["load", "folder", folder, "--collection", name, *LOAD_OPTIONS, *extra]


def collection_id(engine, name: str) -> int | None:
    with engine.connect() as conn:
        found = find_row(conn, name)
    return found.id if found else None


def check_consistent(engine, name: str, valid: set[str]) -> int:
    """What an interrupted load may leave: some of the valid pictures, each once, each with its features.
    Returns how many are stored."""
    cid = collection_id(engine, name)
    if cid is None:
        return 0
    with engine.connect() as conn:
        hashes = conn.execute(sa.text("SELECT sha256 FROM images WHERE collection_id = :c"), {"c": cid}).scalars().all()
        without_features = conn.execute(
            sa.text("SELECT count(*) FROM images i LEFT JOIN features f ON f.collection_id = i.collection_id AND f.sha256 = i.sha256 WHERE i.collection_id = :c AND f.sha256 IS NULL"),
            {"c": cid},
        ).scalar()
        orphan_features = conn.execute(
            sa.text("SELECT count(*) FROM features f LEFT JOIN images i ON f.collection_id = i.collection_id AND f.sha256 = i.sha256 WHERE i.id IS NULL")
        ).scalar()
    assert len(hashes) == len(set(hashes)), "a picture is stored twice"
    assert set(hashes) <= valid, "something other than the folder's valid pictures is stored"
    assert without_features == 0 and orphan_features == 0
    return len(hashes)


def pg_ctl(server: TcpPostgres, *args: str) -> None:
    server.run(str(server.bin / "pg_ctl"), "-D", str(server.data), "-w", *args)


def restart(server: TcpPostgres) -> None:
    """Start a stopped server again on its port (crash recovery replays the WAL)."""
    pg_ctl(server, "-l", str(server.dir / "log"), "-o", f"-h 127.0.0.1 -p {server.port} -k ''", "start")


# --- archives ---------------------------------------------------------------------------------------


def make_jpeg(path: Path, shade: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (shade, 0, 255 - shade)).save(path, "JPEG")
    return path


def make_caltech_tree(root: Path) -> Path:
    """101_ObjectCategories as in the official archive: classes, BACKGROUND_Google and its stray 'tmp' file."""
    categories = root / "101_ObjectCategories"
    for i, name in enumerate(CLASSES + ("BACKGROUND_Google",)):
        for j in range(2):
            make_jpeg(categories / name / f"image_{j + 1:04d}.jpg", shade=40 * i + j)
    (categories / "BACKGROUND_Google" / "tmp").write_bytes(b"not an image")
    return categories


def make_tar_gz(folder: Path, archive: Path) -> Path:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return archive


def add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def hostile_tar(archive: Path, outside: Path, kind: str) -> None:
    with tarfile.open(archive, "w") as tf:
        add_bytes(tf, "fine.txt", b"ok")
        if kind in ("../evil", "abs"):
            add_bytes(tf, "../evil" if kind == "../evil" else str(outside / "abs_evil"), b"evil")
            return
        info = tarfile.TarInfo("link")
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "../outside.txt"
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, str(outside / "outside.txt")
        elif kind == "through-link":
            info.type, info.linkname = tarfile.SYMTYPE, "."
        else:
            info.type = tarfile.CHRTYPE
        tf.addfile(info)
        if kind == "through-link":
            add_bytes(tf, "link/evil", b"evil")


@contextmanager
def scratch_database(ris_home: Path, name: str) -> Iterator[sa.Engine]:
    """A SQLAlchemy engine on a new, empty database `name` of the session's embedded server (dropped first if a
    previous run left it), for tests that migrate a schema from scratch without touching other tests' tables."""
    from ingest.config import Settings
    from ingest.db import connect

    db = connect(Settings(home=ris_home))
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine = sa.create_engine(db.engine.url.set(database=name))
    try:
        yield engine
    finally:
        engine.dispose()
