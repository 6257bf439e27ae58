"""Files that appear whole or not at all: written under a hidden temporary name beside the target, then renamed.

A reader (a search opening an Annoy file, a resumed fine-tuning run reading its checkpoint) never sees half a
file, and a crash leaves the last complete version in place; the next write of the same file removes what a
killed writer left behind. Every write-then-rename in the project goes
through `replacing`, so the temporary names follow one rule.
"""
from __future__ import annotations

import glob
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temporary_name(path: Path, suffix: str = "", pid: int | None = None) -> Path:
    """A hidden name beside `path`, unique to a process; `suffix` keeps an ending a writer insists on (.weights.h5)."""
    return path.with_name(f".{path.name}.{os.getpid() if pid is None else pid}.tmp{suffix}")


def remove_leftovers(path: Path, suffix: str = "") -> None:
    """Delete temporary files of `path` left by processes that no longer run (killed with -9 mid-write)."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp{glob.escape(suffix)}"):
        pid = tmp.name[len(path.name) + 2 : -len(f".tmp{suffix}")]
        if pid.isdigit() and int(pid) != os.getpid() and not process_exists(int(pid)):
            tmp.unlink(missing_ok=True)


def process_exists(pid: int) -> bool:
    """Signal 0 checks without signalling; a process of another user still exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@contextmanager
def replacing(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; rename it onto `path` if the block succeeds, remove it if it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path, suffix)
    tmp = temporary_name(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(path: Path, text: str) -> None:
    """Replace a small text file (a sidecar, a checkpoint's state) in one rename."""
    with replacing(path) as tmp:
        tmp.write_text(text)
