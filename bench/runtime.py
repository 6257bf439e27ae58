"""Does OpenVINO answer as TensorFlow did? Caltech 101 loaded three ways, compared picture by picture.

    python -m bench.runtime --limit-per-class 10 [--ris-home H] [--json]

  default     `ingest load` as it runs now: OpenVINO at the precision `auto` picks (bf16 where the processor offers it)
  fp32        OpenVINO with --precision fp32
  tensorflow  TensorFlow at fp32, as every collection was made before OpenVINO ran the model
Each is a collection of its own (own PCA), as a user would have it. Checks, in the PCA space searches rank by:
each picture's 10 exact neighbours overlap by >= 97% between default and fp32, and the leave-one-out
precision@4 of default and of fp32 is within 0.005 of TensorFlow's. The raw 2048 features are compared too
(with the cosine of each picture's two vectors). Collections already in a kept --ris-home are reused, not loaded again.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: bench/ is then sys.path[0] and this file would shadow the ingest package
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import json

import click

from bench.ingest import DEFAULT_SOURCE, bench_database, bench_home, caltech_candidates
from bench.precision import compare_space
from ingest.collection import Collection
from ingest.config import Settings
from ingest.errors import RisError
from ingest.load import DEFAULT_PCA_DIMS, load_collection
from ingest.precision import choose, hardware

OVERLAP_TARGET = 0.97  # mean share of the 10 exact neighbours default and fp32 have in common, at least
PRECISION_TOLERANCE = 0.005  # |precision@4 - TensorFlow's|, at most
K, P = 10, 4


def extractors(weights: str, models_dir: Path) -> dict:
    """The three ways a collection is embedded here, keyed by the suffix of its collection's name."""
    from ingest.features import FeatureExtractor, build_extractor

    precision = choose("auto", None, hardware())
    return {"default": lambda: build_extractor(weights, precision, "openvino", models_dir=models_dir),
            "fp32": lambda: build_extractor(weights, "fp32", "openvino", models_dir=models_dir),
            "tensorflow": lambda: FeatureExtractor(weights, "fp32")}


def loaded(db, settings: Settings, prefix: str, weights: str, candidates: list, skipped: int, progress: bool) -> dict:
    """name suffix -> Collection, each loaded unless it exists already."""
    existing = {c.name for c in Collection.all(db, settings)}
    out = {}
    for suffix, make in extractors(weights, settings.models_dir).items():
        name = f"{prefix}-{suffix}"
        if name not in existing:
            load_collection(db, settings, name, candidates, make(), pca_dims=min(DEFAULT_PCA_DIMS, len(candidates)),
                            skipped=skipped, progress=progress)
        out[suffix] = Collection.named(db, settings, name)
    return out


def pair(a: Collection, b: Collection, kind: str, progress: bool) -> dict:
    """bench/precision.py's comparison of two collections of the same pictures, named for what they are here."""
    s = compare_space(a, b, kind, K, P, progress)
    renamed = {"precision_fp32": f"precision_{a.name}", "precision_bf16": f"precision_{b.name}"}
    return {renamed.get(key, key): value for key, value in s.items()}


