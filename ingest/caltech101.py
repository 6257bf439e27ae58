"""Caltech 101: where its class folders are, whether from the official download, an archive or a folder.

Built on the generic helpers in ingest/archives.py (download, extract_archive), as torchvision's caltech.py
is built on datasets/utils.py. The images are extracted under <datasets_dir>/caltech101 and stay there,
because the database stores their paths; a '.complete' marker lets the next load skip the extraction.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ingest.archives import download, extract_archive
from ingest.atomic import write_atomically
from ingest.errors import SourceError

CALTECH101_URL = "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip?download=1"
CALTECH101_MD5 = "3138e1922a9193bfa496528edbbc45d0"  # md5 of the official caltech-101.zip (as torchvision uses)
EXCLUDED_CALTECH_LABELS = frozenset({"BACKGROUND_Google"})

CALTECH_DIRNAME = "caltech101"
CATEGORIES_DIRNAME = "101_ObjectCategories"
CALTECH_ZIP_NAME = "caltech-101.zip"
COMPLETE_MARKER = ".complete"


def prepare_caltech101(
    source: Path | None,
    datasets_dir: Path,
    *,
    url: str = CALTECH101_URL,
    md5: str | None = CALTECH101_MD5,
    sha256: str | None = None,
) -> Path:
    """Return the folder holding Caltech 101's class sub-folders, downloading or extracting as needed.

    source None downloads the official zip into <datasets_dir>/caltech101; a folder is used in place;
    a .zip (the official one nests 101_ObjectCategories.tar.gz) or a .tar.gz is extracted into
    <datasets_dir>/caltech101/101_ObjectCategories. A '.complete' marker naming the archive and its size
    makes the next load skip the extraction; the images stay there because stored paths point at them.
    """
    caltech_dir = Path(datasets_dir) / CALTECH_DIRNAME
    categories = caltech_dir / CATEGORIES_DIRNAME
    if source is None:
        if _read_marker(categories).get("archive") == CALTECH_ZIP_NAME:
            return categories  # extracted from a verified download earlier; the zip may be gone
        source = download(url, caltech_dir / CALTECH_ZIP_NAME, md5=md5, sha256=sha256)
    source = Path(source)
    if not source.exists():
        raise SourceError(f"Caltech 101 source {source} does not exist")
    try:
        if source.is_dir():
            return _categories_in_folder(source)
        return _extract_caltech_archive(source, caltech_dir)
    except OSError as e:  # unreadable folder, full disk: the user's to fix
        raise SourceError(f"cannot use Caltech 101 source {source}: {e}") from e


def _categories_in_folder(folder: Path) -> Path:
    """An extracted copy: the 101_ObjectCategories folder within two levels, or the folder itself."""
    found = _find_named(folder, CATEGORIES_DIRNAME, want_dir=True)
    if found is not None:
        return found
    if any(child.is_dir() and not child.name.startswith(".") for child in folder.iterdir()):
        return folder
    raise SourceError(f"{folder} has no {CATEGORIES_DIRNAME} folder and no class sub-folders")


def _find_named(folder: Path, name: str, *, want_dir: bool, depth: int = 2) -> Path | None:
    """Breadth-first search for name in folder and up to `depth` levels below, skipping hidden and
    macOS '__MACOSX' folders (the official zip carries resource forks with look-alike names)."""
    level = [folder]
    for _ in range(depth + 1):
        for parent in level:
            candidate = parent / name
            if (candidate.is_dir() if want_dir else candidate.is_file()):
                return candidate
        level = [
            child
            for parent in level
            for child in sorted(parent.iterdir())
            if child.is_dir() and not child.is_symlink() and not child.name.startswith((".", "__MACOSX"))
        ]
    return None


def _extract_caltech_archive(archive: Path, caltech_dir: Path) -> Path:
    """Extract into a scratch folder, find the categories (in a nested tar.gz if need be), move them into place."""
    categories = caltech_dir / CATEGORIES_DIRNAME
    marker = {"archive": archive.name, "size": archive.stat().st_size}
    if _read_marker(categories) == marker:
        return categories
    caltech_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=caltech_dir) as scratch:
        found = _extract_categories(archive, Path(scratch) / "archive")
        if categories.exists():
            shutil.rmtree(categories)
        found.rename(categories)
    write_atomically(categories / COMPLETE_MARKER, json.dumps(marker) + "\n")
    return categories


def _extract_categories(archive: Path, scratch: Path) -> Path:
    """The 101_ObjectCategories folder from archive, opening a nested 101_ObjectCategories.tar.gz once."""
    extract_archive(archive, scratch)
    found = _find_named(scratch, CATEGORIES_DIRNAME, want_dir=True)
    if found is None:
        nested = _find_named(scratch, CATEGORIES_DIRNAME + ".tar.gz", want_dir=False)
        if nested is not None:
            extract_archive(nested, scratch / "nested")
            found = _find_named(scratch / "nested", CATEGORIES_DIRNAME, want_dir=True)
    if found is None:
        raise SourceError(f"{archive} holds no {CATEGORIES_DIRNAME} folder or {CATEGORIES_DIRNAME}.tar.gz")
    return found


def _read_marker(categories: Path) -> dict:
    """The '.complete' marker's content, or {} when absent or unreadable (then we extract again)."""
    try:
        return json.loads((categories / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return {}
