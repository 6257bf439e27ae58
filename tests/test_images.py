"""ingest.images: every file becomes 224x224 RGB pixels or an ImageError with a short reason."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageFile

from ingest import images
from ingest.errors import ImageError
from ingest.images import INPUT_SIZE, MAX_PIXELS, DecodeBudget, DecodedImage, decode_image, read_and_decode, read_file
from tests.helpers import REPO, encode, gradient, png_announcing

WHITE = (255, 255, 255)


def mean_colour(decoded: DecodedImage) -> np.ndarray:
    return decoded.pixels.reshape(-1, 3).mean(axis=0)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def palette_png(transparent: bool) -> bytes:
    img = Image.new("P", (16, 16), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    return encode(img, "PNG", **({"transparency": 1} if transparent else {}))


MODE_CASES = {
    "RGB": (lambda: encode(Image.new("RGB", (30, 20), (255, 0, 0)), "PNG"), (255, 0, 0), 0),
    "L": (lambda: encode(Image.new("L", (30, 20), 77), "PNG"), (77, 77, 77), 0),
    "1": (lambda: encode(Image.new("1", (30, 20), 1), "PNG"), WHITE, 0),
    "P": (lambda: palette_png(transparent=False), (255, 0, 0), 0),
    "P transparent": (lambda: palette_png(transparent=True), WHITE, 0),
    "GIF transparent": (lambda: encode(Image.new("P", (16, 16), 3), "GIF", transparency=3), WHITE, 0),
    "GIF animated": (animated_gif, (255, 0, 0), 2),
    "RGBA transparent red": (lambda: encode(Image.new("RGBA", (30, 20), (255, 0, 0, 0)), "PNG"), WHITE, 0),
    "RGBA half black": (lambda: encode(Image.new("RGBA", (30, 20), (0, 0, 0, 128)), "PNG"), (127, 127, 127), 1),
    "RGBA opaque": (lambda: encode(Image.new("RGBA", (30, 20), (0, 0, 255, 255)), "PNG"), (0, 0, 255), 0),
    "RGB tRNS": (lambda: encode(Image.new("RGB", (30, 20), (1, 2, 3)), "PNG", transparency=(1, 2, 3)), WHITE, 0),
    "LA transparent": (lambda: encode(Image.new("LA", (30, 20), (0, 0)), "PNG"), WHITE, 0),
    "LA opaque": (lambda: encode(Image.new("LA", (30, 20), (77, 255)), "PNG"), (77, 77, 77), 0),
    "I;16 PNG": (lambda: encode(Image.new("I;16", (30, 20), 32768), "PNG"), (128, 128, 128), 0),
    "I;16 PNG white": (lambda: encode(Image.new("I;16", (30, 20), 65535), "PNG"), WHITE, 0),
    "I;16B TIFF": (lambda: encode(Image.new("I;16B", (30, 20), 32768), "TIFF"), (128, 128, 128), 0),
    "I TIFF": (lambda: encode(Image.new("I", (30, 20), 32768), "TIFF"), (128, 128, 128), 0),
    "F TIFF": (lambda: encode(Image.new("F", (30, 20), 100.5), "TIFF"), (100, 100, 100), 1),
    "CMYK JPEG": (lambda: encode(Image.new("CMYK", (30, 20), (255, 0, 0, 0)), "JPEG", quality=95), (0, 255, 255), 6),
    "CMYK TIFF": (lambda: encode(Image.new("CMYK", (30, 20), (0, 255, 0, 0)), "TIFF"), (255, 0, 255), 0),
    "BMP": (lambda: encode(Image.new("RGB", (30, 20), (10, 200, 30)), "BMP"), (10, 200, 30), 0),
}


@pytest.mark.parametrize("case", MODE_CASES)
def test_every_mode_becomes_rgb_224(case):
    make, expected, tolerance = MODE_CASES[case]
    decoded = decode_image(make())
    assert decoded.pixels.shape == (INPUT_SIZE, INPUT_SIZE, 3)
    assert decoded.pixels.dtype == np.uint8
    assert decoded.pixels.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(mean_colour(decoded), expected, atol=tolerance + 0.5)


def test_reports_full_size_of_the_original():
    decoded = decode_image(encode(Image.new("RGB", (30, 20)), "PNG"))
    assert (decoded.width, decoded.height) == (30, 20)


def test_exif_orientation_is_applied():
    picture = gradient(40, 20)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    tagged = decode_image(encode(picture, "JPEG", quality=95, exif=exif.tobytes()))
    upright = decode_image(encode(picture.transpose(Image.Transpose.ROTATE_270), "JPEG", quality=95))
    unrotated = decode_image(encode(picture, "JPEG", quality=95))
    assert (tagged.width, tagged.height) == (20, 40)
    difference = np.abs(tagged.pixels.astype(int) - upright.pixels.astype(int)).mean()
    assert difference < 4
    assert np.abs(tagged.pixels.astype(int) - unrotated.pixels.astype(int)).mean() > 10 * difference


def test_big_jpeg_reports_full_size_and_matches_a_full_decode():
    """draft() decodes at a reduced scale; the result must stay close to decoding every pixel."""
    picture = gradient(2000, 1000)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 8
    data = encode(picture, "JPEG", quality=90, exif=exif.tobytes())
    decoded = decode_image(data)
    assert (decoded.width, decoded.height) == (1000, 2000)
    full = Image.open(io.BytesIO(data)).convert("RGB").transpose(Image.Transpose.ROTATE_90)
    reference = np.asarray(full.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR))
    assert np.abs(decoded.pixels.astype(int) - reference.astype(int)).mean() < 3


@pytest.mark.parametrize("size", [(1, 1), (10_000, 10), (10, 10_000)])
def test_extreme_shapes(size):
    decoded = decode_image(encode(Image.new("RGB", size, (0, 128, 0)), "PNG"))
    assert decoded.pixels.shape == (INPUT_SIZE, INPUT_SIZE, 3)
    assert (decoded.width, decoded.height) == size
    np.testing.assert_allclose(mean_colour(decoded), (0, 128, 0), atol=0.5)


def test_same_bytes_same_pixels():
    data = encode(gradient(300, 200), "JPEG")
    first, second = decode_image(data), decode_image(data)
    assert np.array_equal(first.pixels, second.pixels)
    assert first.width == second.width and first.height == second.height


def jpeg_cut_in_half() -> bytes:
    data = encode(gradient(200, 150), "JPEG")
    return data[: len(data) // 2]


def png_cut_in_half() -> bytes:
    data = encode(gradient(200, 150), "PNG", compress_level=0)
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"hello, this is a text file\n" * 10, "not an image (cannot identify format)"),
        (b"\x89PNG\r\n\x1a\n", "not an image (cannot identify format)"),
        (jpeg_cut_in_half(), "truncated image"),
        (png_cut_in_half(), "truncated image"),
    ],
)
def test_unusable_bytes_give_a_reason(data, reason):
    with pytest.raises(ImageError) as caught:
        decode_image(data)
    assert str(caught.value) == reason


def test_png_with_garbage_in_the_middle():
    data = bytearray(encode(gradient(200, 150), "PNG"))
    middle = len(data) // 2
    data[middle : middle + 200] = bytes(range(200))
    with pytest.raises(ImageError, match="broken image data"):
        decode_image(bytes(data))


@pytest.mark.parametrize("seed", range(5))
def test_jpeg_with_garbage_in_the_middle_is_decoded_or_refused(seed):
    """libjpeg often decodes corrupt scan data with a warning; either outcome is fine, a crash is not."""
    data = bytearray(encode(gradient(200, 150), "JPEG"))
    middle = len(data) // 2
    data[middle : middle + 64] = np.random.default_rng(seed).integers(0, 256, 64, dtype=np.uint8).tobytes()
    try:
        decoded = decode_image(bytes(data))
    except ImageError as exc:
        assert str(exc)
    else:
        assert decoded.pixels.shape == (INPUT_SIZE, INPUT_SIZE, 3)


def test_decompression_bomb_refused_by_pillow_at_open():
    data = png_announcing(40_000, 40_000)
    assert len(data) < 4_000
    with pytest.raises(ImageError, match=r"^decompression bomb: 1600000000 pixels exceeds the limit of \d+$"):
        decode_image(data)


def test_decompression_bomb_refused_by_our_limit():
    """120 M pixels is past Pillow's warning but below its error: MAX_PIXELS is what refuses it."""
    with pytest.raises(ImageError) as caught:
        decode_image(png_announcing(12_000, 10_000))
    assert str(caught.value) == f"decompression bomb: 12000x10000 pixels exceeds the limit of {MAX_PIXELS}"


