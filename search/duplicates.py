"""`search duplicates`: pictures a collection holds more than once.

Identical files are one image with several paths (a picture is stored once per content, ingest/sync.py
records every file holding it). Near-duplicates (resized, re-encoded, lightly edited) are images whose
embeddings lie within `threshold` of each other. Candidate pairs come from an engine's `neighbourhoods` (the
Engine interface, ingest/engines.py): with the Annoy file, each item's `neighbours` nearest items, by item number,
without SQL or a round trip, so the work grows as n x (trees x neighbours) node visits, n log n overall, not n^2
as an all-pairs scan. Rows the index does not hold yet (`pending_ids`: written since the file was built) are
searched through the engine, which adds them exactly; rows removed since are dropped when their details are read.

Groups are stars, not chains: images are taken in id order, and each one not yet grouped gathers every
ungrouped image within the threshold of it; a member's distance is to that first image, so it is never above
the threshold. Every path of every member is listed.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from ingest import Collection, EngineName, QueryArgs, identical_files, paths_of

# Measured on Caltech 101 (bench/duplicates.py; ResNet50 with random weights, PCA 128): 95% of copies resized to
# half and re-encoded at JPEG quality 60 lie within 0.045 of their original, and 2.3% of distinct pairs of one class
# do. Random weights separate poorly (about half the pictures have some distinct picture that close); with other
# weights, measure again. Distances scale with the weights, little with the PCA dims once they keep most variance.
DEFAULT_THRESHOLD = 0.045
DEFAULT_NEIGHBOURS = 10


@dataclass(frozen=True)
class Member:
    id: int
    path: str
    distance: float


@dataclass
class Group:
    group: int
    kind: str  # 'identical': one picture in several files; 'near': several pictures within the threshold
    members: list[Member] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Report:
    groups: list[Group]
    images: int  # searched for near-duplicates (0 with threshold 0)
    pairs: int  # candidate pairs within the threshold
    seconds: float


def find_duplicates(coll: Collection, threshold: float = DEFAULT_THRESHOLD, *, neighbours: int = DEFAULT_NEIGHBOURS,
                    search_k: int = -1, engine: str = EngineName.ANNOY, progress: bool = False) -> Report:
    """Groups of identical files and of near-duplicates; with threshold 0, identical files only (no index used).
    `search_k` (-1: the engine's default) is Annoy's; any engine can find the candidates, the Annoy file fastest."""
    started = time.perf_counter()
    args = QueryArgs.of(search_k=search_k)
    pairs, searched = (near_pairs(coll, threshold, neighbours, engine, args, progress) if threshold > 0 else ({}, 0))
    copies = identical_files(coll.db, coll.id)
    groups = []
    for centre, members in stars(pairs).items():
        extra = paths_of(coll.db, coll.id, [centre, *members])
        listed = [(centre, 0.0)] + sorted(members.items(), key=lambda m: (m[1], m[0]))
        groups.append(Group(0, "near", [Member(i, p, round(d, 6)) for i, d in listed for p in extra.get(i, [])]))
        for i, _ in listed:
            copies.pop(i, None)
    groups += [Group(0, "identical", [Member(i, p, 0.0) for p in found]) for i, found in copies.items()]
    groups.sort(key=lambda g: g.members[0].id)
    for number, group in enumerate(groups, 1):
        group.group = number
    return Report(groups, searched, sum(len(m) for m in pairs.values()) // 2, time.perf_counter() - started)


def near_pairs(coll: Collection, threshold: float, neighbours: int, engine_name: str, args: QueryArgs,
               progress: bool) -> tuple[dict, int]:
    """id -> {id: distance} for every pair within the threshold that the engine finds (both directions), living rows only."""
    engine = coll.engine(engine_name)
    found: dict[int, dict[int, float]] = {}

    def keep(a: int, b: int, d: float) -> None:
        if a != b and d <= threshold:
            found.setdefault(a, {})[b] = d
            found.setdefault(b, {})[a] = d

    searched = 0
    with tqdm(desc="near-duplicates", unit="img", disable=not progress, smoothing=0.1, mininterval=1) as bar:
        for near in engine.neighbourhoods(neighbours, args):
            for other, d in zip(near.ids.tolist(), near.distances.tolist()):
                keep(near.image_id, other, d)
            searched += 1
            bar.update()
        pending, vectors = coll.vectors_of("embedding", engine.pending_ids())
        for image_id, vector in zip(pending.tolist(), vectors):  # rows newer than the index: the engine searches them exactly
            for hit in engine.search(vector, neighbours + 1, args=args):
                keep(image_id, hit.id, hit.distance)
            searched += 1
            bar.update()
    living = set(coll.details(list(found))) if found else set()
    return {a: {b: d for b, d in near.items() if b in living} for a, near in found.items() if a in living}, searched


def stars(pairs: dict[int, dict[int, float]]) -> dict[int, dict[int, float]]:
    """Centre -> {member: distance}: in id order, each ungrouped image gathers its ungrouped neighbours."""
    grouped: set[int] = set()
    result = {}
    for centre in sorted(pairs):
        if centre in grouped:
            continue
        members = {b: d for b, d in pairs[centre].items() if b not in grouped}
        if members:
            result[centre] = members
            grouped |= {centre, *members}
    return result
