"""Scale benchmark: one synthetic collection of N clustered vectors (default 1,000,000 x 128-d), every cost
that grows with it timed in one run, each step in its own process so its peak RSS is its own.

    python bench/scale.py [--n 1000000] [--dims 128] [--raw] [--home /tmp/ris-scale] [--json out.json]
    python bench/scale.py --collections 10 --collection-rows 100000 [--n 1000000] [--home /tmp/ris-scale-multi] [--json out.json]

Rows go straight into `images` by binary COPY (no CNN), into collections made through the library (so their
partitions exist), then the tool's own commands and engines run on them: the Annoy build (`ingest index`), the
HNSW build (`ingest index --hnsw`), 100 queries per engine with p50/p95 and recall@10 against numpy brute force
(the baseline every ratio refers to), adding 100 rows the way a load stores a batch and the time until every
engine returns them, `ingest reduce` (with --raw: 2048-d raw features, half precision, for every row),
`search report --sample 2000`, and the Annoy file of a 10-row collection made afterwards. Labels are
`c<cluster mod 100>`, so each holds 1% of the rows (the filtered HNSW query). `--collections N` runs the same
beside N smaller collections in one database, with what that case adds (bench/scale_collections.py).
"""
from __future__ import annotations

import itertools
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
    """One committed chunk by binary COPY, stamped with a new embedding_seq and with a path row per picture, as the
    write path stores a batch; with `raw`, half-precision raw features too (4 KB a row)."""
    from pgvector import HalfVector

    from ingest.store import bump_embedding_seq, raw_cursor

    with db.begin() as conn:
        cur = raw_cursor(conn)
        seq, _, _ = bump_embedding_seq(cur, collection_id)
        cur.execute("CREATE TEMP TABLE bulk (sha256 text, label text, embedding vector, raw halfvec) ON COMMIT DROP")
        features = (HalfVector(f.astype(np.float16)) for f in lifted(vectors)) if raw else itertools.repeat(None)
        with cur.copy("COPY bulk FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["text", "text", "vector", "halfvec"])
            for i, (v, w, f) in enumerate(zip(vectors, which.tolist(), features)):
                copy.write_row((f"{start + i:064x}", f"c{w % 100}", v, f))
        cur.execute(
            "WITH added AS (INSERT INTO images (collection_id, path, label, sha256, width, height, bytes, embedding, embedding_seq)"
            " SELECT %(c)s, '/synthetic/' || sha256 || '.jpg', label, sha256, 224, 224, 20000, embedding, %(s)s FROM bulk"
            " RETURNING id, sha256, path),"
            " paths AS (INSERT INTO image_paths (collection_id, sha256, image_id, path) SELECT %(c)s, sha256, id, path FROM added)"
            " INSERT INTO features (collection_id, sha256, raw) SELECT %(c)s, sha256, raw FROM bulk WHERE raw IS NOT NULL",
            {"c": collection_id, "s": seq},
        )


def insert_old(db, collection_id: int, vectors: np.ndarray, which: np.ndarray, start: int, *, raw: bool) -> None:
    """One committed chunk in the 0006 layout (float32 raw features with `raw`)."""
    from ingest.store import raw_cursor

    with db.begin() as conn:
        cur = raw_cursor(conn)
        cur.execute("CREATE TEMP TABLE bulk (sha256 text, label text, embedding vector, raw vector) ON COMMIT DROP")
        features = lifted(vectors) if raw else itertools.repeat(None)
        with cur.copy("COPY bulk FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["text", "text", "vector", "vector"])
            for i, (v, w, f) in enumerate(zip(vectors, which.tolist(), features)):
                copy.write_row((f"{start + i:064x}", f"c{w % 100}", v, f))
        cur.execute(
            "WITH added AS (INSERT INTO images (collection_id, path, label, sha256, width, height, bytes, embedding, embedding_seq)"
            " SELECT %(c)s, '/synthetic/' || sha256 || '.jpg', label, sha256, 224, 224, 20000, embedding, 1 FROM bulk"
            " RETURNING id, sha256, path),"
            " paths AS (INSERT INTO image_paths (image_id, collection_id, path) SELECT id, %(c)s, path FROM added)"
            " INSERT INTO features (image_id, raw) SELECT a.id, b.raw FROM added a JOIN bulk b USING (sha256) WHERE b.raw IS NOT NULL",
            {"c": collection_id},
        )


def make_collection(db, name: str, n: int, dims: int, clusters: int, *, raw: bool, seed: int = 0) -> None:
    """A collection made as the library makes one (its partitions with it), with a fitted (random orthonormal) PCA,
    then n rows in committed chunks. Without `raw` it keeps no raw features, as `--raw-features none` does."""
    from ingest import store
    from ingest.partitions import TABLES, partition
    from ingest.reduce import Pca

    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(2048, dims)))
    pca = Pca(np.zeros(2048, np.float32), q.T.astype(np.float32), np.full(dims, 1 / dims, np.float32))
    row = store.create_row(db, name, "synthetic", "0" * 64, dims, raw_features="half" if raw else "none")
    with db.begin() as conn:
        cur = store.raw_cursor(conn)
        cur.execute("UPDATE collections SET pca_mean = %s, pca_components = %s, pca_explained_variance = %s, pca_version = 1"
                    " WHERE id = %s", (*pca.to_bytes(), row.id))
    vectors, which = clustered(n, dims, clusters, seed)
    for start in range(0, n, CHUNK):
        insert(db, row.id, vectors[start:start + CHUNK], which[start:start + CHUNK], start, raw=raw)
    with db.begin() as conn:  # fresh statistics of its partitions, as autovacuum would give them after a while
        conn.execute(sa.text("ANALYZE " + ", ".join(partition(t, row.id) for t in TABLES)))


