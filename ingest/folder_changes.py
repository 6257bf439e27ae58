"""What tells `ingest watch` that a folder changed: a scan of names, sizes and mtimes, and Linux inotify.

A scan (`FolderScanner.scan`) finds the pictures exactly as a load does (ingest/sources.py `walk_folder`: the same
files, labels, hidden files and --include/--exclude) and stats each. Two scans differ where files appeared,
changed, moved or went, which is all the watcher needs. Polling is a scan every --poll seconds. Inotify only says
*when* to scan, and which files were written (a rewrite could keep size and mtime): a lost event, even a whole
overflowing queue, costs a full scan, never a missed change. Inotify is reached through ctypes (two libc calls)
rather than a dependency.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import math
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ingest.errors import SourceError
from ingest.patterns import PathFilter
from ingest.sources import Candidate, walk_folder

FileStat = tuple[int, int, int]  # size, mtime in ns, inode: a rename keeps all three
MTIME_TICK = 2.0  # seconds: the coarsest timestamp granularity of a common filesystem (FAT)

# Filesystems whose files other machines change: inotify only hears what this machine does there.
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre", "gpfs", "beegfs",
                       "davfs", "fuse.sshfs", "fuse.rclone", "fuse.s3fs", "fuse.gcsfuse", "fuse.glusterfs", "fuse.cephfs"}


@dataclass(frozen=True)
class Scan:
    """The pictures under a folder as a load would find them, each with its stat; `empty` when the folder holds
    nothing at all (as the mount point of an unmounted share does)."""

    files: dict[str, tuple[Candidate, FileStat]]
    empty: bool


class FolderScanner:
    """Scans of one folder. A folder's mtime moves when an entry is added, removed or renamed in it, so while no
    folder has a new mtime since the last walk the pictures are the same files, and a scan only stats them again
    (a scan of 100k files then costs a stat each rather than a walk). A folder changed within MTIME_TICK of a walk
    is not trusted: a second change within its filesystem's timestamp granularity would leave its mtime as it was."""

    def __init__(self, root: Path, path_filter: PathFilter):
        self.root, self.path_filter = Path(root), path_filter
        self.walked: dict[str, int] = {}  # folder -> its mtime when last walked; empty: walk at the next scan
        self.candidates: list[Candidate] = []

    def forget(self) -> None:
        """Walk at the next scan (after lost inotify events, or when the folder comes back)."""
        self.walked = {}

    def scan(self) -> Scan | None:
        """The folder's pictures and their stats, or None if the folder is gone. A sub-folder that cannot be read
        raises SourceError (as it fails a load); one removed while it was walked is found gone by the next scan."""
        if not os.path.isdir(self.root):
            return None
        if not self.unchanged():
            try:
                self.walk()
            except SourceError:
                if not os.path.isdir(self.root):
                    return None
                raise
        files = {}
        for candidate in self.candidates:
            path = str(candidate.path)
            if (st := file_stat(path)) is not None:
                files[path] = (candidate, st)
        return Scan(files, empty=not files and is_empty(self.root))

    def walk(self) -> None:
        real, now = os.path.realpath(self.root), time.time()
        mtimes = {}
        for folder in folders(real, real, self.path_filter):  # each stat'ed before it is listed: a change meanwhile shows
            try:
                mtimes[folder] = os.stat(folder).st_mtime_ns
            except OSError:
                now = math.inf  # gone meanwhile: trust nothing
        self.candidates, _ = walk_folder(self.root, path_filter=self.path_filter)
        self.walked = mtimes if all(now - m / 1e9 > MTIME_TICK for m in mtimes.values()) else {}

    def unchanged(self) -> bool:
        """Whether every folder of the last walk still has the mtime it had then (so none gained or lost an entry)."""
        if not self.walked:
            return False
        try:
            return all(os.stat(folder).st_mtime_ns == mtime for folder, mtime in self.walked.items())
        except OSError:
            return False


