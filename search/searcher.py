"""What one `search serve` process keeps between requests (the database pool, open collections, the model lock)
and how it answers each search: a JSON-ready dict, or `Refused` with an HTTP status and one line.

Collections are opened once and kept, with their engines (the mmap'ed Annoy file); a refit or a new HNSW index by
another process is seen within ROW_CHECK_SECONDS. Images are named by id within a collection, never by a path; a
stored picture's bytes are read through search/files.py, which sends them only if they hash to the stored sha256.
An upload is refused from its header beyond the server's pixel limit, then decoded by ingest (its guards, its
decode budget) from a temporary file removed at once. Every search goes through `similar_to`: an upload and stored
images to search with, stored images to move away from, a crop of the first (ingest.queries); a crop of a stored
picture is decoded from its verified bytes, never from a stored vector.
"""
from __future__ import annotations

import io
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from urllib.parse import quote

from PIL import Image

from ingest import (ENGINES, Collection, Crop, ImageDetails, Settings, compose, count_searchable, draft_size, label_counts, paths_of,
                    pictures_of)
from ingest.errors import CollectionError, ImageError, IndexFileError, RisError, WeightsError
from search.files import FileChanged, FileGone, read_verified

MAX_UPLOAD_MB = 20  # largest upload accepted unless --max-upload-mb says otherwise; a phone photo is 2-8 MB
MAX_PIXELS = 40_000_000  # most pixels the server decodes per picture (120 MB as RGB), counted after a JPEG's 1/2-1/8 draft
ROW_CHECK_SECONDS = 1.0  # how stale a collection's row may be: a refit in another process is seen within this


class Refused(Exception):
    """A request the server cannot answer as asked: an HTTP status and one line saying why."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


class ServerState:
    """What one server process keeps between requests: the database pool, open collections, the model lock."""

    def __init__(self, settings: Settings, db, default_collection: str | None = None, max_upload_mb: float = MAX_UPLOAD_MB,
                 max_pixels: int = MAX_PIXELS):
        self.settings = settings
        self.db = db
        self.default = Collection.named(db, settings, default_collection).name
        self.max_upload = int(max_upload_mb * 1024 * 1024)
        self.max_pixels = max_pixels
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
            try:
                changed = coll.changed()
            except CollectionError as e:  # removed meanwhile
                self.open.pop(coll.name, None)
                raise Refused(404, str(e)) from None
            if changed:
                coll.reload()
        return coll

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
            out.append({"name": coll.name, "images": count_searchable(coll.db, coll.id), "dims": coll.dims, "weights": coll.weights,
                        "default": coll.name == self.default, "engines": self.engines(coll)})
        return out

    def labels(self, coll: Collection) -> list[dict]:
        return [{"label": label, "images": n} for label, n in label_counts(coll.db, coll.id).items()]

    def image(self, coll: Collection, image_id: int) -> ImageDetails:
        """The path, label and sha256 of an image of this collection; 404 for any other id."""
        found = coll.details([image_id]).get(image_id)
        if found is None:
            raise Refused(404, f"no image with id {image_id} in collection {coll.name!r}")
        return found

    def picture(self, coll: Collection, image_id: int, path: str, sha256: str) -> bytes:
        """The stored picture's bytes, verified against its sha256: from its shown path, else from its other files."""
        try:
            return read_verified(files_of(coll, image_id, path), sha256)
        except FileGone as e:
            raise Refused(404, f"image {image_id}: {e}") from None
        except FileChanged as e:
            raise Refused(409, f"image {image_id}: {e}") from None

    def similar_by_id(self, name: str, image_id: int, k: int, engine: str, label: str | None, crop: str | None = None) -> dict:
        """The k nearest to a stored image (no CNN run), or with `crop` to a region of it (decoded from its file)."""
        return self.similar_to(name, [image_id], [], k, engine, label, crop=crop)

    def similar_by_upload(self, name: str, data: bytes, k: int, engine: str, label: str | None, crop: str | None = None,
                          positives=(), negatives=()) -> dict:
        """The k nearest to an uploaded picture (or a region of it), with stored images to pull towards or push from."""
        return self.similar_to(name, list(positives), list(negatives), k, engine, label, crop=crop, upload=data)

    def similar_to(self, name: str, positives: list[int], negatives: list[int], k: int, engine: str, label: str | None, *,
                   crop: str | None = None, upload: bytes | None = None) -> dict:
        """The k nearest to a query made of an upload (first, if any) and stored images, its first picture maybe
        cropped (ingest.queries): the one path of every search the server answers. Images of other collections are
        404 before any work; the model lock is taken only when a picture must be embedded."""
        coll = self.searchable(name, engine)
        region = parse_crop(crop)
        ids = positives + negatives
        if len(ids) > 1 or (ids and region is not None):  # one id alone is looked up by the query itself (404 below)
            self.refuse_missing(coll, ids)
        if upload is not None:
            refuse_oversized(upload, self.max_pixels, region)
        started = time.perf_counter()
        with upload_file(upload) as path:
            try:
                with self.model_lock if path is not None or region is not None else nullcontext():
                    composed = compose(coll, pictures_of([path] if path else [], positives, crop=region), pictures_of(ids=negatives),
                                       read_stored=lambda i: self.stored_picture(coll, i, region))
            except (WeightsError, CollectionError) as e:
                self.refuse_missing(coll, ids)
                raise Refused(409, str(e)) from None
            except RisError as e:  # bad image data or crop: the reason, without our temporary path
                raise Refused(422, str(e).replace(str(path), "the upload")) from None
        return self.answer(coll, composed, k, engine, label, query_ms=ms_since(started))

    @staticmethod
    def refuse_missing(coll: Collection, ids: list[int]) -> None:
        """404 if any of `ids` is not an image of the collection (an id of another collection included)."""
        missing = set(ids) - set(coll.details(ids)) if ids else set()
        if missing:
            raise Refused(404, f"no image with id {min(missing)} in collection {coll.name!r}")

    def stored_picture(self, coll: Collection, image_id: int, crop) -> bytes:
        """A stored picture's verified bytes, to decode a crop of it, refused beyond the pixel limit as uploads are."""
        found = self.image(coll, image_id)
        data = self.picture(coll, image_id, found.path, found.sha256)
        refuse_oversized(data, self.max_pixels, crop)
        return data

    def searchable(self, name: str, engine: str) -> Collection:
        """The collection, if `engine` can answer for it now; else 409 saying what to run."""
        if engine not in ENGINES:
            raise Refused(422, f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        coll = self.collection(name)
        try:
            coll.check_searchable(engine, count_rows=False)  # the engine is opened once, then cached by the collection
        except RisError as e:
            raise Refused(409, str(e)) from None
        return coll

    def answer(self, coll: Collection, composed, k: int, engine: str, label: str | None, *, query_ms: float) -> dict:
        """The JSON of a search: what the query was made of (stored images by id, an upload as "upload") and its hits.
        A query of several pictures or with negatives leaves its stored pictures out of the hits (ingest.queries)."""
        started = time.perf_counter()
        try:
            hits = coll.similar(composed.query, k, engine=engine, label=label, exclude=composed.exclude())
        except (IndexFileError, CollectionError) as e:  # the index went stale or the collection changed meanwhile
            raise Refused(409, str(e)) from None
        search_ms = ms_since(started)
        query, made_of = composed.query, composed.to_dict()
        if made_of["crop"] is not None:
            made_of["crop"]["of"] = public_names([made_of["crop"]["of"]])[0]
        return {
            "collection": coll.name, "engine": engine, "k": k, "label": label,
            "query": {"id": query.image_id, "label": query.label,
                      "name": Path(query.path).name if query.image_id is not None else None,
                      "embedded": any(q.raw is not None for q in composed.pictures),
                      **made_of, "positives": public_names(made_of["positives"]), "negatives": public_names(made_of["negatives"])},
            "timings": {"query_ms": query_ms, "search_ms": search_ms},
            "hits": [hit_json(coll.name, h) for h in hits],
        }


def files_of(coll: Collection, image_id: int, path: str):
    """The files that may hold a stored picture: its shown path, then the other copies ingest recorded."""
    yield path
    yield from (p for p in paths_of(coll.db, coll.id, [image_id]).get(image_id, []) if p != path)


def stored_bytes(coll: Collection, image_id: int) -> bytes:
    """A stored picture's bytes verified against its sha256, for a command (`search similar --id N --crop`): an
    ImageError says why there are none."""
    found = coll.details([image_id])[image_id]
    try:
        return read_verified(files_of(coll, image_id, found.path), found.sha256)
    except (FileGone, FileChanged) as e:
        raise ImageError(str(e)) from None


@contextmanager
def upload_file(data: bytes | None):
    """The upload as a temporary file (ingest reads queries from files), removed as the block ends; None without one."""
    if data is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="ris-upload-") as tmp:
        path = Path(tmp) / "upload"
        path.write_bytes(data)
        yield path


