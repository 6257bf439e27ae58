"""Search benchmark: latency of pgvector exact, Annoy and numpy brute force over one collection,
and Annoy's recall@10 against exact for a few (trees, search_k) settings.

    python bench/search.py --collection caltech101 [--queries 200] [--json]

Queries are stored embeddings sampled with a fixed seed (the query itself is among the answers of
every engine alike). Numpy brute force over the same vectors is the baseline every ratio refers to.
Timing, percentiles and recall are search.evaluation's, the same that `search report` shows.
Targets (Caltech 101, PCA 128, 2 cores): pgvector p50 <= 5 ms; Annoy p50 <= 0.5 ms at recall@10 >= 0.95.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from annoy import AnnoyIndex  # noqa: E402

from bench.machine import cpu_model  # noqa: E402
from ingest.annoy_index import ANNOY_SEED, METRIC, read_sidecar  # noqa: E402
from ingest.collection import Collection  # noqa: E402
from ingest.engines import EngineName  # noqa: E402
from ingest.options import open_database  # noqa: E402
from ingest.store import read_vectors  # noqa: E402
from search.evaluation import brute_force, percentiles, recall, time_each  # noqa: E402

K = 10
SETTINGS = [(10, -1), (50, -1), (50, 2000), (100, -1), (100, 5000), (200, -1)]


def rounded(ms: np.ndarray) -> dict:
    """p50/p95 as printed and written by --json, to the microsecond: finer digits are noise between runs."""
    return {name: round(value, 3) for name, value in percentiles(ms).items()}


def machine() -> str:
    """CPU, cores and Python: latencies mean little without the machine they were measured on."""
    return f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}"


@click.command()
@click.option("--collection", "-c", help="Collection (default: the only one, else caltech101).")
@click.option("--queries", default=200, show_default=True, help="How many sampled stored images to query with.")
@click.option("--seed", default=0, show_default=True)
@click.option("--database-url", envvar="DATABASE_URL")
@click.option("--json", "as_json", is_flag=True)
def main(collection, queries, seed, database_url, as_json):
    """Print p50/p95 latency per engine and Annoy's recall@10 against exact."""
    settings, db = open_database(database_url)
    coll = Collection.named(db, settings, collection)
    ids, vectors = read_vectors(db, coll.id, "embedding")
    sample = np.random.default_rng(seed).choice(len(ids), size=min(queries, len(ids)), replace=False)
    qs = [vectors[i] for i in sample]

    vectors64 = vectors.astype(np.float64)  # once, as a baseline that keeps its data ready would
    brute, brute_ms = time_each(lambda q: brute_force(ids, vectors64, q, K)[0].tolist(), qs)
    exact, pg_ms = time_each(lambda q: [h.id for h in coll.similar(q, K)], qs)
    _, annoy_full_ms = time_each(lambda q: [h.id for h in coll.similar(q, K, engine=EngineName.ANNOY)], qs)
    file_index = coll.engine(EngineName.ANNOY)
    annoy_ids, annoy_ms = time_each(lambda q: file_index.ids_near(q, K), qs)

    rows = [
        {"engine": "numpy brute force (baseline)", **rounded(brute_ms), "recall@10": 1.0},
        {"engine": "pgvector exact (SQL, with rows)", **rounded(pg_ms), "recall@10": recall(exact, brute)},
        {"engine": "annoy index lookup (collection file)", **rounded(annoy_ms), "recall@10": recall(annoy_ids, exact)},
        {"engine": "annoy + rows from PostgreSQL (search similar)", **rounded(annoy_full_ms), "recall@10": None},
    ]
    for row in rows:
        row["vs_brute_p50"] = round(rounded(brute_ms)["p50_ms"] / row["p50_ms"], 2) if row["p50_ms"] else None
    sweep = annoy_sweep(ids, vectors, coll.dims, qs, exact)
    report = {"collection": coll.name, "images": len(ids), "dims": coll.dims, "queries": len(qs), "k": K,
              "machine": machine(), "engines": rows, "annoy_settings": sweep,
              "annoy_file_trees": read_sidecar(coll.settings.annoy_dir, coll.name).trees}
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


def annoy_sweep(ids, vectors, dims, qs, exact) -> list[dict]:
    """Recall@10 and latency of Annoy indexes built here with other trees/search_k (the collection's file is untouched)."""
    out = []
    built: dict[int, AnnoyIndex] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for trees, search_k in SETTINGS:
            if trees not in built:
                index = AnnoyIndex(dims, METRIC)
                index.set_seed(ANNOY_SEED)
                for i, v in zip(ids.tolist(), vectors):
                    index.add_item(i, v)
                t = time.perf_counter()
                index.build(trees, n_jobs=1)
                build_s = time.perf_counter() - t
                index.save(f"{tmp}/{trees}.ann")
                built[trees] = (index, build_s)
            index, build_s = built[trees]
            found, ms = time_each(lambda q: index.get_nns_by_vector(q.tolist(), K, search_k=search_k), qs)
            out.append({"trees": trees, "search_k": search_k, "build_s": round(build_s, 2), **rounded(ms), "recall@10": round(recall(found, exact), 4)})
    return out


def print_report(r: dict) -> None:
    """The benchmark as aligned text, with a PASS/FAIL line per target."""
    print(f"collection {r['collection']}: {r['images']} images, {r['dims']} dims, {r['queries']} queries, k={r['k']}")
    print(f"machine: {r['machine']}")
    print(f"{'engine':48} {'p50 ms':>8} {'p95 ms':>8} {'recall@10':>10} {'speed vs brute (p50)':>21}")
    for e in r["engines"]:
        rec = "" if e["recall@10"] is None else f"{e['recall@10']:.4f}"
        print(f"{e['engine']:48} {e['p50_ms']:8.3f} {e['p95_ms']:8.3f} {rec:>10} {e['vs_brute_p50']:>20}x")
    print(f"annoy settings (built here; the collection's file has {r['annoy_file_trees']} trees):")
    print(f"{'trees':>6} {'search_k':>9} {'build s':>8} {'p50 ms':>8} {'p95 ms':>8} {'recall@10':>10}")
    for s in r["annoy_settings"]:
        print(f"{s['trees']:6} {s['search_k']:9} {s['build_s']:8.2f} {s['p50_ms']:8.3f} {s['p95_ms']:8.3f} {s['recall@10']:10.4f}")
    pg = r["engines"][1]["p50_ms"]
    annoy = r["engines"][2]
    print(f"target pgvector p50 <= 5 ms: {'PASS' if pg <= 5 else 'FAIL'} ({pg} ms)")
    ok = annoy["p50_ms"] <= 0.5 and annoy["recall@10"] >= 0.95
    print(f"target annoy p50 <= 0.5 ms at recall@10 >= 0.95: {'PASS' if ok else 'FAIL'} ({annoy['p50_ms']} ms, {annoy['recall@10']:.4f})")


if __name__ == "__main__":
    main()
