"""`search serve`: the web page and the JSON API it uses, one FastAPI app per server process.

Each process opens the database once (a SQLAlchemy pool), keeps every collection it has searched open (engines,
the mmap'ed Annoy file) and builds the CNN only when the first upload that needs it arrives (searches by id and
uploads of stored pictures never import TensorFlow). Everything is read-only: images are named by id within a
collection, never by a path from the request, and the label filter is a bound parameter (there is no --where).
Uploads are read into memory up to a size limit and decoded through ingest's guards from a temporary file
that is removed at once. A user's mistake is a 4xx with one line in `detail`, never a traceback.
"""
from __future__ import annotations

import mimetypes
import os
import socket
import sys
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from ingest import ENGINES, Collection, Settings, connect_for_queries, raw_cursor
from ingest.errors import (
    CollectionError,
    ImageError,
    IndexFileError,
    RisError,
    WeightsError,
    first_line,
)
from search.thumbnails import thumbnail

MAX_UPLOAD_MB = 20  # largest upload accepted unless --max-upload-mb says otherwise; a phone photo is 2-8 MB
MAX_K = 100
ROW_CHECK_SECONDS = 1.0  # how stale a collection's row may be: a refit in another process is seen within this
CACHE_SECONDS = 7 * 24 * 3600  # an image id's content never changes: thumbnails and files may be kept a week


