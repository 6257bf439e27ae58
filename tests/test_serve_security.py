"""`search serve` attacked as an attacker would: raw HTTP over a socket to a real `search serve` process (TestClient
fills in and normalises the very headers these attacks choose), one test per attack, each also checking that the
ordinary request next to it still works."""
from __future__ import annotations

import hashlib
import io
import os
import re
import select
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ingest.collection import Collection
from ingest.load import load_collection
from ingest.sources import walk_folder
from search.thumbnails import THUMBNAIL_SIZE, thumbnail_path
from tests.helpers import make_folder, png_announcing
from tests.live_server import LiveServer, exchange, get, parse_answer

NAME = "guarded"
LIMIT_MB = 0.05  # the upload limit of the module's server: 51 KB
BOUNDARY = "attack-boundary"


@pytest.fixture(scope="module")
def folder(db, settings, fake_extractor, tmp_path_factory):
    """3 labels x 3 pictures, and red_0 once more as blue/copy.jpg: one picture held by two files."""
    root = make_folder(tmp_path_factory.mktemp("guarded") / "pics", per_label=3, seed=11)
    shutil.copy(root / "red" / "red_0.jpg", root / "blue" / "copy.jpg")
    load_collection(db, settings, NAME, walk_folder(root)[0], fake_extractor, pca_dims=3, progress=False)
    return root


@pytest.fixture(scope="module")
def coll(folder, db, settings):
    return Collection.named(db, settings, NAME)


@pytest.fixture(scope="module")
def server(folder, settings, tmp_path_factory):
    with LiveServer("-c", NAME, "--max-upload-mb", str(LIMIT_MB), home=settings.home, log=tmp_path_factory.mktemp("serve") / "log") as live:
        yield live


def image_id(coll, path) -> int:
    return coll.query(image=path).image_id


def multipart(data: bytes) -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def upload(port: int, data: bytes, extra_headers: str = ""):
    body = multipart(data)
    head = (f"POST /api/collections/{NAME}/similar?k=3 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra_headers}"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return exchange(port, head.encode() + body)


# --- who may ask -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["rebound.attacker.example:{port}", "127.0.0.1.attacker.example", "localhost.:{port}",
                                  "evil.example", "127.0.0.1:{port}@evil.example", ""])
def test_dns_rebinding_host_is_refused(server, host):
    """A page on attacker.example whose name now resolves to 127.0.0.1 reads with its own Host: refused, nothing read."""
    answer = get(server.port, f"/api/collections/{NAME}/labels", host=host.format(port=server.port))
    assert answer.status == 400 and "does not answer to the host" in answer.detail
    assert b"red" not in answer.body
    for own in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "LOCALHOST", f"[::1]:{server.port}"):
        assert get(server.port, f"/api/collections/{NAME}/labels", host=own).status == 200, own


def test_two_host_headers_are_refused(server):
    answer = exchange(server.port, f"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nHost: evil.example\r\n"
                                   "Connection: close\r\n\r\n".encode())
    assert answer.status == 400


@pytest.mark.parametrize("origin", ["http://attacker.example", "https://attacker.example", "http://localhost:3000",
                                    "http://127.0.0.1:1", "file://", "chrome-extension://abc"])
def test_upload_from_a_foreign_origin_is_refused(server, folder, origin):
    """A page elsewhere (another site, or another port of this machine) posts a picture: 403 before any work."""
    picture = (folder / "red" / "red_1.jpg").read_bytes()
    answer = upload(server.port, picture, f"Origin: {origin}\r\n")
    assert answer.status == 403 and answer.detail == "refused: this request comes from another site's page"
    assert upload(server.port, picture, f"Origin: http://127.0.0.1:{server.port}\r\n").status == 200
    assert upload(server.port, picture).status == 200  # no Origin: not a browser (curl)


def test_upload_with_origin_null_is_refused(server, folder):
    """A sandboxed iframe or a file:// page sends `Origin: null`: it is nobody's own origin."""
    answer = upload(server.port, (folder / "red" / "red_1.jpg").read_bytes(), "Origin: null\r\n")
    assert answer.status == 403