def folders(start: str, root: str, path_filter: PathFilter) -> Iterator[str]:
    """`start` and every folder under it that a load of `root` walks (hidden, --exclude'd and symlinked folders are
    not), each yielded before it is listed."""
    pending = [start]
    while pending:
        folder = pending.pop()
        yield folder
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                        continue
                    relative = os.path.relpath(entry.path, root).replace(os.sep, "/")
                    if not (path_filter and path_filter.skips_folder(relative)):
                        pending.append(entry.path)
        except OSError:
            continue  # gone meanwhile or unreadable: the walk says so


def file_stat(path: str) -> FileStat | None:
    """A picture's size, mtime and inode (the link's own for a dangling symlink, which the load records as failed),
    or None once it is gone. Any other error (I/O on a share) is a SourceError, never taken for the file gone."""
    try:
        st = os.stat(path)
    except OSError:
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise SourceError(f"cannot read {path}: {e.strerror or e}") from None
    return st.st_size, st.st_mtime_ns, st.st_ino


def is_empty(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is None
    except OSError:
        return True


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding `path` (the longest mount point above its real path), from /proc."""
    real = os.path.realpath(path)
    best, kind = "", None
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[1])  # "\040" is a space
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        return None
    return kind


# --- inotify ---------------------------------------------------------------------------------------

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_UNMOUNT, IN_Q_OVERFLOW, IN_IGNORED = 0x400, 0x800, 0x2000, 0x4000, 0x8000
IN_ONLYDIR, IN_DONT_FOLLOW, IN_ISDIR = 0x1000000, 0x2000000, 0x40000000
WATCHED = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
           | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW)
EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name


class InotifyError(OSError):
    """Inotify cannot watch the folder (no inotify here, or fs.inotify.max_user_watches reached)."""


@dataclass(frozen=True)
class Event:
    path: str | None  # None for a queue overflow
    mask: int

    @property
    def new_folder(self) -> bool:
        return bool(self.mask & IN_ISDIR and self.mask & (IN_CREATE | IN_MOVED_TO))

    @property
    def closed_after_writing(self) -> bool:
        return bool(self.mask & IN_CLOSE_WRITE)

    @property
    def overflow(self) -> bool:
        return bool(self.mask & IN_Q_OVERFLOW)


class Inotify:
    """Watches on every folder of a tree (hidden and --exclude'd folders aside, symlinked ones not followed), added
    as folders appear; `read` returns what happened since the last call."""

    def __init__(self):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            self._add = libc.inotify_add_watch
        except (OSError, AttributeError) as e:
            raise InotifyError(errno.ENOSYS, f"no inotify here ({e})") from None
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._add.restype = ctypes.c_int
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            code = ctypes.get_errno()
            raise InotifyError(code, f"inotify_init1: {os.strerror(code)}")
        self.folders: dict[int, str] = {}

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        os.close(self.fd)

    def watch_tree(self, folder: str, root: str, path_filter: PathFilter) -> None:
        """Watch `folder` and every folder under it that a load of `root` walks."""
        for each in folders(folder, root, path_filter):
            self.watch(each)

    def watch(self, folder: str) -> bool:
        """Watch one folder (again: a moved folder keeps its watch, named anew); False if it is gone or unreadable."""
        wd = self._add(self.fd, os.fsencode(folder), WATCHED)
        if wd < 0:
            code = ctypes.get_errno()
            if code in (errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.ELOOP):
                return False
            hint = " (raise fs.inotify.max_user_watches, or use --poll)" if code == errno.ENOSPC else ""
            raise InotifyError(code, f"cannot watch {folder}: {os.strerror(code)}{hint}")
        self.folders[wd] = folder
        return True

    def read(self) -> list[Event]:
        """Every event queued, with the path it names (a folder's own events name the folder)."""
        events = []
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return events
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = EVENT.unpack_from(data, offset)
                name = data[offset + EVENT.size:offset + EVENT.size + length].rstrip(b"\0")
                offset += EVENT.size + length
                if mask & IN_Q_OVERFLOW:
                    events.append(Event(None, mask))
                    continue
                folder = self.folders.get(wd)
                if mask & IN_IGNORED:
                    self.folders.pop(wd, None)
                if folder is None or name.startswith(b"."):
                    continue
                events.append(Event(os.path.join(folder, os.fsdecode(name)) if name else folder, mask))
