"""HEIC/HEIF (pillow-heif) and AVIF (Pillow's own) read like any other picture, upright by their EXIF orientation.
The files are written here, with the same libraries: an upright portrait picture stored turned on its side,
with the EXIF orientation that turns it back."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ingest.cli import cli as ingest_cli
from ingest.images import decode_image
from ingest.sources import walk_folder
from tests.helpers import COLOURS, make_picture

FORMATS = {"HEIF": ".heic", "AVIF": ".avif"}
ROTATED_CLOCKWISE = 6  # EXIF orientation: display after turning 90 degrees clockwise


def upright() -> Image.Image:
    """A portrait picture whose top half is red and bottom half blue."""
    img = Image.new("RGB", (60, 120), COLOURS["blue"])
    img.paste(COLOURS["red"], (0, 0, 60, 60))
    return img


def sideways(fmt: str, picture: Image.Image) -> bytes:
    """The picture as a camera writes it: pixels turned anticlockwise, orientation 6 in EXIF."""
    exif = Image.Exif()
    exif[0x0112] = ROTATED_CLOCKWISE
    out = io.BytesIO()
    picture.transpose(Image.Transpose.ROTATE_90).save(out, fmt, exif=exif.tobytes(), quality=90)
    return out.getvalue()


@pytest.mark.parametrize("fmt", FORMATS)
def test_heic_and_avif_decode_upright(fmt):
    data = sideways(fmt, upright())
    assert Image.open(io.BytesIO(data)).format == fmt
    decoded = decode_image(data)
    assert (decoded.width, decoded.height) == (60, 120)
    top, bottom = decoded.pixels[:100].mean(axis=(0, 1)), decoded.pixels[124:].mean(axis=(0, 1))
    np.testing.assert_allclose(top, COLOURS["red"], atol=12)
    np.testing.assert_allclose(bottom, COLOURS["blue"], atol=12)


def test_a_folder_of_phone_pictures_loads(tmp_path, fake_extractor):
    folder = tmp_path / "phone"
    (folder / "camera").mkdir(parents=True)
    for i in range(3):
        for fmt, suffix in FORMATS.items():
            upper = suffix.upper() if i == 0 else suffix  # IMG_0001.HEIC as iPhones name them
            out = io.BytesIO()
            make_picture(COLOURS["green"], "circle", seed=i * 10 + len(suffix)).save(out, fmt, quality=80)
            (folder / "camera" / f"img_{i}{upper}").write_bytes(out.getvalue())
    assert len(walk_folder(folder)[0]) == 6
    result = CliRunner().invoke(ingest_cli, ["load", "folder", str(folder), "--weights", "fake", "--pca-dims", "2", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["ingested"], summary["failed"]) == (6, 0)
