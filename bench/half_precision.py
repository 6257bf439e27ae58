"""What storing raw features in half precision does to `--space raw`: its neighbours and precision@p against float32.

    RIS_HOME=/tmp/ris-half RIS_PRECISION=fp32 ingest load caltech101 --source 101_ObjectCategories.tar.gz --weights random
    RIS_HOME=/tmp/ris-half python bench/half_precision.py [--collection caltech101] [--sample 1000] [--json]

The collection must have been embedded at fp32 (RIS_PRECISION=fp32): then the float32 side is the same model at
the same precision on the same runtime, run again here on every stored picture (read from its stored path,
decoded by ingest.images.decode_image), and the only difference between the two sides is that the database keeps
float16. Three comparisons, each leaving the query out:
- the tool itself: `Collection.similar(..., space='raw')` (halfvec in SQL) for a seeded sample of stored pictures,
  by id, against numpy's exact k nearest on the L2-normalised float32 features (search.evaluation.exact_neighbours);
- numpy on both sides over every picture: float32 against the stored half features normalised as the SQL does
  (ingest.reduce.normalize, then rounded to half as pgvector's l2_normalize(halfvec) returns them), for the
  k-NN overlap and precision@p (share of the first p neighbours carrying the query's label);
- the stored vectors against their float32 twins (how far float16 rounding moved them).
"""
from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.precision import precision_at  # noqa: E402
from ingest.collection import Collection  # noqa: E402
from ingest.config import DEFAULT_BATCH_SIZE  # noqa: E402
from ingest.errors import RisError  # noqa: E402
from ingest.features import RAW_DIMS, extractor_for  # noqa: E402
from ingest.images import decode_image, read_file  # noqa: E402
from ingest.options import open_database  # noqa: E402
from ingest.reduce import normalize  # noqa: E402
from search.evaluation import exact_neighbours  # noqa: E402

OVERLAP_TARGET = 0.99  # mean share of the tool's k neighbours that float32 finds too, at least
PRECISION_MOVE_TARGET = 0.002  # |precision@p half - float32|, less than
SEED = 0


def as_halfvec(raw: np.ndarray) -> np.ndarray:
    """Rows normalised as RawSearch's SQL does: l2_normalize of a halfvec is a halfvec, so rounded to half again."""
    return normalize(raw).astype(np.float16).astype(np.float32)


