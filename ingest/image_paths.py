"""Where each stored picture lives: the SQL over `image_paths` (one row per file holding a picture).

A picture is embedded once per collection (by sha256); every file with that content is a row here, and
images.path is one of them (the one searches show). `insert_images` records the path of each new image in its
own transaction; the rest (copies, moves, files whose content changed, pruning) is written by ingest/sync.py
through `apply`, in one transaction.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import sqlalchemy as sa

from ingest import locks
from ingest.db import Database
from ingest.store import delete_images, raw_cursor, sequential, write_paths


@dataclass
class Changes:
    """What a sync writes: path rows to add or re-point, path rows to forget, images whose shown path changes."""

    upsert: dict[str, int] = field(default_factory=dict)  # path -> image id
    forget: list[str] = field(default_factory=list)
    shown: dict[int, tuple[str, str | None]] = field(default_factory=dict)  # image id -> (path, label)
    forget_failures: list[str] = field(default_factory=list)
    prune_orphans: bool = False  # delete images left without any path (a --prune)

    def __bool__(self) -> bool:
        return bool(self.upsert or self.forget or self.shown or self.forget_failures or self.prune_orphans)


def stored_paths(db: Database, collection_id: int, *, under: str | None = None, paths: list[str] | None = None,
                 image_ids: list[int] | None = None) -> dict[str, tuple[int, str]]:
    """path -> (image id, sha256) of the collection's path rows under a folder, with given paths, or of given images."""
    if under is not None:
        where, params = "starts_with(p.path, :v)", {"v": under.rstrip(os.sep) + os.sep}
    elif paths is not None:
        where, params = "p.path = ANY(:v)", {"v": list(paths)}
    else:
        where, params = "p.image_id = ANY(:v)", {"v": list(image_ids or [])}  # (collection_id, image_id) is indexed
    with db.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT p.path, p.image_id, i.sha256 FROM image_paths p JOIN images i ON i.collection_id = p.collection_id"
                                    f" AND i.sha256 = p.sha256 WHERE p.collection_id = :c AND {where}"), {"c": collection_id} | params)
        return {r.path: (r.image_id, r.sha256) for r in rows}


def images_by_sha(db: Database, collection_id: int, hashes: list[str]) -> dict[str, tuple[int, str]]:
    """sha256 -> (image id, shown path) for some contents of the collection."""
    with db.connect() as conn:
        rows = conn.execute(sa.text("SELECT sha256, id, path FROM images WHERE collection_id = :c AND sha256 = ANY(:h)"),
                            {"c": collection_id, "h": list(hashes)})
        return {r.sha256: (r.id, r.path) for r in rows}


def failure_paths(db: Database, collection_id: int, under: str, *, outside: bool = False) -> list[str]:
    """Paths of the collection's recorded failures under a folder (or, with `outside`, everywhere else)."""
    where = "NOT starts_with(path, :u)" if outside else "starts_with(path, :u)"
    with db.connect() as conn:
        return list(conn.execute(sa.text(f"SELECT path FROM ingest_failures WHERE collection_id = :c AND {where}"),
                                 {"c": collection_id, "u": under.rstrip(os.sep) + os.sep}).scalars())


def orphans(conn, collection_id: int) -> list[int]:
    """Images no file holds any more (the only file with their content now holds something else)."""
    return list(conn.execute(sa.text("SELECT id FROM images i WHERE collection_id = :c AND NOT EXISTS (SELECT 1 FROM image_paths p"
                                     " WHERE p.collection_id = i.collection_id AND p.sha256 = i.sha256)"), {"c": collection_id}).scalars())


def count_orphans(db: Database, collection_id: int) -> int:
    with db.connect() as conn:
        return len(orphans(conn, collection_id))


def apply(db: Database, collection_id: int, changes: Changes) -> int:
    """Write a sync's changes in one transaction, one collection at a time (the lock `Collection.finish` takes);
    with `prune_orphans`, images left without a path are deleted with their features and counted in removed_rows.
    Returns the images deleted."""
    with db.begin() as conn:
        locks.lock_in_transaction(conn, locks.COLLECTION, of=collection_id)
        sequential(conn)
        conn.exec_driver_sql("SELECT 1 FROM collections WHERE id = %s FOR UPDATE", (collection_id,))  # as every path writer
        if changes.forget:
            conn.execute(sa.text("DELETE FROM image_paths WHERE collection_id = :c AND path = ANY(:p)"),
                         {"c": collection_id, "p": changes.forget})
        if changes.upsert:
            shas = dict(conn.execute(sa.text("SELECT id, sha256 FROM images WHERE collection_id = :c AND id = ANY(:i)"),
                                     {"c": collection_id, "i": sorted(set(changes.upsert.values()))}).all())
            rows = [(shas[i], i, p) for p, i in changes.upsert.items() if i in shas]
            if rows:
                write_paths(raw_cursor(conn), collection_id, rows)
        if changes.shown:
            conn.execute(sa.text("UPDATE images SET path = :p, label = :l WHERE id = :i AND collection_id = :c"),
                         [{"c": collection_id, "p": p, "l": label, "i": i} for i, (p, label) in changes.shown.items()])
        if changes.forget_failures:
            conn.execute(sa.text("DELETE FROM ingest_failures WHERE collection_id = :c AND path = ANY(:p)"),
                         {"c": collection_id, "p": changes.forget_failures})
        return delete_images(conn, collection_id, orphans(conn, collection_id)) if changes.prune_orphans else 0


def paths_of(db: Database, collection_id: int, image_ids: list[int]) -> dict[int, list[str]]:
    """image id -> every path holding it (the shown one first), for some images of one collection."""
    with db.connect() as conn:
        rows = conn.execute(sa.text("SELECT p.image_id, p.path FROM image_paths p JOIN images i ON i.collection_id = p.collection_id"
                                    " AND i.sha256 = p.sha256 WHERE p.collection_id = :c AND p.image_id = ANY(:ids) ORDER BY p.image_id, p.path <> i.path, p.path"),
                            {"c": collection_id, "ids": list(image_ids)})
        found: dict[int, list[str]] = {}
        for r in rows:
            found.setdefault(r.image_id, []).append(r.path)
        return found


def identical_files(db: Database, collection_id: int) -> dict[int, list[str]]:
    """image id -> its paths, for every image of the collection held by more than one file."""
    with db.connect() as conn:
        ids = list(conn.execute(sa.text("SELECT image_id FROM image_paths WHERE collection_id = :c GROUP BY image_id"
                                        " HAVING count(*) > 1 ORDER BY image_id"), {"c": collection_id}).scalars())
    return paths_of(db, collection_id, ids) if ids else {}


def path_counts(db: Database, collection_id: int, *, check_files: bool = True) -> dict:
    """For `ingest status`: files recorded, extra copies (paths beyond one per image), images no file holds any
    more, and (checking every file on disk: one stat a path) files gone."""
    with db.connect() as conn:
        row = conn.execute(sa.text("SELECT count(*) AS paths, count(*) - count(DISTINCT image_id) AS copies"
                                   " FROM image_paths WHERE collection_id = :c"), {"c": collection_id}).one()
        counts = {"paths": row.paths, "duplicate_paths": row.copies, "orphans": len(orphans(conn, collection_id))}
        if check_files:
            paths = conn.execute(sa.text("SELECT path FROM image_paths WHERE collection_id = :c"), {"c": collection_id}).scalars()
            counts["missing"] = sum(1 for p in paths if not os.path.lexists(p))
    return counts
