"""What bf16 does to search, not only to vectors: one collection loaded at fp32 and a twin at bf16, compared.

    RIS_HOME=... python bench/precision.py --fp32 caltech101 --bf16 caltech101-bf16 [--json]

Both collections hold the same pictures (matched by sha256), each with its own PCA, as two users would have
them. For each space (the PCA embeddings searches rank by, and the raw 2048 features) it prints the mean
overlap of every picture's k exact neighbours between the two (leave-one-out, ranked as pgvector ranks
them: search.evaluation.exact_neighbours) and each collection's precision@p (share of the first p
neighbours with the query's label); and, for the raw features, how far each bf16 vector is from its fp32 twin.
The speed side (each precision's load and forward pass against the fp32 forward pass) is measured by
bench/ingest.py, which takes its ratios and report lines from here.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ingest.collection import Collection  # noqa: E402
from ingest.options import open_database  # noqa: E402
from search.evaluation import exact_neighbours  # noqa: E402

PRECISIONS = ("fp32", "bf16")  # bench/ingest.py's: the first is the baseline every ratio is taken against
BF16_TARGET = 1.25  # bf16 load images/s over the fp32 bare forward pass's, at least (the goal on AVX512_BF16 machines)
SPACES = {"embedding": "PCA embeddings (what search ranks by)", "raw": "raw 2048 features"}


def by_sha(coll: Collection, kind: str) -> tuple[dict[str, np.ndarray], dict[str, str | None]]:
    """sha256 -> vector and sha256 -> label of every row of `kind` of a collection."""
    ids, vectors = coll.read_vectors(kind)
    details = coll.details(ids.tolist())
    sha = [details[i].sha256 for i in ids.tolist()]
    return dict(zip(sha, vectors)), {details[i].sha256: details[i].label for i in ids.tolist()}


def precision_at(neighbours: np.ndarray, labels: list[str | None], p: int) -> float:
    """Mean share of the first p neighbours carrying the query's label, over labelled queries (leave-one-out)."""
    hits = [sum(labels[j] == labels[i] for j in row[:p]) / p for i, row in enumerate(neighbours.tolist()) if labels[i] is not None]
    return float(np.mean(hits))


