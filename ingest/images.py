"""Image files -> the 224x224 RGB pixels ResNet50 takes.

The single place where bytes become pixels: ingest and queries both call `decode_image`, so a query
image is prepared exactly as the stored ones were. A file that cannot be used raises `ImageError`
whose message is the short reason recorded in the database.

Memory is bounded three ways, all decided before the expensive step: a file larger than the process's file
limit is refused from its size before it is read (`read_file`); a picture of more than `max_pixels` is
refused from its header; and every decode holds its pixels' weight of the process-wide `decode_budget`, so
threads decoding at once never hold more than the budget's pixels between them (a picture larger than the
whole budget decodes alone).
"""
from __future__ import annotations

import functools
import io
import math
import os
import re
import stat
import threading
import warnings
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from ingest.config import DEFAULT_MAX_FILE_MB
from ingest.errors import ImageError

INPUT_SIZE = 224
MIN_CROP_SIDE = 16  # pixels: a smaller region of a picture holds too little for the CNN to tell anything
MAX_PIXELS = 100_000_000  # refuse larger images without decoding them
DEFAULT_DECODE_BUDGET = MAX_PIXELS  # pixels decoded at once per process: a 100 MP PNG alone, or a few photos side by side

_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that turn the picture by 90 degrees
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa"}
_HIGH_BIT_GREY_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
_PILLOW_BOMB = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+)")

# Pillow warns from about 89M pixels; MAX_PIXELS is our limit, checked from the header before any
# decoding, so the warning would only be noise. Set once here: catch_warnings per call is not
# thread-safe, and loads decode in threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Pillow allocates pixels in blocks of 16 MB by default; glibc serves allocations that size from per-thread
# arenas, which keep freed memory for their own thread, so eight threads that each decoded one 40 MP PNG in turn
# held 1.1 GB between them although the budget let only one decode at a time. Blocks as large as the largest
# picture (4 bytes a pixel) are mapped and unmapped whole, so a decode's memory goes back when it ends.
PILLOW_BLOCK_SIZE = 512 * 2**20
Image.core.set_block_size(PILLOW_BLOCK_SIZE)


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


Box = tuple[int, int, int, int]  # a crop: x, y, width, height in pixels of the upright picture (after EXIF rotation)


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # uint8, shape (224, 224, 3), RGB, upright
    width: int  # of the upright original picture (after EXIF orientation), full resolution
    height: int


def _positive(n: int) -> int:
    if n < 1:
        raise ValueError(f"a limit must be positive, got {n}")
    return int(n)


class DecodeBudget:
    """A weighted semaphore over pixels: `decoding(n)` waits until n pixels fit beside what other threads are
    decoding, so their pixel buffers together stay within `capacity` pixels.

    Waiters are served in arrival order, so a large picture is not starved by a stream of small ones. A
    picture larger than the whole budget waits until nothing else is decoding, then runs alone (it is
    below `max_pixels`, or it would have been refused from its header).
    """

    def __init__(self, pixels: int = DEFAULT_DECODE_BUDGET):
        self._capacity = _positive(pixels)
        self._in_use = 0
        self._queue: deque[object] = deque()
        self._changed = threading.Condition()

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def in_use(self) -> int:
        """Pixels being decoded right now (each picture counted at most `capacity`)."""
        return self._in_use

    def resize(self, pixels: int) -> None:
        """Change the capacity (a server with less memory lowers it); decodes already running keep their share."""
        with self._changed:
            self._capacity = _positive(pixels)
            self._changed.notify_all()

    @contextmanager
    def decoding(self, pixels: int):
        """Hold `pixels` of the budget for the duration of the block."""
        ticket = object()
        with self._changed:
            self._queue.append(ticket)
            try:
                self._changed.wait_for(lambda: self._queue[0] is ticket and self._fits(pixels))
            finally:  # also when the wait is interrupted (Ctrl-C): a ticket left in the queue would block the rest
                self._queue.remove(ticket)
                self._changed.notify_all()  # the next in line may fit too
            weight = min(pixels, self._capacity)
            self._in_use += weight
        try:
            yield
        finally:
            with self._changed:
                self._in_use -= weight
                self._changed.notify_all()

    def _fits(self, pixels: int) -> bool:
        return self._in_use == 0 or self._in_use + min(pixels, self._capacity) <= self._capacity


decode_budget = DecodeBudget()  # the process's: every decode here and in the web server draws on it


def decoding(pixels: int):
    """`with decoding(width * height):` around anything that allocates a picture's pixels (the process-wide budget)."""
    return decode_budget.decoding(pixels)


_file_limit = {"bytes": DEFAULT_MAX_FILE_MB * 2**20}


@contextmanager
def file_size_limit(max_bytes: int):
    """Within the block, `read_file` refuses files over `max_bytes` in this process (`ingest load --max-file-mb`,
    env RIS_MAX_FILE_MB: a load's decode threads read through `read_file` without being handed the limit)."""
    before = _file_limit["bytes"]
    _file_limit["bytes"] = _positive(max_bytes)
    try:
        yield
    finally:
        _file_limit["bytes"] = before


def max_file_bytes() -> int:
    """The largest file `read_file` reads by default: DEFAULT_MAX_FILE_MB, or what `file_size_limit` set."""
    return _file_limit["bytes"]


