"""The search page in a real headless Chromium (Debian's, driven by Playwright): upload a picture and see it
first at distance 0, click a neighbour and see the grid change, filter by label, switch engines (one of which
cannot answer and says so), and fit a phone-sized window, all without one Content-Security-Policy violation; and
a server with a token opened from its one-time link. A failing test leaves a screenshot beside its report.

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
from tests.helpers import COLOURS, make_folder

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: `apt-get install chromium` (.ci/run installs it)")
NAME = "browser"
WAIT_MS = 30_000  # the first upload may wait for the CNN on a busy machine


@pytest.fixture(scope="module")
def folder(db, settings, extractor, tmp_path_factory) -> Path:
    root = make_folder(tmp_path_factory.mktemp("browser") / "pics", labels=tuple(COLOURS), per_label=4, seed=9)
    load_collection(db, settings, NAME, walk_folder(root)[0], extractor, pca_dims=6, progress=False)
    return root


@contextmanager
def serving(app):
    """The app under uvicorn in a thread, on a free port of 127.0.0.1: its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
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
def server(folder, db, settings):
    with serving(create_app(settings, db, collection=NAME)) as base:
        yield base


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


def watch_console(page) -> list[str]:
    """Every console message and uncaught error of the page (Chromium reports each CSP violation there)."""
    seen: list[str] = []
    page.on("console", lambda message: seen.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: seen.append(f"pageerror: {error}"))
    return seen


def csp_violations(seen: list[str]) -> list[str]:
    return [m for m in seen if "Content Security Policy" in m or "Content-Security-Policy" in m]


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
    console = watch_console(page)
    with screenshot_on_failure(page, tmp_path):
        response = page.goto(server)
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp
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
        neighbour.locator("button.pick").click()
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
        assert not csp_violations(console), csp_violations(console)
        assert not [m for m in console if m.startswith("pageerror")], console
    page.close()


def test_the_one_time_link_opens_a_server_with_a_token(folder, db, settings, browser, tmp_path):
    """Opened from the link `search serve` prints, the page comes up at / (the token gone from the address bar),
    its API calls and thumbnails pass on the HttpOnly cookie alone, and script cannot read that cookie."""
    from playwright.sync_api import expect

    token = "browser-test-token-0123456789"
    with serving(create_app(settings, db, collection=NAME, token=token)) as base:
        page = browser.new_page()
        page.set_default_timeout(WAIT_MS)
        console = watch_console(page)
        with screenshot_on_failure(page, tmp_path):
            assert page.goto(f"{base}/api/status").status == 401
            page.goto(f"{base}/?token={token}")
            page.wait_for_url(f"{base}/")
            expect(page.locator("#collection")).to_have_value(NAME)
            expect(page.locator("#label option")).to_have_count(1 + len(COLOURS))
            page.set_input_files("#file", str(folder / "red" / "red_0.jpg"))
            expect(page.locator("#results li")).to_have_count(12)
            assert page.locator("#results img").first.evaluate("img => img.decode().then(() => img.naturalWidth > 0)")
            assert "ris_token" not in page.evaluate("document.cookie")
            assert not csp_violations(console), csp_violations(console)
        page.close()


def composite(folder: Path, path: Path, places: dict[str, tuple[int, int]]) -> Path:
    """A 288 x 216 PNG (shown at its own size on the page) with stored pictures pasted at `places`."""
    canvas = Image.new("RGB", (288, 216), (200, 205, 190))
    for stem, at in places.items():
        with Image.open(next(folder.glob(f"*/{stem}.jpg"))) as img:
            canvas.paste(img.convert("RGB"), at)
    canvas.save(path)
    return path


