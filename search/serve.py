"""`search serve`: the web page and the JSON API it uses, one FastAPI app per server process.

Who may ask, and how big a body may be, is decided in front of the app (search/guards.py); what one process keeps
and how it answers a search is search/searcher.py; a stored picture is sent only if its bytes are the ones ingested
(search/files.py). The database pool pre-pings and starts the embedded server again if it died. Everything is
read-only: images are named by id within a collection, never by a path from the request, and the label filter is a
bound parameter (there is no --where). A user's mistake is a 4xx with one line in `detail`, never a traceback.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated

import psycopg
import sqlalchemy.exc
from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from ingest import ENGINES, MAX_PICTURES, EngineName, Settings, connect_for_queries, decode_budget, survive_restarts
from ingest.errors import ImageError, RisError, first_line
from search.files import cached_bytes, cached_path, media_type, not_modified
from search.guards import GuardMiddleware, Guards, too_large
from search.searcher import MAX_PIXELS, MAX_UPLOAD_MB, Refused, ServerState, image_url
from search.thumbnails import LAYOUT, THUMBNAIL_SIZE, cached_thumbnail, make_thumbnail, purge_first_layout

MAX_K = 100
LOG = logging.getLogger("uvicorn.error")  # uvicorn's own log: what the server says goes where uvicorn's lines go
STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}


def static_file(name: str) -> bytes:
    return resources.files("search").joinpath(f"static/{name}").read_bytes()


def create_app(settings: Settings | None = None, db=None, *, collection: str | None = None, max_upload_mb: float = MAX_UPLOAD_MB,
               max_pixels: int = MAX_PIXELS, allowed_hosts=(), token: str | None = None) -> FastAPI:
    """The app for one server process: settings from RIS_HOME / DATABASE_URL / DATABASE_READ_URL unless given, the
    database opened now (a missing collection fails here, before the server listens). The server only reads, so a
    read replica, when one is set, answers everything. It answers to loopback names and `allowed_hosts`, and with
    a `token` only to requests that show it (search/guards.py).

    /docs and /redoc are off: Swagger UI and ReDoc run a script from a CDN on this origin, where the pictures and the
    token cookie are; /openapi.json stays, behind the same guards, for any OpenAPI viewer to read."""
    settings = settings or Settings.load()
    searcher = ServerState(settings, db or survive_restarts(connect_for_queries(settings), settings.pgdata), collection,
                        max_upload_mb, max_pixels)
    purge_first_layout(settings.home)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        if db is None:  # ours: close the pool when the server stops
            searcher.db.dispose()

    app = FastAPI(title="reverse-image-search", summary="Search a collection of pictures by picture.", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.searcher = searcher
    app.add_middleware(GuardMiddleware, guards=Guards.build(allowed_hosts, token, max_upload=searcher.max_upload))
    add_error_handlers(app)
    add_routes(app, searcher)
    return app


def app_from_environment() -> FastAPI:
    """The factory uvicorn calls in every worker process (`search serve --workers N`): its options come from
    the environment `search serve` set (RIS_SERVE_*, plus RIS_HOME and DATABASE_URL as everywhere). Pictures
    decoded at once in the process hold no more than the pixel limit between them (ingest's decode budget)."""
    max_pixels = int(os.environ.get("RIS_SERVE_MAX_PIXELS") or MAX_PIXELS)
    decode_budget.resize(max_pixels)
    return create_app(collection=os.environ.get("RIS_SERVE_COLLECTION") or None,
                      max_upload_mb=float(os.environ.get("RIS_SERVE_MAX_UPLOAD_MB") or MAX_UPLOAD_MB), max_pixels=max_pixels,
                      allowed_hosts=os.environ.get("RIS_SERVE_ALLOWED_HOSTS", "").split(),
                      token=os.environ.get("RIS_SERVE_TOKEN") or None)


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

    async def database_error(_request, exc: Exception):
        """A database that stopped answering is the server's state, not a bug: 503 and its one line, and one line
        in the log (the pool reconnects, starting the embedded server again, as soon as it can)."""
        detail = f"database error: {first_line(str(getattr(exc, 'orig', None) or exc))}"
        LOG.warning(detail)
        return JSONResponse({"detail": detail}, status_code=503)

    for database_exception in (sqlalchemy.exc.DBAPIError, psycopg.Error):
        app.add_exception_handler(database_exception, database_error)

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):
        """Anything else is a bug: 500 without the traceback (uvicorn logs it)."""
        return JSONResponse({"detail": "internal error; the server log has the details"}, status_code=500)