def run(source, ris_home, prefix, weights, limit_per_class, progress) -> dict:
    with bench_home(ris_home) as home:
        settings = Settings.load(home=home)
        with bench_database(settings) as db:
            candidates, skipped = caltech_candidates(source, settings, limit_per_class)
            colls = loaded(db, settings, prefix, weights, candidates, skipped, progress)
            names = {suffix: c.name for suffix, c in colls.items()}
            result = {"collections": {s: {"name": c.name, "runtime": c.runtime, "precision": c.precision} for s, c in colls.items()},
                      "limit_per_class": limit_per_class, "weights": weights, "k": K, "p": P, "spaces": {}}
            for kind in ("embedding", "raw"):
                result["spaces"][kind] = {"default_vs_fp32": pair(colls["default"], colls["fp32"], kind, progress),
                                          "default_vs_tensorflow": pair(colls["default"], colls["tensorflow"], kind, progress),
                                          "fp32_vs_tensorflow": pair(colls["fp32"], colls["tensorflow"], kind, progress)}
    pca = result["spaces"]["embedding"]
    tf = pca["default_vs_tensorflow"][f"precision_{names['tensorflow']}"]
    result["precision_at_p"] = {"tensorflow": tf, "default": pca["default_vs_tensorflow"][f"precision_{names['default']}"],
                                "fp32": pca["fp32_vs_tensorflow"][f"precision_{names['fp32']}"]}
    overlap = pca["default_vs_fp32"]["overlap_mean"]
    result["targets"] = {
        "overlap_default_fp32": {"value": overlap, "target": OVERLAP_TARGET, "pass": overlap >= OVERLAP_TARGET},
        **{f"precision_{s}_vs_tensorflow": {"value": result["precision_at_p"][s] - tf, "target": PRECISION_TOLERANCE,
                                            "pass": abs(result["precision_at_p"][s] - tf) <= PRECISION_TOLERANCE}
           for s in ("default", "fp32")},
    }
    return result


def report(r: dict) -> None:
    c = r["collections"]
    click.echo(f"collections: " + ", ".join(f"{v['name']} ({v['runtime']} {v['precision']})" for v in c.values())
               + f"; weights {r['weights']}" + (f", {r['limit_per_class']} per class" if r["limit_per_class"] else ""))
    for kind, pairs in r["spaces"].items():
        click.echo(f"{'PCA embeddings (what search ranks by)' if kind == 'embedding' else 'raw 2048 features'}:")
        for what, s in pairs.items():
            cosine = f", cosine of each picture's vectors min {s['cosine_min']:.6f}" if "cosine_min" in s else ""
            click.echo(f"  {what.replace('_', ' ')}: {s['images']} pictures, {r['k']}-NN overlap mean {s['overlap_mean']:.4f} "
                       f"(min {s['overlap_min']:.2f}), same first neighbour {s['top1_same_share']:.1%}{cosine}")
    p = r["precision_at_p"]
    click.echo(f"precision@{r['p']} (PCA, leave-one-out): tensorflow {p['tensorflow']:.4f}, default {p['default']:.4f}, fp32 {p['fp32']:.4f}")
    for name, t in r["targets"].items():
        bound = f">= {t['target']}" if name.startswith("overlap") else f"within {t['target']}"
        click.echo(f"{name.replace('_', ' ')}: {t['value']:+.4f} ({bound}): {'PASS' if t['pass'] else 'FAIL'}")


@click.command()
@click.option("--source", type=click.Path(path_type=Path), default=DEFAULT_SOURCE, show_default=True,
              help="Caltech 101: 101_ObjectCategories.tar.gz, caltech-101.zip, or the extracted folder.")
@click.option("--ris-home", type=click.Path(path_type=Path), help="Load into this RIS_HOME (kept; existing collections reused). "
                                                                  "Default: a fresh temporary one, removed after.")
@click.option("--prefix", default="runtime", show_default=True, help="Collections are PREFIX-default, PREFIX-fp32, PREFIX-tensorflow.")
@click.option("--weights", default="random", show_default=True, metavar="imagenet|random|PATH")
@click.option("--limit-per-class", type=click.IntRange(1), metavar="N", help="At most N images per class (quick runs).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for programs.")
def main(source, ris_home, prefix, weights, limit_per_class, as_json):
    """OpenVINO's neighbours and precision@4 on Caltech 101 against TensorFlow's, with PASS/FAIL.

    Example: python -m bench.runtime --limit-per-class 10
    """
    try:
        result = run(source, ris_home, prefix, weights, limit_per_class, not as_json)
    except RisError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(result, indent=2)) if as_json else report(result)


if __name__ == "__main__":
    main()