def compare_space(fp32: Collection, bf16: Collection, kind: str, k: int, p: int, progress: bool) -> dict:
    a, labels_a = by_sha(fp32, kind)
    b, _ = by_sha(bf16, kind)
    common = sorted(a.keys() & b.keys())
    labels = [labels_a[s] for s in common]
    rows, index = np.arange(len(common)), np.arange(len(common))
    va, vb = np.stack([a[s] for s in common]), np.stack([b[s] for s in common])
    na = exact_neighbours(index, va, rows, k, progress=progress)
    nb = exact_neighbours(index, vb, rows, k, progress=progress)
    overlap = np.array([len(set(x) & set(y)) / k for x, y in zip(na.tolist(), nb.tolist())])
    result = {
        "images": len(common), "only_fp32": len(a) - len(common), "only_bf16": len(b) - len(common),
        "overlap_mean": float(overlap.mean()), "overlap_min": float(overlap.min()),
        "all_k_same_share": float((overlap == 1).mean()), "top1_same_share": float((na[:, 0] == nb[:, 0]).mean()),
        "precision_fp32": precision_at(na, labels, p), "precision_bf16": precision_at(nb, labels, p),
    }
    if kind == "raw":
        cos = (va * vb).sum(1) / np.linalg.norm(va, axis=1) / np.linalg.norm(vb, axis=1)
        result |= {"relative_l2": float(np.linalg.norm(va - vb) / np.linalg.norm(va)),
                   "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}
    return result


# --- speed, for bench/ingest.py: each precision's load and forward pass over the baseline's forward pass ----------


def parse_precisions(text: str) -> tuple[str, ...]:
    """'fp32,bf16' -> ('fp32', 'bf16'): bench/ingest.py's --precisions, the first the baseline."""
    chosen = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    if not chosen or set(chosen) - set(PRECISIONS):
        raise click.UsageError(f"--precisions takes a comma-separated list of {', '.join(PRECISIONS)}, got {text!r}")
    return chosen


def over_baseline_forward(runs: dict, base: str) -> dict:
    """precision -> {'load': x, 'forward': x, 'load_per_cpu_second': x, 'forward_per_cpu_second': x}: images/s, and
    images per CPU-second of this process (steadier when other processes take cores), over the baseline precision's
    bare forward pass in the same run."""
    def per_cpu(m: dict) -> float:
        return m["images"] / m["cpu"]["own_cpu_seconds"]

    rate, cpu_rate = runs[base]["forward"]["images_per_second"], per_cpu(runs[base]["forward"])
    return {p: {**{part: run[part]["images_per_second"] / rate for part in ("load", "forward")},
                **{f"{part}_per_cpu_second": per_cpu(run[part]) / cpu_rate for part in ("load", "forward")}}
            for p, run in runs.items()}


def precision_targets(ratios: dict, base: str) -> dict:
    """The bf16 goal (BF16_TARGET), when bf16 ran against another baseline."""
    if "bf16" not in ratios or base == "bf16":
        return {}
    return {"bf16_load_over_forward": {"target": BF16_TARGET, "pass": ratios["bf16"]["load"] >= BF16_TARGET}}


def report_precisions(r: dict) -> None:
    """The other precisions' load and forward pass, each over the baseline's forward pass of the same run."""
    base = r["baseline_precision"]
    for precision, run in r["precisions"].items():
        if precision == base:
            continue
        load, fwd, ratio = run["load"], run["forward"], r["over_baseline_forward"][precision]
        target = r["targets"].get(f"{precision}_load_over_forward")
        verdict_text = f" (target >= {target['target']}x): {'PASS' if target['pass'] else 'FAIL'}" if target else ""
        click.echo(
            f"{precision}:    load {load['images_per_second']:.2f} images/s ({load['seconds']:.1f} s, model {load['model_images_per_second']:.2f} "
            f"images/s inside it, peak RSS {load['peak_rss_mib']:.0f} MiB so far), forward {fwd['images_per_second']:.2f} images/s; "
            f"model built in {run['model_build_seconds']:.1f} s"
        )
        click.echo(f"{precision} forward / {base} forward = {ratio['forward']:.2f}x "
                   f"({ratio['forward_per_cpu_second']:.2f}x per CPU-second of this process)")
        click.echo(f"{precision} load / {base} forward    = {ratio['load']:.2f}x{verdict_text} "
                   f"({ratio['load_per_cpu_second']:.2f}x per CPU-second)")



def report(r: dict) -> None:
    click.echo(f"fp32 {r['fp32']!r} ({r['fp32_precision']}) vs bf16 {r['bf16']!r} ({r['bf16_precision']}), "
               f"k={r['k']}, precision@{r['p']}")
    for kind, s in r["spaces"].items():
        click.echo(f"{SPACES[kind]}: {s['images']} pictures in both ({s['only_fp32']} only fp32, {s['only_bf16']} only bf16)")
        click.echo(f"  {r['k']}-NN overlap mean {s['overlap_mean']:.4f}, min {s['overlap_min']:.2f}; all {r['k']} the same for "
                   f"{s['all_k_same_share']:.1%}; same first neighbour for {s['top1_same_share']:.1%}")
        click.echo(f"  precision@{r['p']}: fp32 {s['precision_fp32']:.4f}, bf16 {s['precision_bf16']:.4f} "
                   f"(bf16 - fp32 = {s['precision_bf16'] - s['precision_fp32']:+.4f})")
        if "relative_l2" in s:
            click.echo(f"  vectors: relative L2 {s['relative_l2']:.2%}, cosine to the fp32 twin min {s['cosine_min']:.6f}, "
                       f"mean {s['cosine_mean']:.6f}")


@click.command()
@click.option("--fp32", "fp32_name", default="caltech101", show_default=True, help="The collection loaded at fp32.")
@click.option("--bf16", "bf16_name", default="caltech101-bf16", show_default=True, help="The same pictures loaded at bf16.")
@click.option("-k", type=click.IntRange(1, 100), default=10, show_default=True, help="Neighbours compared.")
@click.option("-p", type=click.IntRange(1, 100), default=4, show_default=True, help="precision@p.")
@click.option("--database-url", envvar="DATABASE_URL")
@click.option("--json", "as_json", is_flag=True)
def main(fp32_name, bf16_name, k, p, database_url, as_json):
    """Neighbour overlap and precision@p of an fp32 collection and its bf16 twin."""
    if p > k:
        raise click.UsageError(f"-p ({p}) cannot exceed -k ({k})")
    settings, db = open_database(database_url)
    fp32, bf16 = Collection.named(db, settings, fp32_name), Collection.named(db, settings, bf16_name)
    result = {"fp32": fp32.name, "bf16": bf16.name, "fp32_precision": fp32.precision, "bf16_precision": bf16.precision,
              "k": k, "p": p, "spaces": {kind: compare_space(fp32, bf16, kind, k, p, not as_json) for kind in SPACES}}
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        report(result)


if __name__ == "__main__":
    main()