class Refused(Exception):
    """A request the server cannot answer as asked: an HTTP status and one line saying why."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


class Searcher:
    """What one server process keeps between requests: the database pool, open collections, the model lock."""

    def __init__(self, settings: Settings, db, default_collection: str | None = None, max_upload_mb: float = MAX_UPLOAD_MB):
        self.settings = settings
        self.db = db
        self.default = Collection.named(db, settings, default_collection).name
        self.max_upload = int(max_upload_mb * 1024 * 1024)
        self.open: dict[str, Collection] = {}
        self.checked: dict[str, float] = {}  # collection -> when its row was last compared with the database
        self.model_lock = threading.Lock()  # one forward pass at a time; the first one builds the model

    def collection(self, name: str) -> Collection:
        """The open collection `name`, brought up to date (within ROW_CHECK_SECONDS) if another process refitted
        its PCA or built its HNSW index since; 404 if there is none."""
        coll = self.open.get(name)
        if coll is None:
            try:
                coll = self.open[name] = Collection.named(self.db, self.settings, name)
            except CollectionError as e:
                raise Refused(404, str(e)) from None
            self.checked[name] = time.monotonic()
        elif time.monotonic() - self.checked.get(name, 0) > ROW_CHECK_SECONDS:
            self.checked[name] = time.monotonic()
            if self.row_changed(coll):
                coll.reload()
        return coll

    def row_changed(self, coll: Collection) -> bool:
        """One primary-key lookup: has the collection's PCA or its HNSW flag changed since we read its row?"""
        with self.db.connect() as conn:
            cur = raw_cursor(conn)
            cur.execute("SELECT pca_version, pca_dims, hnsw FROM collections WHERE id = %s", (coll.id,))
            row = cur.fetchone()
        if row is None:
            self.open.pop(coll.name, None)
            raise Refused(404, f"collection {coll.name!r} was removed")
        return tuple(row) != (coll.row.pca_version, coll.dims, coll.row.hnsw)

    def engines(self, coll: Collection) -> dict[str, str | None]:
        """engine -> None if it can answer for the collection now, else the reason it cannot (and what to run)."""
        found = {}
        for name in ENGINES:
            try:
                coll.check_searchable(name)
                found[name] = None
            except RisError as e:
                found[name] = str(e)
        return found

    def describe(self) -> list[dict]:
        """Every collection with its size and which engines can answer."""
        out = []
        for row_coll in Collection.all(self.db, self.settings):
            coll = self.collection(row_coll.name)
            out.append({"name": coll.name, "images": count_searchable(coll), "dims": coll.dims, "weights": coll.weights,
                        "default": coll.name == self.default, "engines": self.engines(coll)})
        return out

    def labels(self, coll: Collection) -> list[dict]:
        with self.db.connect() as conn:
            cur = raw_cursor(conn)
            cur.execute("SELECT label, count(*) FROM images WHERE collection_id = %s AND embedding IS NOT NULL AND label IS NOT NULL"
                        " GROUP BY label ORDER BY label", (coll.id,))
            return [{"label": label, "images": n} for label, n in cur.fetchall()]

    def image(self, coll: Collection, image_id: int) -> tuple[str, str | None, str]:
        """(path, label, sha256) of an image of this collection; 404 for any other id."""
        found = coll.details([image_id]).get(image_id)
        if found is None:
            raise Refused(404, f"no image with id {image_id} in collection {coll.name!r}")
        return found

    def similar_by_id(self, name: str, image_id: int, k: int, engine: str, label: str | None) -> dict:
        coll = self.searchable(name, engine)
        started = time.perf_counter()
        try:
            query = coll.query(image_id=image_id)
        except CollectionError as e:
            raise Refused(404, str(e)) from None
        return self.answer(coll, query, k, engine, label, query_ms=ms_since(started))

    def similar_by_upload(self, name: str, data: bytes, k: int, engine: str, label: str | None) -> dict:
        coll = self.searchable(name, engine)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="ris-upload-") as tmp:
            path = Path(tmp) / "upload"
            path.write_bytes(data)
            try:
                with self.model_lock:
                    query = coll.query(image=path)
            except (WeightsError, CollectionError) as e:
                raise Refused(409, str(e)) from None
            except RisError as e:  # bad image data: the reason ingest would record, without our temporary path
                raise Refused(422, str(e).replace(str(path), "the upload")) from None
        return self.answer(coll, query, k, engine, label, query_ms=ms_since(started))

    def searchable(self, name: str, engine: str) -> Collection:
        """The collection, if `engine` can answer for it now; else 409 saying what to run."""
        if engine not in ENGINES:
            raise Refused(422, f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        coll = self.collection(name)
        try:
            if coll.pca is None:  # (check_searchable counts rows: fine for the listing, too slow for every search)
                raise CollectionError(f"collection {coll.name!r} has no searchable images yet; run `ingest load` (or `ingest index`)")
            coll.engine(engine)  # opened once, then cached by the collection
        except RisError as e:
            raise Refused(409, str(e)) from None
        return coll

    def answer(self, coll: Collection, query, k: int, engine: str, label: str | None, *, query_ms: float) -> dict:
        started = time.perf_counter()
        try:
            hits = coll.similar(query, k, engine=engine, label=label)
        except (IndexFileError, CollectionError) as e:  # the index went stale or the collection changed meanwhile
            raise Refused(409, str(e)) from None
        search_ms = ms_since(started)
        return {
            "collection": coll.name, "engine": engine, "k": k, "label": label,
            "query": {"id": query.image_id, "label": query.label,
                      "name": Path(query.path).name if query.image_id is not None else None,
                      "embedded": query.raw is not None},
            "timings": {"query_ms": query_ms, "search_ms": search_ms},
            "hits": [hit_json(coll.name, h) for h in hits],
        }


def hit_json(collection: str, hit) -> dict:
    """A hit as the page shows it: the file's name, not its path on the server, and where to fetch its pictures."""
    base = image_url(collection, hit.id)
    return {"rank": hit.rank, "id": hit.id, "label": hit.label, "distance": hit.distance, "name": Path(hit.path).name,
            "thumbnail": f"{base}/thumbnail", "image": f"{base}/file"}


def image_url(collection: str, image_id: int) -> str:
    return f"/api/collections/{quote(collection, safe='')}/images/{image_id}"


def count_searchable(coll: Collection) -> int:
    with coll.db.connect() as conn:
        cur = raw_cursor(conn)
        cur.execute("SELECT count(*) FROM images WHERE collection_id = %s AND embedding IS NOT NULL", (coll.id,))
        return cur.fetchone()[0]


def ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def cached_file(request: Request, path: Path | str, etag: str, media_type: str | None = None) -> Response:
    """A file the browser may keep (its content is fixed by its sha256): 304 when it already has this one."""
    etag = f'"{etag}"'
    headers = {"Cache-Control": f"public, max-age={CACHE_SECONDS}, immutable", "ETag": etag}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return FileResponse(path, media_type=media_type, headers=headers)


def page_html() -> str:
    return resources.files("search").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(settings: Settings | None = None, db=None, *, collection: str | None = None,
               max_upload_mb: float = MAX_UPLOAD_MB) -> FastAPI:
    """The app for one server process: settings from RIS_HOME / DATABASE_URL / DATABASE_READ_URL unless given, the
    database opened now (a missing collection fails here, before the server listens). The server only reads, so a
    read replica, when one is set, answers everything."""
    settings = settings or Settings.load()
    searcher = Searcher(settings, db or connect_for_queries(settings), collection, max_upload_mb)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        if db is None:  # ours: close the pool when the server stops
            searcher.db.dispose()

    app = FastAPI(title="reverse-image-search", summary="Search a collection of pictures by picture.", lifespan=lifespan)
    app.state.searcher = searcher
    add_error_handlers(app)
    add_routes(app, searcher)
    return app


def app_from_environment() -> FastAPI:
    """The factory uvicorn calls in every worker process (`search serve --workers N`): its options come from
    the environment `search serve` set (RIS_SERVE_*, plus RIS_HOME and DATABASE_URL as everywhere)."""
    return create_app(collection=os.environ.get("RIS_SERVE_COLLECTION") or None,
                      max_upload_mb=float(os.environ.get("RIS_SERVE_MAX_UPLOAD_MB") or MAX_UPLOAD_MB))


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Refused)
    async def refused(_request, exc: Refused):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)

    @app.exception_handler(RisError)
    async def ris_error(_request, exc: RisError):
        return JSONResponse({"detail": first_line(str(exc))}, status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):
        """A database that stopped answering is the server's state, not a bug: 503 and its one line. Anything
        else is a bug: 500 without the traceback (uvicorn logs it)."""
        if is_database_error(exc):
            return JSONResponse({"detail": f"database error: {first_line(str(getattr(exc, 'orig', None) or exc))}"}, status_code=503)
        return JSONResponse({"detail": "internal error; the server log has the details"}, status_code=500)