def embed_fp32(coll: Collection, paths: list[str], batch_size: int, progress: bool) -> np.ndarray:
    """The float32 raw features of the stored pictures, by the collection's model at fp32 on its runtime."""
    extractor = extractor_for(coll.weights, "fp32", coll.runtime, models_dir=coll.settings.models_dir)
    if extractor.fingerprint != coll.row.weights_fingerprint:
        raise click.ClickException(f"the fp32 model's weights differ from those of collection {coll.name!r}")
    out = np.empty((len(paths), RAW_DIMS), np.float32)
    with ThreadPoolExecutor(2) as pool, tqdm(total=len(paths), desc="fp32 features", unit="image", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            batch = list(pool.map(lambda p: decode_image(read_file(Path(p))).pixels, paths[start : start + batch_size]))
            out[start : start + len(batch)] = extractor.embed(np.stack(batch))
            bar.update(len(batch))
    return out


def vector_change(fp32: np.ndarray, half: np.ndarray) -> dict:
    """How far the stored half vectors are from their float32 twins, and whether they are float16(float32) exactly."""
    cos = (fp32 * half).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(half, axis=1)
    rounded = fp32.astype(np.float16).astype(np.float32)
    return {"relative_l2": float(np.linalg.norm(fp32 - half) / np.linalg.norm(fp32)),
            "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "stored_equals_rounded_share": float((rounded == half).mean()),
            "max_abs_fp32": float(np.abs(fp32).max())}


def overlap(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Per query, the share of k neighbours the two answers have in common (order ignored)."""
    return np.array([len(set(x) & set(y)) / k for x, y in zip(a.tolist(), b.tolist())])


def sample_precision(neighbours: np.ndarray, queries: np.ndarray, labels: list[str | None], p: int) -> float:
    """precision@p of some queries (rows), their neighbours being rows of the whole collection, over labelled queries."""
    hits = [sum(labels[j] == labels[q] for j in row[:p]) / p
            for q, row in zip(queries.tolist(), neighbours.tolist()) if labels[q] is not None]
    return float(np.mean(hits))


def tool_neighbours(coll: Collection, ids: np.ndarray, rows: np.ndarray, k: int, progress: bool) -> tuple[np.ndarray, float]:
    """`--space raw` as users run it: each sampled stored picture queried by id, itself excluded. Rows of the answers,
    and the median seconds a search took."""
    row_of = {int(i): r for r, i in enumerate(ids.tolist())}
    found, seconds = np.empty((len(rows), k), np.int64), []
    for n, row in enumerate(tqdm(rows.tolist(), desc="--space raw", unit="query", disable=not progress)):
        image_id = int(ids[row])
        query = coll.query(image_id=image_id, space="raw")
        start = time.perf_counter()
        hits = coll.similar(query, k, space="raw", exclude=image_id)
        seconds.append(time.perf_counter() - start)
        found[n] = [row_of[h.id] for h in hits]
    return found, float(np.median(seconds))


def compare(coll: Collection, k: int, p: int, sample: int, batch_size: int, progress: bool) -> dict:
    """Every figure of the report. Neighbours are rows of the collection's id-ordered vectors, the query's own row
    left out on both sides (exact_neighbours skips it; the tool is told to exclude its id)."""
    times = {}
    clock = time.perf_counter()
    ids, half = coll.read_vectors("raw")
    details = coll.details(ids.tolist())
    paths, labels = [details[i].path for i in ids.tolist()], [details[i].label for i in ids.tolist()]
    fp32 = embed_fp32(coll, paths, batch_size, progress)
    times["embed_fp32"], clock = time.perf_counter() - clock, time.perf_counter()

    rows = np.arange(len(ids))  # ids come in id order, so ties between rows break by id as in SQL
    near32 = exact_neighbours(rows, normalize(fp32), rows, k, progress=progress)
    near16 = exact_neighbours(rows, as_halfvec(half), rows, k, progress=progress)
    times["numpy_knn"], clock = time.perf_counter() - clock, time.perf_counter()

    queries = np.sort(np.random.default_rng(SEED).choice(len(ids), size=min(sample, len(ids)), replace=False))
    tool, median_s = tool_neighbours(coll, ids, queries, k, progress)
    times["tool_search"] = time.perf_counter() - clock

    whole, tool_vs_32 = overlap(near16, near32, k), overlap(tool, near32[queries], k)
    return {
        "collection": coll.name, "weights": coll.weights, "precision": coll.precision, "runtime": coll.runtime,
        "images": len(ids), "k": k, "p": p, "sample": len(queries), "seed": SEED,
        "vectors": vector_change(fp32, half),
        "tool": {"overlap_mean": float(tool_vs_32.mean()), "overlap_min": float(tool_vs_32.min()),
                 "all_k_same_share": float((tool_vs_32 == 1).mean()),
                 "top1_same_share": float((tool[:, 0] == near32[queries, 0]).mean()),
                 "overlap_with_numpy_half": float(overlap(tool, near16[queries], k).mean()),
                 "precision_half": sample_precision(tool, queries, labels, p),
                 "precision_fp32": sample_precision(near32[queries], queries, labels, p),
                 "median_query_ms": median_s * 1000},
        "numpy": {"overlap_mean": float(whole.mean()), "overlap_min": float(whole.min()),
                  "all_k_same_share": float((whole == 1).mean()),
                  "top1_same_share": float((near16[:, 0] == near32[:, 0]).mean()),
                  "precision_fp32": precision_at(near32, labels, p), "precision_half": precision_at(near16, labels, p)},
        "seconds": times,
    }


def targets(r: dict) -> dict:
    """The two claims: the tool's k neighbours are float32's, and precision@p stays put (over every picture)."""
    move = r["numpy"]["precision_half"] - r["numpy"]["precision_fp32"]
    return {"tool_overlap": {"target": OVERLAP_TARGET, "value": r["tool"]["overlap_mean"],
                             "pass": r["tool"]["overlap_mean"] >= OVERLAP_TARGET},
            "precision_move": {"target": PRECISION_MOVE_TARGET, "value": move, "pass": abs(move) < PRECISION_MOVE_TARGET}}


def verdict(t: dict) -> str:
    return "PASS" if t["pass"] else "FAIL"


def report(r: dict) -> None:
    k, p, v, tool, whole, t = r["k"], r["p"], r["vectors"], r["tool"], r["numpy"], r["targets"]
    click.echo(f"{r['collection']!r}: {r['images']} pictures, weights {r['weights']}, inference {r['precision']} on "
               f"{r['runtime']} for both sides; raw features stored as halfvec, float32 recomputed here")
    click.echo(f"vectors: relative L2 {v['relative_l2']:.2e}, cosine to the float32 twin min {v['cosine_min']:.8f}, mean "
               f"{v['cosine_mean']:.8f}; {v['stored_equals_rounded_share']:.2%} of stored values are float16(float32) exactly "
               f"(largest |float32| {v['max_abs_fp32']:.1f}, half's limit 65504)")
    click.echo(f"--space raw (halfvec in SQL) vs numpy float32, {r['sample']} sampled queries (seed {r['seed']}), self excluded:")
    click.echo(f"  {k}-NN overlap mean {tool['overlap_mean']:.4f}, min {tool['overlap_min']:.2f}; all {k} the same for "
               f"{tool['all_k_same_share']:.1%}; same first neighbour for {tool['top1_same_share']:.1%} "
               f"(target mean >= {t['tool_overlap']['target']}: {verdict(t['tool_overlap'])})")
    click.echo(f"  overlap with numpy on the stored half vectors {tool['overlap_with_numpy_half']:.4f}; median search "
               f"{tool['median_query_ms']:.0f} ms")
    click.echo(f"  precision@{p} on the sample: float32 {tool['precision_fp32']:.4f}, half {tool['precision_half']:.4f} "
               f"(half - float32 = {tool['precision_half'] - tool['precision_fp32']:+.4f})")
    click.echo("numpy, every picture against all others (leave-one-out), float32 vs stored half:")
    click.echo(f"  {k}-NN overlap mean {whole['overlap_mean']:.4f}, min {whole['overlap_min']:.2f}; all {k} the same for "
               f"{whole['all_k_same_share']:.1%}; same first neighbour for {whole['top1_same_share']:.1%}")
    click.echo(f"  precision@{p}: float32 {whole['precision_fp32']:.4f}, half {whole['precision_half']:.4f} (half - float32 = "
               f"{t['precision_move']['value']:+.4f}; target |move| < {t['precision_move']['target']}: {verdict(t['precision_move'])})")
    click.echo("seconds: " + ", ".join(f"{name} {s:.1f}" for name, s in r["seconds"].items()))


@click.command()
@click.option("-c", "--collection", "name", default="caltech101", show_default=True,
              help="A collection embedded at fp32 (RIS_PRECISION=fp32) with its raw features kept.")
@click.option("-k", type=click.IntRange(1, 100), default=10, show_default=True, help="Neighbours compared.")
@click.option("-p", type=click.IntRange(1, 100), default=4, show_default=True, help="precision@p.")
@click.option("--sample", type=click.IntRange(1), default=1000, show_default=True, help="Pictures queried through the tool.")
@click.option("--batch-size", type=click.IntRange(1, 1024), default=DEFAULT_BATCH_SIZE, show_default=True,
              help="Pictures per forward pass of the float32 side.")
@click.option("--database-url", envvar="DATABASE_URL")
@click.option("--json", "as_json", is_flag=True)
def main(name, k, p, sample, batch_size, database_url, as_json):
    """Neighbour overlap and precision@p of raw features stored in half precision against float32."""
    if p > k:
        raise click.UsageError(f"-p ({p}) cannot exceed -k ({k})")
    settings, db = open_database(database_url)
    try:
        coll = Collection.named(db, settings, name)
    except RisError as e:
        raise click.ClickException(str(e)) from e
    if coll.precision != "fp32":
        raise click.ClickException(f"collection {coll.name!r} was embedded at {coll.precision}; load one with RIS_PRECISION=fp32 "
                                   "so that storage is the only difference")
    if not coll.row.keeps_raw:
        raise click.ClickException(f"collection {coll.name!r} keeps no raw features (loaded with --raw-features none)")
    try:
        result = compare(coll, k, p, sample, batch_size, not as_json)
    except RisError as e:  # a stored picture gone or unreadable since the load
        raise click.ClickException(str(e)) from e
    result["targets"] = targets(result)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        report(result)


if __name__ == "__main__":
    main()
