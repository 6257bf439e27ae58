"""Scale benchmark: one synthetic collection of N clustered vectors (default 1,000,000 x 128-d), every cost
that grows with it timed in one run, each step in its own process so its peak RSS is its own.

    python bench/scale.py [--n 1000000] [--dims 128] [--raw] [--home /tmp/ris-scale] [--json out.json]

Rows go straight into `images` (no CNN), then the tool's own commands and engines run on them: the Annoy
build (`ingest index`), the HNSW build (`ingest index --hnsw`), 100 queries per engine with p50/p95 and
recall@10 against numpy brute force (the baseline every ratio refers to), adding 100 rows the way a load
stores a batch and the time until every engine returns them, `ingest reduce` (with --raw: 2048-d raw
features for every row), `search report --sample 2000`, and the Annoy file of a 10-row collection made
afterwards. Labels are `c<cluster mod 100>`, so each holds 1% of the rows (the filtered HNSW query).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import CpuWatch, cpu_model  # noqa: E402

K = 10
QUERIES = 100
CHUNK = 50_000
NAME = "scale"
BIN = Path(sys.executable).parent


# --- the data ------------------------------------------------------------------------------------------


def clustered(n: int, dims: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n points around `clusters` random centres, and the cluster of each: seeded, so every step agrees."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dims)).astype(np.float32)
    which = rng.integers(0, clusters, n)
    return (centres[which] + 0.35 * rng.normal(size=(n, dims))).astype(np.float32), which


def lifted(embeddings: np.ndarray, seed: int = 1) -> np.ndarray:
    """2048-d non-negative 'raw features' whose principal subspace holds the embeddings (for `ingest reduce`)."""
    rotation = np.random.default_rng(seed).normal(size=(embeddings.shape[1], 2048)).astype(np.float32) / 8
    return np.maximum(embeddings @ rotation + 1.0, 0)


def insert(db, collection_id: int, vectors: np.ndarray, which: np.ndarray, start: int, *, raw: bool) -> None:
    """One committed chunk by binary COPY, stamped with a new embedding_seq as the write path does."""
    from ingest.store import bump_embedding_seq, raw_cursor

    with db.begin() as conn:
        cur = raw_cursor(conn)
        seq, _ = bump_embedding_seq(cur, collection_id)
        cur.execute("CREATE TEMP TABLE bulk (sha256 text, label text, embedding vector, raw vector) ON COMMIT DROP")
        features = lifted(vectors) if raw else [None] * len(vectors)
        with cur.copy("COPY bulk FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["text", "text", "vector", "vector"])
            for i, (v, w, f) in enumerate(zip(vectors, which.tolist(), features)):
                copy.write_row((f"{start + i:064x}", f"c{w % 100}", v, f))
        cur.execute(
            "WITH added AS (INSERT INTO images (collection_id, path, label, sha256, width, height, bytes, embedding, embedding_seq)"
            " SELECT %(c)s, '/synthetic/' || sha256 || '.jpg', label, sha256, 224, 224, 20000, embedding, %(s)s FROM bulk"
            " RETURNING id, sha256)"
            " INSERT INTO features (image_id, raw) SELECT a.id, b.raw FROM added a JOIN bulk b USING (sha256) WHERE b.raw IS NOT NULL",
            {"c": collection_id, "s": seq},
        )


def make_collection(db, name: str, n: int, dims: int, clusters: int, *, raw: bool, seed: int = 0) -> None:
    """A collection with a fitted (random orthonormal) PCA, then n rows in committed chunks."""
    from ingest import store
    from ingest.reduce import Pca

    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(2048, dims)))
    pca = Pca(np.zeros(2048, np.float32), q.T.astype(np.float32), np.full(dims, 1 / dims, np.float32))
    row = store.create_row(db, name, "synthetic", "0" * 64, dims)
    with db.begin() as conn:
        cur = store.raw_cursor(conn)
        cur.execute("UPDATE collections SET pca_mean = %s, pca_components = %s, pca_explained_variance = %s, pca_version = 1"
                    " WHERE id = %s", (*pca.to_bytes(), row.id))
    vectors, which = clustered(n, dims, clusters, seed)
    for start in range(0, n, CHUNK):
        insert(db, row.id, vectors[start:start + CHUNK], which[start:start + CHUNK], start, raw=raw)
    with db.begin() as conn:  # fresh statistics, as autovacuum would give them after a while
        conn.execute(sa.text("ANALYZE images"))


# --- the steps (each runs in a child process) ----------------------------------------------------------


def open_collection(name: str = NAME):
    from ingest.collection import Collection
    from ingest.options import open_database

    settings, db = open_database(None)
    return Collection.named(db, settings, name)


def step_insert(args: dict) -> dict:
    from ingest.options import open_database

    _, db = open_database(None)
    make_collection(db, NAME, args["n"], args["dims"], args["clusters"], raw=args["raw"])
    return {"rows": args["n"]}


def timed(fn, qs) -> tuple[list, np.ndarray]:
    answers, ms = [], []
    for q in qs:
        t = time.perf_counter()
        answers.append(fn(q))
        ms.append((time.perf_counter() - t) * 1000)
    return answers, np.array(ms)


def step_queries(args: dict) -> dict:
    """p50/p95 and recall@10 of every engine on the same queries (stored vectors plus noise)."""
    coll = open_collection()
    ids, vectors = coll.read_vectors("embedding")
    rng = np.random.default_rng(5)
    qs = vectors[rng.choice(len(ids), QUERIES, replace=False)] + 0.05 * rng.normal(size=(QUERIES, coll.dims)).astype(np.float32)
    norms = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)  # |v|^2 - 2 v.q ranks as |v - q|^2, without an n x d temporary

    def brute(q):
        d = norms - 2 * (vectors @ q)
        top = np.argpartition(d, K)[:K]
        return ids[top[np.argsort(d[top])]].tolist()

    from ingest.engines import EngineName

    truth, brute_ms = timed(brute, qs)
    engines = {"pgvector exact (SQL)": dict(engine=EngineName.PGVECTOR), "annoy (file + delta + rows)": dict(engine=EngineName.ANNOY)}
    engines |= {f"hnsw ef_search={ef}": dict(engine=EngineName.HNSW, ef_search=ef) for ef in args["ef"]}
    rows = [summary("numpy brute force (baseline)", brute_ms, 1.0, brute_ms)]
    for name, opts in engines.items():
        coll.similar(qs[0], K, **opts)  # open the engine (Annoy mmap, HNSW check) outside the timing
        found, ms = timed(lambda q: [h.id for h in coll.similar(q, K, **opts)], qs)
        rows.append(summary(name, ms, recall(found, truth), brute_ms))
    label = "c7"
    found, ms = timed(lambda q: coll.similar(q, K, engine=EngineName.HNSW, label=label, ef_search=args["ef"][-1]), qs)
    filtered = summary(f"hnsw label={label} (1% of rows)", ms, None, brute_ms)
    filtered["queries_with_k_results"] = sum(len(f) == K and all(h.label == label for h in f) for f in found)
    return {"engines": rows + [filtered]}


def summary(name: str, ms: np.ndarray, rec: float | None, baseline: np.ndarray) -> dict:
    p50 = float(np.percentile(ms, 50))
    return {"engine": name, "p50_ms": round(p50, 3), "p95_ms": round(float(np.percentile(ms, 95)), 3),
            "recall@10": None if rec is None else round(rec, 4), "vs_brute_p50": round(float(np.percentile(baseline, 50)) / p50, 1)}


def recall(found: list[list[int]], truth: list[list[int]]) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def step_add(args: dict) -> dict:
    """Store 100 rows as a load's batch does, run the load's end (`finish`), and time until annoy and hnsw
    both return every new row for its own vector."""
    from ingest import store
    from ingest.engines import EngineName

    coll = open_collection()
    vectors, _ = clustered(100, coll.dims, 1, seed=99)
    vectors += 4.0
    raw = lifted(vectors)
    rows = [store.ImageRow(f"/synthetic/new-{i}.jpg", "new", f"new{i:061d}", 224, 224, 20000) for i in range(100)]
    started = time.perf_counter()
    store.insert_images(coll.db, coll.id, rows, raw, vectors, pca_version=coll.row.pca_version)
    coll.finish()
    coll.reload()
    waited = {}
    for engine in (EngineName.ANNOY, EngineName.HNSW):
        while not all(coll.similar(v, 1, engine=engine)[0].label == "new" for v in vectors):
            time.sleep(0.1)
        waited[engine] = round(time.perf_counter() - started, 2)
    _, ms = timed(lambda q: coll.similar(q, K, engine=EngineName.ANNOY), vectors[:50])
    sidecar = coll.sidecar()
    return {"searchable_after_s": waited, "annoy_items": sidecar.items, "annoy_delta": coll.index_delta(10**6),
            "annoy_p50_ms_with_delta": round(float(np.percentile(ms, 50)), 3)}


def step_tiny(args: dict) -> dict:
    """A 10-row collection made after the big one: its Annoy file follows its own rows."""
    from ingest.options import open_database

    settings, db = open_database(None)
    make_collection(db, "tiny", 10, 8, 2, raw=False)
    coll = open_collection("tiny")
    sidecar = coll.build_index()
    return {"items": sidecar.items, "file_bytes": (settings.annoy_dir / sidecar.file).stat().st_size}


STEPS = {"insert": step_insert, "queries": step_queries, "add": step_add, "tiny": step_tiny}


# --- the driver ----------------------------------------------------------------------------------------


def run_child(argv: list[str], env: dict) -> tuple[float, float, dict | None]:
    """(seconds, peak RSS MiB, JSON printed on the last line) of one step in its own process."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise click.ClickException(f"{' '.join(argv[:4])} failed: {out.strip()[-300:]}")
    last = out.strip().splitlines()[-1] if out.strip() else ""
    return seconds, usage.ru_maxrss / 1024, json.loads(last) if last.startswith("{") else None


