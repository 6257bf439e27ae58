"""`ingest watch FOLDER`: a collection that keeps itself in step with a folder as files appear, change, move and go.

It starts with a load of the whole folder (ingest/load.py `add_pictures` with the folder as root), which picks up
whatever happened while it was not running. Then, batch by batch, it loads only the files that changed since the
batch before, still with the folder as root: ingest/sync.py compares them with every path recorded under the
folder, so moves, copies, files changed in place, files gone, --prune and --include/--exclude come out as a load
of the whole folder would make them, and a load run afterwards finds nothing to do. With the changed files go
the other files of the pictures whose recorded files changed or went (read again, no CNN): the sync picks the
file a picture shows among the files of the load, so it keeps showing one that is still there.

When (ingest/folder_changes.py, ingest/watcher.py): inotify events, or a scan every --poll seconds. A batch waits for the folder to be quiet
for --debounce seconds (at most MAX_WAIT debounces while events keep coming), and takes a file once it has not
changed for --debounce seconds, so a copy in progress waits for the next batch.

A folder that vanishes or is suddenly empty (an unmounted share) is never pruned: the watcher says so and waits
for it. SIGINT and SIGTERM finish the batch in hand (a second one stops at once, as Ctrl-C stops a load). A
database that goes away is retried with backoff; a collection removed meanwhile ends the watch.
"""
from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import click

from ingest.config import DEFAULT_BATCH_SIZE, DEFAULT_TREES
from ingest.errors import CollectionError, SourceError
from ingest.load import DEFAULT_PCA_DIMS
from ingest.options import to_json
from ingest.patterns import PathFilter

if TYPE_CHECKING:
    from ingest.batches import LoadSummary

DEFAULT_DEBOUNCE = 1.0

Say = Callable[..., None]  # say(event, text, **fields): one line for people, or one JSON object with --json


@dataclass(frozen=True)
class WatchOptions:
    """How a folder is watched: what counts (patterns), what a batch does (prune, the load's knobs), when (debounce, poll)."""

    path_filter: PathFilter = PathFilter()
    prune: bool = False
    debounce: float = DEFAULT_DEBOUNCE
    poll: float | None = None  # scan every `poll` seconds instead of listening to inotify
    pca_dims: int = DEFAULT_PCA_DIMS  # a new collection's dims, and what a PCA cut small is refitted to
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int = 2
    trees: int = DEFAULT_TREES


@dataclass
class BatchReport:
    """What one batch changed, counted in files (`removed`: pictures --prune deleted; `waiting`: files still being
    written, left for the next batch)."""

    collection: str
    start: bool = False
    added: int = 0
    changed: int = 0
    moved: int = 0
    gone: int = 0
    failed: int = 0
    removed: int = 0
    waiting: int = 0
    refit_dims: int | None = None
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.start or self.added or self.changed or self.moved or self.gone or self.failed or self.removed
                    or self.refit_dims)

    def line(self) -> str:
        extra = [(self.removed, f"{self.removed} images removed"), (self.refit_dims, f"PCA refitted to {self.refit_dims} dims"),
                 (self.waiting, f"{self.waiting} still being written")]
        return (f"{self.collection}: {'start: ' if self.start else ''}{self.added} added, {self.changed} changed, {self.moved} moved, "
                f"{self.gone} gone, {self.failed} failed{''.join(f', {text}' for n, text in extra if n)} in {self.seconds:.1f} s")


class CollectionRemoved(Exception):
    """The collection was removed (`ingest remove`) while it was watched."""


def printer(as_json: bool) -> Say:
    """Batch lines on stdout, notices on stderr; with --json, one JSON object a line on stdout."""

    def say(event: str, text: str, **fields) -> None:
        if as_json:
            click.echo(json.dumps({"event": event, **fields}, ensure_ascii=False, default=to_json))
        else:
            click.echo(text, err=event != "batch")

    return say


