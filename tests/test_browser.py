"""The search page in a real headless Chromium (Debian's, driven by Playwright): upload a picture and see it
first at distance 0, click a neighbour and see the grid change, filter by label, switch engines (one of which
cannot answer and says so), and fit a phone-sized window. A failing test leaves a screenshot beside its report.

The collection is embedded by the real ResNet50 (seeded random weights); the server runs in a thread of this
process, so the upload is embedded by the same model the collection was loaded with, built once.
"""
from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from ingest.collection import Collection
from ingest.load import load_collection
from ingest.sources import walk_folder
from search.serve import create_app
from tests.conftest import COLOURS, make_folder

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: `apt-get install chromium` (.ci/run installs it)")
NAME = "browser"
WAIT_MS = 30_000  # the first upload may wait for the CNN on a busy machine


@pytest.fixture(scope="module")
def folder(db, settings, extractor, tmp_path_factory) -> Path:
    root = make_folder(tmp_path_factory.mktemp("browser") / "pics", labels=tuple(COLOURS), per_label=4, seed=9)
    load_collection(db, settings, NAME, walk_folder(root)[0], extractor, pca_dims=6, progress=False)
    return root


@pytest.fixture(scope="module")
def server(folder, db, settings):
    """The app under uvicorn in a thread, on a free port of 127.0.0.1."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app(settings, db, collection=NAME)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # Chromium's sandbox needs user namespaces that root in a container does not get.
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"] if os.geteuid() == 0 else [])
        yield chromium
        chromium.close()


@contextmanager
def screenshot_on_failure(page, tmp_path: Path):
    try:
        yield
    except BaseException as e:
        shot = tmp_path / "failure.png"
        page.screenshot(path=str(shot), full_page=True)
        raise AssertionError(f"{e}\n(screenshot of the page: {shot})") from e


def result_ids(page) -> list[str]:
    return page.locator("#results li").evaluate_all("items => items.map(li => li.dataset.id)")


def test_search_by_picture_then_by_click_then_other_engines(server, browser, folder, db, settings, tmp_path):
    from playwright.sync_api import expect

    coll = Collection.named(db, settings, NAME)
    red_id = coll.query(image=folder / "red" / "red_0.jpg").image_id
    png = tmp_path / "red copy.png"  # other bytes than the stored JPEG, the same pixels: the CNN runs, distance ~0
    Image.open(io.BytesIO((folder / "red" / "red_0.jpg").read_bytes())).save(png)

    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.set_default_timeout(WAIT_MS)
    with screenshot_on_failure(page, tmp_path):
        page.goto(server)
        expect(page.locator("#collection")).to_have_value(NAME)
        expect(page.locator("#label option")).to_have_count(1 + len(COLOURS))

        page.set_input_files("#file", str(png))
        results = page.locator("#results li")
        expect(results).to_have_count(12)
        first = results.first
        expect(first).to_have_attribute("data-id", str(red_id))
        assert float(first.get_attribute("data-distance")) < 1e-3
        expect(first.locator(".distance")).to_have_text("0.000")
        expect(page.locator("#status")).to_contain_text("pgvector:")
        expect(page.locator("#status")).to_contain_text("CNN")
        expect(page.locator("#query-text")).to_contain_text("your picture")
        assert page.locator("#results img").first.evaluate("img => img.complete && img.naturalWidth > 0")

        before = result_ids(page)
        neighbour = results.nth(4)
        neighbour_id = neighbour.get_attribute("data-id")
        neighbour.locator("button").click()
        expect(first).to_have_attribute("data-id", neighbour_id)
        expect(first.locator(".distance")).to_have_text("0.000")
        expect(page.locator("#query-text")).to_contain_text(f"image #{neighbour_id}")
        after = result_ids(page)
        assert after != before and len(after) == 12

        page.select_option("#engine", "annoy")
        expect(page.locator("#status")).to_contain_text("annoy:")
        expect(first).to_have_attribute("data-id", neighbour_id)
        assert result_ids(page) == after  # 16 pictures, 100 trees: Annoy finds the exact answer

        page.select_option("#label", "blue")
        expect(page.locator("#status")).to_contain_text("label blue")
        expect(results).to_have_count(4)
        assert set(results.locator(".label").all_inner_texts()) == {f"{rank}. blue" for rank in range(1, 5)}

        page.select_option("#engine", "hnsw")
        message = page.locator("#message")
        expect(message).to_be_visible()
        expect(message).to_contain_text(f"has no HNSW index; run `ingest index --hnsw --collection {NAME}`")
        expect(results).to_have_count(0)

        page.select_option("#engine", "pgvector")
        page.select_option("#label", "")
        expect(results).to_have_count(12)
        expect(message).to_be_hidden()

        page.set_viewport_size({"width": 390, "height": 844})  # a phone
        boxes = [results.nth(i).bounding_box() for i in range(3)]
        assert boxes[0]["y"] == boxes[1]["y"] < boxes[2]["y"], "two results a row on a phone"
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, "nothing wider than the phone's screen"
    page.close()