def is_database_error(exc: Exception) -> bool:
    import psycopg
    import sqlalchemy.exc

    return isinstance(exc, (sqlalchemy.exc.DBAPIError, psycopg.Error))


def add_routes(app: FastAPI, searcher: Searcher) -> None:
    K = Query(10, ge=1, le=MAX_K, description="How many neighbours.")
    ENGINE = Query("pgvector", description=f"One of {', '.join(ENGINES)}.")
    LABEL = Query(None, max_length=200, description="Only neighbours with this label (a bound parameter).")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return HTMLResponse(page_html(), headers={"Cache-Control": "no-cache"})

    @app.get("/api/status")
    def status():
        """The server's limits, and whether this process has loaded the CNN (only uploads need it)."""
        return {"default_collection": searcher.default, "max_upload_bytes": searcher.max_upload, "max_k": MAX_K,
                "engines": list(ENGINES), "model_loaded": "tensorflow" in sys.modules}

    @app.get("/api/collections")
    def collections():
        """Every collection: searchable images, dims, and per engine null (ready) or why it cannot answer."""
        return searcher.describe()

    @app.get("/api/collections/{name}/labels")
    def labels(name: str):
        """The collection's labels with how many searchable images each has."""
        return searcher.labels(searcher.collection(name))

    @app.get("/api/collections/{name}/images/{image_id}/similar")
    def similar_by_id(name: str, image_id: int, k: int = K, engine: str = ENGINE, label: str | None = LABEL):
        """The k images nearest to a stored image (no CNN run)."""
        return JSONResponse(searcher.similar_by_id(name, image_id, k, engine, label))  # plain JSON: no re-validation

    @app.post("/api/collections/{name}/similar")
    async def similar_by_upload(request: Request, name: str, k: int = K, engine: str = ENGINE, label: str | None = LABEL):
        """The k images nearest to an uploaded picture: multipart/form-data with one file field `image`."""
        data = await read_upload(request, searcher.max_upload)
        return JSONResponse(await run_in_threadpool(searcher.similar_by_upload, name, data, k, engine, label))

    @app.get("/api/collections/{name}/images/{image_id}")
    def image_info(name: str, image_id: int):
        path, label, sha256 = searcher.image(searcher.collection(name), image_id)
        base = image_url(name, image_id)
        return {"id": image_id, "label": label, "name": Path(path).name, "sha256": sha256,
                "thumbnail": f"{base}/thumbnail", "image": f"{base}/file"}

    @app.get("/api/collections/{name}/images/{image_id}/thumbnail")
    def image_thumbnail(request: Request, name: str, image_id: int):
        """A JPEG of at most 256 pixels a side, made once and cached under $RIS_HOME/thumbnails by sha256."""
        path, _, sha256 = searcher.image(searcher.collection(name), image_id)
        try:
            return cached_file(request, thumbnail(searcher.settings.home, sha256, path), f"{sha256}-thumb", "image/jpeg")
        except ImageError as e:
            raise Refused(404, f"image {image_id}: {e}") from None

    @app.get("/api/collections/{name}/images/{image_id}/file")
    def image_file(request: Request, name: str, image_id: int):
        """The stored picture itself, as ingested."""
        path, _, sha256 = searcher.image(searcher.collection(name), image_id)
        if not os.path.isfile(path):
            raise Refused(404, f"image {image_id}: its file is no longer on disk")
        return cached_file(request, path, sha256, mimetypes.guess_type(path)[0] or "application/octet-stream")