class StopSignals:
    """SIGINT and SIGTERM ask the watcher to stop once the batch in hand is done; a second one stops at once
    (KeyboardInterrupt: what was stored is kept, as when Ctrl-C stops a load). `fileno` turns readable when one
    arrives, so a wait in select() ends at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> "StopSignals":
        self.received: int | None = None
        self._read, self._write = os.pipe()
        for fd in (self._read, self._write):
            os.set_blocking(fd, False)
        self._old_fd = signal.set_wakeup_fd(self._write)
        self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(self._old_fd)
        os.close(self._read)
        os.close(self._write)

    def _handle(self, signum, _frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    @property
    def exit_code(self) -> int:
        """130 after Ctrl-C, as every command; 0 after SIGTERM, a service's ordinary stop."""
        return 130 if self.received == signal.SIGINT else 0

    def fileno(self) -> int:
        return self._read

    def drain(self) -> None:
        try:
            while os.read(self._read, 512):
                pass
        except BlockingIOError:
            pass


def counted(name: str, before: dict[str, tuple[int, str]], after: dict[str, tuple[int, str]], summary: LoadSummary, *,
            start: bool) -> BatchReport:
    """A batch in files: recorded paths new to it (less the moves), recorded paths whose content changed, moves,
    recorded files gone from disk (less the moves), and failures."""
    gone = sum(1 for p in before if not os.path.lexists(p))
    changed = sum(1 for p, (_, sha) in before.items() if p in after and after[p][1] != sha)
    new = sum(1 for p in after if p not in before)
    return BatchReport(name, start=start, added=max(0, new - summary.moved), changed=changed, moved=summary.moved,
                       gone=max(0, gone - summary.moved), failed=summary.failed, removed=summary.removed,
                       failures=list(summary.failures))


def watch_folder(settings, db, root: Path, path_filter: PathFilter = PathFilter(), *, collection: str | None = None,
                 weights: str = "imagenet", precision: str = "auto", pca_dims: int | None = None, batch_size: int | None = None,
                 workers: int | None = None, trees: int = DEFAULT_TREES, poll: float | None = None,
                 debounce: float = DEFAULT_DEBOUNCE, prune: bool = False, as_json: bool = False) -> int:
    """Open (or create) the collection (default: the folder's name made valid) with its model, then watch (the options
    are those of `ingest watch`); returns the exit status: 0 after SIGTERM or the collection's removal, 130 after Ctrl-C."""
    from ingest.collection import Collection
    from ingest.db import survive_restarts
    from ingest.features import extractor_for
    from ingest.names import folder_collection_name
    from ingest.feeding import feeding
    from ingest.precision import plan_load
    from ingest.reduce import check_dims
    from ingest.watcher import Watcher

    name, say = collection or folder_collection_name(root), printer(as_json)
    pca_dims = pca_dims or DEFAULT_PCA_DIMS
    check_dims(pca_dims)
    if not os.path.isdir(root) and not collection_exists(db, settings, name):
        raise SourceError(f"source folder {root} {'is not a folder' if os.path.exists(root) else 'does not exist'}")
    precision, hw = plan_load(db, name, precision)
    extractor = extractor_for(weights, precision, settings.runtime, models_dir=settings.models_dir)
    feed = feeding(hw, precision, batch_size, workers, runtime=extractor.runtime)
    if feed.device_line:
        say("notice", feed.device_line)
    db = survive_restarts(db, settings.pgdata)  # a long-running process outlives a restart of the embedded server
    coll = Collection.create(db, settings, name, extractor, pca_dims=pca_dims)
    options = WatchOptions(path_filter, prune=prune, debounce=debounce, poll=poll, pca_dims=pca_dims, batch_size=feed.batch_size,
                           workers=feed.workers, trees=trees)
    with StopSignals() as signals:
        try:
            Watcher(coll, root, options, say, signals).run()
        except CollectionRemoved as e:
            say("removed", str(e), collection=name)
            return 0
        say("stopped", f"{name}: stopped", collection=name, signal=signals.received)
        return signals.exit_code


def collection_exists(db, settings, name: str) -> bool:
    """Whether the collection is there already (a folder missing now may be an unmounted share it was loaded from)."""
    from ingest.collection import Collection

    try:
        Collection.named(db, settings, name)
    except CollectionError:
        return False
    return True
