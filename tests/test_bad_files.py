"""Bad files: one `ingest load folder` (a real process, the real ResNet50 with random weights, the
embedded PostgreSQL, a real Annoy file) over a folder of broken, unusual, oddly named and hidden files.

Every usable picture is stored, every unusable one is in ingest_failures with its reason, hidden files are
nowhere, and names with quotes, newlines and non-ASCII letters come back intact from the JSON outputs.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import ExifTags, Image

from ingest.annoy_index import read_sidecar
from ingest.images import decode_image
from ingest.store import as_array, raw_cursor
from tests.helpers import BIN, COLOURS, LOAD_OPTIONS, child_env, cli, collection_id, encode, Finished, gradient, make_picture, png_announcing, run_measured

FOLDER_NAME = "bäd \"fîles\" 'x'"  # quotes and non-ASCII: the collection is named after it, made valid
COLLECTION = "bad-files-x"
SPACE, QUOTES, NEWLINE, UNICODE = "names/with space.jpg", "names/quote's \"double\".jpg", "names/new\nline.jpg", "names/ünïcødé 日本語 ß.jpg"
ODD_LABEL = "l'été \"q\"\nx"
RECOVERED = "broken/garbage_recovered.jpg"  # libjpeg decodes through random bytes in the scan data, or refuses
MEMORY_LIMIT = int(2.5 * 2**30)  # decoding the 40000x40000 bomb alone would need 1.6-4.8 GB


def picture(seed: int, size=(96, 72)) -> Image.Image:
    colours = list(COLOURS.values())
    return make_picture(colours[seed % len(colours)], ("square", "circle")[seed % 2], 500 + seed, size)


def jpeg(img: Image.Image, **options) -> bytes:
    return encode(img, "JPEG", quality=options.pop("quality", 90), **options)


def with_garbage(seed: int, garbage: bytes) -> bytes:
    data = bytearray(jpeg(picture(seed, (300, 200))))
    middle = len(data) // 2
    data[middle : middle + len(garbage)] = garbage
    return bytes(data)


def cut_in_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def half_transparent_rgba() -> tuple[Image.Image, Image.Image]:
    """An RGBA picture whose left half is transparent black, and the same picture on white."""
    rgba = np.zeros((60, 80, 4), np.uint8)
    rgba[..., :3] = np.asarray(picture(30, (80, 60)))
    rgba[..., 3] = 255
    rgba[:, :40] = 0
    on_white = rgba[..., :3].copy()
    on_white[:, :40] = 255
    return Image.fromarray(rgba, "RGBA"), Image.fromarray(on_white)


def transparent_palette() -> tuple[Image.Image, Image.Image]:
    """A palette picture whose colour 0 is transparent, and the same picture with white for colour 0."""
    indexed = picture(31, (80, 60)).quantize(16)
    indexed.info["transparency"] = 0
    on_white = np.asarray(indexed.convert("RGB")).copy()
    on_white[np.asarray(indexed) == 0] = 255
    return indexed, Image.fromarray(on_white)


def exif_rotated() -> tuple[bytes, Image.Image, Image.Image]:
    """A 300x200 JPEG tagged 'rotate 90 clockwise to view', the picture turned upright, and it unturned.
    Quality 100 without chroma subsampling keeps JPEG's own differences small next to a rotation's."""
    original = picture(32, (300, 200))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    return jpeg(original, quality=100, subsampling=0, exif=exif.tobytes()), original.transpose(Image.Transpose.ROTATE_270), original


def animated_gif() -> bytes:
    frames = [picture(33), picture(34)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def grey16() -> bytes:
    values = (np.asarray(gradient(120, 80).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    return encode(Image.fromarray(values), "PNG")


# relative path -> (bytes, stored (width, height)): every one must be stored.
GOOD = {
    "plain.jpg": (lambda: jpeg(picture(1)), (96, 72)),
    "modes/cmyk.jpg": (lambda: jpeg(picture(2).convert("CMYK")), (96, 72)),
    "modes/grey16.png": (grey16, (120, 80)),
    "modes/palette_transparent.png": (lambda: encode(transparent_palette()[0], "PNG", transparency=0), (80, 60)),
    "modes/rgba.png": (lambda: encode(half_transparent_rgba()[0], "PNG"), (80, 60)),
    "modes/grey.png": (lambda: encode(picture(3).convert("L"), "PNG"), (96, 72)),
    "modes/animated.gif": (animated_gif, (96, 72)),
    "modes/exif_rotated.jpg": (lambda: exif_rotated()[0], (200, 300)),
    "shapes/one_pixel.png": (lambda: encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), (1, 1)),
    "shapes/strip.png": (lambda: encode(gradient(10_000, 10), "PNG"), (10_000, 10)),
    SPACE: (lambda: jpeg(picture(10)), (96, 72)),
    QUOTES: (lambda: jpeg(picture(11)), (96, 72)),
    NEWLINE: (lambda: jpeg(picture(12)), (96, 72)),
    UNICODE: (lambda: jpeg(picture(13)), (96, 72)),
    f"{ODD_LABEL}/pic.jpg": (lambda: jpeg(picture(14)), (96, 72)),
    "x.jpg/inner.jpg": (lambda: jpeg(picture(15)), (96, 72)),  # in a directory named like an image
    "links/outside.jpg": (None, (96, 72)),  # a symlink to a picture outside the folder
}
# relative path -> reason (a regular expression): every one must be in ingest_failures.
BAD = {
    "broken/empty \"ü\"\n.jpg": r"empty file",
    "broken/text.jpg": r"not an image \(cannot identify format\)",
    "broken/truncated.jpg": r"truncated image",
    "broken/garbage.jpg": r"broken image data: .+",
    "broken/bomb.png": r"decompression bomb: 1600000000 pixels exceeds the limit of \d+",
    "broken/huge.jpg": r"file too large: 3072 MB exceeds the limit of 200 MB \(--max-file-mb\)",
    "links/loop.jpg": r"cannot read: \[Errno 40\] Too many levels of symbolic links",
    "links/dangling.jpg": r"cannot read: \[Errno 2\] No such file or directory",
}
# neither stored nor recorded as failures
HIDDEN = [".DS_Store", ".hidden.jpg", "modes/._resource.jpg", ".git/objects/ab.jpg"]


def make_bad_folder(root: Path, outside: Path) -> None:
    files = {rel: make() for rel, (make, _) in GOOD.items() if make is not None}
    files |= {
        RECOVERED: with_garbage(20, np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()),
        "broken/empty \"ü\"\n.jpg": b"",
        "broken/text.jpg": b"this is a text file, not a picture\n" * 20,
        "broken/truncated.jpg": cut_in_half(jpeg(picture(21, (300, 200)))),
        "broken/garbage.jpg": with_garbage(22, b"\xff" * 200),
        "broken/bomb.png": png_announcing(40_000, 40_000),
        ".DS_Store": b"\x00\x00\x00\x01Bud1" + bytes(100),
        ".hidden.jpg": jpeg(picture(40)),
        "modes/._resource.jpg": b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64),
        ".git/objects/ab.jpg": jpeg(picture(41)),
        "notes.txt": b"not an image name: skipped and counted\n",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    with open(root / "broken" / "huge.jpg", "wb") as f:
        f.truncate(3 * 2**30)  # sparse: 3 GB by its size, no disk used; refused unread
    (root / "links").mkdir()
    outside.mkdir()
    (outside / "o.jpg").write_bytes(jpeg(picture(16)))
    (root / "links" / "outside.jpg").symlink_to(outside / "o.jpg")
    (root / "links" / "loop.jpg").symlink_to("loop.jpg")
    (root / "links" / "dangling.jpg").symlink_to(outside / "missing.jpg")
    (root / "links" / "up").symlink_to(root)  # a directory loop: not followed


@dataclass(frozen=True)
class Load:
    root: Path
    name: str
    result: Finished
    max_rss: int  # bytes

    def path(self, rel: str) -> str:
        return str(self.root / rel)


@pytest.fixture(scope="module")
def bad_load(db, ris_home, tmp_path_factory) -> Load:
    base = tmp_path_factory.mktemp("bad-files")
    root = base / FOLDER_NAME
    root.mkdir()
    make_bad_folder(root, base / "outside")
    argv = [str(BIN / "ingest"), "load", "folder", str(root), *LOAD_OPTIONS, "--batch-size", "8", "--json"]
    result, max_rss = run_measured(argv, child_env(ris_home), base / "load")
    return Load(root.resolve(), COLLECTION, result, max_rss)


def stored(db, load: Load) -> dict[str, dict]:
    """path -> the images row (and its raw features) of every picture of the collection."""
    with db.engine.connect() as conn:
        cur = raw_cursor(conn)
        cur.execute(
            "SELECT i.id, i.path, i.label, i.width, i.height, f.raw FROM images i JOIN features f ON f.collection_id = i.collection_id AND f.sha256 = i.sha256 "
            "WHERE i.collection_id = %s",
            (collection_id(db.engine, load.name),),
        )
        return {r[1]: {"id": r[0], "label": r[2], "size": (r[3], r[4]), "raw": as_array(r[5])} for r in cur.fetchall()}


def failures(db, load: Load) -> dict[str, str]:
    with db.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT path, reason FROM ingest_failures WHERE collection_id = :c"), {"c": collection_id(db.engine, load.name)}
        )
        return dict(rows.all())


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_load_exits_0_and_counts_every_file(bad_load):
    assert bad_load.result.returncode == 0, bad_load.result.stderr
    assert "Traceback" not in bad_load.result.stderr
    summary = json.loads(bad_load.result.stdout)
    assert summary["collection"] == COLLECTION
    assert summary["ingested"] + summary["failed"] == len(GOOD) + len(BAD) + 1  # + RECOVERED, one or the other
    assert summary["failed"] in (len(BAD), len(BAD) + 1) and summary["present"] == 0
    assert summary["skipped"] == 1  # notes.txt; hidden files are not even counted


def test_every_usable_picture_is_stored_upright_with_its_label(db, bad_load):
    rows = stored(db, bad_load)
    expected = {bad_load.path(rel) for rel in GOOD}
    assert expected <= set(rows) and set(rows) - expected <= {bad_load.path(RECOVERED)}
    for rel, (_, size) in GOOD.items():
        row = rows[bad_load.path(rel)]
        assert row["size"] == size, rel
        assert row["label"] == (str(Path(rel).parent) if "/" in rel else None), rel


def test_every_unusable_file_is_recorded_with_its_reason(db, bad_load):
    recorded = failures(db, bad_load)
    for rel, reason in BAD.items():
        assert re.fullmatch(reason, recorded.get(bad_load.path(rel), "<not recorded>")), (rel, recorded.get(bad_load.path(rel)))
    assert set(recorded) - {bad_load.path(rel) for rel in BAD} <= {bad_load.path(RECOVERED)}


def test_jpeg_with_garbage_is_stored_or_recorded_not_both(db, bad_load):
    path = bad_load.path(RECOVERED)
    in_images, in_failures = path in stored(db, bad_load), path in failures(db, bad_load)
    assert in_images != in_failures
    if in_failures:
        assert re.fullmatch(r"broken image data: .+|truncated image", failures(db, bad_load)[path])


def test_hidden_files_are_nowhere(db, bad_load):
    everywhere = set(stored(db, bad_load)) | set(failures(db, bad_load))
    assert not {bad_load.path(rel) for rel in HIDDEN} & everywhere
    assert not [p for p in everywhere if "/." in p[len(str(bad_load.root)) :]]
    assert not [p for p in everywhere if p.startswith(bad_load.path("links/up/"))]  # the directory loop is not followed


def test_memory_stays_bounded_with_a_decompression_bomb(bad_load):
    """The bomb announces 40000x40000 pixels; it is refused from its header, and the 3 GB file from its size, so
    the load peaks at the model's size."""
    assert bad_load.max_rss < MEMORY_LIMIT, f"peak RSS {bad_load.max_rss / 2**30:.2f} GB"