# --- what they may send ----------------------------------------------------------------------------------------

def big_files_in_tempdir(since: float, over: int) -> list[str]:
    found = []
    for entry in os.scandir(tempfile.gettempdir()):
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime >= since and entry.stat().st_size > over:
                found.append(entry.name)
        except OSError:
            continue
    return found


def stream_until_answered(port: int, head: bytes, chunked: bool, planned: int) -> tuple[int, bytes]:
    """Send `head`, then a multipart body of `planned` bytes in 64 KB pieces (chunk-framed if `chunked`), stopping
    as soon as the server answers or closes: (bytes of body sent, what the server said)."""
    piece = b"\x89PNG" + os.urandom(65532)
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head)
        first = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
                 f"Content-Type: image/png\r\n\r\n").encode()
        try:
            for data in [first] + [piece] * (planned // len(piece)):
                s.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n" if chunked else data)
                sent += len(data)
                if select.select([s], [], [], 0)[0]:
                    break
        except OSError:  # the server closed the connection while we were still sending: what we want
            pass
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except OSError:
            pass
    return sent, answer


def send_chunked_200_mb(server, extra_headers: str = ""):
    """POST a 200 MB chunked upload (with `extra_headers`) and return the answer, checking that it came before 20 MB
    went out, that the server read and wrote under 1 MB, that no large file landed in the temp dir, and that the
    server still answers."""
    started, planned = time.time(), 200 * 1024 * 1024
    head = (f"POST /api/collections/{NAME}/similar HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nTransfer-Encoding: chunked\r\n{extra_headers}\r\n")
    read_before, written_before = server.io_bytes()
    sent, answer = stream_until_answered(server.port, head.encode(), chunked=True, planned=planned)
    read, written = (after - before for after, before in zip(server.io_bytes(), (read_before, written_before)))
    assert sent < 20 * 1024 * 1024, f"{sent} bytes went out before the answer"
    assert read < 1024 * 1024 and written < 1024 * 1024, f"the server read {read} bytes and wrote {written}"
    assert not big_files_in_tempdir(started, int(LIMIT_MB * 1024 * 1024))
    assert get(server.port, "/api/status").status == 200
    return parse_answer(answer)


def test_chunked_and_content_length_smuggling_is_refused_before_the_body(server):
    """Transfer-Encoding: chunked with a small Content-Length, then 200 MB: the server used to check the small length
    and stream the chunked body to disk. Now the request is refused from its headers, before the body."""
    refused = send_chunked_200_mb(server, "Content-Length: 100\r\n")
    assert refused.status == 400 and "both Transfer-Encoding and Content-Length" in refused.detail
    assert refused.headers.get("connection") == "close"


def test_a_chunked_body_past_the_limit_is_cut_off_while_streaming(server):
    """No Content-Length at all, a chunked body of 200 MB: counted as it arrives, 413 once past the limit."""
    refused = send_chunked_200_mb(server)
    assert refused.status == 413 and refused.detail == "the upload is larger than the limit of 0.05 MB"


def test_a_content_length_past_the_limit_is_refused_before_the_body(server):
    head = (f"POST /api/collections/{NAME}/similar HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {200 * 1024 * 1024}\r\n\r\n")
    sent, answer = stream_until_answered(server.port, head.encode(), chunked=False, planned=200 * 1024 * 1024)
    assert parse_answer(answer).status == 413 and sent < 20 * 1024 * 1024


@pytest.mark.parametrize("url", ["/api/collections/guarded/images/{id}/similar?label=red%00x",
                                 "/api/collections/guarded/images/{id}/similar?engine=annoy%00",
                                 "/api/collections/gua%00rded/labels", "/api/collections/guarded/images/{id}/similar?label=%ff%fe",
                                 "/api/collections/guarded/images/{id}/similar?label=%ed%a0%80",  # a lone surrogate
                                 "/api/collections/%c0%80/labels"])  # an overlong NUL
def test_nul_in_label_is_422_without_a_traceback(server, coll, folder, url):
    """NUL (PostgreSQL cannot take it: it used to be 503 and a traceback) or invalid UTF-8 anywhere: 422, one line."""
    answer = get(server.port, url.format(id=image_id(coll, folder / "red" / "red_0.jpg")))
    assert answer.status == 422 and answer.detail == "refused: the path or a parameter holds NUL or invalid UTF-8"
    assert "Traceback" not in server.output()
    label = get(server.port, f"/api/collections/{NAME}/images/{image_id(coll, folder / 'red' / 'red_0.jpg')}/similar?label=red%20x")
    assert label.status == 200  # a label with other characters is still searched for (and not found)


# --- what is sent back ---------------------------------------------------------------------------------------

@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_bytes(b"SECRET-" + os.urandom(8).hex().encode())
    return path


def test_symlink_swap_serves_nothing_but_the_stored_picture(server, coll, folder, settings, secret, tmp_path):
    """green_1.jpg is replaced by a symlink to a secret file after ingest: /file and /thumbnail answer 409 and send
    nothing of it (they used to send the link's target, cached as immutable under the old sha256)."""
    path = folder / "green" / "green_1.jpg"
    picture = image_id(coll, path)
    original = path.read_bytes()
    sha256 = hashlib.sha256(original).hexdigest()
    thumbnail_path(settings.home, sha256).unlink(missing_ok=True)
    shutil.move(path, tmp_path / "kept.jpg")
    path.symlink_to(secret)
    try:
        for what in ("file", "thumbnail"):
            answer = get(server.port, f"/api/collections/{NAME}/images/{picture}/{what}")
            assert answer.status == 409, (what, answer)
            assert answer.detail == f"image {picture}: its file on disk is no longer the picture that was ingested; run `ingest sync`"
            assert b"SECRET" not in answer.body and "immutable" not in answer.headers.get("cache-control", "")
        assert not thumbnail_path(settings.home, sha256).exists()
    finally:
        path.unlink()
        shutil.move(tmp_path / "kept.jpg", path)
    assert get(server.port, f"/api/collections/{NAME}/images/{picture}/file").body == original


def test_symlinked_parent_folder_swap_serves_nothing_but_the_stored_picture(server, coll, folder, tmp_path):
    """The label folder itself becomes a link to a folder with the same file names: hashing what is read catches
    what a no-follow open of the last component would not."""
    picture = image_id(coll, folder / "green" / "green_2.jpg")
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    for name in os.listdir(folder / "green"):
        (decoy / name).write_bytes(b"DECOY" * 100)
    shutil.move(folder / "green", tmp_path / "green-kept")
    (folder / "green").symlink_to(decoy, target_is_directory=True)
    try:
        answer = get(server.port, f"/api/collections/{NAME}/images/{picture}/file")
        assert answer.status == 409 and b"DECOY" not in answer.body
    finally:
        (folder / "green").unlink()
        shutil.move(tmp_path / "green-kept", folder / "green")


def test_a_swapped_picture_is_sent_from_its_other_copy(server, coll, folder, secret, tmp_path):
    """red_0.jpg has a copy (blue/copy.jpg): with the file the picture is shown by swapped, it still comes, from the other."""
    picture = image_id(coll, folder / "red" / "red_0.jpg")
    shown = Path(coll.details([picture])[picture].path)
    original = shown.read_bytes()
    shutil.move(shown, tmp_path / "kept.jpg")
    shown.symlink_to(secret)
    try:
        answer = get(server.port, f"/api/collections/{NAME}/images/{picture}/file")
        assert answer.status == 200 and answer.body == original and answer.headers["content-type"] == "image/jpeg"
    finally:
        shown.unlink()
        shutil.move(tmp_path / "kept.jpg", shown)


def test_a_fifo_in_place_of_a_picture_does_not_hang_the_server(server, coll, folder, tmp_path):
    path = folder / "blue" / "blue_2.jpg"
    picture = image_id(coll, path)
    shutil.move(path, tmp_path / "kept.jpg")
    os.mkfifo(path)
    try:
        answer = get(server.port, f"/api/collections/{NAME}/images/{picture}/file")
        assert answer.status == 404 and answer.detail == f"image {picture}: its file is no longer a regular file"
    finally:
        path.unlink()
        shutil.move(tmp_path / "kept.jpg", path)


def mean_colour(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32).reshape(-1, 3).mean(axis=0)


def test_stale_thumbnail_cache_is_purged(coll, folder, settings, tmp_path):
    """A thumbnail cached before thumbnails were verified may show anything (what the path held then): the server
    removes that cache when it starts and makes the thumbnail again from the verified picture."""
    path = folder / "blue" / "blue_0.jpg"
    picture = image_id(coll, path)
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    stale = settings.home / "thumbnails" / sha256[:2] / f"{sha256}-{THUMBNAIL_SIZE}.jpg"  # where it used to be kept
    stale.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (255, 0, 255)).save(stale, "JPEG")  # magenta: not the blue square
    thumbnail_path(settings.home, sha256).unlink(missing_ok=True)
    with LiveServer("-c", NAME, home=settings.home, log=tmp_path / "log") as live:
        assert not stale.exists()
        answer = get(live.port, f"/api/collections/{NAME}/images/{picture}/thumbnail")
    assert answer.status == 200 and answer.headers["etag"] == f'"{sha256}-{THUMBNAIL_SIZE}-v2"'
    served, expected = Image.open(io.BytesIO(answer.body)), Image.open(path).convert("RGB")
    assert served.size == expected.size
    assert np.abs(mean_colour(served) - mean_colour(expected)).max() < 10, "the thumbnail is not the stored picture"