def public_names(names) -> list:
    """A query's pictures as the API tells them: stored images by id, the upload as "upload" (never a server path)."""
    return [n if isinstance(n, int) else "upload" for n in names]


def parse_crop(text: str | None) -> Crop | None:
    """A request's "x,y,w,h", or 422 saying what a crop is."""
    try:
        return None if text is None else Crop.parse(text)
    except RisError as e:
        raise Refused(422, str(e)) from None


def refuse_oversized(data: bytes, max_pixels: int, crop: Crop | None = None) -> None:
    """422 for a picture that would decode to more than the server's pixel limit, read from its header (a JPEG
    counted at the draft scale ingest decodes it at, which a small crop makes larger). What Pillow cannot open is
    left to ingest, which says why."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            img.draft("RGB", draft_size(img.size, crop))
            decoded = img.width * img.height
    except Exception:  # noqa: BLE001 - not an image, or a bomb Pillow itself refuses: ingest gives the reason
        return
    if decoded > max_pixels:
        raise Refused(422, f"cannot use the upload as a query: decompression bomb: {width}x{height} pixels exceeds "
                           f"the server's limit of {max_pixels}")


def hit_json(collection: str, hit) -> dict:
    """A hit as the page shows it: the file's name, not its path on the server, and where to fetch its pictures."""
    base = image_url(collection, hit.id)
    return {"rank": hit.rank, "id": hit.id, "label": hit.label, "distance": hit.distance, "name": Path(hit.path).name,
            "thumbnail": f"{base}/thumbnail", "image": f"{base}/file"}


def image_url(collection: str, image_id: int) -> str:
    return f"/api/collections/{quote(collection, safe='')}/images/{image_id}"


def ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
