"""ingest.sources: folders, downloads over loopback HTTP, safe extraction, and the Caltech 101 layouts."""
from __future__ import annotations

import functools
import hashlib
import http.server
import os
import socket
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from ingest.errors import SourceError
from ingest.archives import download, extract_archive
from ingest.caltech101 import EXCLUDED_CALTECH_LABELS, prepare_caltech101
from ingest.sources import Candidate, walk_folder
from tests.helpers import CLASSES, add_bytes, hostile_tar, make_caltech_tree, make_jpeg, make_tar_gz


def make_official_zip(tmp_path: Path) -> Path:
    """caltech-101.zip: caltech-101/{101_ObjectCategories.tar.gz, Annotations.tar} plus __MACOSX forks."""
    inner = make_tar_gz(make_caltech_tree(tmp_path / "build"), tmp_path / "build" / "101_ObjectCategories.tar.gz")
    annotations = tmp_path / "build" / "Annotations.tar"
    with tarfile.open(annotations, "w") as tf:
        add_bytes(tf, "Annotations/README", b"annotations")
    archive = tmp_path / "archives" / "caltech-101.zip"
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(inner, "caltech-101/101_ObjectCategories.tar.gz")
        zf.write(annotations, "caltech-101/Annotations.tar")
        zf.writestr("caltech-101/show_annotation.m", "% matlab")
        zf.writestr("__MACOSX/caltech-101/._101_ObjectCategories.tar.gz", b"\x00\x05\x16\x07")
    return archive


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def names(candidates: list[Candidate], root: Path) -> list[str]:
    return [c.path.relative_to(root.absolute()).as_posix() for c in candidates]


# --- walk_folder ---------------------------------------------------------------------------------


def test_walk_folder_labels_sorted_and_skip_count(tmp_path):
    make_jpeg(tmp_path / "b" / "z.JPG")
    make_jpeg(tmp_path / "a" / "deep" / "x.png")
    make_jpeg(tmp_path / "top.jpeg")
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "README").write_text("x")
    candidates, skipped = walk_folder(tmp_path)
    assert names(candidates, tmp_path) == ["a/deep/x.png", "b/z.JPG", "top.jpeg"]
    assert [c.label for c in candidates] == ["a/deep", "b", None]
    assert all(c.path.is_absolute() for c in candidates)
    assert skipped == 2


def test_walk_folder_skips_hidden_quietly(tmp_path):
    make_jpeg(tmp_path / "cats" / "ok.jpg")
    make_jpeg(tmp_path / "cats" / "._ok.jpg")
    (tmp_path / "cats" / ".DS_Store").write_bytes(b"\x00")
    make_jpeg(tmp_path / ".git" / "objects" / "a.jpg")
    make_jpeg(tmp_path / "cats" / ".thumbs" / "b.jpg")
    candidates, skipped = walk_folder(tmp_path)
    assert names(candidates, tmp_path) == ["cats/ok.jpg"]
    assert skipped == 0


def test_walk_folder_directory_named_like_an_image(tmp_path):
    make_jpeg(tmp_path / "x.jpg" / "inner.jpg")
    candidates, skipped = walk_folder(tmp_path)
    assert [(names([c], tmp_path)[0], c.label) for c in candidates] == [("x.jpg/inner.jpg", "x.jpg")]
    assert skipped == 0


def test_walk_folder_symlinks(tmp_path):
    root = tmp_path / "root"
    make_jpeg(root / "cats" / "a.jpg")
    outside = make_jpeg(tmp_path / "outside" / "o.jpg")
    os.symlink(root, root / "cats" / "loop")  # a directory loop: must not be followed
    os.symlink(tmp_path / "outside", root / "linked_dir.jpg")  # a directory symlink, even named like an image
    os.symlink(outside, root / "cats" / "link.jpg")  # a file symlink out of root is a candidate
    os.symlink(root / "missing.jpg", root / "cats" / "dangling.jpg")
    os.symlink("self.jpg", root / "cats" / "self.jpg")  # a looping file symlink
    candidates, skipped = walk_folder(root)
    assert names(candidates, root) == ["cats/a.jpg", "cats/dangling.jpg", "cats/link.jpg", "cats/self.jpg"]
    assert candidates[2].path == root.absolute() / "cats" / "link.jpg"  # not resolved to the target
    assert skipped == 0