@pytest.mark.parametrize("rel, make", [("modes/rgba.png", half_transparent_rgba), ("modes/palette_transparent.png", transparent_palette)])
def test_transparent_pixels_are_composited_onto_white(db, bad_load, extractor, rel, make):
    transparent, on_white = make()
    raw = stored(db, bad_load)[bad_load.path(rel)]["raw"]
    white = extractor.embed(decode_image(encode(on_white, "PNG")).pixels[np.newaxis])[0]
    opaque = Image.fromarray(np.asarray(transparent.convert("RGB")))  # fromarray: no tRNS colour carried over
    ignoring_alpha = extractor.embed(decode_image(encode(opaque, "PNG")).pixels[np.newaxis])[0]
    white = white.astype(np.float16).astype(np.float32)  # raw features are stored in half precision
    assert relative_error(raw, white) < 1e-4
    assert relative_error(raw, ignoring_alpha) > 100 * relative_error(raw, white) + 1e-3


def test_exif_rotated_picture_is_stored_upright(db, bad_load, extractor):
    _, upright, unturned = exif_rotated()
    row = stored(db, bad_load)[bad_load.path("modes/exif_rotated.jpg")]
    assert row["size"] == (200, 300)
    as_upright = extractor.embed(decode_image(jpeg(upright, quality=100, subsampling=0)).pixels[np.newaxis])[0]
    as_unturned = extractor.embed(decode_image(jpeg(unturned, quality=100, subsampling=0)).pixels[np.newaxis])[0]
    assert relative_error(row["raw"], as_upright) < 0.01
    assert relative_error(row["raw"], as_unturned) > 10 * relative_error(row["raw"], as_upright)


