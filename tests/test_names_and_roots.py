"""Attacks on what a load is told and what it reads: hostile collection names, a folder reached through a symlink,
pictures and files made to exhaust memory, a folder of bad files loaded with the default PCA size.

The fake extractor stands in for ResNet50 (the model is not the subject); commands run in-process with CliRunner,
or in a child process where memory is measured (its own peak RSS, VmHWM).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from ingest.annoy_index import data_files, sidecar_path
from ingest.cli import cli as ingest_cli
from ingest.collection import Collection
from ingest.errors import CollectionError
from ingest.names import file_stem
from search.cli import cli as search_cli
from tests.helpers import REPO, child_env, make_folder, png_announcing, run_measured


def invoke(cli, *args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def load(folder: Path, name: str, *extra, env=None) -> dict:
    result = invoke(ingest_cli, "load", "folder", folder, "--collection", name, "--weights", "fake", "--json", *extra, env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def recorded(db, name: str, table: str = "image_paths") -> set[str]:
    """Every path a collection records in image_paths (or images, or ingest_failures)."""
    with db.engine.connect() as conn:
        return set(conn.execute(sa.text(f"SELECT t.path FROM {table} t JOIN collections c ON c.id = t.collection_id"
                                        " WHERE c.name = :n"), {"n": name}).scalars())


def files_outside(home: Path) -> set[Path]:
    """Every file beside RIS_HOME (the session's temporary folder holds it and the tests' own folders)."""
    return {p for p in home.parent.rglob("*") if home not in p.parents and p != home}


# --- collection names ----------------------------------------------------------------------------

HOSTILE_NAMES = {
    "dot-dot-slash": "../../x",
    "dot-dot": "..",
    "hidden": ".hidden",
    "slash": "a/b",
    "64-characters": "x" * 64,
    "nul": "a\x00b",
    "newline": "new\nline",
    "cyrillic-lookalike": "c\u0430ltech",  # the second letter is Cyrillic
    "fullwidth-lookalike": "\uff43\uff41\uff4c\uff54\uff45\uff43\uff48",
    "zero-width-space": "caltech\u200b",
}


@pytest.fixture
def small_folder(tmp_path) -> Path:
    return make_folder(tmp_path / "pictures", per_label=2)


@pytest.mark.parametrize("name", HOSTILE_NAMES.values(), ids=HOSTILE_NAMES.keys())
def test_hostile_collection_name_is_refused_by_cli_and_library(db, settings, ris_home, small_folder, fake_extractor, name):
    before = files_outside(ris_home)
    result = invoke(ingest_cli, "load", "folder", small_folder, "--collection", name, "--weights", "fake")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith(f"Error: invalid collection name {name!r}: use 1 to 63 letters") and result.output.count("\n") == 1
    with pytest.raises(CollectionError, match="^invalid collection name"):
        Collection.create(db, settings, name, fake_extractor, pca_dims=4)
    with pytest.raises(CollectionError, match="^no collection named"):  # what the web server answers 404 with
        Collection.named(db, settings, name)
    finetune = invoke(ingest_cli, "finetune", "--into", name)
    assert finetune.exit_code == 1 and finetune.output.startswith("Error: invalid collection name")
    assert files_outside(ris_home) == before
    with db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM collections WHERE name = :n"), {"n": name.replace("\x00", "")}).scalar() == 0


def test_folder_with_an_unusable_name_loads_into_that_name_made_valid(db, tmp_path, fake_extractor):
    folder = make_folder(tmp_path / "Mes Photos d'été", per_label=2)
    summary = load_default(folder)
    assert summary["collection"] == "Mes-Photos-d-ete"
    lookalike = make_folder(tmp_path / "\u0444\u043e\u0442\u043e", per_label=1)  # Cyrillic only: nothing usable is left
    result = invoke(ingest_cli, "load", "folder", lookalike, "--weights", "fake")
    assert result.exit_code == 1 and result.output.startswith("Error: cannot make a collection name from the folder name")


def load_default(folder: Path, *extra) -> dict:
    """A load without --collection and without --pca-dims."""
    result = invoke(ingest_cli, "load", "folder", folder, "--weights", "fake", "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def rename_collection(db, old: str, new: str) -> None:
    """What a database of an earlier version may hold: a collection whose name is not valid now."""
    with db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE collections SET name = :new WHERE name = :old"), {"old": old, "new": new})


def test_collection_named_by_an_older_version_is_searched_and_removed_but_not_loaded_into(db, settings, small_folder, fake_extractor):
    load(small_folder, "older-name", "--pca-dims", "3")
    rename_collection(db, "older-name", "My Photos")
    old = Collection.named(db, settings, "My Photos")
    old.build_index()  # its Annoy file, named after it, as the earlier version built it
    assert sidecar_path(settings.annoy_dir, "My Photos").name == "My Photos.json"
    image_id = int(old.image_ids()[0])

    for engine in ("pgvector", "annoy"):
        hits = invoke(search_cli, "similar", "--id", image_id, "-c", "My Photos", "--engine", engine, "-k", "2", "--json")
        assert hits.exit_code == 0, hits.output
        assert json.loads(hits.stdout)[0]["id"] == image_id
    status = json.loads(invoke(ingest_cli, "status", "--json").stdout)
    assert next(c for c in status["collections"] if c["name"] == "My Photos")["images"] == 6

    refused = invoke(ingest_cli, "load", "folder", small_folder, "--collection", "My Photos", "--weights", "fake")
    assert refused.exit_code == 1 and refused.output.count("\n") == 1
    assert "load them into a new one such as 'My-Photos'" in refused.output
    with pytest.raises(CollectionError, match="load them into a new one such as 'My-Photos'"):
        Collection.create(db, settings, "My Photos", fake_extractor, pca_dims=3)
    assert len(recorded(db, "My Photos", "images")) == 6

    removed = invoke(ingest_cli, "remove", "--collection", "My Photos", "--yes")
    assert removed.exit_code == 0, removed.output
    assert not sidecar_path(settings.annoy_dir, "My Photos").exists() and data_files(settings.annoy_dir, "My Photos") == []


def test_collection_named_dot_dot_slash_by_an_older_version_keeps_its_files_inside_ris_home(db, settings, ris_home, small_folder,
                                                                                            fake_extractor):
    load(small_folder, "escaping", "--pca-dims", "3")
    rename_collection(db, "escaping", "../../escape")
    before = files_outside(ris_home)
    indexed = invoke(ingest_cli, "index", "--collection", "../../escape")
    assert indexed.exit_code == 0, indexed.output
    inside = sidecar_path(settings.annoy_dir, "../../escape")
    assert inside.parent == settings.annoy_dir and inside.exists() and len(file_stem("../../escape")) > 63
    hits = invoke(search_cli, "similar", "--id", Collection.named(db, settings, "../../escape").image_ids()[0], "-c", "../../escape",
                  "--engine", "annoy", "--json")
    assert hits.exit_code == 0, hits.output
    assert invoke(ingest_cli, "remove", "--collection", "../../escape", "--yes").exit_code == 0
    assert not inside.exists() and data_files(settings.annoy_dir, "../../escape") == []
    assert files_outside(ris_home) == before


# --- folders reached through a symlink -----------------------------------------------------------


def test_folder_loaded_through_a_symlink_then_by_its_real_path_is_recorded_once(db, tmp_path, fake_extractor):
    real = make_folder(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    assert load(link, "linked")["ingested"] == 12
    expected = {str(p) for p in real.resolve().rglob("*.jpg")}
    assert recorded(db, "linked") == expected
    again = load(real, "linked")
    assert (again["ingested"], again["present"], again["duplicates"], again["moved"], again["missing"]) == (0, 12, 0, 0, 0)
    pruned = load(link, "linked", "--prune")
    assert (pruned["present"], pruned["pruned"], pruned["removed"], pruned["missing"]) == (12, 0, 0, 0)
    assert recorded(db, "linked") == expected == recorded(db, "linked", "images")


@pytest.mark.parametrize("reload_through", ["real", "link"])
def test_paths_recorded_through_a_symlink_by_an_older_version_are_recognised(db, tmp_path, fake_extractor, reload_through):
    real = make_folder(tmp_path / "real").resolve()
    shutil.copy(real / "red" / "red_0.jpg", real / "blue" / "copy.jpg")
    (real / "red" / "broken.jpg").write_bytes(b"not a picture")
    link = tmp_path / "link"
    link.symlink_to(real)
    name = f"old-links-{reload_through}"
    load(real, name)
    with db.engine.begin() as conn:  # an earlier version recorded the folder as it was named: through the link
        for table in ("image_paths", "images", "ingest_failures"):
            conn.execute(sa.text(f"UPDATE {table} SET path = :link || substr(path, length(:real) + 1)"
                                 " WHERE starts_with(path, :real || '/')"), {"link": str(link), "real": str(real)})
    assert all(p.startswith(str(link)) for p in recorded(db, name) | recorded(db, name, "ingest_failures"))

    again = load(real if reload_through == "real" else link, name)
    assert (again["ingested"], again["present"], again["duplicates"], again["moved"], again["missing"], again["failed"]) == (0, 13, 0, 0, 0, 1)
    real_paths = {str(p) for p in real.rglob("*.jpg")}
    assert recorded(db, name) == real_paths - {str(real / "red" / "broken.jpg")}
    assert recorded(db, name, "images") <= real_paths and len(recorded(db, name, "images")) == 12
    assert recorded(db, name, "ingest_failures") == {str(real / "red" / "broken.jpg")}
    pruned = load(real, name, "--prune")
    assert (pruned["present"], pruned["pruned"], pruned["removed"], pruned["missing"], pruned["duplicates"]) == (13, 0, 0, 0, 0)


# --- memory --------------------------------------------------------------------------------------


def solid_png(width: int, height: int) -> bytes:
    """A valid RGB PNG of width x height pixels of one colour: a few hundred KB that decode to 4 bytes a pixel."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    packer = zlib.compressobj(9)
    row = b"\0" + bytes((20, 200, 60)) * width
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes((8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


DECODE_IN_THREADS = textwrap.dedent(
    """
    import sys
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path
    from ingest.images import decode_budget, decode_image
    path, threads, budget = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    if budget:
        decode_budget.resize(budget)
    data = path.read_bytes()
    def high_water():  # VmHWM is this program's own peak; ru_maxrss would count the process it was forked from
        return int(Path('/proc/self/status').read_text().split('VmHWM:')[1].split()[0])
    base = high_water()
    with ThreadPoolExecutor(threads) as pool:
        sizes = {(d.width, d.height, d.pixels.shape) for d in pool.map(lambda _: decode_image(data), range(threads))}
    print((high_water() - base) * 1024, sizes)
    """
)


def decode_peak(path: Path, threads: int, budget: int = 0) -> int:
    """Bytes the peak RSS of a child grew by while `threads` threads decoded the picture at once."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", DECODE_IN_THREADS, str(path), str(threads), str(budget)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    grew, sizes = done.stdout.split(" ", 1)
    return int(grew)


@pytest.mark.parametrize(("width", "height", "threads"), [(9999, 9999, 4), (8000, 5000, 8)], ids=["9999x9999-png", "40-megapixel-pngs"])
def test_png_decompression_bomb_decodes_within_the_budget(tmp_path, width, height, threads):
    """Pictures below MAX_PIXELS are decoded, but threads take turns: the default budget (100 M pixels) holds one
    9999x9999 picture, or two of 40 M pixels, at a time. Without it, every thread holds its own picture at once."""
    from ingest.images import DEFAULT_DECODE_BUDGET

    path = tmp_path / "bomb.png"
    path.write_bytes(solid_png(width, height))
    assert path.stat().st_size < 1_000_000
    at_once = max(1, DEFAULT_DECODE_BUDGET // (width * height))
    bound = int(at_once * width * height * 4 * 1.3)  # 4 bytes a decoded pixel, plus the decoder's own buffers
    budgeted = decode_peak(path, threads)
    unbounded = decode_peak(path, threads, budget=10**12)
    print(f"{width}x{height}, {threads} threads: peak RSS grew {budgeted / 2**20:.0f} MB within the budget, "
          f"{unbounded / 2**20:.0f} MB without it (bound {bound / 2**20:.0f} MB)")
    assert budgeted < bound
    assert unbounded > 2 * budgeted  # the control: without the budget the threads' pictures add up


FAKE_LOAD = textwrap.dedent(
    """
    import sys
    from tests.helpers import FakeExtractor
    from ingest.features import register_extractor
    register_extractor(FakeExtractor())
    from ingest.cli import cli
    cli.main(sys.argv[1:], prog_name="ingest")
    """
)


def test_sparse_3_gb_file_is_refused_unread(db, ris_home, tmp_path):
    """A file of 3 GB named like a picture (sparse: it costs no disk) is refused from its size: the load's peak
    memory is that of the same load without it, and the failure is recorded with its reason."""
    runs = {}
    for name in ("without-huge", "with-huge"):
        folder = make_folder(tmp_path / name, per_label=2)
        if name == "with-huge":
            with open(folder / "red" / "huge.png", "wb") as f:
                f.truncate(3 * 2**30)
        argv = [sys.executable, "-c", FAKE_LOAD, "load", "folder", str(folder), "--collection", name, "--weights", "fake", "--json"]
        result, peak = run_measured(argv, child_env(ris_home) | {"PYTHONPATH": str(REPO)}, tmp_path / name)
        assert result.returncode == 0, result.stderr
        runs[name] = (json.loads(result.stdout), peak)
    summary, peak = runs["with-huge"]
    print(f"peak RSS {peak / 2**20:.0f} MB with the 3 GB file, {runs['without-huge'][1] / 2**20:.0f} MB without")
    assert (summary["ingested"], summary["failed"]) == (6, 1)
    reason = "file too large: 3072 MB exceeds the limit of 200 MB (--max-file-mb)"
    huge = str((tmp_path / "with-huge" / "red" / "huge.png").resolve())
    assert summary["failures"] == [[huge, reason]]
    with db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT reason FROM ingest_failures WHERE path = :p"), {"p": huge}).scalar() == reason
    assert peak < runs["without-huge"][1] + 100 * 2**20


def test_max_file_mb_and_its_environment_variable_refuse_a_file_over_the_limit(db, tmp_path, fake_extractor):
    folder = make_folder(tmp_path / "pictures", per_label=1)
    (folder / "red" / "big.png").write_bytes(png_announcing(100, 100) + bytes(2 * 2**20))  # 2 MB
    flag = load(folder, "file-limit-flag", "--max-file-mb", "1")
    env = load(folder, "file-limit-env", env={"RIS_MAX_FILE_MB": "1"})
    for summary in (flag, env):
        assert summary["failures"] == [[str(folder.resolve() / "red" / "big.png"), "file too large: 2 MB exceeds the limit of 1 MB (--max-file-mb)"]]
    by_default = load(folder, "file-limit-default")
    assert "file too large" not in json.dumps(by_default["failures"])
    refused = invoke(ingest_cli, "load", "folder", folder, "--max-file-mb", "0", "--weights", "fake")
    assert refused.exit_code == 2


# --- the default PCA size ------------------------------------------------------------------------


def test_first_default_load_of_a_folder_with_bad_files_is_searchable_and_exits_0(db, settings, tmp_path, fake_extractor):
    """Seven candidates, three of them unusable: PCA is fitted on the four pictures embedded, not planned for seven."""
    folder = make_folder(tmp_path / "first-load", labels=("red", "green"), per_label=2)
    (folder / "red" / "empty.jpg").write_bytes(b"")
    (folder / "red" / "text.jpg").write_bytes(b"not a picture\n" * 10)
    (folder / "green" / "bomb.png").write_bytes(png_announcing(40_000, 40_000))
    summary = load_default(folder)
    assert (summary["collection"], summary["ingested"], summary["failed"]) == ("first-load", 4, 3)
    coll = Collection.named(db, settings, "first-load")
    coll.check_searchable("annoy")
    assert coll.dims == 4
    assert len(coll.similar(coll.query(image_id=int(coll.image_ids()[0])), 4, engine="annoy")) == 4


def test_explicit_pca_dims_above_the_candidates_is_refused_before_any_work(db, tmp_path, fake_extractor):
    folder = make_folder(tmp_path / "too-few", labels=("red",), per_label=3)
    result = invoke(ingest_cli, "load", "folder", folder, "--weights", "fake", "--pca-dims", "50")
    assert result.exit_code == 1
    assert result.output == "Error: --pca-dims 50 is more than the 3 images to fit PCA on; choose at most 3\n"
    assert recorded(db, "too-few", "images") == set()