def test_walk_folder_excludes_background_google(tmp_path):
    categories = make_caltech_tree(tmp_path)
    candidates, skipped = walk_folder(categories, EXCLUDED_CALTECH_LABELS)
    assert sorted({c.label for c in candidates}) == sorted(CLASSES)
    assert len(candidates) == 2 * len(CLASSES)
    assert skipped == 0  # BACKGROUND_Google/tmp went with its folder
    _, skipped_all = walk_folder(categories)
    assert skipped_all == 1


def test_walk_folder_relative_root_gives_absolute_paths(tmp_path, monkeypatch):
    make_jpeg(tmp_path / "pics" / "a.jpg")
    monkeypatch.chdir(tmp_path)
    candidates, _ = walk_folder(Path("pics"))
    assert candidates == [Candidate(tmp_path.absolute() / "pics" / "a.jpg", None)]


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: make_jpeg(p / "file.jpg")])
def test_walk_folder_bad_root(tmp_path, make):
    with pytest.raises(SourceError):
        walk_folder(make(tmp_path))


# --- download ------------------------------------------------------------------------------------


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """A static file server on 127.0.0.1 serving tmp_path/'served'; yields its base URL."""
    served = tmp_path / "served"
    served.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=served))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def served_archive(tmp_path, server):
    base, served = server
    archive = make_tar_gz(make_caltech_tree(tmp_path / "src"), served / "small.tar.gz")
    return f"{base}/small.tar.gz", archive


def test_download_good_checksum(tmp_path, served_archive):
    url, archive = served_archive
    dest = tmp_path / "dl" / "small.tar.gz"
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert download(url, dest, md5=md5_of(archive), sha256=sha) == dest
    assert dest.read_bytes() == archive.read_bytes()
    assert not dest.with_suffix(".gz.part").exists()
    archive.unlink()  # a matching dest is returned without asking the server again
    assert download(url, dest, md5=md5_of(dest)) == dest


def test_download_bad_checksum_leaves_nothing(tmp_path, served_archive):
    url, archive = served_archive
    dest = tmp_path / "dl" / "small.tar.gz"
    with pytest.raises(SourceError, match=f"expected md5 {'0' * 32}, got {md5_of(archive)}"):
        download(url, dest, md5="0" * 32)
    assert list(dest.parent.iterdir()) == []