def read_file(path: Path, *, max_bytes: int | None = None) -> bytes:
    """A file's bytes (the caller hashes them before deciding to decode), or ImageError saying why not.

    A file larger than `max_bytes` (default: the process's limit, `file_size_limit`) is refused from its
    size, before a byte is read; the read itself stops past the limit too, in case the file grew meanwhile. It is
    opened without blocking and must be a regular file: a FIFO put where a picture was would otherwise hang the load."""
    limit = max_bytes or max_file_bytes()
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            status = os.fstat(f.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise ImageError("cannot read: not a regular file")
            size = status.st_size
            if size > limit:
                raise ImageError(_too_large(size, limit))
            data = f.read(size + 1)
            if len(data) > size:  # it grew since fstat (or reports no size): read on, still bounded
                data += f.read(limit + 1 - len(data))
    except OSError as exc:
        raise ImageError(f"cannot read: {_os_reason(exc)}") from exc
    if len(data) > limit:
        raise ImageError(_too_large(len(data), limit))
    return data


def read_and_decode(path: Path, *, max_pixels: int = MAX_PIXELS, max_bytes: int | None = None) -> tuple[bytes, DecodedImage]:
    """Read a file and decode it; the raw bytes come back too because the caller hashes them."""
    data = read_file(path, max_bytes=max_bytes)
    return data, decode_image(data, max_pixels=max_pixels)


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS, crop: Box | None = None) -> DecodedImage:
    """Decode one image file's bytes into upright 224x224 RGB pixels, or say why it cannot be used.

    `max_pixels` (a server may pass less than MAX_PIXELS) is checked right after the header is read, before
    any pixel is decoded, and the decode waits for its share of `decode_budget`. Every failure inside Pillow
    becomes an `ImageError` with its reason, so one bad file never stops a load. With `crop` (x, y, w, h of the
    upright picture) only that region becomes the 224x224 pixels (a query of part of a picture); a crop not wholly
    inside the picture, or under MIN_CROP_SIDE a side, is an ImageError saying so.
    """
    if not data:
        raise ImageError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            _refuse_bomb(img.size, max_pixels)
            return _decode_opened(img, crop)
    except (ImageError, MemoryError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(_pillow_bomb_reason(exc)) from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageError("not an image (cannot identify format)") from exc
    except Exception as exc:  # noqa: BLE001 - any Pillow failure is a property of this file, recorded as its reason
        raise ImageError(_broken_reason(exc)) from exc


def _decode_opened(img: Image.Image, crop: Box | None = None) -> DecodedImage:
    """Load the first frame at the smallest size still >= 224 (for a crop: the region's short side >= 224), turn
    it upright, cut the crop out, make it RGB, resize."""
    width, height = img.size  # before draft() shrinks it
    drafted = img.draft("RGB", draft_size(img.size, crop))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale
    scale = width / drafted[1][2] if drafted else 1.0  # the draft's box is the picture's size at its scale
    with decoding(img.width * img.height):  # what is decoded: the draft's size, not the header's
        img.load()
        if img.getexif().get(ExifTags.Base.Orientation, 1) in _SWAPPING_ORIENTATIONS:
            width, height = height, width
        ImageOps.exif_transpose(img, in_place=True)
        region = img if crop is None else _cut(img, crop, (width, height), scale)
        rgb = to_rgb(region).resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR)
    pixels = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    return DecodedImage(pixels=pixels, width=width, height=height)


def draft_size(size: tuple[int, int], crop: Box | None = None) -> tuple[int, int]:
    """What to ask a JPEG's `draft` for, given its header size: 224 a side for the whole picture; for a crop, as
    much as keeps the region's short side >= 224 where the source has that many (draft divides by the largest of
    8, 4, 2 that leaves at least the size asked, so asking the picture's size times 224 / the region's short
    side divides it by at most short / 224). A 300 px region of a 4000 px photo stays at full scale instead of
    coming from the 1/8 draft as 37 px and being upscaled."""
    if crop is None:
        return INPUT_SIZE, INPUT_SIZE
    short = min(crop[2], crop[3])
    if short <= INPUT_SIZE:
        return size
    return tuple(math.ceil(side * INPUT_SIZE / short) for side in size)


def check_crop(crop: Box, width: int, height: int) -> None:
    """Refuse a crop that is empty, under MIN_CROP_SIDE a side, or not wholly inside the width x height picture."""
    x, y, w, h = crop
    if w <= 0 or h <= 0:
        raise ImageError(f"the crop {x},{y},{w},{h} is empty")
    if w < MIN_CROP_SIDE or h < MIN_CROP_SIDE:
        raise ImageError(f"the crop {x},{y},{w},{h} is too small: at least {MIN_CROP_SIDE} pixels a side")
    if x < 0 or y < 0 or x + w > width or y + h > height:
        raise ImageError(f"the crop {x},{y},{w},{h} is not inside the {width}x{height} picture (as shown, after EXIF rotation)")


def _cut(img: Image.Image, crop: Box, upright: tuple[int, int], scale: float) -> Image.Image:
    """The crop (in pixels of the upright full-size picture) of the upright picture as decoded, at 1/scale."""
    check_crop(crop, *upright)
    x, y, w, h = crop
    box = [round(v / scale) for v in (x, y, x + w, y + h)]
    return img.crop((box[0], box[1], min(box[2], img.width), min(box[3], img.height)))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; what is transparent becomes white, as it looks on a page. An RGB picture without
    a transparent colour comes back as itself, not copied (a copy would double a large picture's memory)."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
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


def _refuse_bomb(size: tuple[int, int], max_pixels: int) -> None:
    """Refuse from the header alone: a few KB of PNG can announce gigabytes of pixels."""
    width, height = size
    if width * height > max_pixels:
        raise ImageError(f"decompression bomb: {width}x{height} pixels exceeds the limit of {max_pixels}")


def _too_large(size: int, limit: int) -> str:
    return f"file too large: {size / 2**20:.0f} MB exceeds the limit of {limit / 2**20:g} MB (--max-file-mb)"



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