# --- the token beyond loopback --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def open_server(folder, settings, tmp_path_factory):
    """Listening on every address without --token: a token is made up and printed in the link."""
    with LiveServer("-c", NAME, "--host", "0.0.0.0", home=settings.home, log=tmp_path_factory.mktemp("open") / "log") as live:
        yield live


def token_of(live) -> str:
    return re.search(r"\?token=([\w.~-]+)", live.link())[1]


def test_token_required_beyond_loopback(open_server):
    """`--host 0.0.0.0`: every request without the token is 401, whatever else it gets right."""
    assert open_server.link().startswith(f"http://127.0.0.1:{open_server.port}/?token=")
    for path in ("/", "/api/status", f"/api/collections/{NAME}/labels", "/static/app.js", "/openapi.json"):
        answer = get(open_server.port, path)
        assert answer.status == 401 and "needs its token" in answer.detail and b"red" not in answer.body, path
    wrong = get(open_server.port, "/api/status", headers="Authorization: Bearer " + "x" * 32 + "\r\n")
    assert wrong.status == 401
    assert get(open_server.port, "/?token=" + "x" * 32).status == 401


def test_token_accepted_by_header(open_server):
    token = token_of(open_server)
    answer = get(open_server.port, f"/api/collections/{NAME}/labels", headers=f"Authorization: Bearer {token}\r\n")
    assert answer.status == 200 and b"red" in answer.body


