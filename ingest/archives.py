"""Fetching and unpacking archives, for any dataset: a verified download and a safe extraction.

Nothing here knows about a particular dataset (that is ingest/caltech101.py), in the way torchvision keeps
`download_url` and `extract_archive` in datasets/utils.py apart from caltech.py. A download appears whole
and verified or not at all; an extraction never writes outside its target and never leaves half a target.
Every problem a user can cause or fix (bad checksum, no network, hostile or broken archive) becomes a
one-line SourceError.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import lzma
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from ingest.atomic import replacing
from ingest.errors import SourceError

DOWNLOAD_TIMEOUT = 60  # seconds without data before a download counts as failed
CHUNK_SIZE = 1 << 20
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# What a damaged archive raises somewhere between opening it and writing its last member.
BROKEN_ARCHIVE_ERRORS = (tarfile.ReadError, EOFError, zipfile.BadZipFile, zlib.error, gzip.BadGzipFile, lzma.LZMAError)
TAR_FILTER_ERRORS = (tarfile.FilterError,) if hasattr(tarfile, "FilterError") else ()


# --- downloads -----------------------------------------------------------------------------------


def download(url: str, dest: Path, md5: str | None = None, sha256: str | None = None) -> Path:
    """Fetch url to dest, verified, so a half-finished or tampered download is never mistaken for data.

    Bytes go to a hidden temporary file beside dest (ingest.atomic.replacing) that is renamed to dest
    only once complete and matching the checksum. An existing dest that matches is returned as is;
    without a checksum an existing dest is trusted, since only a complete download is ever renamed into place.
    """
    dest = Path(dest)
    if dest.is_file() and (_digest_mismatch(_hash_file(dest, md5, sha256), md5, sha256) is None):
        return dest
    with replacing(dest) as part:
        try:
            digests = _fetch(url, part, dest.name, md5, sha256)
        except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, timeouts; ValueError: bad url
            reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e
            raise SourceError(f"cannot download {url}: {reason}; pass --source PATH with a local copy instead") from e
        mismatch = _digest_mismatch(digests, md5, sha256)
        if mismatch:
            raise SourceError(f"checksum mismatch for {url}: {mismatch}")
    return dest


def _fetch(url: str, part: Path, label: str, md5: str | None, sha256: str | None) -> dict[str, str]:
    """Stream url into part under a progress bar named label, hashing on the way; returns the hex digests."""
    hashers = _hashers(md5, sha256)
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response, open(part, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label) as bar:
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
    """The digests of a file already on disk, so a finished download is not fetched again."""
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
    # A folder, so not ingest.atomic.replacing (one file, one os.replace): same idea, staged beside the target.
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
    """Zip names are checked up front; zip has no links or devices to check (Python writes them as files)."""
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
