"""Keeping a collection in step with its folder: moves, copies, files gone, files whose content changed.

A load hashes every file it finds (it has to, to know what it holds) and embeds only new content. Around that,
the sync compares the files found with the paths recorded before the load (`snapshot`) and writes the
difference (`reconcile`, one transaction through ingest/image_paths.py):
- a file whose content is already stored, while a recorded path of that content is gone from disk, is a
  move: the path row is re-pointed (and the path searches show, with its label), no CNN run;
- any other new file with stored content is a copy: one more path of the same image;
- a recorded file whose content changed now belongs to its new content; an image no file holds any more is
  missing, like one whose files are all gone;
- recorded files under the folder that are gone are counted missing; `--prune` forgets them, deletes the
  images left without any file (their features and index items with them, counted in removed_rows so no
  engine returns them) and the failures recorded for files that are gone.
- files are recorded under the folder's real path (ingest/sources.py); a path recorded through a symlinked
  folder (as earlier versions did) that names a file found now is the same file: its row is re-pointed to
  the real name (or forgotten if that is recorded too), never kept twice, never counted gone, and so are
  its failures.
Files still on disk that the walk left out (hidden, --exclude, --limit-per-class) are not touched.
An unchanged folder writes nothing.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ingest import image_paths
from ingest.image_paths import Changes

if TYPE_CHECKING:
    from ingest.collection import Collection
    from ingest.batches import LoadSummary
    from ingest.sources import Candidate


def snapshot(coll: Collection, root: Path | None, candidates: list[Candidate]) -> dict[str, tuple[int, str]]:
    """path -> (image id, sha256) recorded before the load: every path under `root` (its real path: ingest/sources.py
    records files there), or (without a root) the candidates' own paths."""
    if root is not None:
        return image_paths.stored_paths(coll.db, coll.id, under=real_root(root))
    return image_paths.stored_paths(coll.db, coll.id, paths=[str(c.path.absolute()) for c in candidates])


def reconcile(coll: Collection, root: Path | None, before: dict[str, tuple[int, str]], seen: dict[str, tuple[str, str | None]],
              summary: LoadSummary, *, prune: bool = False) -> None:
    """Record where the files found (`seen`: path -> (sha256, label)) are, work out moves, copies and files gone,
    write it all at once and count it in `summary`. Rows of images new in this load were recorded as they went in."""
    present = {p for p, (sha, _) in seen.items() if p in before and before[p][1] == sha}
    new = {p: seen[p][0] for p in seen if p not in present}
    inserted = image_paths.stored_paths(coll.db, coll.id, paths=list(new)) if new else {}
    fresh = {p for p in new if p in inserted and inserted[p][1] == new[p]}  # the path of an image this load added
    needed = {p: sha for p, sha in new.items() if p not in fresh}
    images = image_paths.images_by_sha(coll.db, coll.id, sorted(set(needed.values())))
    owner = {p: images[sha][0] for p, sha in needed.items() if sha in images}  # a concurrent prune may have taken one

    gone = {p: v for p, v in before.items() if p not in seen and not os.path.lexists(p)}
    elsewhere = image_paths.stored_paths(coll.db, coll.id, image_ids=sorted(set(owner.values()))) if owner else {}
    others = elsewhere | recorded_through_symlink(coll, root)
    aliases = other_names(others, before, seen)
    gone_elsewhere = {p: v for p, v in elsewhere.items()
                      if p not in before and p not in seen and p not in aliases and not os.path.lexists(p)}

    changes = Changes()
    renamed = {aliases[old] for old in aliases if others[old][1] == seen[aliases[old]][0]}  # already present, named anew
    copies = {p: i for p, i in owner.items() if p not in renamed}
    moved_from = []
    gone_by_image = group({p: v[0] for p, v in (gone | gone_elsewhere).items()})
    for image_id, new_paths in group(copies).items():
        moved_from += gone_by_image.get(image_id, [])[:len(new_paths)]
    changes.upsert.update(owner)
    summary.moved += len(moved_from)
    summary.duplicates += len(copies) - len(moved_from)
    # Every file hashed is one of: a new image (counted as it was stored), moved, a copy, or already present
    # (recorded before, under this name or through a symlink, or by a concurrent load of the same folder).
    summary.present = max(0, len(seen) - summary.ingested - summary.moved - summary.duplicates)
    changes.forget = sorted(set(moved_from) | set(aliases))
    missing = sorted(set(gone) - set(moved_from))
    changed = [p for p in new if p in before]  # content replaced in place: the old image loses this file

    live = group({p: before[p][0] for p in present} | {p: inserted[p][0] for p in fresh} | owner)
    dead = set(moved_from) | set(changed) | set(gone) | set(aliases)
    dead_contents = {v[1] for p, v in (before | others).items() if p in dead}
    for image_id, shown in image_paths.images_by_sha(coll.db, coll.id, sorted(dead_contents)).values():
        if shown in dead and live.get(image_id):
            first = live[image_id][0]
            changes.shown[image_id] = (first, seen[first][1])

    changes.forget_failures = failures_named_otherwise(coll, root, seen, summary)
    if prune and root is not None:
        changes.forget = sorted(set(changes.forget) | set(missing))
        changes.forget_failures += [p for p in image_paths.failure_paths(coll.db, coll.id, real_root(root)) if not os.path.lexists(p)]
        changes.prune_orphans = bool(missing or changed or aliases or image_paths.count_orphans(coll.db, coll.id))
        summary.pruned += len(missing)
    if changes:
        summary.removed += image_paths.apply(coll.db, coll.id, changes)
    if not prune:
        summary.missing += len(missing) + image_paths.count_orphans(coll.db, coll.id)


