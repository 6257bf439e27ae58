"""Queries made of part of a picture, of several pictures, or of "more like this, less like that": one vector.

People rarely hold exactly the picture they want to find. They point at part of one (the lamp in a room: a crop),
give several (the vector between them), or refine a result list by marking results as more or less like what they
want (relevance feedback). Each picture becomes a vector the way any query does: a stored image's own vector, or a
file decoded and embedded by the collection's one recipe (a crop is a keyword of that decode, ingest/images.py).
The vectors combine Rocchio's way, in the space searched (the PCA embeddings, or the raw features with space='raw'):

    q = scale * (ALPHA * mean(normalize(positives)) - GAMMA * mean(normalize(negatives)))

Each vector is L2-normalised first (`ingest.reduce.normalize`) so every picture pulls with the same weight, however
far from the collection's centre it lies. ALPHA = 1 and GAMMA = 0.5 are the classic setting of relevance feedback
(Rocchio's beta, the weight of the pictures marked relevant, folded into the positives with the query itself):
negatives push half as hard as positives pull, since "not like this" says less about what is wanted than "like
this". `scale` is the mean length of the positives' vectors: it puts the query back at the distance from the
centre where stored vectors lie (euclidean search with a unit vector among shorter ones would favour the longest
vectors), and makes a query of one picture exactly that picture's vector. The raw space compares directions only
(RawSearch normalises the query), so there the scale changes nothing.

A query of one picture without a crop is that picture's own Query, bit for bit: it comes back first at distance 0.
The stored pictures a query is made of are left out of its results when it has several pictures or a negative
(they are what the person already has); `ComposedQuery.exclude` says which, and can be told otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np

from ingest.collection import Query
from ingest.errors import CollectionError, ImageError, RisError
from ingest.images import decode_image, read_file
from ingest.reduce import normalize

if TYPE_CHECKING:
    from ingest.collection import Collection

ALPHA = 1.0  # weight of the mean of the positives (Rocchio's alpha, with beta folded in)
GAMMA = 0.5  # weight of the mean of the negatives (Rocchio's gamma)
MAX_PICTURES = 100  # positives and negatives of one query, together: each may cost a CNN run


class Crop(NamedTuple):
    """A region of a picture in its pixels as shown (after EXIF rotation): left, top, width, height."""

    x: int
    y: int
    w: int
    h: int

    @classmethod
    def parse(cls, text: str) -> "Crop":
        """"X,Y,W,H" (whole pixels) -> Crop; whether it fits its picture is known only once that is decoded."""
        try:
            values = [int(part) for part in str(text).split(",")]
        except ValueError:
            values = []
        if len(values) != 4:
            raise RisError(f"a crop is X,Y,W,H in whole pixels of the picture, e.g. 10,20,300,200; got {text!r}")
        return cls(*values)

    def to_dict(self) -> dict:
        return self._asdict()


@dataclass(frozen=True)
class Picture:
    """One picture of a query: a stored image (`image_id`) or a file (`path`), and maybe the region of it to search."""

    image_id: int | None = None
    path: Path | None = None
    crop: Crop | None = None

    def __post_init__(self):
        if (self.image_id is None) == (self.path is None):
            raise RisError("a query picture is either a file or a stored image's id")


@dataclass(frozen=True)
class ComposedQuery:
    """What a search starts from (`query`), and what it was made of, as `--json` and the web API report it."""

    query: Query  # what Collection.similar searches with
    pictures: tuple[Query, ...]  # the positives' own queries, in order (the first is shown beside results)
    positives: tuple[int | str, ...]  # each picture: its image id when it is stored, else its file's path
    negatives: tuple[int | str, ...]
    crop: dict | None  # {"of": id or path, "x", "y", "w", "h"}: the region of the first positive searched
    stored: tuple[int, ...]  # ids of the stored images among positives and negatives
    scale: float

    @property
    def single(self) -> bool:
        """One picture, no negatives: searched as that picture alone."""
        return len(self.positives) == 1 and not self.negatives

    def exclude(self, exclude_self: bool | None = None) -> tuple[int, ...]:
        """Ids to leave out of the results: the query's stored pictures, if `exclude_self` says so, or by default
        when the query has several pictures or a negative (one picture alone comes back first, as it always did)."""
        leave_out = (not self.single) if exclude_self is None else exclude_self
        return self.stored if leave_out else ()

    def to_dict(self) -> dict:
        return {"positives": list(self.positives), "negatives": list(self.negatives), "crop": self.crop,
                "weights": {"alpha": ALPHA, "gamma": GAMMA, "scale": self.scale}}


def pictures_of(files=(), ids=(), *, crop: Crop | None = None) -> list[Picture]:
    """A query's pictures as commands and requests name them: files first, then stored ids; `crop` of the first."""
    pictures = [Picture(path=Path(f)) for f in files] + [Picture(image_id=int(i)) for i in ids]
    if crop is not None and pictures:
        pictures[0] = replace(pictures[0], crop=crop)
    return pictures


