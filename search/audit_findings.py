"""What `search audit` finds, each from the pictures (search.audit.Images) and their k nearest other pictures
(search.audit.Neighbours): leaks across splits, label suspects and conflicts, outliers, per-label quality.

Everything here works on arrays of row numbers (a picture's place in id order) and label codes (its label's
index in the sorted names; pictures without a label share the code len(names)), so a million rows cost numpy
passes, not Python loops, except where search.evaluation's own per-query function is the point.
"""
from __future__ import annotations

import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from search.evaluation import precision_at_k
from search.split_rule import SplitRule

if TYPE_CHECKING:
    from search.audit import Images, Neighbours

FLOOR = 1e-9  # a label's median distance below this counts as this (no division by zero)
OUTLIER_MEMBERS = 3  # an outlier is far from its label's 3 nearest members: steadier than the nearest alone
BLOCK_CELLS = 1 << 25  # distances computed at once by nearest_among: 128 MB of float32


@dataclass(frozen=True)
class Place:
    """One side of a leak: a file of a stored picture and the split it sits in."""

    id: int
    path: str
    split: str


@dataclass(frozen=True)
class Leak:
    a: Place  # in the larger split (usually the training one)
    b: Place  # in the smaller split: the file to drop or move for a clean evaluation
    distance: float  # 0 for one picture in several files


@dataclass(frozen=True)
class Suspect:
    id: int
    path: str
    label: str
    suggested: str
    agreement: float  # share of the k neighbours carrying `suggested`
    conflict: bool = False  # the picture's files sit under folders of different labels


@dataclass(frozen=True)
class Outlier:
    id: int
    path: str
    label: str | None
    score: float


@dataclass(frozen=True)
class LabelQuality:
    label: str
    images: int
    precision_at_k: float


@dataclass(frozen=True)
class Confusion:
    a: str
    b: str
    count: int  # neighbours of label a's pictures that carry label b


def label_codes(labels: list[str | None]) -> tuple[list[str], np.ndarray]:
    """Sorted label names, and each picture's index into them; pictures without a label get len(names)."""
    names = sorted({x for x in labels if x is not None})
    index = {name: i for i, name in enumerate(names)}
    return names, np.array([index.get(x, len(names)) if x is not None else len(names) for x in labels], np.int64)


def neighbour_codes(near: Neighbours, codes: np.ndarray) -> np.ndarray:
    """(n, k) label codes of each picture's neighbours; -1 where there is no neighbour."""
    return np.where(near.rows >= 0, codes[np.maximum(near.rows, 0)], -1)


# --- leaks -----------------------------------------------------------------------------------------------


def splits_of_rows(images: Images, rule: SplitRule | None, by_sha: dict[str, str]) -> list[str | None]:
    """The split of each picture's shown file: from the rule on its path, or from the run by its sha256."""
    if rule is not None:
        return [rule.split(p) for p in images.paths]
    return [by_sha.get(sha) for sha in images.sha256]


def find_leaks(images: Images, near: Neighbours, split_of: list[str | None], copies: dict[int, list[str]],
               rule: SplitRule | None, threshold: float) -> list[Leak]:
    """One stored picture whose files (`copies`: id -> paths) sit in different splits, and pictures within
    `threshold` of each other in different splits; side a is in the larger split. Nearest first."""
    sizes = Counter(s for s in split_of if s is not None)
    rank = lambda split: (-sizes.get(split, 0), split)  # noqa: E731
    found: dict[tuple[Place, Place], Leak] = {}

    def places(row: int) -> dict[str, str]:
        image_id = int(images.ids[row])
        if image_id in copies:
            by_split: dict[str, str] = {}
            for path in copies[image_id]:
                by_split.setdefault(rule.split(path), path)
            by_split.pop(None, None)
            return by_split
        return {split_of[row]: images.paths[row]} if split_of[row] is not None else {}

    def add(ra: int, rb: int, distance: float) -> None:
        for sa, path_a in places(ra).items():
            for sb, path_b in places(rb).items():
                if sa != sb:
                    a, b = Place(int(images.ids[ra]), path_a, sa), Place(int(images.ids[rb]), path_b, sb)
                    a, b = (a, b) if rank(sa) <= rank(sb) else (b, a)
                    found.setdefault((a, b), Leak(a, b, distance))

    for image_id in copies:
        row = int(np.searchsorted(images.ids, image_id))
        if row < len(images.ids) and images.ids[row] == image_id:
            add(row, row, 0.0)
    near_rows, columns = np.nonzero((near.rows >= 0) & (near.distances <= threshold))
    seen = set()
    for ra, column in zip(near_rows.tolist(), columns.tolist()):
        rb = int(near.rows[ra, column])
        if (min(ra, rb), max(ra, rb)) not in seen:
            seen.add((min(ra, rb), max(ra, rb)))
            add(ra, rb, round(float(near.distances[ra, column]), 6))
    return sorted(found.values(), key=lambda x: (x.distance, x.a.id, x.b.id, x.a.path, x.b.path))