def real_root(root: Path) -> str:
    """The folder's real path, as ingest/sources.py records its files."""
    return os.path.realpath(root)


def recorded_through_symlink(coll: Collection, root: Path | None) -> dict[str, tuple[int, str]]:
    """Paths recorded under the folder as it was named when that name goes through a symlink (earlier versions
    recorded them so): path -> (image id, sha256)."""
    if root is None or os.path.abspath(root) == real_root(root):
        return {}
    return image_paths.stored_paths(coll.db, coll.id, under=os.path.abspath(root))


def other_names(recorded: dict[str, tuple[int, str]], before: dict, seen: dict) -> dict[str, str]:
    """recorded path -> the path of this load's file that it names through a symlinked folder: the same file recorded
    under another name, which the sync re-points (or forgets, when the file's real name is recorded already)."""
    real = real_names(p for p in recorded if p not in before and p not in seen)
    return {old: name for old, name in real.items() if name in seen}


def failures_named_otherwise(coll: Collection, root: Path | None, seen: dict, summary: LoadSummary) -> list[str]:
    """Failures recorded through a symlinked folder for files this load stored or saw fail under their real name."""
    if root is None:
        return []
    found = set(seen) | {p for p, _ in summary.failures}
    real = real_names(image_paths.failure_paths(coll.db, coll.id, real_root(root), outside=True))
    return [old for old, name in real.items() if name in found and name != old]


def real_names(recorded) -> dict[str, str]:
    """path -> the same path with its folder resolved (the file itself may be a symlink, kept as such, as the walk does);
    one realpath per folder."""
    folders: dict[str, str] = {}
    names = {}
    for path in recorded:
        folder, name = os.path.split(path)
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
        names[path] = os.path.join(folders[folder], name)
    return names


def group(owner: dict[str, int]) -> dict[int, list[str]]:
    """image id -> its paths, sorted (moves pair gone and new paths of one image in path order)."""
    grouped: dict[int, list[str]] = {}
    for path in sorted(owner):
        grouped.setdefault(owner[path], []).append(path)
    return grouped