# --- the steps (each runs in a child process) ----------------------------------------------------------


def open_collection(name: str = NAME, home: str | None = None):
    """A collection of the RIS_HOME the step runs in, or of another `home` (a second embedded server)."""
    from ingest.collection import Collection
    from ingest.config import Settings
    from ingest.db import connect

    settings = Settings.load(home=home)
    return Collection.named(connect(settings), settings, name)


def step_insert(args: dict) -> dict:
    from ingest.options import open_database

    _, db = open_database(None)
    make_collection(db, args.get("name", NAME), args["n"], args["dims"], args["clusters"], raw=args["raw"], seed=args.get("seed", 0))
    return {"rows": args["n"]}


def timed(fn, qs) -> tuple[list, np.ndarray]:
    answers, ms = [], []
    for q in qs:
        t = time.perf_counter()
        answers.append(fn(q))
        ms.append((time.perf_counter() - t) * 1000)
    return answers, np.array(ms)


def sampled_queries(coll, n: int, seed: int = 5) -> np.ndarray:
    """n stored vectors plus noise, read by id (not the whole collection)."""
    rng = np.random.default_rng(seed)
    _, vectors = coll.vectors_of("embedding", rng.choice(coll.image_ids("embedding"), n, replace=False))
    return vectors + 0.05 * rng.normal(size=vectors.shape).astype(np.float32)


def percentiles(ms: list[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2), "queries": len(ms)}


def workload(coll) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
    """The queries every engine answers (100 stored vectors plus noise, seeded: the same in every step and run), their
    true k nearest by numpy brute force over every vector of the collection, and that baseline's time per query."""
    ids, vectors = coll.read_vectors("embedding")
    rng = np.random.default_rng(5)
    qs = vectors[rng.choice(len(ids), QUERIES, replace=False)] + 0.05 * rng.normal(size=(QUERIES, coll.dims)).astype(np.float32)
    norms = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)  # |v|^2 - 2 v.q ranks as |v - q|^2, without an n x d temporary

    def brute(q):
        d = norms - 2 * (vectors @ q)
        top = np.argpartition(d, K)[:K]
        return ids[top[np.argsort(d[top])]].tolist()

    truth, brute_ms = timed(brute, qs)
    return qs, truth, brute_ms


