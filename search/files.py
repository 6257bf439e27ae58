"""What `search serve` sends from disk: a stored picture's bytes only if they are the picture that was ingested.

A path in the database says where a picture was, not what is there now: the file may since have been edited,
replaced, or swapped for a symlink to anything the server can read (a parent folder too). So a file is read once,
into memory, and the very bytes that will be sent are hashed and compared with the stored sha256: no check of one
file followed by the open of another. When the shown path fails, the picture's other recorded files (the copies
ingest found, `ingest.paths_of`) are tried in turn. Verified content never changes under its sha256, so the
browser may keep it for a week (`Cache-Control: immutable`, the sha256 as ETag).
"""
from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from fastapi import Request
from fastapi.responses import FileResponse, Response
from PIL import Image

from ingest import read_file
from ingest.errors import ImageError

CACHE_SECONDS = 7 * 24 * 3600  # an image id's content never changes: thumbnails and files may be kept a week


class FileGone(Exception):
    """None of the picture's files could be read; the message says why for the first one."""


class FileChanged(Exception):
    """Files are there, but none holds the picture that was ingested."""


def read_verified(paths: Iterable[str], sha256: str) -> bytes:
    """The bytes of the first of `paths` whose content has this sha256 (each read once, hashed as read)."""
    reasons = []
    for path in paths:
        try:
            data = read_regular(path)
        except ImageError as e:
            reasons.append(str(e))
            continue
        if hashlib.sha256(data).hexdigest() == sha256:
            return data
        reasons.append(None)
    if any(r is None for r in reasons):
        raise FileChanged("its file on disk is no longer the picture that was ingested; run `ingest sync`")
    raise FileGone(reasons[0] if reasons else "no file holds it")


def read_regular(path: str) -> bytes:
    """A regular file's bytes (ingest's bounded read), or ImageError with a reason that names no path. A FIFO
    would hang the read and /dev/zero fill memory up to the file limit, so anything else is refused first."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageError("its file is no longer on disk") from None
    except OSError as e:
        raise ImageError(f"cannot read its file: [Errno {e.errno}] {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise ImageError("its file is no longer a regular file")
    return read_file(Path(path))


def media_type(data: bytes) -> str:
    """The type the bytes are (from their header, as Pillow identifies them), not the type their name suggests:
    with nosniff, a browser believes what we say."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return Image.MIME.get(img.format, "application/octet-stream")
    except Exception:  # noqa: BLE001 - verified content that Pillow cannot name is sent as plain bytes
        return "application/octet-stream"


def cache_headers(etag: str) -> dict[str, str]:
    return {"Cache-Control": f"public, max-age={CACHE_SECONDS}, immutable", "ETag": f'"{etag}"'}


def not_modified(request: Request, etag: str) -> Response | None:
    """304 when the browser already holds this content (checked before any file is read)."""
    if request.headers.get("if-none-match") == f'"{etag}"':
        return Response(status_code=304, headers=cache_headers(etag))
    return None


def cached_bytes(data: bytes, etag: str, media: str) -> Response:
    return Response(data, media_type=media, headers=cache_headers(etag))


def cached_path(path: Path, etag: str, media: str) -> FileResponse:
    """A file of the server's own (a thumbnail it made from verified bytes) with the same caching."""
    return FileResponse(path, media_type=media, headers=cache_headers(etag))
