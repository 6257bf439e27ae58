"""Thumbnails for the web page: made once from a stored picture's verified bytes, kept under $RIS_HOME/thumbnails.

A thumbnail is made only from bytes whose sha256 is the stored one (search/files.py), so it is right for every
collection and every path holding that content, and the browser may keep it as long as it likes. Thumbnails of
the first layout (thumbnails/<xx>/...) were made from whatever the path held at the time and are purged when the
server starts. Files are written under a temporary name and renamed, so two server workers making the same
thumbnail never serve half a JPEG.

Decoding is what costs memory: a JPEG is decoded at 1/2 to 1/8 scale (`draft`); a picture that would still decode
to more than the server's pixel limit is refused from its header; the rest is shrunk by whole factors first
(`Image.reduce`, inside `thumbnail`), and every decode holds its pixels of ingest's process-wide decode budget.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageOps

from ingest import decoding, to_rgb
from ingest.errors import ImageError

THUMBNAIL_SIZE = 256  # longest side in pixels: sharp in a 2x-density grid cell of 128 CSS pixels
QUALITY = 85
LAYOUT = "v2"  # made from verified bytes only; the first layout (no version folder) is purged at start
RESIZABLE_MODES = {"L", "LA", "RGB", "RGBA"}  # others (palette, 1-bit, 16-bit, CMYK) become RGB before shrinking
_FIRST_LAYOUT = re.compile(r"[0-9a-f]{2}")


def thumbnail_path(home: Path, sha256: str) -> Path:
    return home / "thumbnails" / LAYOUT / sha256[:2] / f"{sha256}-{THUMBNAIL_SIZE}.jpg"


def cached_thumbnail(home: Path, sha256: str) -> Path | None:
    target = thumbnail_path(home, sha256)
    return target if target.exists() else None


def make_thumbnail(home: Path, sha256: str, data: bytes, *, max_pixels: int) -> Path:
    """Make and keep the thumbnail of the picture with this sha256 from its (verified) bytes."""
    target = thumbnail_path(home, sha256)
    target.parent.mkdir(parents=True, exist_ok=True)
    small = shrink(data, max_pixels)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            small.save(f, "JPEG", quality=QUALITY)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def shrink(data: bytes, max_pixels: int) -> Image.Image:
    """The picture upright, RGB, at most THUMBNAIL_SIZE on its longest side; ImageError if it cannot be made."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (THUMBNAIL_SIZE, THUMBNAIL_SIZE))  # JPEG: decode at a fraction of full size
            if img.width * img.height > max_pixels:
                raise ImageError(f"{img.width}x{img.height} pixels exceeds the server's limit of {max_pixels}")
            with decoding(img.width * img.height):  # what is decoded: the draft's size, not the header's
                img.load()
                if img.mode not in RESIZABLE_MODES:
                    img = to_rgb(img)
                img.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
            return to_rgb(ImageOps.exif_transpose(img))  # on the small picture: no full-size copies
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable or no longer an image: one reason for the page
        raise ImageError(f"cannot make a thumbnail: {str(exc) or type(exc).__name__}") from exc


def purge_first_layout(home: Path) -> None:
    """Remove thumbnails made before they were made from verified bytes (thumbnails/<two hex digits>/)."""
    root = home / "thumbnails"
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if _FIRST_LAYOUT.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