def engine_rows(coll, engines: dict[str, dict], qs: np.ndarray, truth: list[list[int]], brute_ms: np.ndarray) -> list[dict]:
    """p50/p95 and recall@10 of each engine (name -> `Collection.similar` keywords), each opened before its timing."""
    return compared_rows({"": (coll, truth)}, engines, qs, brute_ms)[""]


def compared_rows(sides: dict[str, tuple], engines: dict[str, dict], qs: np.ndarray, brute_ms: np.ndarray, *,
                  rounds: int = 1) -> dict[str, list[dict]]:
    """`engine_rows` of several collections (label -> (collection, truth)) asked the same queries, their rounds
    interleaved so that whatever a shared machine did meanwhile slowed each alike. Of several rounds the one with the
    lowest p50 counts (as timeit takes the least disturbed run)."""
    runs: dict[tuple[str, str], list] = {(side, name): [] for side in sides for name in engines}
    for (coll, _), opts in itertools.product(sides.values(), engines.values()):
        coll.similar(qs[0], K, **opts)  # open the engine (Annoy mmap, HNSW check) outside the timing
    for _, (name, opts), (side, (coll, _)) in itertools.product(range(rounds), engines.items(), sides.items()):
        runs[side, name].append(timed(lambda q: [h.id for h in coll.similar(q, K, **opts)], qs))
    out = {}
    for side, (_, truth) in sides.items():
        out[side] = [summary("numpy brute force (baseline)", brute_ms, 1.0, brute_ms)]
        for name in engines:
            found, ms = min(runs[side, name], key=lambda run: np.percentile(run[1], 50))
            out[side].append(summary(name, ms, recall(found, truth), brute_ms))
            if rounds > 1:
                out[side][-1]["p50_ms_of_rounds"] = [round(float(np.percentile(run[1], 50)), 3) for run in runs[side, name]]
    return out


