"""Shared fixtures: a private RIS_HOME with the real embedded PostgreSQL, the real ResNet50 (random weights),
and a fake extractor for tests about storage and search rather than the model.

The server and the model are started once per test session (the model through the process's own cache,
ingest.features.extractor_for, which CLI commands run in-process share); every test gets its own collection names.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ingest.config import Settings
from ingest.db import connect, stop_embedded

# Commands run the CNN at fp32 whatever the processor: `--precision auto` picks bf16 on some machines and not on
# others. Set for the whole process (module fixtures load collections before any function fixture runs) and
# inherited by the commands tests spawn; tests of `auto` pass --precision themselves.
os.environ["RIS_PRECISION"] = "fp32"


@pytest.fixture(scope="session")
def ris_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("ris")
    yield home
    stop_embedded(home / "pgdata")


@pytest.fixture(autouse=True)
def private_home(monkeypatch, ris_home):
    """Every test, and every command it runs, uses the session's RIS_HOME and the embedded server."""
    monkeypatch.setenv("RIS_HOME", str(ris_home))
    monkeypatch.delenv("DATABASE_URL", raising=False)


@pytest.fixture(scope="session")
def settings(ris_home) -> Settings:
    return Settings(home=ris_home)


@pytest.fixture(scope="session")
def db(settings):
    database = connect(settings)
    yield database
    database.dispose()


@pytest.fixture(scope="session")
def extractor(settings):
    """The real ResNet50 with seeded random weights on the runtime `auto` picks (OpenVINO on a processor), built once
    per process; its IR is cached in the session's RIS_HOME."""
    from ingest.features import extractor_for

    return extractor_for("random", models_dir=settings.models_dir)


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


@pytest.fixture(scope="session")
def fake_extractor():
    """The fake extractor, registered as the process's extractor of its weights on every runtime
    (ingest.features.register_extractor, as real ones are), so collections made with it answer queries by file like
    any other; removed after the session."""
    from ingest.features import register_extractor

    fake = FakeExtractor()
    unregister = register_extractor(fake, ("openvino", "tensorflow"))
    yield fake
    unregister()


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


@pytest.fixture
def picture_folder(tmp_path) -> Path:
    return make_folder(tmp_path / "pictures")


def collection_row(db, name: str):
    """The stored row of collection `name` (id, dims, PCA, weights), read afresh."""
    from ingest import store

    with db.connect() as conn:
        return store.find_row(conn, name)