def compose(coll: Collection, positives: list[Picture], negatives: list[Picture] = (), *, space: str = "pca",
            read_stored: Callable[[int], bytes] | None = None) -> ComposedQuery:
    """The query of some pictures: positives pulled towards, negatives pushed from (the module's formula).

    Only the first positive may have a crop. `read_stored(image_id)` gives a stored picture's file, verified
    against its sha256 (search/files.py), when a crop of it must be decoded and embedded: no stored vector
    describes a region."""
    positives, negatives = list(positives), list(negatives)
    check_pictures(positives, negatives)
    pos = [picture_query(coll, p, space, read_stored) for p in positives]
    neg = [picture_query(coll, p, space, read_stored) for p in negatives]
    if len(pos) == 1 and not neg:
        query, scale = pos[0], float(np.linalg.norm(vectors_of(pos, space)[0]))
    else:
        vector, scale = rocchio(vectors_of(pos, "pca"), vectors_of(neg, "pca"))
        raw = None
        if space == "raw":
            raw, scale = rocchio(vectors_of(pos, "raw"), vectors_of(neg, "raw"))
        query = Query(vector, path=pos[0].path, label=pos[0].label, raw=raw)
    stored = [stored_id(p, q) for p, q in zip(positives + negatives, pos + neg)]
    crop = positives[0].crop
    return ComposedQuery(query, tuple(pos), names(positives, pos), names(negatives, neg),
                         None if crop is None else {"of": name_of(positives[0], pos[0])} | crop.to_dict(),
                         tuple(dict.fromkeys(i for i in stored if i is not None)), scale)


def rocchio(positives: np.ndarray, negatives: np.ndarray | None = None, *, alpha: float = ALPHA,
            gamma: float = GAMMA) -> tuple[np.ndarray, float]:
    """(scale * (alpha * mean(normalize(positives)) - gamma * mean(normalize(negatives))), scale), scale being the
    positives' mean length: the formula of this module, on rows of one space."""
    pos = np.asarray(positives, dtype=np.float32)
    q = alpha * normalize(pos).mean(axis=0)
    if negatives is not None and len(negatives):
        q = q - gamma * normalize(negatives).mean(axis=0)
    scale = float(np.linalg.norm(pos, axis=1).mean())
    return (scale * q).astype(np.float32), scale


def check_pictures(positives: list[Picture], negatives: list[Picture]) -> None:
    """Refuse, before any work, a query with no positive, too many pictures, a crop past the first picture, or a
    stored image both wanted and not wanted."""
    if not positives:
        raise RisError("give either an image file or --id (one or more) to search with")
    if len(positives) + len(negatives) > MAX_PICTURES:
        raise RisError(f"a query is made of at most {MAX_PICTURES} pictures, got {len(positives) + len(negatives)}")
    if any(p.crop is not None for p in positives[1:] + negatives):
        raise RisError("only the first picture of a query can be cropped")
    both = {p.image_id for p in positives} & {p.image_id for p in negatives} - {None}
    if both:
        raise RisError(f"image {min(both)} is both a picture to search with and one to move away from")


def picture_query(coll: Collection, picture: Picture, space: str, read_stored: Callable[[int], bytes] | None) -> Query:
    """The Query of one picture: as Collection.query makes it, or for a crop its region decoded and embedded."""
    if picture.crop is None:
        return coll.query(image=picture.path, image_id=picture.image_id, space=space)
    if picture.image_id is not None:
        found = coll.details([picture.image_id]).get(picture.image_id)
        if found is None:
            raise CollectionError(f"no image with id {picture.image_id} in collection {coll.name!r}")
        if read_stored is None:
            raise RisError("a crop of a stored image needs its file: pass read_stored")
        path, label, what = found.path, found.label, f"image {picture.image_id}"
    else:
        path, label, what = str(Path(picture.path).absolute()), None, str(picture.path)
        if not Path(picture.path).exists():
            raise RisError(f"no such file: {picture.path}")
    try:
        data = read_stored(picture.image_id) if picture.image_id is not None else read_file(Path(picture.path))
        pixels = decode_image(data, crop=picture.crop).pixels
    except ImageError as e:
        raise RisError(f"cannot use {what} as a query: {e}") from None
    raw, embedding = coll.embed(pixels[np.newaxis])
    return Query(embedding[0], path=path, label=label, raw=raw[0])


def vectors_of(queries: list[Query], space: str) -> np.ndarray | None:
    """The queries' vectors of one space as rows (None when there are none)."""
    if not queries:
        return None
    return np.stack([q.raw if space == "raw" else q.vector for q in queries])


def stored_id(picture: Picture, query: Query) -> int | None:
    return picture.image_id if picture.image_id is not None else query.image_id


def names(pictures: list[Picture], queries: list[Query]) -> tuple[int | str, ...]:
    return tuple(name_of(p, q) for p, q in zip(pictures, queries))


def name_of(picture: Picture, query: Query) -> int | str:
    """How a picture is reported: its image id when stored, else the file's path."""
    found = stored_id(picture, query)
    return found if found is not None else query.path
