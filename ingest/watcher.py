"""The loop of `ingest watch` (ingest/watch.py): when to scan the folder, which changed files have settled, and the
batch that loads them with the folder as root, so the collection comes out as a load of the folder makes it."""
from __future__ import annotations

import math
import os
import select
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from ingest import image_paths
from ingest.errors import CollectionError, DatabaseError, SourceError, first_line
from ingest.folder_changes import NETWORK_FILESYSTEMS, FileStat, FolderScanner, Inotify, InotifyError, Scan, filesystem_type
from ingest.load import add_pictures
from ingest.options import is_database_error
from ingest.watch import CollectionRemoved, Say, StopSignals, WatchOptions, counted

if TYPE_CHECKING:
    from ingest.collection import Collection

DEFAULT_POLL = 60.0  # seconds between scans where inotify cannot hear every change (network shares)
MAX_WAIT = 10  # debounces a batch waits at most for a quiet folder while events keep coming
ROOT_RECHECK = 5.0  # seconds between looks at a folder that is gone, empty or unreadable
RETRY_MAX = 60.0  # longest wait between two attempts to reach the database
HEARTBEAT = 30.0  # seconds between checks, while nothing happens, that the collection still exists


class Watcher:
    """One folder kept in step with one collection: the files as of the last batch (`state`), the changed files
    not taken yet (`observed`: their stat when last seen changing and since when), and what inotify said."""

    def __init__(self, coll: Collection, root: Path, options: WatchOptions, say: Say, signals: StopSignals):
        self.coll, self.root, self.options, self.say, self.signals = coll, Path(root), options, say, signals
        self.real_root = os.path.realpath(root)
        self.poll = options.poll
        self.scanner = FolderScanner(self.root, options.path_filter)
        self.inotify: Inotify | None = None
        self.state: dict[str, FileStat] = {}
        self.observed: dict[str, tuple[FileStat | None, float]] = {}
        self.touched: dict[str, float] = {}  # path -> time of inotify's last event naming it
        self.written: set[str] = set()  # files closed after writing: changed even if size and mtime look the same
        self.first_event: float | None = None  # the first event since the last scan
        self.last_event = self.last_scan = -math.inf
        self.started = False
        self.rewatch = True  # (re)add inotify watches before the next scan
        self.blocked: str | None = None  # why the folder cannot be scanned now
        self.retry_at, self.backoff = 0.0, 0.0
        self.next_check = time.monotonic() + HEARTBEAT

    # --- the loop -------------------------------------------------------------------------------------

    def run(self) -> None:
        """Watch until a stop signal (returns) or the collection's removal (CollectionRemoved)."""
        self.listen()
        self.say("watching", f"{self.coll.name}: watching {self.real_root} "
                 f"({f'polling every {self.poll:g} s' if self.poll else 'inotify'}, debounce {self.options.debounce:g} s)",
                 collection=self.coll.name, folder=self.real_root, poll=self.poll, debounce=self.options.debounce)
        try:
            while self.signals.received is None:
                self.wait(min(self.due(), self.next_check))
                if self.signals.received is not None:
                    break
                if time.monotonic() >= self.due():
                    self.step()
                elif time.monotonic() >= self.next_check and self.collection_removed():
                    raise CollectionRemoved(self.removed_line())
        finally:
            if self.inotify is not None:
                self.inotify.close()

    def listen(self) -> None:
        """Inotify, unless polling was asked for, the folder is on a network share (inotify hears only this machine
        there) or inotify is not to be had."""
        if self.poll:
            return
        kind = filesystem_type(self.root)
        if kind in NETWORK_FILESYSTEMS:
            self.poll = DEFAULT_POLL
            self.say("notice", f"{self.coll.name}: {self.real_root} is on a network share ({kind}), where inotify misses changes "
                     f"made elsewhere: polling every {DEFAULT_POLL:g} s (--poll to choose)", filesystem=kind, poll=self.poll)
            return
        try:
            self.inotify = Inotify()
        except InotifyError as e:
            self.fall_back(e)

    def fall_back(self, e: OSError) -> None:
        if self.inotify is not None:
            self.inotify.close()
        self.inotify, self.poll = None, DEFAULT_POLL
        self.say("notice", f"{self.coll.name}: {e.strerror}: polling every {DEFAULT_POLL:g} s instead", poll=self.poll)

    def due(self) -> float:
        """When the next scan is due (monotonic seconds)."""
        if self.retry_at:
            return self.retry_at
        if not self.started or self.blocked:
            return self.last_scan + ROOT_RECHECK
        d = self.options.debounce
        times = [math.inf]
        if self.poll:
            times.append(self.last_scan + self.poll)
        if self.first_event is not None:
            times.append(min(self.last_event + d, self.first_event + MAX_WAIT * max(d, 0.1)))
        times += [self.settled_at(p) for p in self.observed]
        return min(times)

    def settled_at(self, path: str) -> float:
        return max(self.observed[path][1], self.touched.get(path, -math.inf)) + self.options.debounce

    def wait(self, until: float) -> None:
        """Sleep until `until`, a stop signal, or inotify events (taken in as they come)."""
        timeout = until - time.monotonic()
        if timeout <= 0:
            return
        ready, _, _ = select.select([self.signals, *([self.inotify] if self.inotify else [])], [], [], min(timeout, 3600))
        if self.signals in ready:
            self.signals.drain()
        if self.inotify is not None and self.inotify in ready:
            self.take_events()

    def take_events(self) -> None:
        now = time.monotonic()
        events = self.inotify.read()
        for event in events:
            if event.overflow:
                self.rewatch = True  # events were lost: a full scan finds the changes, new folders need watches
                self.scanner.forget()
                continue
            if event.new_folder:
                self.watch(event.path)
            self.touched[event.path] = now
            if event.closed_after_writing:
                self.written.add(event.path)
        if events:
            self.last_event = now
            self.first_event = self.first_event or now

    def watch(self, folder: str) -> None:
        if self.inotify is None:  # fell back to polling meanwhile
            return
        try:
            self.inotify.watch_tree(folder, self.real_root, self.options.path_filter)
        except InotifyError as e:
            self.fall_back(e)

    # --- a scan and its batch -------------------------------------------------------------------------

    def step(self) -> None:
        """Scan; start, or batch the files that have settled. A database that cannot be reached is tried again later."""
        self.retry_at, self.last_scan, self.first_event = 0.0, time.monotonic(), None
        try:
            self.scan_and_batch()
        except Exception as e:  # noqa: BLE001 - sorted below: removed collection, unreachable database, or raised
            if self.collection_removed():
                raise CollectionRemoved(self.removed_line()) from None
            if not (isinstance(e, DatabaseError) or is_database_error(e)):
                raise
            self.backoff = min(RETRY_MAX, self.backoff * 2 or 1.0)
            self.retry_at = time.monotonic() + self.backoff
            reason = first_line(str(getattr(e, "orig", None) or e))
            self.say("database", f"{self.coll.name}: database unavailable ({reason}): retrying in {self.backoff:g} s",
                     reason=reason, retry_in=self.backoff)
            return
        if self.backoff:
            self.backoff = 0.0
            self.say("database", f"{self.coll.name}: database reachable again", reason=None, retry_in=None)

    def scan_and_batch(self) -> None:
        if self.rewatch and self.inotify is not None and os.path.isdir(self.real_root):
            self.rewatch = False
            self.watch(self.real_root)
        try:
            scan = self.scanner.scan()
        except SourceError as e:
            return self.block(f"{self.coll.name}: {e}: waiting")
        if not self.started:
            return self.start(scan)
        if scan is None or (scan.empty and self.state):
            return self.block(self.vanished(scan))
        self.unblock()
        ready = self.settled(scan)
        if ready:
            self.batch(scan, ready)

    def start(self, scan: Scan | None) -> None:
        """The first batch: a load of the whole folder. A folder that is gone or empty while the collection has files
        recorded under it is waited for (an unmounted share); one that never was is the user's typo."""
        recorded = image_paths.stored_paths(self.coll.db, self.coll.id, under=self.real_root)
        if scan is None and not recorded:
            kind = "is not a folder" if os.path.exists(self.root) else "does not exist"
            raise SourceError(f"source folder {self.root} {kind}")
        if scan is None or (scan.empty and recorded):
            return self.block(self.vanished(scan))
        self.unblock()
        self.batch(scan, set(scan.files) | set(recorded), before=recorded)
        self.started = True

    def vanished(self, scan: Scan | None) -> str:
        state = "is gone" if scan is None else "is empty"
        return f"{self.coll.name}: {self.real_root} {state} (an unmounted share?): nothing is pruned; waiting for it"

    def block(self, message: str) -> None:
        if self.blocked != message:
            self.say("waiting", message, folder=self.real_root)
        self.blocked = message
        self.observed.clear()
        self.rewatch = True
        self.scanner.forget()

    def unblock(self) -> None:
        if self.blocked is not None:
            self.blocked = None
            self.say("resumed", f"{self.coll.name}: {self.real_root} is back", folder=self.real_root)

    def settled(self, scan: Scan) -> set[str]:
        """Files that differ from the state and have not changed for --debounce seconds. Under inotify a file changed
        when its last event came; a change found by a scan alone counts from that scan."""
        now = time.monotonic()
        files = scan.files
        dirty = {p for p, (_, st) in files.items() if self.state.get(p) != st}
        dirty |= {p for p in self.state if p not in files}
        self.written = {p for p in self.written if p in files or p in self.state}
        dirty |= self.written | set(self.observed)
        for p in dirty:
            current = files[p][1] if p in files else None
            seen = self.observed.get(p)
            if seen is None or seen[0] != current:
                self.observed[p] = (current, self.touched.get(p, now) if seen is None else now)
        self.touched = {p: t for p, t in self.touched.items() if t > now - self.options.debounce or p in self.observed}
        return {p for p in self.observed if self.settled_at(p) <= now}

    def batch(self, scan: Scan, ready: set[str], *, before: dict[str, tuple[int, str]] | None = None) -> None:
        """Load the settled files (plus the other files of pictures whose recorded files changed or went), say what
        changed, refit PCA if the collection has outgrown it, and take the files into the state."""
        started = time.perf_counter()
        start = before is not None
        coll = self.coll.reload()
        if before is None:
            before = image_paths.stored_paths(coll.db, coll.id, paths=sorted(ready))
        files = scan.files
        wanted = ready if start else ready | self.other_files(before, files)
        candidates = [files[p][0] for p in sorted(wanted) if p in files]
        summary = add_pictures(coll, candidates, pca_dims=self.first_dims(len(candidates)), batch_size=self.options.batch_size,
                               trees=self.options.trees, workers=self.options.workers, progress=False, root=self.root,
                               prune=self.options.prune)
        after = (image_paths.stored_paths(coll.db, coll.id, under=self.real_root) if start
                 else image_paths.stored_paths(coll.db, coll.id, paths=sorted(ready)))
        report = counted(coll.name, before, after, summary, start=start)
        report.refit_dims = self.refit()
        for p in ready:
            if p in files:
                self.state[p] = files[p][1]
            else:
                self.state.pop(p, None)
            self.observed.pop(p, None)
            self.written.discard(p)
        report.waiting = len(self.observed)
        report.seconds = time.perf_counter() - started
        if report:
            fields = {k: v for k, v in asdict(report).items() if k != "collection"}
            for path, reason in report.failures[:10]:
                shown = path.replace("\n", "\\n")  # one line per failure, as a load prints them
                self.say("failed", f"failed: {shown}: {reason}", path=path, reason=reason)
            self.say("batch", report.line(), collection=coll.name, **fields)

    def other_files(self, before: dict[str, tuple[int, str]], files: dict) -> set[str]:
        """The files still there, and settled, of the pictures recorded at the paths of a batch."""
        images = sorted({image_id for image_id, _ in before.values()})
        if not images:
            return set()
        recorded = image_paths.stored_paths(self.coll.db, self.coll.id, image_ids=images)
        return {p for p in recorded if p in files and p not in self.observed}

    def first_dims(self, candidates: int) -> int | None:
        """--pca-dims for the first fit, when there are pictures enough for it (else the fit takes what there is and
        `refit_due` brings it to --pca-dims as the collection grows)."""
        dims = self.options.pca_dims
        return dims if self.coll.pca is None and dims <= candidates else None

    def refit(self) -> int | None:
        dims = self.coll.refit_due(self.options.pca_dims)
        if dims is not None:
            self.coll.refit(dims, trees=self.options.trees)
        return dims

    def collection_removed(self) -> bool:
        self.next_check = time.monotonic() + HEARTBEAT
        try:
            self.coll.reload()
        except CollectionError:
            return True
        except Exception:  # noqa: BLE001 - the database is away: it cannot say
            return False
        return False

    def removed_line(self) -> str:
        return f"{self.coll.name}: the collection was removed: stopped watching {self.real_root}"