@pytest.fixture(scope="module")
def strict_load(bad_load, ris_home) -> Finished:
    return cli(ris_home, "ingest", "load", "folder", bad_load.root, *LOAD_OPTIONS, "--strict")


def test_strict_exits_1_and_changes_nothing(db, bad_load, strict_load):
    before = (stored(db, bad_load).keys(), failures(db, bad_load))
    assert strict_load.returncode == 1 and "Traceback" not in strict_load.stderr
    failed = len(before[1])
    assert strict_load.messages[-1] == f"Error: {failed} file(s) could not be ingested (--strict); see table ingest_failures"
    assert f"0 ingested, {len(before[0])} already present, {failed} failed, 1 non-image files skipped" in strict_load.stdout
    assert (stored(db, bad_load).keys(), failures(db, bad_load)) == before


def test_each_failure_is_reported_on_one_line(db, bad_load, strict_load):
    failed_lines = [line for line in strict_load.messages if not line.startswith("Error:")]
    assert all(line.startswith("failed: ") for line in failed_lines), failed_lines
    assert len(failed_lines) == len(failures(db, bad_load))


def search_json(ris_home: Path, *args) -> list | dict:
    result = cli(ris_home, "search", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


ODD_NAMES = [SPACE, QUOTES, NEWLINE, UNICODE, f"{ODD_LABEL}/pic.jpg"]


def test_odd_names_round_trip_through_search_similar_json(db, bad_load, ris_home):
    rows = stored(db, bad_load)
    for rel in (NEWLINE, f"{ODD_LABEL}/pic.jpg"):
        row = rows[bad_load.path(rel)]
        hits = search_json(ris_home, "similar", "--id", row["id"], "-c", bad_load.name, "-k", "1")
        assert (hits[0]["id"], hits[0]["path"], hits[0]["label"]) == (row["id"], bad_load.path(rel), row["label"])
    by_file = search_json(ris_home, "similar", bad_load.path(QUOTES), "-c", bad_load.name, "-k", "1")
    assert by_file[0]["path"] == bad_load.path(QUOTES)
    by_label = search_json(ris_home, "similar", bad_load.path(UNICODE), "-c", bad_load.name, "--label", ODD_LABEL, "-k", "3")
    assert [(h["path"], h["label"]) for h in by_label] == [(bad_load.path(f"{ODD_LABEL}/pic.jpg"), ODD_LABEL)]


def test_odd_names_round_trip_through_search_sql_json(db, bad_load, ris_home):
    cid = collection_id(db.engine, bad_load.name)
    images = search_json(ris_home, "sql", f"SELECT path, label FROM images WHERE collection_id = {cid}")
    assert {(r["path"], r["label"]) for r in images} == {(p, row["label"]) for p, row in stored(db, bad_load).items()}
    assert {bad_load.path(rel) for rel in ODD_NAMES} <= {r["path"] for r in images}
    recorded = search_json(ris_home, "sql", f"SELECT path, reason FROM ingest_failures WHERE collection_id = {cid}")
    assert {r["path"]: r["reason"] for r in recorded} == failures(db, bad_load)
    assert recorded and any("\n" in r["path"] and "ü" in r["path"] for r in recorded)


def test_folder_name_with_quotes_and_accents_names_its_collection_made_valid(db, bad_load, ris_home):
    status = cli(ris_home, "ingest", "status", "--json")
    assert status.returncode == 0, status.stderr
    entry = next(c for c in json.loads(status.stdout)["collections"] if c["name"] == COLLECTION)
    assert entry["images"] == len(stored(db, bad_load)) and entry["failures"] == len(failures(db, bad_load))
    annoy = entry["annoy"]
    assert Path(annoy["path"]) == ris_home.resolve() / "annoy" / read_sidecar(ris_home.resolve() / "annoy", COLLECTION).file
    assert Path(annoy["path"]).name.startswith(f"{COLLECTION}.") and Path(annoy["path"]).exists()
    assert (annoy["items"], annoy["fresh"], annoy["delta"]) == (entry["images"], True, 0)
