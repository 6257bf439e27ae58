"""The train / hold-out split of a fine-tuning run: drawn once (stratified by label, seeded), recorded in
finetune_splits, and reused by every rerun, so evaluation and early stopping never see a training picture.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from ingest import locks
from ingest.db import Database
from ingest.errors import CollectionError

if TYPE_CHECKING:
    from ingest.collection import Collection


@dataclass(frozen=True)
class LabelledImage:
    id: int
    path: str
    label: str


def split_images(db: Database, coll: Collection, run: str, holdout: float, seed: int):
    """(train, holdout, labels) of run `run`: training only ever sees `train`."""
    images = labelled_images(db, coll)
    split = ensure_split(db, coll, run, images, holdout, seed)
    train = [i for i in images if split.get(i.id) == "train"]
    held = [i for i in images if split.get(i.id) == "holdout"]
    if not train or not held:
        raise CollectionError(f"the recorded split of run {run!r} has no train or no hold-out images; delete its rows in finetune_splits")
    check_files(train + held)
    return train, held, sorted({i.label for i in train + held})


def labelled_images(db: Database, coll: Collection) -> list[LabelledImage]:
    """The collection's pictures that have a label, in id order; fine-tuning needs at least two labels."""
    with db.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT id, path, label FROM images WHERE collection_id = :c AND label IS NOT NULL ORDER BY id"),
            {"c": coll.id},
        ).all()
    images = [LabelledImage(r.id, r.path, r.label) for r in rows]
    if len({i.label for i in images}) < 2:
        raise CollectionError(f"collection {coll.name!r} needs pictures of at least 2 labels to fine-tune on")
    return images


def ensure_split(db: Database, coll: Collection, run: str, images: list[LabelledImage], holdout: float, seed: int) -> dict[int, str]:
    """image id -> 'train'|'holdout' for run `run`: the recorded split, or a new stratified one, recorded now."""
    with db.begin() as conn:
        locks.lock_in_transaction(conn, locks.FINETUNE_SPLIT, of=run)
        rows = conn.execute(sa.text("SELECT image_id, split FROM finetune_splits WHERE run = :r"), {"r": run}).all()
        if rows:
            return {r.image_id: r.split for r in rows}
        split = stratified_split(coll, images, holdout, seed)
        conn.execute(
            sa.text("INSERT INTO finetune_splits (collection_id, run, sha256, image_id, split) SELECT :c, :r, sha256, id, :s"
                    " FROM images WHERE collection_id = :c AND id = :i"),
            [{"r": run, "i": i, "c": coll.id, "s": s} for i, s in split.items()],
        )
    return split


def stratified_split(coll: Collection, images: list[LabelledImage], holdout: float, seed: int) -> dict[int, str]:
    """A seeded split keeping each label's share in both parts; refused when a label is too small to split."""
    from sklearn.model_selection import train_test_split

    counts: dict[str, int] = {}
    for i in images:
        counts[i.label] = counts.get(i.label, 0) + 1
    small = sorted(label for label, n in counts.items() if n < 2)
    if small:
        raise CollectionError(f"collection {coll.name!r}: labels with fewer than 2 pictures cannot be split: {', '.join(small[:5])}")
    try:
        train, held = train_test_split(
            [i.id for i in images], test_size=holdout, stratify=[i.label for i in images], random_state=seed
        )
    except ValueError as e:  # e.g. fewer hold-out pictures than labels
        raise CollectionError(f"collection {coll.name!r} cannot be split with --holdout {holdout}: {e}") from None
    return {int(i): "train" for i in train} | {int(i): "holdout" for i in held}


def check_files(images: list[LabelledImage]) -> None:
    """Fail before training, not in the middle of an epoch, when stored pictures have gone."""
    missing = [i.path for i in images if not Path(i.path).is_file()]
    if missing:
        raise CollectionError(f"{len(missing)} stored picture(s) are missing, e.g. {missing[0]}")


def holdout_hashes(db: Database, base: Collection, run: str) -> set[str]:
    """sha256 of the pictures of `base` that fine-tuning run `run` held out (never trained on)."""
    with db.connect() as conn:
        return set(conn.execute(sa.text(
            "SELECT sha256 FROM finetune_splits WHERE run = :run AND collection_id = :c AND split = 'holdout'"),
            {"run": run, "c": base.id}).scalars())


def finetune_runs(db: Database, coll: Collection) -> list[str]:
    """The fine-tuning runs made from this collection or producing it, latest first (by the creation of the
    collection each produced; runs whose collection is gone last, then by name)."""
    with db.connect() as conn:
        return list(conn.execute(sa.text(
            "SELECT s.run FROM finetune_splits s LEFT JOIN collections c ON c.name = s.run"
            " WHERE s.collection_id = :c OR s.run = :name GROUP BY s.run ORDER BY max(c.created_at) DESC NULLS LAST, s.run"),
            {"c": coll.id, "name": coll.name}).scalars())


def split_by_hash(db: Database, run: str) -> dict[str, str]:
    """sha256 -> 'train'|'holdout' of every picture of fine-tuning run `run`."""
    with db.connect() as conn:
        rows = conn.execute(sa.text("SELECT sha256, split FROM finetune_splits WHERE run = :run"), {"run": run})
        return {r.sha256: r.split for r in rows}
