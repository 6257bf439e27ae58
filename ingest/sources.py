"""Where the images of a load come from: a folder, an archive, or the Caltech 101 download.

Everything here hands back plain paths on disk. Images are used where they lie (a folder) or where
an archive was extracted to (under the datasets directory), because the database stores those paths.
Every problem a user can cause or fix (missing path, bad checksum, no network, hostile or broken
archive) becomes a one-line SourceError.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import json
import lzma
import os
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image
from tqdm import tqdm

from ingest.errors import SourceError

CALTECH101_URL = "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip?download=1"
CALTECH101_MD5 = "3138e1922a9193bfa496528edbbc45d0"  # md5 of the official caltech-101.zip (as torchvision uses)
EXCLUDED_CALTECH_LABELS = frozenset({"BACKGROUND_Google"})

CALTECH_DIRNAME = "caltech101"
CATEGORIES_DIRNAME = "101_ObjectCategories"
CALTECH_ZIP_NAME = "caltech-101.zip"
COMPLETE_MARKER = ".complete"
DOWNLOAD_TIMEOUT = 60  # seconds without data before a download counts as failed
CHUNK_SIZE = 1 << 20
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# What a damaged archive raises somewhere between opening it and writing its last member.
BROKEN_ARCHIVE_ERRORS = (tarfile.ReadError, EOFError, zipfile.BadZipFile, zlib.error, gzip.BadGzipFile, lzma.LZMAError)
TAR_FILTER_ERRORS = (tarfile.FilterError,) if hasattr(tarfile, "FilterError") else ()


@dataclass(frozen=True)
class Candidate:
    """A file that looks like an image by its name; decoding decides later whether it is one."""

    path: Path  # absolute, as found under root (symlinks are not resolved)
    label: str | None  # parent folder relative to root, posix style; None directly in root


# --- folders -------------------------------------------------------------------------------------


def walk_folder(root: Path, exclude_labels: frozenset[str] = frozenset()) -> tuple[list[Candidate], int]:
    """List the image files under root, sorted by path so two loads of the same folder agree.

    Returns (candidates, skipped): skipped counts the other files, so a user sees how much was ignored.
    Hidden entries are skipped silently (macOS and git litter), directory symlinks are not followed
    (a loop cannot hang the walk), file symlinks are kept even when dangling (decoding records why they
    fail). Top-level folders named in exclude_labels are left out entirely.
    """
    root = Path(root)
    if not root.exists():
        raise SourceError(f"source folder {root} does not exist")
    if not root.is_dir():
        raise SourceError(f"source {root} is not a folder")
    root = Path(os.path.abspath(root))
    candidates: list[Candidate] = []
    skipped = 0
    pending = [root]
    while pending:
        folder = pending.pop()
        for entry in _scan(folder):
            if entry.name.startswith(".") or (folder == root and entry.name in exclude_labels):
                continue
            kind = _entry_kind(entry)
            if kind == "dir":
                pending.append(Path(entry.path))
            elif kind == "file" and _is_image_name(entry.name):
                candidates.append(Candidate(Path(entry.path), _label(folder, root)))
            elif kind == "file":
                skipped += 1
    candidates.sort(key=lambda c: c.path)
    return candidates, skipped


def _scan(folder: Path) -> list[os.DirEntry]:
    """The entries of one folder; an unreadable folder is the user's to fix, so it is an error."""
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as e:
        raise SourceError(f"cannot read folder {folder}: {e.strerror or e}") from e


def _entry_kind(entry: os.DirEntry) -> str:
    """'dir' to descend into, 'file' to consider, 'other' to ignore (FIFOs, sockets, devices would block or
    make no sense as images; a symlink to a folder is not followed)."""
    if entry.is_dir(follow_symlinks=False):
        return "dir"
    if entry.is_file(follow_symlinks=False):
        return "file"
    if not entry.is_symlink():
        return "other"
    try:
        mode = os.stat(entry.path).st_mode
    except OSError:  # dangling or looping: keep it, decoding will record the reason
        return "file"
    return "file" if stat.S_ISREG(mode) else "other"


@functools.cache
def _image_suffixes() -> frozenset[str]:
    """Every suffix Pillow can open, lower case; computed once because it initialises all plugins."""
    return frozenset(suffix.lower() for suffix in Image.registered_extensions())


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in _image_suffixes()


def _label(folder: Path, root: Path) -> str | None:
    """The class of an image is the folder it sits in, relative to root."""
    relative = folder.relative_to(root).as_posix()
    return None if relative == "." else relative


# --- downloads -----------------------------------------------------------------------------------


def download(url: str, dest: Path, md5: str | None = None, sha256: str | None = None) -> Path:
    """Fetch url to dest, verified, so a half-finished or tampered download is never mistaken for data.

    Bytes go to '<dest>.part' and are renamed to dest only once complete and matching the checksum.
    An existing dest that matches is returned as is; without a checksum an existing dest is trusted,
    since only a complete download is ever renamed into place.
    """
    dest = Path(dest)
    if dest.is_file() and (_digest_mismatch(_hash_file(dest, md5, sha256), md5, sha256) is None):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    try:
        digests = _fetch(url, part, md5, sha256)
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, timeouts; ValueError: bad url
        part.unlink(missing_ok=True)
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e
        raise SourceError(f"cannot download {url}: {reason}; pass --source PATH with a local copy instead") from e
    mismatch = _digest_mismatch(digests, md5, sha256)
    if mismatch:
        part.unlink(missing_ok=True)
        raise SourceError(f"checksum mismatch for {url}: {mismatch}")
    part.replace(dest)
    return dest


