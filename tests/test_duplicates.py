"""search duplicates: identical files (one image, several paths) and near-duplicates from the Annoy index, with the
real ResNet50 (random weights) at the default threshold: a copy resized to half and re-encoded at JPEG quality 60
is found, and distinct pictures make no group."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ingest.annoy_index import sidecar_path
from ingest.cli import cli as ingest_cli
from search.cli import cli as search_cli
from search.duplicates import DEFAULT_THRESHOLD

NAME = "near-copies"  # unique among the test files: a worker shares one database across them


def colour_field(seed: int, size=(320, 240)) -> Image.Image:
    """A distinct picture: a smooth random field of colours (a 3x3 grid of colours, blurred by upscaling)."""
    grid = np.random.default_rng(seed).integers(0, 256, (3, 3, 3), dtype=np.uint8)
    return Image.fromarray(grid, "RGB").resize(size, Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, ris_home, extractor):
    root = tmp_path_factory.mktemp("dups") / "pictures"
    for i in range(12):
        (root / f"set{i % 2}").mkdir(parents=True, exist_ok=True)
        colour_field(i).save(root / f"set{i % 2}" / f"field_{i}.jpg", quality=90)
    original = Image.open(root / "set0" / "field_0.jpg")
    original.resize((160, 120), Image.Resampling.BILINEAR).save(root / "set1" / "smaller.jpg", quality=60)
    shutil.copy(root / "set1" / "field_3.jpg", root / "set0" / "copy_of_3.jpg")
    with pytest.MonkeyPatch.context() as mp:  # the autouse private_home is per test, and this fixture per module
        mp.setenv("RIS_HOME", str(ris_home))
        result = CliRunner().invoke(ingest_cli, ["load", "folder", str(root), "--collection", NAME, "--weights", "random",
                                                 "--pca-dims", "12", "--json"])
    assert result.exit_code == 0, result.output
    return root


def groups(*args):
    result = CliRunner().invoke(search_cli, ["duplicates", "--collection", NAME, "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_near_and_identical_groups_at_the_default_threshold(folder):
    found = groups()
    named = [(g["kind"], sorted(m["path"].split("/pictures/")[1] for m in g["members"])) for g in found]
    assert sorted(named) == [("identical", ["set0/copy_of_3.jpg", "set1/field_3.jpg"]),
                             ("near", ["set0/field_0.jpg", "set1/smaller.jpg"])]
    near = next(g for g in found if g["kind"] == "near")
    assert [g["group"] for g in found] == [1, 2]
    assert near["members"][0]["distance"] == 0 and 0 < near["members"][1]["distance"] <= DEFAULT_THRESHOLD
    assert set(near["members"][0]) == {"id", "path", "distance"}


def test_threshold_zero_finds_identical_files_only(folder):
    assert [g["kind"] for g in groups("--threshold", "0")] == ["identical"]


def test_a_large_threshold_groups_more_and_members_stay_within_it(folder):
    loose = groups("--threshold", "10", "--neighbours", "3")
    assert len(loose) >= 1
    for group in loose:
        assert all(m["distance"] <= 10 for m in group["members"])
    assert sum(len({m["id"] for m in g["members"]}) for g in loose) <= 13  # each image in one group at most


def test_table_and_a_missing_index(folder, settings):
    result = CliRunner().invoke(search_cli, ["duplicates", "--collection", NAME])
    assert result.exit_code == 0 and "near" in result.stdout and "identical" in result.stdout
    saved = sidecar_path(settings.annoy_dir, NAME).read_text()
    sidecar_path(settings.annoy_dir, NAME).unlink()
    try:
        missing = CliRunner().invoke(search_cli, ["duplicates", "--collection", NAME])
        assert missing.exit_code == 1 and "ingest index" in missing.output and "Traceback" not in missing.output
        assert CliRunner().invoke(search_cli, ["duplicates", "--collection", NAME, "-t", "0"]).exit_code == 0
    finally:
        sidecar_path(settings.annoy_dir, NAME).write_text(saved)
