"""Image files -> the 224x224 RGB pixels ResNet50 takes.

The single place where bytes become pixels: ingest and queries both call `decode_image`, so a query
image is prepared exactly as the stored ones were. A file that cannot be used raises `ImageError`
whose message is the short reason recorded in the database.
"""
from __future__ import annotations

import functools
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from ingest.errors import ImageError

INPUT_SIZE = 224
MAX_PIXELS = 100_000_000  # refuse larger images without decoding them

_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that turn the picture by 90 degrees
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa"}
_HIGH_BIT_GREY_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
_PILLOW_BOMB = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+)")

# Pillow warns from about 89M pixels; MAX_PIXELS is our limit, checked from the header before any
# decoding, so the warning would only be noise. Set once here: catch_warnings per call is not
# thread-safe, and loads decode in threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@functools.cache
def register_formats() -> None:
    """Teach Pillow HEIC/HEIF (what iPhones write) through pillow-heif, which turns pictures upright by their
    irot/imir boxes and EXIF as it decodes. AVIF is Pillow's own (11.3 and later, built with libavif)."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:  # without it a HEIC file fails to decode, with its reason recorded like any other
        return
    register_heif_opener()


register_formats()


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # uint8, shape (224, 224, 3), RGB, upright
    width: int  # of the upright original picture (after EXIF orientation), full resolution
    height: int


def read_file(path: Path) -> bytes:
    """A file's bytes (the caller hashes them before deciding to decode), or ImageError saying why not."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read: {_os_reason(exc)}") from exc


def read_and_decode(path: Path) -> tuple[bytes, DecodedImage]:
    """Read a file and decode it; the raw bytes come back too because the caller hashes them."""
    data = read_file(path)
    return data, decode_image(data)


def decode_image(data: bytes) -> DecodedImage:
    """Decode one image file's bytes into upright 224x224 RGB pixels, or say why it cannot be used.

    `MAX_PIXELS` is checked right after the header is read, before any pixel is decoded. Every
    failure inside Pillow becomes an `ImageError` with its reason, so one bad file never stops a load.
    """
    if not data:
        raise ImageError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            _refuse_bomb(img.size)
            return _decode_opened(img)
    except (ImageError, MemoryError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(_pillow_bomb_reason(exc)) from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageError("not an image (cannot identify format)") from exc
    except Exception as exc:  # noqa: BLE001 - any Pillow failure is a property of this file, recorded as its reason
        raise ImageError(_broken_reason(exc)) from exc


def _decode_opened(img: Image.Image) -> DecodedImage:
    """Load the first frame at the smallest size still >= 224, turn it upright, make it RGB, resize."""
    width, height = img.size  # before draft() shrinks it
    img.draft("RGB", (INPUT_SIZE, INPUT_SIZE))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale
    img.load()
    if img.getexif().get(ExifTags.Base.Orientation, 1) in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    ImageOps.exif_transpose(img, in_place=True)
    rgb = to_rgb(img).resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR)
    pixels = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    return DecodedImage(pixels=pixels, width=width, height=height)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; what is transparent becomes white, as it looks on a page."""
    if img.mode in _HIGH_BIT_GREY_MODES:
        return _high_bit_grey_to_rgb(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        page = Image.new("RGB", rgba.size, (255, 255, 255))
        page.paste(rgba, mask=rgba.getchannel("A"))
        return page
    return img.convert("RGB")


def _high_bit_grey_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit greys keep their high byte, as Pillow does for 16-bit RGB; convert('RGB') would clip
    every value above 255 and turn a mid-grey picture white."""
    values = np.clip(np.asarray(img), 0, 65535).astype(np.uint16) >> 8
    return Image.fromarray(values.astype(np.uint8)).convert("RGB")


def _refuse_bomb(size: tuple[int, int]) -> None:
    """Refuse from the header alone: a few KB of PNG can announce gigabytes of pixels."""
    width, height = size
    if width * height > MAX_PIXELS:
        raise ImageError(f"decompression bomb: {width}x{height} pixels exceeds the limit of {MAX_PIXELS}")


def _pillow_bomb_reason(exc: Exception) -> str:
    """Pillow refuses far larger images itself, inside Image.open; keep its numbers in our wording."""
    match = _PILLOW_BOMB.search(str(exc))
    if match is None:
        return f"decompression bomb: {exc}"
    return f"decompression bomb: {match[1]} pixels exceeds the limit of {match[2]}"


def _broken_reason(exc: Exception) -> str:
    """Short reason for a file Pillow could open but not decode."""
    if isinstance(exc, OSError) and "truncated" in str(exc):
        return "truncated image"
    return f"broken image data: {str(exc) or type(exc).__name__}"


def _os_reason(exc: OSError) -> str:
    """'[Errno 40] Too many levels of symbolic links' without the path, which is recorded separately."""
    if exc.errno is not None and exc.strerror:
        return f"[Errno {exc.errno}] {exc.strerror}"
    return str(exc)