def _fetch(url: str, part: Path, md5: str | None, sha256: str | None) -> dict[str, str]:
    """Stream url into part under a progress bar, hashing on the way; returns the hex digests."""
    hashers = _hashers(md5, sha256)
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response, open(part, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[: -len(".part")]) as bar:
            while chunk := response.read(CHUNK_SIZE):
                out.write(chunk)
                for hasher in hashers.values():
                    hasher.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise OSError(f"connection closed after {received} of {total} bytes")
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


def _hashers(md5: str | None, sha256: str | None) -> dict[str, "hashlib._Hash"]:
    """Only the digests a caller asked for: hashing a large archive twice for nothing costs seconds."""
    hashers = {}
    if md5:
        hashers["md5"] = hashlib.md5(usedforsecurity=False)
    if sha256:
        hashers["sha256"] = hashlib.sha256()
    return hashers


def _hash_file(path: Path, md5: str | None, sha256: str | None) -> dict[str, str]:
    hashers = _hashers(md5, sha256)
    if hashers:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_SIZE):
                for hasher in hashers.values():
                    hasher.update(chunk)
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


def _digest_mismatch(digests: dict[str, str], md5: str | None, sha256: str | None) -> str | None:
    """None when every expected digest matches, else 'expected <algo> X, got Y' for the user."""
    for name, expected in (("md5", md5), ("sha256", sha256)):
        if expected and digests[name] != expected.lower():
            return f"expected {name} {expected.lower()}, got {digests[name]}"
    return None


# --- archives ------------------------------------------------------------------------------------


def extract_archive(archive: Path, target: Path) -> Path:
    """Extract a zip or tar archive into target, refusing anything that could write outside it.

    All members are checked before a byte is written. Extraction happens in a hidden temporary sibling
    folder that is moved into place only on success, so a truncated download never leaves a
    half-extracted target behind. Top-level entries already in target with the same name are replaced.
    """
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise SourceError(f"archive {archive} does not exist")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", suffix=".part", dir=target.parent))
    try:
        _extract_into(archive, staging)
        _move_into_place(staging, target)
    except BROKEN_ARCHIVE_ERRORS as e:
        raise SourceError(f"{archive} is truncated or not a valid archive ({e})") from e
    except TAR_FILTER_ERRORS as e:
        raise SourceError(f"{archive}: unsafe member refused ({e})") from e
    except OSError as e:
        raise SourceError(f"cannot extract {archive}: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _extract_into(archive: Path, folder: Path) -> None:
    """Pick the format by name first (a .tar can end in bytes that look like a zip), then by content."""
    name = archive.name.lower()
    if name.endswith(".zip") or (not name.endswith(TAR_SUFFIXES) and zipfile.is_zipfile(archive)):
        _extract_zip(archive, folder)
    else:
        _extract_tar(archive, folder)


def _extract_zip(archive: Path, folder: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            _check_member_name(archive, info.filename.replace("\\", "/"))
        zf.extractall(folder)


def _extract_tar(archive: Path, folder: Path) -> None:
    """getmembers() reads the whole archive, so truncation shows up here, before anything is written."""
    with tarfile.open(archive, "r:*") as tf:
        members = tf.getmembers()
        _check_tar_members(archive, members)
        if hasattr(tarfile, "data_filter"):  # second line of defence where Python has it
            tf.extractall(folder, members=members, filter="data")
        else:
            tf.extractall(folder, members=members)


def _check_tar_members(archive: Path, members: list[tarfile.TarInfo]) -> None:
    """Refuse absolute or '..' names, links that leave the archive, paths through links, and devices."""
    links: set[str] = set()
    for member in members:
        name = _check_member_name(archive, member.name)
        if any(str(parent) in links for parent in PurePosixPath(name).parents):
            raise SourceError(f"{archive}: member {member.name!r} is written through a link; refused")
        if member.issym():
            _check_link(archive, member, PurePosixPath(name).parent / member.linkname)
            links.add(name)
        elif member.islnk():
            _check_link(archive, member, PurePosixPath(member.linkname))
            links.add(name)
        elif not (member.isfile() or member.isdir()):
            raise SourceError(f"{archive}: member {member.name!r} is a device or special file; refused")


def _check_member_name(archive: Path, name: str) -> str:
    """A member name must stay inside the target: no leading '/', no drive letter, no '..'."""
    path = PurePosixPath(name)
    drive = len(name) > 1 and name[0].isalpha() and name[1] == ":"
    if path.is_absolute() or drive or ".." in path.parts:
        raise SourceError(f"{archive}: member {name!r} would be written outside the target; refused")
    return path.as_posix()


def _check_link(archive: Path, member: tarfile.TarInfo, destination: PurePosixPath) -> None:
    """A link's destination, relative to the extraction root, must not climb out of it."""
    normalised = os.path.normpath(destination.as_posix())
    if PurePosixPath(member.linkname).is_absolute() or normalised == ".." or normalised.startswith("../"):
        raise SourceError(f"{archive}: link {member.name!r} -> {member.linkname!r} points outside the target; refused")


def _move_into_place(staging: Path, target: Path) -> None:
    """One rename when target is new; otherwise each top-level entry replaces its namesake in target."""
    if not target.exists():
        staging.rename(target)
        return
    for entry in staging.iterdir():
        destination = target / entry.name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        elif destination.exists() or destination.is_symlink():
            destination.unlink()
        entry.rename(destination)


# --- Caltech 101 ---------------------------------------------------------------------------------


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
    (categories / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
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


def limit_per_label(candidates: list[Candidate], limit: int) -> list[Candidate]:
    """The first `limit` candidates of each label, in path order (for quick runs, e.g. 2 per Caltech class)."""
    seen: dict[str | None, int] = {}
    kept = []
    for candidate in candidates:
        seen[candidate.label] = seen.get(candidate.label, 0) + 1
        if seen[candidate.label] <= limit:
            kept.append(candidate)
    return kept