async def read_upload(request: Request, limit: int) -> bytes:
    """The bytes of the form's `image` file, refusing before reading anything a body larger than `limit`."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise Refused(411, "send the upload with a Content-Length")
    if int(length) > limit + 64 * 1024:  # multipart framing and the other fields are small
        raise Refused(413, too_large(limit))
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise Refused(415, "send the picture as multipart/form-data in a field named `image`")
    async with request.form(max_files=1, max_fields=10) as form:
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise Refused(422, "the form has no file field named `image`")
        data = await upload.read(limit + 1)
    if len(data) > limit:
        raise Refused(413, too_large(limit))
    if not data:
        raise Refused(422, "the upload is empty")
    return data


def too_large(limit: int) -> str:
    return f"the upload is larger than the limit of {limit / (1024 * 1024):.3g} MB"


def no_delay(transport) -> None:
    """Send small answers at once (TCP_NODELAY). asyncio sets it only on sockets made with proto IPPROTO_TCP, and
    the socket uvicorn binds for --workers has proto 0: there, a response written in two parts waited for the
    client's delayed ACK, 40 ms on every kept-alive request (measured: 48 ms against 2 ms with one worker)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class NoDelayHTTP(AutoHTTPProtocol):
    """uvicorn's HTTP protocol, with no_delay on each connection it accepts."""

    def connection_made(self, transport) -> None:
        no_delay(transport)
        super().connection_made(transport)


def run(*, host: str, port: int, workers: int, collection: str | None, max_upload_mb: float | None, log_level: str = "info") -> None:
    """Serve until interrupted; workers are separate processes, each building the app through app_from_environment."""
    import uvicorn

    os.environ["RIS_SERVE_COLLECTION"] = collection or ""
    os.environ["RIS_SERVE_MAX_UPLOAD_MB"] = str(max_upload_mb or MAX_UPLOAD_MB)
    uvicorn.run("search.serve:app_from_environment", factory=True, host=host, port=port, workers=workers, log_level=log_level,
                http=NoDelayHTTP)