def test_token_accepted_by_cookie_from_the_one_time_link(open_server):
    """The printed link answers with an HttpOnly, SameSite=Strict cookie and sends the browser on to / (the token
    leaves the address bar); the cookie alone then opens the page and the API."""
    token = token_of(open_server)
    signed_in = get(open_server.port, f"/?token={token}")
    assert signed_in.status == 200 and b'http-equiv="refresh" content="0; url=/"' in signed_in.body
    cookie = signed_in.headers["set-cookie"]
    assert cookie.startswith(f"ris_token={token};") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert signed_in.headers["referrer-policy"] == "no-referrer"
    jar = f"Cookie: other=1; {cookie.split(';')[0]}\r\n"
    assert get(open_server.port, "/", headers=jar).status == 200
    assert get(open_server.port, f"/api/collections/{NAME}/labels", headers=jar).status == 200
    assert get(open_server.port, "/", headers=f"Cookie: ris_token={token[:-1]}\r\n").status == 401


# --- what the page allows -------------------------------------------------------------------------------------

def test_csp_header_present_without_unsafe_inline(server):
    """The page runs no inline script or style, so its CSP allows none; it cannot be framed; nothing is sniffed."""
    page = get(server.port, "/")
    csp = page.headers["content-security-policy"]
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
    assert "script-src 'self'" in csp and "style-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-frame-options"] == "DENY"
    html = page.body.decode()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html) and "<style" not in html and not re.search(r"\son\w+=", html)
    for path in ("/", "/api/status", "/static/app.js", "/nope", "/api/collections/nope/labels"):
        assert get(server.port, path).headers["x-content-type-options"] == "nosniff", path
    assert get(server.port, "/api/status", host="evil.example").headers["x-content-type-options"] == "nosniff"
    assert get(server.port, "/static/app.js").headers["content-type"].startswith("text/javascript")
    assert get(server.port, "/docs").status == 404 and get(server.port, "/openapi.json").status == 200