def step_queries(args: dict) -> dict:
    """p50/p95 and recall@10 of every engine on the same queries, and the hnsw query filtered by a label of 1% of the
    rows (answered exactly when the planner expects few enough rows: which engine answered is reported)."""
    from ingest.engines import EngineName
    from ingest.filters import Filter

    coll = open_collection(args.get("name", NAME))
    qs, truth, brute_ms = workload(coll)
    engines = {"pgvector exact (SQL)": dict(engine=EngineName.PGVECTOR), "annoy (file + delta + rows)": dict(engine=EngineName.ANNOY)}
    engines |= {f"hnsw ef_search={ef}": dict(engine=EngineName.HNSW, ef_search=ef) for ef in args["ef"]}
    rows = engine_rows(coll, engines, qs, truth, brute_ms)
    label = "c7"
    coll.similar(qs[0], K, engine=EngineName.HNSW, label=label)
    found, ms = timed(lambda q: coll.similar(q, K, engine=EngineName.HNSW, label=label, ef_search=args["ef"][-1]), qs)
    filtered = summary(f"hnsw label={label} (1% of rows)", ms, None, brute_ms)
    filtered["queries_with_k_results"] = sum(len(f) == K and all(h.label == label for h in f) for f in found)
    filtered["answered_by"] = coll.searcher_for(Filter.of(label), EngineName.HNSW).name.value
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

    coll = open_collection(args.get("name", NAME))
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
    """(seconds, peak RSS MiB, JSON printed: the whole output or its last line) of one step in its own process."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read().strip()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise click.ClickException(f"{' '.join(argv[:4])} failed: {out[-300:]}")
    last = out.splitlines()[-1] if out else ""
    found = out if out.startswith("{") else last if last.startswith("{") else None
    return seconds, usage.ru_maxrss / 1024, json.loads(found) if found else None


def run_step(title: str, argv: list[str], env: dict, results: dict, log: Path | None = None) -> dict | None:
    """Run one step, add its figures (time, peak RSS, cores others kept busy meanwhile, load average, what it printed)
    to `results` (and a line of `log`, so a run cut short keeps them), print them and return them; a failed step is
    recorded (None) and the run goes on."""
    watch = CpuWatch()
    try:
        seconds, rss, out = run_child(argv, env)
    except click.ClickException as e:
        results["steps"].append({"step": title, "error": e.message})
        click.echo(f"{title:44} FAILED: {e.message}", err=True)
        return None
    entry = {"step": title, "seconds": round(seconds, 1), "peak_rss_mib": round(rss), "result": out,
             "other_cores_busy": round(watch.cores()["other_cores"], 2), "load_average": round(os.getloadavg()[0], 2)}
    results["steps"].append(entry)
    if log:
        with log.open("a") as f:
            f.write(json.dumps(entry) + "\n")
    shown = json.dumps(out) if out else ""
    click.echo(f"{title:44} {seconds:8.1f} s  peak RSS {rss:7.0f} MiB  load {entry['load_average']:5.2f}  "
               + (shown if len(shown) < 300 else shown[:300] + "..."))
    return entry


def one_collection_plan(home: Path, args: dict, trees: int) -> list[tuple[str, list[str]]]:
    """The steps of the one-collection case, on the collection args["name"]."""
    me, name, ingest = [sys.executable, __file__], args["name"], str(BIN / "ingest")
    step = lambda s: me + ["--step", s, "--args", json.dumps(args)]  # noqa: E731
    plan = [
        ("insert rows (COPY)", step("insert")),
        (f"ingest index (Annoy, {trees} trees)", [ingest, "index", "-c", name, "--trees", str(trees)]),
        ("ingest index --hnsw", [ingest, "index", "-c", name, "--no-annoy", "--hnsw"]),
        ("queries (100 per engine)", step("queries")),
        ("add 100 rows + load's finish", step("add")),
        ("search report --sample 2000", [str(BIN / "search"), "report", "-c", name, "--sample", "2000", "--out", str(home / "report")]),
        ("10-row collection's Annoy file", step("tiny")),
    ]
    if args["raw"]:
        plan.insert(5, ("ingest reduce --pca-dims 64", [ingest, "reduce", "-c", name, "--pca-dims", "64"]))
    return plan


@click.command()
@click.option("--n", default=1_000_000, show_default=True, help="Rows of the big collection.")
@click.option("--dims", default=128, show_default=True)
@click.option("--clusters", default=1000, show_default=True)
@click.option("--raw", is_flag=True, help="Store 2048-d raw features in the big collection too (4 KB a row), so `ingest reduce` runs.")
@click.option("--trees", default=100, show_default=True)
@click.option("--collections", default=0, show_default=True,
              help="The many-collections case: this many collections of --collection-rows beside the big one (bench/scale_collections.py).")
@click.option("--collection-rows", default=100_000, show_default=True)
@click.option("--home", type=click.Path(path_type=Path), help="RIS_HOME to use (default: a new temporary one).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the figures here.")
@click.option("--step", hidden=True)
@click.option("--args", "step_args", hidden=True)
def main(n, dims, clusters, raw, trees, collections, collection_rows, home, json_out, step, step_args):
    from bench import scale_collections

    if step:
        print(json.dumps((STEPS | scale_collections.STEPS)[step](json.loads(step_args))))
        return
    home = home or Path(tempfile.mkdtemp(prefix="ris-scale-"))
    env = {**os.environ, "RIS_HOME": str(home)}
    env.pop("DATABASE_URL", None)
    args = {"name": NAME, "n": n, "dims": dims, "clusters": clusters, "raw": raw, "ef": [40, 200, 800]}
    results = {"n": n, "dims": dims, "clusters": clusters, "raw": raw, "machine": cpu_model(), "cores": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d"), "steps": []}
    if collections:
        scale_collections.run(home, env, args, trees, collections, collection_rows, results)
    else:
        for title, argv in one_collection_plan(home, args, trees):
            run_step(title, argv, env, results)
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
                           + (f"  ({e['queries_with_k_results']}/{QUERIES} with k rows, by {e['answered_by']})"
                              if "queries_with_k_results" in e else ""))


if __name__ == "__main__":
    main()