def add_routes(app: FastAPI, searcher: ServerState) -> None:
    K = Query(10, ge=1, le=MAX_K, description="How many neighbours.")
    CROP = Query(None, max_length=100, description='Search a region of the picture: "x,y,w,h" in its pixels (after EXIF rotation).')
    ENGINE = Query(EngineName.PGVECTOR.value, description=f"One of {', '.join(ENGINES)}.")
    LABEL = Query(None, max_length=200, description="Only neighbours with this label (a bound parameter).")
    page_html = static_file("index.html")
    static = {name: static_file(name) for name in STATIC}
    home = searcher.settings.home

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return HTMLResponse(page_html, headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    def static_files(name: str):
        """The page's script and style (files of their own: the CSP allows no inline script or style)."""
        if name not in static:
            raise Refused(404, f"no static file named {name!r}")
        return Response(static[name], media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

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
    def similar_by_id(name: str, image_id: int, k: int = K, engine: str = ENGINE, label: str | None = LABEL, crop: str | None = CROP):
        """The k images nearest to a stored image (no CNN run), or to a region of it (`crop`: decoded from its file)."""
        return JSONResponse(searcher.similar_by_id(name, image_id, k, engine, label, crop))  # plain JSON: no re-validation

    @app.post("/api/collections/{name}/similar")
    async def similar_by_upload(request: Request, name: str, k: int = K, engine: str = ENGINE, label: str | None = LABEL):
        """The k images nearest to an uploaded picture: multipart/form-data with one file field `image`; optional text
        fields `crop` ("x,y,w,h" of the picture), `positives` and `negatives` (stored image ids, "1,2,3")."""
        data, fields = await read_upload(request, searcher.max_upload)
        return JSONResponse(await run_in_threadpool(searcher.similar_by_upload, name, data, k, engine, label, fields.get("crop"),
                                                    id_list(fields, "positives"), id_list(fields, "negatives")))

    @app.post("/api/collections/{name}/similar/feedback")
    def similar_by_feedback(name: str, body: Feedback):
        """The k images nearest to stored images marked "more like this", pushed from those marked "less like this"
        (ingest.queries: mean of the positives minus half the mean of the negatives); they are left out of the hits."""
        return JSONResponse(searcher.similar_to(name, body.positives, body.negatives, body.k, body.engine, body.label, crop=body.crop))

    @app.get("/api/collections/{name}/images/{image_id}")
    def image_info(name: str, image_id: int):
        found = searcher.image(searcher.collection(name), image_id)
        base = image_url(name, image_id)
        return {"id": image_id, "label": found.label, "name": Path(found.path).name, "sha256": found.sha256,
                "thumbnail": f"{base}/thumbnail", "image": f"{base}/file"}

    @app.get("/api/collections/{name}/images/{image_id}/thumbnail")
    def image_thumbnail(request: Request, name: str, image_id: int):
        """A JPEG of at most 256 pixels a side, made once from the verified picture and cached by its sha256."""
        coll = searcher.collection(name)
        found = searcher.image(coll, image_id)
        etag = f"{found.sha256}-{THUMBNAIL_SIZE}-{LAYOUT}"
        if (unchanged := not_modified(request, etag)) is not None:
            return unchanged
        made = cached_thumbnail(home, found.sha256)
        if made is None:
            try:
                made = make_thumbnail(home, found.sha256, searcher.picture(coll, image_id, found.path, found.sha256),
                                      max_pixels=searcher.max_pixels)
            except ImageError as e:
                raise Refused(404, f"image {image_id}: {e}") from None
        return cached_path(made, etag, "image/jpeg")

    @app.get("/api/collections/{name}/images/{image_id}/file")
    def image_file(request: Request, name: str, image_id: int):
        """The stored picture itself, as ingested: its bytes are sent only if they hash to its sha256."""
        coll = searcher.collection(name)
        found = searcher.image(coll, image_id)
        if (unchanged := not_modified(request, found.sha256)) is not None:
            return unchanged
        data = searcher.picture(coll, image_id, found.path, found.sha256)
        return cached_bytes(data, found.sha256, media_type(data))


ImageId = Annotated[int, Field(ge=0, lt=2**63)]  # a bigint


class Feedback(BaseModel):
    """A search by stored images: more like `positives` (the first one maybe cropped), less like `negatives`."""

    model_config = ConfigDict(extra="forbid")
    positives: list[ImageId] = Field(min_length=1, max_length=MAX_PICTURES, description="Stored image ids to search with.")
    negatives: list[ImageId] = Field([], max_length=MAX_PICTURES, description="Stored image ids to move away from.")
    crop: str | None = Field(None, max_length=100, description='"x,y,w,h": search this region of the first positive.')
    k: int = Field(10, ge=1, le=MAX_K)
    engine: str = Field(EngineName.PGVECTOR.value, max_length=20)
    label: str | None = Field(None, max_length=200)


def id_list(fields: dict, name: str) -> list[int]:
    """A form field of image ids, "1,2,3" (empty or missing: none), or 422."""
    text = fields.get(name) or ""
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
        TypeAdapter(list[ImageId]).validate_python(ids)
    except (ValueError, ValidationError):
        raise Refused(422, f"{name}: a list of image ids, e.g. 3,17,42") from None
    if len(ids) > MAX_PICTURES:
        raise Refused(422, f"{name}: at most {MAX_PICTURES} images")
    return ids


async def read_upload(request: Request, limit: int) -> tuple[bytes, dict[str, str]]:
    """The bytes of the form's `image` file, at most `limit` of them (the guard has already refused, while it
    streamed in, any body larger than that and its framing), and the form's short text fields."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise Refused(415, "send the picture as multipart/form-data in a field named `image`")
    async with request.form(max_files=1, max_fields=10) as form:
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise Refused(422, "the form has no file field named `image`")
        data = await upload.read(limit + 1)
        fields = {key: value for key, value in form.items() if isinstance(value, str) and len(value) <= 2000}
    if len(data) > limit:
        raise Refused(413, too_large(limit))
    if not data:
        raise Refused(422, "the upload is empty")
    return data, fields


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


def run(*, host: str, port: int, workers: int, collection: str | None, max_upload_mb: float | None = None,
        max_pixels: int | None = None, allowed_hosts=(), token: str | None = None, log_level: str = "info") -> None:
    """Serve until interrupted; workers are separate processes, each building the app through app_from_environment."""
    import uvicorn

    os.environ["RIS_SERVE_COLLECTION"] = collection or ""
    os.environ["RIS_SERVE_MAX_UPLOAD_MB"] = str(max_upload_mb or MAX_UPLOAD_MB)
    os.environ["RIS_SERVE_MAX_PIXELS"] = str(max_pixels or MAX_PIXELS)
    os.environ["RIS_SERVE_ALLOWED_HOSTS"] = " ".join(allowed_hosts)
    os.environ["RIS_SERVE_TOKEN"] = token or ""
    uvicorn.run("search.serve:app_from_environment", factory=True, host=host, port=port, workers=workers, log_level=log_level,
                http=NoDelayHTTP)