# --- what decoding may cost -----------------------------------------------------------------------------------

def big_png(path: Path, side: int, seed: int) -> Path:
    """A side x side PNG of a few hundred KB that decodes to side^2 pixels: flat, with one shape of its own."""
    img = Image.new("RGB", (side, side), (40 + seed * 20, 90, 200))
    ImageDraw.Draw(img).ellipse((side // 8 + seed * 50, side // 6, side // 2, side // 2 + seed * 80), fill=(250, 200, 10 + seed))
    img.save(path, "PNG")
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # loading the 9999x9999 ones, under ingest's limit
def test_decompression_bombs_in_parallel_keep_the_server_under_2_gb(db, settings, extractor, tmp_path):
    """14 requests at once against a real `search serve` with the real model: 4 uploads of new 6320x6320 PNGs (just
    under the 40 MP limit, so they are decoded and embedded), 4 uploads of PNGs announcing 9999x9999 (a 97 KB one used
    to cost 1.25 GB to decode), and thumbnails of 4 stored 6320x6320 and 2 stored 9999x9999 PNGs. The server's peak
    resident memory (VmHWM from /proc, model included) stays under 2 GB: one decode of the limit's size at a time."""
    root = tmp_path / "pics"
    (root / "big").mkdir(parents=True)
    stored = [big_png(root / "big" / f"big_{i}.png", 6320, i) for i in range(4)]
    bombs = [big_png(root / "big" / f"bomb_{i}.png", 9999, i) for i in range(2)]
    make_folder(root, labels=("red", "green"), per_label=2, seed=13)
    load_collection(db, settings, "bombs", walk_folder(root)[0], extractor, pca_dims=2, progress=False)
    coll = Collection.named(db, settings, "bombs")
    uploads = [big_png(tmp_path / f"upload_{i}.png", 6320, 5 + i).read_bytes() for i in range(4)]
    with LiveServer("-c", "bombs", home=settings.home, log=tmp_path / "log") as live:
        assert upload_to(live.port, "bombs", (root / "red" / "red_0.jpg").read_bytes()).status == 200  # the model, built once
        requests = ([("upload", data, 200) for data in uploads] + [("upload", png_announcing(9999, 9999), 422)] * 4
                    + [("thumbnail", image_id(coll, path), 200) for path in stored]
                    + [("thumbnail", image_id(coll, path), 404) for path in bombs])
        answers: dict[int, int] = {}

        def ask(n: int, kind: str, what) -> None:
            if kind == "upload":
                answers[n] = upload_to(live.port, "bombs", what).status
            else:
                answers[n] = get(live.port, f"/api/collections/bombs/images/{what}/thumbnail").status

        threads = [threading.Thread(target=ask, args=(n, kind, what)) for n, (kind, what, _) in enumerate(requests)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak = live.peak_rss_mb()
    assert [answers[n] for n in range(len(requests))] == [status for _, _, status in requests]
    assert peak < 2048, f"peak RSS {peak:.0f} MB"
    print(f"search serve peak RSS with {len(requests)} concurrent bomb requests: {peak:.0f} MB")


def upload_to(port: int, collection: str, data: bytes):
    body = multipart(data)
    head = (f"POST /api/collections/{collection}/similar?k=3 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return exchange(port, head.encode() + body, timeout=300)