# --- outliers and suspects -------------------------------------------------------------------------------


def outlier_scores(images: Images, near: Neighbours, codes: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(score of each picture, median of each of the `groups` label codes): a picture's mean distance to the
    OUTLIER_MEMBERS nearest other pictures of its label (fewer in a smaller label) over that label's median of the
    same distance; NaN when alone in its label. A picture with fewer of them among its k neighbours is measured
    exactly against every member of its label."""
    wanted = np.minimum(OUTLIER_MEMBERS, np.bincount(codes, minlength=groups)[codes] - 1)
    same = (near.rows >= 0) & (neighbour_codes(near, codes) == codes[:, None])
    nearest = np.sort(np.where(same, near.distances, np.inf), axis=1)[:, :OUTLIER_MEMBERS]
    has = (wanted > 0) & (wanted <= nearest.shape[1]) & (same.sum(axis=1) >= wanted)
    own = np.full(len(codes), np.nan)
    sums = np.cumsum(np.where(np.isinf(nearest), 0, nearest), axis=1)
    own[has] = sums[has, wanted[has] - 1] / wanted[has]
    order = np.argsort(codes, kind="stable")
    medians = np.full(groups, np.nan)
    for members in np.split(order, np.flatnonzero(np.diff(codes[order])) + 1):
        if len(members) < 2:
            continue
        lacking = members[~has[members]]
        if len(lacking):
            own[lacking] = nearest_among(images.vectors, lacking, members, int(wanted[members[0]]))[1].mean(axis=1)
        medians[codes[members[0]]] = np.median(own[members])
    return own / np.maximum(medians[codes], FLOOR), medians


def nearest_among(vectors: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, distances) of each query row's k nearest rows among `candidates` (sorted row numbers; a query that is
    one of them is left out), nearest first, -1 and inf where fewer exist. Blocks of queries keep the distance
    matrix near BLOCK_CELLS, whatever the number of candidates."""
    v = np.asarray(vectors, np.float32)
    c = v[candidates]
    squares = np.einsum("ij,ij->i", c, c)
    kk = min(k, len(candidates))
    rows, distances = np.full((len(queries), k), -1, np.int64), np.full((len(queries), k), np.inf)
    step = max(1, BLOCK_CELLS // max(1, len(candidates)))
    for start in range(0, len(queries) if kk else 0, step):
        block = queries[start:start + step]
        d2 = np.einsum("ij,ij->i", v[block], v[block])[:, None] - 2 * v[block] @ c.T + squares[None, :]
        at = np.minimum(np.searchsorted(candidates, block), len(candidates) - 1)
        itself = candidates[at] == block
        d2[np.flatnonzero(itself), at[itself]] = np.inf
        near = np.argpartition(d2, kk - 1, axis=1)[:, :kk] if kk < len(candidates) else np.tile(np.arange(kk), (len(block), 1))
        d = np.take_along_axis(d2, near, axis=1)
        order = np.argsort(d, axis=1, kind="stable")
        found, d = np.take_along_axis(candidates[near], order, 1), np.sqrt(np.maximum(np.take_along_axis(d, order, 1), 0))
        rows[start:start + step, :kk], distances[start:start + step, :kk] = np.where(np.isinf(d), -1, found), d
    return rows, distances


def find_suspects(images: Images, near: Neighbours, names: list[str], codes: np.ndarray, medians: np.ndarray, agreement: float,
                  outlier_score: float) -> tuple[list[Suspect], np.ndarray]:
    """Labelled pictures whose neighbours carry one other label at `agreement` or more, and whose distance to that
    label's nearest members (scored as outliers are) is under `outlier_score` (farther, it is an outlier, not a
    mislabelled member of that label); most agreed first. Also the mask of those rows."""
    n, k = near.rows.shape
    nc = neighbour_codes(near, codes)
    other = (nc >= 0) & (nc != len(names)) & (nc != codes[:, None])
    counts = np.stack([(nc == nc[:, [j]]).sum(axis=1) for j in range(k)], axis=1) * other
    best = counts.argmax(axis=1)
    top, suggested = counts[np.arange(n), best], nc[np.arange(n), best]
    share = top / k
    candidate = (codes != len(names)) & (top > 0) & (share >= agreement)
    used = np.minimum(OUTLIER_MEMBERS, np.maximum(top, 1))  # its nearest members of that label, measured as outliers are
    nearest = np.sort(np.where(nc == suggested[:, None], near.distances, np.inf), axis=1)[:, :OUTLIER_MEMBERS]
    spread = np.cumsum(np.where(np.isinf(nearest), 0, nearest), axis=1)[np.arange(n), used - 1] / used
    with np.errstate(invalid="ignore"):
        flagged = candidate & (spread / np.maximum(medians[np.where(candidate, suggested, len(names))], FLOOR) < outlier_score)
    rows = sorted(np.flatnonzero(flagged).tolist(), key=lambda r: (-share[r], int(images.ids[r])))
    return [Suspect(int(images.ids[r]), images.paths[r], images.labels[r], names[suggested[r]], float(share[r])) for r in rows], flagged


def conflicts(images: Images, near: Neighbours, copies: dict[int, list[str]], rule: SplitRule | None, names: list[str],
              codes: np.ndarray, k: int) -> list[Suspect]:
    """Files of one picture under folders of different labels: each file whose label is not the one its neighbours
    vote for most (ties: the shown file's, then by name), with that label and its share of the votes."""
    if not copies:
        return []
    roots = sorted({r for r in map(root_of, images.paths, images.stored_labels) if r is not None}, key=len, reverse=True)
    nc = neighbour_codes(near, codes)
    index = {name: i for i, name in enumerate(names)}
    found = []
    for image_id, paths in copies.items():
        row = int(np.searchsorted(images.ids, image_id))
        if row >= len(images.ids) or images.ids[row] != image_id:
            continue
        own_root = root_of(images.paths[row], images.stored_labels[row])
        labels = {}
        for path in paths:
            known, label = file_label(path, [own_root] if own_root else [], roots)
            labels[path] = (rule.label(path, label) if rule else label) if known else images.labels[row]
        distinct = sorted({x for x in labels.values() if x is not None})
        if len(distinct) < 2:
            continue
        votes = {x: int((nc[row] == index[x]).sum()) if x in index else 0 for x in distinct}
        suggested = max(distinct, key=lambda x: (votes[x], x == images.labels[row], [-ord(c) for c in x]))
        found += [Suspect(image_id, path, label, suggested, votes[suggested] / k, conflict=True)
                  for path, label in sorted(labels.items()) if label is not None and label != suggested]
    return sorted(found, key=lambda s: (-s.agreement, s.id, s.path))


def root_of(path: str, label: str | None) -> str | None:
    """The folder a load was given, read back from a file's path and the label it got there (its folder under
    that root); None when the label is not the tail of the file's folder."""
    folder = posixpath.dirname(path)
    if label is None:
        return folder
    return folder[:-len(label) - 1] if folder.endswith("/" + label) else None


def file_label(path: str, *candidates: list[str]) -> tuple[bool, str | None]:
    """(known, label) of a file as a load of the first root containing it would label it (ingest/sources.py:
    its folder relative to that root); roots are tried in the order given."""
    folder = posixpath.dirname(path)
    for roots in candidates:
        for root in roots:
            if folder == root:
                return True, None
            if folder.startswith(root.rstrip("/") + "/"):
                return True, folder[len(root.rstrip("/")) + 1:]
    return False, None


# --- quality ---------------------------------------------------------------------------------------------


def label_quality(images: Images, near: Neighbours, names: list[str], codes: np.ndarray, k: int) -> tuple[list[LabelQuality], list[Confusion]]:
    """Leave-one-out precision@k per label (worst first), by the function `search report` uses, and the label pairs
    most often confused (label a's pictures with neighbours of label b), most first."""
    per_label: dict[str, list[float]] = {}
    for label, near_rows in zip(images.labels, near.rows.tolist()):
        if label is not None:
            per_label.setdefault(label, []).append(precision_at_k(label, [images.labels[r] if r >= 0 else None for r in near_rows], k))
    quality = sorted((LabelQuality(label, len(p), float(np.mean(p))) for label, p in per_label.items()),
                     key=lambda q: (q.precision_at_k, q.label))
    nc = neighbour_codes(near, codes)
    wrong = (codes[:, None] != len(names)) & (nc >= 0) & (nc != len(names)) & (nc != codes[:, None])
    pairs, counts = np.unique((np.broadcast_to(codes[:, None], nc.shape) * (len(names) + 1) + nc)[wrong], return_counts=True)
    confused = [Confusion(names[p // (len(names) + 1)], names[p % (len(names) + 1)], int(c)) for p, c in zip(pairs.tolist(), counts.tolist())]
    return quality, sorted(confused, key=lambda c: (-c.count, c.a, c.b))
