"""Where the pictures of a load come from on disk: the image files under a folder, and how many to keep.

Everything here hands back plain paths. Images are used where they lie, because the database stores those
paths; an archive or the Caltech 101 download is first turned into such a folder by ingest/caltech101.py
(on top of the generic ingest/archives.py). Every problem a user can cause or fix (missing path, unreadable
folder) becomes a one-line SourceError.
"""
from __future__ import annotations

import functools
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ingest.errors import SourceError
from ingest.images import register_formats
from ingest.patterns import PathFilter


@dataclass(frozen=True)
class Candidate:
    """A file that looks like an image by its name; decoding decides later whether it is one."""

    path: Path  # absolute, under the root's real path; a file symlink under it is not resolved
    label: str | None  # parent folder relative to root, posix style; None directly in root


# --- folders -------------------------------------------------------------------------------------


def walk_folder(root: Path, exclude_labels: frozenset[str] = frozenset(), path_filter: PathFilter = PathFilter()) -> tuple[list[Candidate], int]:
    """List the image files under root, sorted by path so two loads of the same folder agree.

    Returns (candidates, skipped): skipped counts the other files, so a user sees how much was ignored.
    The root is resolved to its real path first, so a folder reached through a symlink (or a symlinked parent)
    is recorded as the same folder whichever way it is named (ingest/sync.py recognises paths recorded
    through a symlink before this was so).
    Hidden entries are skipped silently (macOS and git litter), directory symlinks are not followed
    (a loop cannot hang the walk), file symlinks are kept even when dangling (decoding records why they
    fail). Top-level folders named in exclude_labels are left out entirely, and so is what `path_filter`
    (--include/--exclude, ingest/patterns.py) leaves out, without counting it as skipped.
    """
    root = Path(root)
    if not root.exists():
        raise SourceError(f"source folder {root} does not exist")
    if not root.is_dir():
        raise SourceError(f"source {root} is not a folder")
    root = root.resolve()
    candidates: list[Candidate] = []
    skipped = 0
    pending = [root]
    while pending:
        folder = pending.pop()
        for entry in _scan(folder):
            if entry.name.startswith(".") or (folder == root and entry.name in exclude_labels):
                continue
            kind = _entry_kind(entry)
            relative = Path(entry.path).relative_to(root).as_posix() if path_filter else ""
            if kind == "dir" and not (path_filter and path_filter.skips_folder(relative)):
                pending.append(Path(entry.path))
            elif kind == "file" and path_filter and not path_filter.keeps_file(relative):
                continue
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
    """Every suffix Pillow can open (HEIC/HEIF too), lower case; computed once because it initialises all plugins."""
    register_formats()
    return frozenset(suffix.lower() for suffix in Image.registered_extensions())


def _is_image_name(name: str) -> bool:
    """Judged by suffix only: opening every file to sniff it would read a whole tree twice."""
    return os.path.splitext(name)[1].lower() in _image_suffixes()


def _label(folder: Path, root: Path) -> str | None:
    """The class of an image is the folder it sits in, relative to root."""
    relative = folder.relative_to(root).as_posix()
    return None if relative == "." else relative


def limit_per_label(candidates: list[Candidate], limit: int) -> list[Candidate]:
    """The first `limit` candidates of each label, in path order (for quick runs, e.g. 2 per Caltech class)."""
    seen: dict[str | None, int] = {}
    kept = []
    for candidate in candidates:
        seen[candidate.label] = seen.get(candidate.label, 0) + 1
        if seen[candidate.label] <= limit:
            kept.append(candidate)
    return kept