def drag(page, selector: str, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Press the mouse at `start` on the element (its own pixels from its top left), move to `end`, release."""
    box = page.locator(selector).bounding_box()
    page.mouse.move(box["x"] + start[0], box["y"] + start[1])
    page.mouse.down()
    page.mouse.move(box["x"] + end[0], box["y"] + end[1], steps=8)
    page.mouse.up()


def touch_drag(page, selector: str, start: tuple[float, float], end: tuple[float, float]) -> None:
    """The same with a finger (Chromium's touch events, which the page sees as pointer events)."""
    box = page.locator(selector).bounding_box()
    cdp = page.context.new_cdp_session(page)
    at = lambda p: [{"x": box["x"] + p[0], "y": box["y"] + p[1]}]  # noqa: E731
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": at(start)})
    for step in range(1, 9):
        point = (start[0] + (end[0] - start[0]) * step / 8, start[1] + (end[1] - start[1]) * step / 8)
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": at(point)})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})


def test_a_box_drawn_on_the_query_picture_searches_that_region(server, browser, folder, db, settings, tmp_path):
    """Drawn with the mouse, then with a finger: each box searches its region, which the server reports and the
    page keeps drawn on the query; "whole picture" goes back to the whole."""
    from playwright.sync_api import expect

    coll = Collection.named(db, settings, NAME)
    red, blue = (coll.query(image=folder / c / f"{c}_{i}.jpg").image_id for c, i in (("red", 0), ("blue", 1)))
    picture = composite(folder, tmp_path / "table.png", {"red_0": (160, 120), "blue_1": (20, 30)})

    context = browser.new_context(viewport={"width": 1200, "height": 900}, has_touch=True)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    console = watch_console(page)
    with screenshot_on_failure(page, tmp_path):
        page.goto(server)
        expect(page.locator("#collection")).to_have_value(NAME)
        page.set_input_files("#file", str(picture))
        results = page.locator("#results li")
        expect(results).to_have_count(12)
        expect(page.locator("#crop-box")).to_be_hidden()
        assert page.locator("#query-picture").evaluate("img => [img.naturalWidth, img.getBoundingClientRect().width]") == [288, 288]

        drag(page, "#query-picture", (160, 120), (256, 192))
        expect(page.locator("#status")).to_contain_text("region 160,120 96×72")
        expect(results.first).to_have_attribute("data-id", str(red))
        assert float(results.first.get_attribute("data-distance")) < 1e-3
        box, shown = page.locator("#crop-box").bounding_box(), page.locator("#query-picture").bounding_box()
        assert (round(box["x"] - shown["x"]), round(box["y"] - shown["y"]), round(box["width"]), round(box["height"])) == (160, 120, 96, 72)
        expect(page.locator("#query-text")).to_contain_text("your picture, region")

        touch_drag(page, "#query-picture", (116, 102), (20, 30))  # drawn from the far corner: the same box
        expect(page.locator("#status")).to_contain_text("region 20,30 96×72")
        expect(results.first).to_have_attribute("data-id", str(blue))

        page.click("#whole-picture")
        expect(page.locator("#status")).not_to_contain_text("region")
        expect(page.locator("#crop-box")).to_be_hidden()
        expect(page.locator("#whole-picture")).to_be_hidden()
        assert not csp_violations(console), csp_violations(console)
        assert not [m for m in console if m.startswith("pageerror")], console
    context.close()


def test_more_and_less_like_this_refine_the_grid(server, browser, folder, db, settings, tmp_path):
    """Marks from the grid search with the query and the pictures marked more like it, away from those marked less
    (the library's query, its pictures left out), show as thumbnails, and clear."""
    from playwright.sync_api import expect

    from ingest.queries import Picture, compose

    coll = Collection.named(db, settings, NAME)
    query = coll.query(image=folder / "green" / "green_2.jpg").image_id
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.set_default_timeout(WAIT_MS)
    console = watch_console(page)
    with screenshot_on_failure(page, tmp_path):
        page.goto(server)
        expect(page.locator("#collection")).to_have_value(NAME)
        page.set_input_files("#file", str(folder / "green" / "green_2.jpg"))
        results = page.locator("#results li")
        expect(results.first).to_have_attribute("data-id", str(query))
        expect(results.first.locator("button.more")).to_have_count(0)  # the query itself is not marked
        expect(page.locator("#refine")).to_be_hidden()

        more = int(results.nth(3).get_attribute("data-id"))
        results.nth(3).locator("button.more").click()
        expect(page.locator("#status")).to_contain_text("more like 2, less like 0")
        expect(page.locator("#positives img")).to_have_count(1)
        less = int(results.nth(5).get_attribute("data-id"))
        results.nth(5).locator("button.less").click()
        expect(page.locator("#status")).to_contain_text("more like 2, less like 1")
        expect(page.locator("#negatives img")).to_have_count(1)
        expect(page.locator("#negatives img")).to_have_attribute("alt", f"#{less}")

        composed = compose(coll, [Picture(image_id=query), Picture(image_id=more)], [Picture(image_id=less)])
        want = [str(h.id) for h in coll.similar(composed.query, 12, exclude=composed.exclude())]
        expect(results).to_have_count(12)
        assert result_ids(page) == want and not {str(query), str(more), str(less)} & set(want)

        page.click("#clear-feedback")
        expect(page.locator("#refine")).to_be_hidden()
        expect(results.first).to_have_attribute("data-id", str(query))
        assert not csp_violations(console), csp_violations(console)
        assert not [m for m in console if m.startswith("pageerror")], console
    page.close()