def test_download_unreachable(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.zip"
    with pytest.raises(SourceError, match=r"cannot download .*--source PATH"):
        download(url, tmp_path / "x.zip", md5="0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_download_http_error(tmp_path, server):
    base, _ = server
    with pytest.raises(SourceError, match="404"):
        download(f"{base}/missing.zip", tmp_path / "missing.zip")


# --- extract_archive -----------------------------------------------------------------------------


def hostile_zip(archive: Path, outside: Path, kind: str) -> None:
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("fine.txt", "ok")
        zf.writestr("../evil" if kind == "../evil" else str(outside / "abs_evil"), "evil")


@pytest.mark.parametrize(
    "maker, kind",
    [(hostile_tar, k) for k in ("../evil", "abs", "symlink", "hardlink", "through-link", "device")]
    + [(hostile_zip, k) for k in ("../evil", "abs")],
)
def test_extract_refuses_hostile_members(tmp_path, maker, kind):
    box = tmp_path / "box"
    box.mkdir()
    (tmp_path / "outside.txt").write_text("secret")
    archive = tmp_path / ("hostile.zip" if maker is hostile_zip else "hostile.tar")
    maker(archive, tmp_path, kind)
    with pytest.raises(SourceError, match="refused"):
        extract_archive(archive, box / "target")
    assert list(box.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["box", archive.name, "outside.txt"]
    assert (tmp_path / "outside.txt").read_text() == "secret"


def test_extract_truncated_then_good(tmp_path):
    good = make_tar_gz(make_caltech_tree(tmp_path / "src"), tmp_path / "good.tar.gz")
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    box = tmp_path / "box"
    with pytest.raises(SourceError, match="truncated or not a valid archive"):
        extract_archive(truncated, box / "target")
    assert list(box.iterdir()) == []
    target = extract_archive(good, box / "target")
    assert len(list((target / "101_ObjectCategories").rglob("*.jpg"))) == 2 * (len(CLASSES) + 1)
    assert [p.name for p in box.iterdir()] == ["target"]


def test_extract_not_an_archive(tmp_path):
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"hello")
    with pytest.raises(SourceError, match="truncated or not a valid archive"):
        extract_archive(junk, tmp_path / "target")


def test_extract_zip_into_existing_target(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("dir/a.txt", "new")
    target = tmp_path / "target"
    (target / "dir").mkdir(parents=True)
    (target / "dir" / "old.txt").write_text("old")
    (target / "keep.txt").write_text("keep")
    extract_archive(archive, target)
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["dir", "dir/a.txt", "keep.txt"]


# --- prepare_caltech101 --------------------------------------------------------------------------


def assert_caltech(categories: Path, datasets: Path | None = None) -> None:
    assert categories.name == "101_ObjectCategories"
    if datasets is not None:
        assert categories == datasets / "caltech101" / "101_ObjectCategories"
    candidates, skipped = walk_folder(categories, EXCLUDED_CALTECH_LABELS)
    assert sorted({c.label for c in candidates}) == sorted(CLASSES)
    assert skipped == 0


def test_prepare_from_folder_in_place(tmp_path):
    categories = make_caltech_tree(tmp_path / "mine" / "caltech-101")
    datasets = tmp_path / "datasets"
    assert prepare_caltech101(tmp_path / "mine", datasets) == categories
    assert prepare_caltech101(categories, datasets) == categories
    assert not datasets.exists()


def test_prepare_from_folder_of_classes(tmp_path):
    make_jpeg(tmp_path / "classes" / "cats" / "a.jpg")
    assert prepare_caltech101(tmp_path / "classes", tmp_path / "datasets") == tmp_path / "classes"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no class sub-folders"):
        prepare_caltech101(tmp_path / "empty", tmp_path / "datasets")


def test_prepare_from_tar_gz(tmp_path):
    archive = make_tar_gz(make_caltech_tree(tmp_path / "src"), tmp_path / "archives" / "101_ObjectCategories.tar.gz")
    datasets = tmp_path / "datasets"
    categories = prepare_caltech101(archive, datasets)
    assert_caltech(categories, datasets)
    assert sorted(p.name for p in (datasets / "caltech101").iterdir()) == ["101_ObjectCategories"]


def test_prepare_from_official_zip_then_skips(tmp_path):
    archive = make_official_zip(tmp_path)
    datasets = tmp_path / "datasets"
    categories = prepare_caltech101(archive, datasets)
    assert_caltech(categories, datasets)
    assert '"caltech-101.zip"' in (categories / ".complete").read_text()
    sentinel = categories / "airplanes" / "sentinel.jpg"
    sentinel.write_bytes(b"")
    assert prepare_caltech101(archive, datasets) == categories
    assert sentinel.exists()  # the marker matched: nothing was extracted again


def test_prepare_missing_source(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        prepare_caltech101(tmp_path / "nope.zip", tmp_path / "datasets")


def test_prepare_archive_without_categories(tmp_path):
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("readme.txt", "x")
    with pytest.raises(SourceError, match="holds no 101_ObjectCategories"):
        prepare_caltech101(archive, tmp_path / "datasets")


def test_prepare_by_download(tmp_path, server):
    base, served = server
    archive = make_official_zip(tmp_path)
    (served / "caltech-101.zip").write_bytes(archive.read_bytes())
    datasets = tmp_path / "datasets"
    url = f"{base}/caltech-101.zip?download=1"
    categories = prepare_caltech101(None, datasets, url=url, md5=md5_of(archive))
    assert_caltech(categories, datasets)
    assert (datasets / "caltech101" / "caltech-101.zip").read_bytes() == archive.read_bytes()
    (served / "caltech-101.zip").unlink()  # the marker makes a second load work offline
    assert prepare_caltech101(None, datasets, url=url, md5=md5_of(archive)) == categories


def test_prepare_by_download_bad_checksum(tmp_path, server):
    base, served = server
    (served / "caltech-101.zip").write_bytes(make_official_zip(tmp_path).read_bytes())
    datasets = tmp_path / "datasets"
    with pytest.raises(SourceError, match="checksum mismatch"):
        prepare_caltech101(None, datasets, url=f"{base}/caltech-101.zip", md5="0" * 32)
    assert list((datasets / "caltech101").iterdir()) == []
