"""`search audit` at scale: the synthetic collection of bench/scale.py (N clustered 128-d vectors, labels
`c<cluster mod 100>`), audited whole, with the engine settings the audit chose and their recall@k against exact
numpy neighbours on a seeded sample of pictures.

    python bench/audit.py [--n 1000000] [--home /tmp/ris-audit] [--k 10] [--sample 500] [--json out.json]

The collection and its Annoy file are made in --home if it does not hold them yet (timed apart), so a second run
times the audit alone. Splits come from the paths (`--split-by`, the last hex digit of each synthetic file name:
16 splits), so the leak search runs too. Printed: each step's seconds, the audit's peak memory, the engine
settings, how many cases each section found, and whether other processes kept the cores busy meanwhile.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import CpuWatch, cpu_model, peak_rss_mib  # noqa: E402

SPLIT_BY = r"([0-9a-f])\.jpg$"


def exact_ids(ids: np.ndarray, vectors: np.ndarray, rows: np.ndarray, k: int) -> list[list[int]]:
    """The baseline: each sampled row's k nearest other rows by brute force, one query at a time (|v|^2 - 2 v.q
    ranks as |v - q|^2 without an n x d temporary)."""
    norms = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
    found = []
    for row in rows.tolist():
        d = norms - 2 * (vectors @ vectors[row])
        d[row] = np.inf
        top = np.argpartition(d, k)[:k]
        found.append(ids[top[np.argsort(d[top])]].tolist())
    return found


def ensure_collection(db, settings, name: str, n: int, trees: int) -> dict:
    """Make the synthetic collection and its Annoy file if missing; seconds of each step made."""
    from bench.scale import make_collection
    from ingest.collection import Collection

    made = {}
    if name not in [c.name for c in Collection.all(db, settings)]:
        started = time.perf_counter()
        make_collection(db, name, n, 128, 1000, raw=False)
        made["insert rows (COPY)"] = round(time.perf_counter() - started, 1)
    coll = Collection.named(db, settings, name)
    if coll.index_problem():
        started = time.perf_counter()
        coll.build_index(trees)
        made[f"Annoy index ({trees} trees)"] = round(time.perf_counter() - started, 1)
    return made


@click.command()
@click.option("--n", default=1_000_000, show_default=True, help="Rows of the synthetic collection.")
@click.option("--home", type=click.Path(path_type=Path), help="RIS_HOME to use (default: a new temporary one).")
@click.option("--k", default=10, show_default=True)
@click.option("--trees", default=100, show_default=True)
@click.option("--sample", default=500, show_default=True, help="Pictures whose neighbours are checked against exact ones.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the figures here.")
def main(n, home, k, trees, sample, json_out):
    os.environ["RIS_HOME"] = str(home or Path(tempfile.mkdtemp(prefix="ris-audit-")))
    os.environ.pop("DATABASE_URL", None)
    from ingest.collection import Collection
    from ingest.options import open_database
    from search.audit import audit
    from search.evaluation import recall

    settings, db = open_database(None)
    name = f"audit-{n}"
    results = {"n": n, "k": k, "machine": cpu_model(), "cores": os.cpu_count(), "home": os.environ["RIS_HOME"],
               "made": ensure_collection(db, settings, name, n, trees)}
    coll = Collection.named(db, settings, name)
    watch = CpuWatch()
    started = time.perf_counter()
    found = audit(coll, k=k, split_by=SPLIT_BY, progress=True)
    results["audit_seconds"] = round(time.perf_counter() - started, 1)
    results["other_cores_busy"] = round(watch.cores()["other_cores"], 2)
    results["peak_rss_mib"] = round(peak_rss_mib())
    results["engine"] = found.neighbours.engine
    results["found"] = {section: len(getattr(found, section)) for section in ("leaks", "suspects", "outliers", "labels", "confused")}
    rows = np.sort(np.random.default_rng(0).choice(len(found.images.ids), min(sample, len(found.images.ids)), replace=False))
    approx = [[int(found.images.ids[r]) for r in near if r >= 0] for near in found.neighbours.rows[rows].tolist()]
    results[f"recall@{k}"] = round(recall(approx, exact_ids(found.images.ids, found.images.vectors, rows, k)), 4)
    results["recall_sample"] = len(rows)
    for key, value in results.items():
        click.echo(f"{key:>20}: {value}")
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
