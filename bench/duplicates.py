"""Near-duplicate threshold and `search duplicates` time on a loaded collection (e.g. Caltech 101).

    RIS_HOME=... python bench/duplicates.py --collection caltech101 --sample 300
    RIS_HOME=/tmp/elsewhere python bench/duplicates.py --collection - --scale-rows 1000000

1. Threshold: a seeded sample of the collection's pictures is copied as a phone or a chat app would (resized to
   half, re-encoded as JPEG quality 60), the copies embedded with the collection's own model and PCA, and their
   distance to the original compared with each original's nearest distinct picture (exact, numpy). A good
   threshold lies above the first and below the second.
2. Time: `find_duplicates` on the whole collection at the default threshold, against the numpy all-pairs scan
   (the baseline, in the same run), with the groups each found.
3. With --scale-rows N: the same on bench/scale.py's synthetic collection of N rows (made in this RIS_HOME if
   missing, with its Annoy file), where only the time means something.
"""
from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import click
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def copy_of(path: str) -> bytes:
    """The picture resized to half and re-encoded at JPEG quality 60."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        half = img.resize((max(1, img.width // 2), max(1, img.height // 2)), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    half.save(out, "JPEG", quality=60)
    return out.getvalue()


def threshold_figures(coll, sample: int, seed: int, threshold: float) -> dict:
    from ingest.images import decode_image

    ids, vectors = coll.read_vectors("embedding")
    chosen = np.sort(np.random.default_rng(seed).choice(len(ids), min(sample, len(ids)), replace=False))
    details = coll.details(ids[chosen].tolist())
    pixels = np.stack([decode_image(copy_of(details[int(ids[i])].path)).pixels for i in chosen])
    copies = coll.embed(pixels)[1]
    near = np.linalg.norm(copies - vectors[chosen], axis=1)
    distinct = []
    for i in chosen:
        d = np.linalg.norm(vectors - vectors[i], axis=1)
        d[i] = np.inf
        distinct.append(d.min())
    distinct = np.array(distinct)
    labels = np.array([coll.details(ids.tolist())[int(i)].label for i in ids])
    same_class = np.concatenate([np.linalg.norm(vectors[(labels == labels[i]) & (np.arange(len(ids)) != i)] - vectors[i], axis=1)
                                 for i in chosen])
    pct = lambda a, q: float(np.percentile(a, q))  # noqa: E731
    return {"sample": len(chosen), "copy p50": pct(near, 50), "copy p95": pct(near, 95), "copy max": float(near.max()),
            "nearest distinct p1": pct(distinct, 1), "nearest distinct p50": pct(distinct, 50),
            f"copies within {threshold:g}": float((near <= threshold).mean()),
            f"same-class pairs within {threshold:g}": float((same_class <= threshold).mean()),
            f"pictures with a distinct one within {threshold:g}": float((distinct <= threshold).mean())}


def time_duplicates(coll, threshold: float) -> dict:
    from search.duplicates import find_duplicates

    started = time.perf_counter()
    report = find_duplicates(coll, threshold)
    seconds = time.perf_counter() - started
    ids, vectors = coll.read_vectors("embedding")
    baseline = None
    if len(ids) <= 50_000:  # the all-pairs scan, block by block: n^2 distances
        started = time.perf_counter()
        pairs = 0
        squared = (vectors ** 2).sum(axis=1)
        for start in range(0, len(ids), 2000):
            block = vectors[start:start + 2000]
            d2 = squared[start:start + 2000, None] + squared[None, :] - 2 * block @ vectors.T
            pairs += int((d2 <= threshold ** 2).sum()) - len(block)
        baseline = {"seconds": time.perf_counter() - started, "pairs": pairs // 2}
    return {"rows": len(ids), "seconds": seconds, "groups": len(report.groups), "near groups": sum(g.kind == "near" for g in report.groups),
            "pairs found": report.pairs, "all-pairs baseline": baseline}


@click.command()
@click.option("--collection", default="caltech101", show_default=True, help="'-': none (only --scale-rows).")
@click.option("--sample", default=300, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--threshold", type=float, default=None, help="Default: search.duplicates.DEFAULT_THRESHOLD.")
@click.option("--scale-rows", type=int, default=0, help="Also time a synthetic collection of this many rows.")
def main(collection, sample, seed, threshold, scale_rows):
    from ingest.collection import Collection
    from ingest.options import open_database
    from search.duplicates import DEFAULT_THRESHOLD

    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    settings, db = open_database(None)
    if collection != "-":
        coll = Collection.named(db, settings, collection)
        if sample:
            for key, value in threshold_figures(coll, sample, seed, threshold).items():
                print(f"{key:>40}: {value:.4f}" if isinstance(value, float) else f"{key:>40}: {value}")
        print(collection, time_duplicates(coll, threshold))
    if scale_rows:
        from bench.scale import make_collection

        name = f"dups-{scale_rows}"
        if name not in [c.name for c in Collection.all(db, settings)]:
            started = time.perf_counter()
            make_collection(db, name, scale_rows, 128, 1000, raw=False)
            print(f"made {name} in {time.perf_counter() - started:.0f} s")
        scale = Collection.named(db, settings, name)
        if scale.index_problem():
            started = time.perf_counter()
            scale.build_index()
            print(f"Annoy index of {name} in {time.perf_counter() - started:.0f} s")
        print(name, time_duplicates(scale, threshold))


if __name__ == "__main__":
    main()
