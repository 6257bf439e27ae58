"""Thumbnails for the web page: made once from the stored picture, kept under $RIS_HOME/thumbnails by sha256.

A picture's content never changes under its sha256, so a thumbnail made once is right for every collection
and every path holding that content, and the browser may keep it as long as it likes. Files are written under
a temporary name and renamed, so two server workers making the same thumbnail never serve half a JPEG.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from PIL import Image, ImageOps

from ingest import MAX_PIXELS, to_rgb
from ingest.errors import ImageError

THUMBNAIL_SIZE = 256  # longest side in pixels: sharp in a 2x-density grid cell of 128 CSS pixels
QUALITY = 85


def thumbnail_path(home: Path, sha256: str) -> Path:
    return home / "thumbnails" / sha256[:2] / f"{sha256}-{THUMBNAIL_SIZE}.jpg"


def thumbnail(home: Path, sha256: str, source: str) -> Path:
    """The cached thumbnail of the picture with this sha256, made from `source` (a stored path) if missing."""
    target = thumbnail_path(home, sha256)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    small = shrink(Path(source))
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            small.save(f, "JPEG", quality=QUALITY)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def shrink(source: Path) -> Image.Image:
    """The picture upright, RGB, at most THUMBNAIL_SIZE on its longest side; ImageError if it cannot be read."""
    try:
        with Image.open(source) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"{img.width}x{img.height} pixels exceeds the limit of {MAX_PIXELS}")
            img.draft("RGB", (THUMBNAIL_SIZE, THUMBNAIL_SIZE))  # JPEG: decode at a fraction of full size
            img = ImageOps.exif_transpose(img)
            img = to_rgb(img)
            img.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
            return img
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - gone, unreadable or no longer an image: one reason for the page
        raise ImageError(f"cannot make a thumbnail: {str(exc) or type(exc).__name__}") from exc