@click.command()
@click.option("--n", default=1_000_000, show_default=True)
@click.option("--dims", default=128, show_default=True)
@click.option("--clusters", default=1000, show_default=True)
@click.option("--raw", is_flag=True, help="Store 2048-d raw features too (8 KB a row), so `ingest reduce` runs.")
@click.option("--trees", default=100, show_default=True)
@click.option("--home", type=click.Path(path_type=Path), help="RIS_HOME to use (default: a new temporary one).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the figures here.")
@click.option("--step", type=click.Choice(list(STEPS)), hidden=True)
@click.option("--args", "step_args", hidden=True)
def main(n, dims, clusters, raw, trees, home, json_out, step, step_args):
    if step:
        print(json.dumps(STEPS[step](json.loads(step_args))))
        return
    home = home or Path(tempfile.mkdtemp(prefix="ris-scale-"))
    env = {**os.environ, "RIS_HOME": str(home)}
    env.pop("DATABASE_URL", None)
    args = json.dumps({"n": n, "dims": dims, "clusters": clusters, "raw": raw, "ef": [40, 200, 800]})
    me = [sys.executable, __file__]
    plan = [
        ("insert rows (COPY)", me + ["--step", "insert", "--args", args]),
        (f"ingest index (Annoy, {trees} trees)", [str(BIN / "ingest"), "index", "-c", NAME, "--trees", str(trees)]),
        ("ingest index --hnsw", [str(BIN / "ingest"), "index", "-c", NAME, "--no-annoy", "--hnsw"]),
        ("queries (100 per engine)", me + ["--step", "queries", "--args", args]),
        ("add 100 rows + load's finish", me + ["--step", "add", "--args", args]),
        ("search report --sample 2000", [str(BIN / "search"), "report", "-c", NAME, "--sample", "2000", "--out", str(home / "report")]),
        ("10-row collection's Annoy file", me + ["--step", "tiny", "--args", args]),
    ]
    if raw:
        plan.insert(5, ("ingest reduce --pca-dims 64", [str(BIN / "ingest"), "reduce", "-c", NAME, "--pca-dims", "64"]))
    results = {"n": n, "dims": dims, "clusters": clusters, "raw": raw, "machine": cpu_model(), "cores": os.cpu_count(), "steps": []}
    for title, argv in plan:
        watch = CpuWatch()
        try:
            seconds, rss, out = run_child(argv, env)
        except click.ClickException as e:
            results["steps"].append({"step": title, "error": e.message})
            click.echo(f"{title:38} FAILED: {e.message}", err=True)
            continue
        cores = watch.cores()
        results["steps"].append({"step": title, "seconds": round(seconds, 1), "peak_rss_mib": round(rss), "result": out,
                                 "other_cores_busy": round(cores["other_cores"], 2)})
        click.echo(f"{title:38} {seconds:8.1f} s  peak RSS {rss:7.0f} MiB  {json.dumps(out) if out else ''}")
    print_engines(results)
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))


def print_engines(results: dict) -> None:
    for step in results["steps"]:
        if step.get("result") and "engines" in step["result"]:
            click.echo(f"\n{'engine':40} {'p50 ms':>8} {'p95 ms':>8} {'recall@10':>10} {'x brute p50':>12}")
            for e in step["result"]["engines"]:
                rec = "" if e["recall@10"] is None else f"{e['recall@10']:.3f}"
                click.echo(f"{e['engine']:40} {e['p50_ms']:8.2f} {e['p95_ms']:8.2f} {rec:>10} {e['vs_brute_p50']:12.1f}"
                           + (f"  ({e['queries_with_k_results']}/{QUERIES} with k rows)" if "queries_with_k_results" in e else ""))


if __name__ == "__main__":
    main()