def test_below_our_limit_is_decoded_despite_pillows_warning():
    """95 M pixels makes Pillow warn; our limit is MAX_PIXELS, so this file is decoded (and found truncated)."""
    with pytest.raises(ImageError) as caught:
        decode_image(png_announcing(10_000, 9_500))
    assert "decompression bomb" not in str(caught.value)


def test_decompression_bomb_allocates_nothing(tmp_path):
    """Run in a child whose address space allows only 300 MB more: decoding either bomb would need
    1.6 GB or 120 MB for its pixels plus their RGB copy; the control proves the limit bites."""
    bombs = [png_announcing(40_000, 40_000), png_announcing(12_000, 10_000)]
    for index, bomb in enumerate(bombs):
        (tmp_path / f"bomb{index}.png").write_bytes(bomb)
    child = textwrap.dedent(
        f"""
        import resource, sys
        from pathlib import Path
        from PIL import Image
        from ingest.errors import ImageError
        from ingest.images import decode_image
        bombs = [Path(r"{tmp_path}") / f"bomb{{i}}.png" for i in range(2)]
        pages = int(Path("/proc/self/statm").read_text().split()[0])
        limit = pages * resource.getpagesize() + (300 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        for bomb in bombs:
            try:
                decode_image(bomb.read_bytes())
            except ImageError as exc:
                print(exc)
        try:
            Image.new("1", (40_000, 40_000))
        except MemoryError:
            print("control: MemoryError")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("decompression bomb") for line in lines[:2]), lines
    assert lines[2] == "control: MemoryError"


def test_global_pillow_and_warning_state_untouched():
    filters = list(warnings.filters)
    limit = Image.MAX_IMAGE_PIXELS
    for data in (png_announcing(12_000, 10_000), png_announcing(40_000, 40_000), jpeg_cut_in_half()):
        with pytest.raises(ImageError):
            decode_image(data)
    decode_image(encode(gradient(30, 20), "JPEG"))
    assert warnings.filters == filters
    assert Image.MAX_IMAGE_PIXELS == limit
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_read_and_decode_returns_the_bytes(tmp_path):
    path = tmp_path / "red.png"
    path.write_bytes(encode(Image.new("RGB", (5, 5), (255, 0, 0)), "PNG"))
    data, decoded = read_and_decode(path)
    assert data == path.read_bytes()
    np.testing.assert_allclose(mean_colour(decoded), (255, 0, 0))


def test_read_and_decode_unreadable_files(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(ImageError, match=r"^cannot read: \[Errno 2\] No such file or directory$"):
        read_and_decode(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match=r"^cannot read: \[Errno 40\] Too many levels of symbolic links$"):
        read_and_decode(tmp_path / "a")
    with pytest.raises(ImageError, match=r"^cannot read: \[Errno 21\] Is a directory$"):
        read_and_decode(tmp_path)


def test_read_and_decode_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.touch()
    with pytest.raises(ImageError, match="^empty file$"):
        read_and_decode(path)


# --- memory: the decode budget, max_pixels, the file size limit ----------------------------------


def holding(budget: DecodeBudget, pixels: int, started: threading.Event, release: threading.Event, log: list):
    """A thread body: hold `pixels` of the budget until `release` is set, logging when it got them."""
    def run():
        with budget.decoding(pixels):
            log.append(pixels)
            started.set()
            release.wait(10)
    return threading.Thread(target=run, daemon=True)


def test_decode_budget_makes_a_decode_wait_while_others_use_it():
    budget = DecodeBudget(100)
    log: list[int] = []
    first_in, second_in, release = threading.Event(), threading.Event(), threading.Event()
    first = holding(budget, 70, first_in, release, log)
    second = holding(budget, 40, second_in, threading.Event(), log)
    first.start()
    assert first_in.wait(5)
    second.start()
    assert not second_in.wait(0.3) and budget.in_use == 70  # 70 + 40 > 100: it waits
    release.set()
    assert second_in.wait(5) and log == [70, 40]


def test_decode_budget_lets_a_picture_larger_than_itself_run_alone():
    budget = DecodeBudget(100)
    with budget.decoding(250):  # no deadlock: it holds the whole budget
        assert budget.in_use == 100
        started = threading.Event()
        holding(budget, 1, started, threading.Event(), []).start()
        assert not started.wait(0.3)  # nothing runs beside it
    assert started.wait(5)


def test_decode_budget_serves_waiters_in_arrival_order():
    """A large picture waiting is not overtaken by small ones arriving after it, which would starve it."""
    budget = DecodeBudget(100)
    log: list[int] = []
    release = threading.Event()
    holder_in = threading.Event()
    holding(budget, 60, holder_in, release, log).start()
    assert holder_in.wait(5)
    large_in, small_in = threading.Event(), threading.Event()
    holding(budget, 90, large_in, threading.Event(), log).start()
    time.sleep(0.1)
    holding(budget, 10, small_in, threading.Event(), log).start()  # would fit now, but arrived after the large one
    assert not small_in.wait(0.3)
    release.set()
    assert large_in.wait(5) and small_in.wait(5)
    assert log == [60, 90, 10]


def test_decode_image_holds_the_budget_for_what_it_decodes(monkeypatch):
    """A JPEG is weighed at its draft size (1/8 here), a PNG at its full size."""
    weights = []
    real = images.decode_budget.decoding

    def recording(pixels):
        weights.append(pixels)
        return real(pixels)

    monkeypatch.setattr(images.decode_budget, "decoding", recording)
    decode_image(encode(gradient(4000, 2000), "JPEG"))
    decode_image(encode(gradient(600, 400), "PNG"))
    assert weights == [500 * 250, 600 * 400]
    assert images.decode_budget.in_use == 0


def test_max_pixels_keyword_lowers_the_limit():
    data = encode(gradient(300, 200), "PNG")
    with pytest.raises(ImageError, match=r"^decompression bomb: 300x200 pixels exceeds the limit of 50000$"):
        decode_image(data, max_pixels=50_000)
    assert decode_image(data, max_pixels=60_000).width == 300


def test_read_file_refuses_a_file_over_the_limit_before_reading_it(tmp_path):
    path = tmp_path / "big.jpg"
    with open(path, "wb") as f:
        f.truncate(5 * 2**20)  # sparse: nothing to read, but 5 MB by its size
    with pytest.raises(ImageError, match=r"^file too large: 5 MB exceeds the limit of 1 MB \(--max-file-mb\)$"):
        read_file(path, max_bytes=2**20)
    with images.file_size_limit(2**20):
        with pytest.raises(ImageError, match="^file too large"):
            read_and_decode(path)
    assert len(read_file(path)) == 5 * 2**20  # the default limit is restored after the block


def test_a_fifo_put_where_a_picture_was_is_refused_without_blocking(tmp_path):
    """A picture replaced by a named pipe between the walk and the read: opening it for reading would wait for a
    writer forever and hang the load; it is refused at once instead."""
    path = tmp_path / "photo.jpg"
    os.mkfifo(path)
    started = time.monotonic()
    with pytest.raises(ImageError, match="^cannot read: not a regular file$"):
        read_file(path)
    assert time.monotonic() - started < 5
