"""The many-collections case of bench/scale.py (`--collections N`): one database holding N collections of
`--collection-rows` vectors (default ten of 100,000) and the big one (`--n`, default 1,000,000), each in partitions of
its own made through the library; rows by binary COPY, embeddings only (the second small collection keeps half-precision
raw features, for their size). What it adds to the one-collection figures, which it gives for the big collection:
- the first small collection's engines (pgvector exact, annoy, hnsw; best of three rounds of 100 queries) measured
  alone (the only collection), then beside the others, and at that time also the same rows alone in a database of their
  own, the rounds interleaved: the same-time ratio is the one a shared machine leaves fair (bar: exact within 1.2x);
- the big collection's label filter of 1% of the rows on hnsw (answered exactly when the planner expects few rows:
  bar 20 ms p50, k rows every time), and its exact search with the server's parallel workers against one process,
  the same queries interleaved (bar: 0.6x), with the plans and the settings the planner weighed;
- the partitions' sizes per million rows: heap, TOAST, b-tree and HNSW indexes, paths, raw features;
- `ingest remove` of the big collection, and searches in a small one while it runs;
- `ingest db upgrade` from revision 0006 (the one-table layout): the big collection's rows without raw features, and a
  small one's with float32 raw features, each in a database of its own (RIS_HOMEs inside --home);
- a projection to 10M rows: sizes linear, each query time growing from 1M to 10M as it grew from 100k to 1M.
"""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import sqlalchemy as sa

from bench.machine import CpuWatch
from bench.scale import (BIN, CHUNK, K, QUERIES, clustered, compared_rows, insert_old, make_collection, one_collection_plan,
                         open_collection, percentiles, run_step, sampled_queries, workload)

PROBE = "coll00"  # the small collection measured alone, then beside the others
PROBE_ROUNDS = 3  # rounds of its queries per engine; the least disturbed counts (bench.scale.engine_rows)
EXACT_BESIDE_BAR = 1.2
FILTERED_P50_BAR_MS = 20.0
PARALLEL_BAR = 0.6
ONE_PROCESS = "-c max_parallel_workers_per_gather=0"
PLANNER_SETTINGS = ("max_parallel_workers_per_gather", "max_parallel_workers", "max_worker_processes",
                    "min_parallel_table_scan_size", "parallel_setup_cost", "parallel_tuple_cost", "cpu_operator_cost",
                    "shared_buffers", "work_mem")


def clusters_for(rows: int) -> int:
    """About 1,000 points a cluster, as in the big collection (each label still holds 1% of the rows)."""
    return max(100, rows // 1000)


# --- the steps (each runs in a child process, as in bench/scale.py) --------------------------------------------------


def step_make(args: dict) -> dict:
    """A small collection, made and filled as the big one is, with an Annoy file as a load's end leaves it."""
    from ingest.options import open_database

    _, db = open_database(None)
    started = time.perf_counter()
    make_collection(db, args["name"], args["n"], args["dims"], clusters_for(args["n"]), raw=args["raw"], seed=args["seed"])
    out = {"rows": args["n"], "insert_s": round(time.perf_counter() - started, 1)}
    started = time.perf_counter()
    open_collection(args["name"]).build_index(args["trees"])
    return out | {"annoy_s": round(time.perf_counter() - started, 1)}


def step_probe(args: dict) -> dict:
    """Every engine on the probe collection: the same queries and truth whenever it runs (bench.scale.workload); with
    `control` (a RIS_HOME holding the same collection alone), that one too, the rounds of both interleaved."""
    from ingest.engines import EngineName
    from ingest.hnsw_engine import DEFAULT_EF_SEARCH

    coll = open_collection(PROBE)
    qs, truth, brute_ms = workload(coll)
    sides = {"measured": (coll, truth)}
    if args.get("control"):
        control = open_collection(PROBE, args["control"])
        control_qs, control_truth, _ = workload(control)
        assert np.array_equal(qs, control_qs), "the control collection must hold the same rows"
        sides["control"] = (control, control_truth)
    engines = {"pgvector exact (SQL)": dict(engine=EngineName.PGVECTOR), "annoy (file + delta + rows)": dict(engine=EngineName.ANNOY),
               f"hnsw ef_search={DEFAULT_EF_SEARCH}": dict(engine=EngineName.HNSW)}
    watch = CpuWatch()
    rows = compared_rows(sides, engines, qs, brute_ms, rounds=PROBE_ROUNDS)
    with coll.db.connect() as conn:
        count = conn.execute(sa.text("SELECT count(*) FROM collections")).scalar()
        stored = conn.execute(sa.text("SELECT sum(reltuples)::bigint FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid"
                                      " WHERE i.inhparent = 'images'::regclass")).scalar()
    return {"phase": args["phase"], "collections": count, "rows_in_database": stored, "engines": rows["measured"],
            "control": rows.get("control"), "cores": {k: round(v, 2) for k, v in watch.cores().items()},
            "exact_plan": exact_plans(coll, qs[0])["custom"]}


def one_process(db):
    """The same database through a pool whose sessions plan without parallel workers."""
    from ingest.db import Database, open_engine

    return open_engine(Database(sa.create_engine(db.engine.url, connect_args={"options": ONE_PROCESS}), db.kind, db.settings))


def step_parallel(args: dict) -> dict:
    """Exact search with the server's parallel workers (its default) and in one process, the same queries interleaved so
    a busy neighbour slows both alike; the plans each got, as one statement and as psycopg's prepared one."""
    from ingest.collection import Collection

    coll = open_collection(args["name"])
    both = {"parallel": coll, "one process": Collection(one_process(coll.db), coll.settings, coll.row)}
    qs = sampled_queries(coll, QUERIES)
    ms = {name: [] for name in both}
    for c in both.values():
        c.similar(qs[0], K)
    for q in qs:
        for name, c in both.items():
            started = time.perf_counter()
            c.similar(q, K)
            ms[name].append((time.perf_counter() - started) * 1000)
    with coll.db.connect() as conn:
        settings = {s: conn.execute(sa.text(f"SHOW {s}")).scalar() for s in PLANNER_SETTINGS}
        settings["l2_distance procost"] = float(conn.execute(sa.text("SELECT procost FROM pg_proc WHERE proname = 'l2_distance'"
                                                                     " AND proargtypes[0] = 'vector'::regtype")).scalar())
    return {"times": {name: percentiles(v) for name, v in ms.items()},
            "plans": {name: exact_plans(c, qs[0]) for name, c in both.items()}, "settings": settings}


def exact_plans(coll, q: np.ndarray) -> dict:
    """EXPLAIN ANALYZE of ExactSearch's statement in its cursor set-up: planned with the values (as psycopg's first
    five executions are) and as the generic plan of a prepared statement (as later ones may be)."""
    from ingest.engines import filtered_cursor
    from ingest.filters import Filter

    flt = Filter()
    sql = flt.scoped("id, path, label, embedding <-> %(q)s AS distance", "embedding IS NOT NULL", coll.id) + " ORDER BY distance, id LIMIT %(k)s"
    params = flt.params(coll.id) | {"q": q, "k": K}
    with filtered_cursor(coll.db, flt, timeout=None, exact=True) as cur:
        cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params)
        custom = cur.fetchone()[0][0]
        cur.execute("PREPARE bench_exact (vector, int) AS " + sql.replace("%(q)s", "$1").replace("%(k)s", "$2"))
        cur.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        literal = "[" + ",".join(map(repr, np.asarray(q, dtype=np.float32).tolist())) + "]"  # EXECUTE takes no bound parameters
        cur.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE bench_exact ('{literal}', {K})")
        generic = cur.fetchone()[0][0]
        cur.execute("DEALLOCATE bench_exact")
    return {"custom": plan_summary(custom), "generic": plan_summary(generic)}


def plan_summary(explained: dict) -> dict:
    nodes = list(walk(explained["Plan"]))
    return {"nodes": " > ".join(n["Node Type"] for n in nodes), "workers_planned": max(n.get("Workers Planned", 0) for n in nodes),
            "workers_launched": max(n.get("Workers Launched", 0) for n in nodes), "total_cost": explained["Plan"]["Total Cost"],
            "relations": sorted({n["Relation Name"] for n in nodes if "Relation Name" in n}),
            "planning_ms": round(explained["Planning Time"], 2), "execution_ms": round(explained["Execution Time"], 1)}


def walk(node: dict):
    yield node
    for child in node.get("Plans", []):
        yield from walk(child)


def step_sizes(args: dict) -> dict:
    """Each named collection's partitions: heap (main fork), table (heap, TOAST, maps), b-tree and HNSW indexes."""
    from ingest.options import open_database
    from ingest.partitions import TABLES, partition

    _, db = open_database(None)
    out = {}
    with db.connect() as conn:
        for name in args["names"]:
            cid = conn.execute(sa.text("SELECT id FROM collections WHERE name = :n"), {"n": name}).scalar()
            if cid is None:
                continue
            entry = {"rows": conn.execute(sa.text(f"SELECT count(*) FROM {partition('images', cid)}")).scalar()}
            for t in TABLES:
                heap, table, indexes, total = conn.execute(sa.text(
                    "SELECT pg_relation_size(c), pg_table_size(c), pg_indexes_size(c), pg_total_relation_size(c)"
                    " FROM to_regclass(:p) AS c"), {"p": partition(t, cid)}).one()
                entry[t] = {"heap": heap, "table": table, "indexes": indexes, "total": total}
            entry["hnsw"] = conn.execute(sa.text(
                "SELECT coalesce(sum(pg_relation_size(indexrelid)), 0)::bigint FROM pg_index WHERE indrelid = to_regclass(:p)"
                " AND indexrelid::regclass::text LIKE '%\\_hnsw\\_%'"), {"p": partition("images", cid)}).scalar()
            out[name] = entry
        database = conn.execute(sa.text("SELECT pg_database_size(current_database())")).scalar()
    return {"sizes": out, "database_bytes": database}


def step_search_loop(args: dict) -> dict:
    """Exact searches of the probe collection, one after another, until the stop file appears: (start, ms) of each."""
    coll = open_collection(PROBE)
    qs = sampled_queries(coll, QUERIES, seed=11)
    coll.similar(qs[0], K)
    Path(args["ready"]).touch()
    done = []
    for q in itertools.cycle(qs):
        if Path(args["stop"]).exists():
            break
        started, clock = time.time(), time.perf_counter()
        coll.similar(q, K)
        done.append((started, (time.perf_counter() - clock) * 1000))
    return {"queries": done}


def step_old_layout(args: dict) -> dict:
    """A database at revision 0006 holding one collection in the one-table layout: images, features(image_id, raw
    vector(2048)) and image_paths(image_id, collection_id, path), as `ingest db upgrade` finds it."""
    from ingest.config import Settings
    from ingest.db import connect, current_revision, upgrade
    from ingest.features import MODEL_NAME

    db = connect(Settings.load(None), migrate=False)
    upgrade(db.engine, "0006")
    db.dispose()  # connections made before the extension existed do not know the vector type
    with db.begin() as conn:
        cid = conn.exec_driver_sql("INSERT INTO collections (name, model, weights, weights_fingerprint, pca_dims)"
                                   " VALUES (%s, %s, 'synthetic', %s, %s) RETURNING id",
                                   (args["name"], MODEL_NAME, "0" * 64, args["dims"])).scalar()
    vectors, which = clustered(args["n"], args["dims"], clusters_for(args["n"]), args["seed"])
    for start in range(0, args["n"], CHUNK):
        insert_old(db, cid, vectors[start:start + CHUNK], which[start:start + CHUNK], start, raw=args["raw"])
    with db.begin() as conn:
        conn.execute(sa.text("ANALYZE images, features, image_paths"))
        size = conn.execute(sa.text("SELECT pg_database_size(current_database())")).scalar()
    return {"rows": args["n"], "revision": current_revision(db.engine), "database_bytes": size}


STEPS = {"make": step_make, "probe": step_probe, "parallel": step_parallel, "sizes": step_sizes,
         "search_loop": step_search_loop, "old_layout": step_old_layout}


# --- the driver -------------------------------------------------------------------------------------------------------


class Plan:
    """How the driver starts a step: this file's steps through bench/scale.py, the tool's commands from the venv."""

    def __init__(self, env: dict, results: dict):
        self.env, self.results = env, results
        self.me = [sys.executable, str(Path(__file__).with_name("scale.py"))]

    def step(self, step: str, /, **args) -> list[str]:
        return self.me + ["--step", step, "--args", json.dumps(args)]

    @staticmethod
    def cli(*argv: str) -> list[str]:
        return [str(BIN / argv[0]), *argv[1:]]

    def run(self, title: str, argv: list[str], env: dict | None = None) -> dict:
        """The step's figures ({} if it failed: the run goes on)."""
        return run_step(title, argv, env or self.env, self.results, Path(self.env["RIS_HOME"]) / "steps.jsonl") or {}


def run(home: Path, env: dict, args: dict, trees: int, count: int, rows: int, results: dict) -> None:
    plan = Plan(env, results)
    names, big = [f"coll{i:02d}" for i in range(count)], args["name"]
    small = dict(n=rows, dims=args["dims"], trees=trees)
    results |= {"collections": count, "collection_rows": rows, "figures": {}}
    figures = results["figures"]
    plan.run(f"{PROBE}: insert + Annoy", plan.step("make", name=PROBE, seed=100, raw=False, **small))
    plan.run(f"{PROBE}: ingest index --hnsw", plan.cli("ingest", "index", "-c", PROBE, "--no-annoy", "--hnsw"))
    figures["alone"] = plan.run(f"{PROBE} alone: queries", plan.step("probe", phase="alone")).get("result")
    control = {**env, "RIS_HOME": str(home / "alone")}  # the same rows alone in a server of their own, asked beside
    plan.run(f"{PROBE} in a database of its own: insert + Annoy", plan.step("make", name=PROBE, seed=100, raw=False, **small), control)
    plan.run(f"{PROBE} in a database of its own: --hnsw", plan.cli("ingest", "index", "-c", PROBE, "--no-annoy", "--hnsw"), control)
    for i, name in enumerate(names[1:], 1):
        plan.run(f"{name}: insert + Annoy" + (" (raw features)" if i == 1 else ""),
                 plan.step("make", name=name, seed=100 + i, raw=i == 1, **small))
    steps = one_collection_plan(home, args, trees)
    measured = next(i for i, (title, _) in enumerate(steps) if title.startswith("queries"))
    for title, argv in steps[:measured]:  # the big collection's rows and indexes
        plan.run(f"{big}: {title}", argv)
    figures["beside"] = plan.run(f"{PROBE} beside the others (and in its own database): queries",
                                 plan.step("probe", phase="beside", control=control["RIS_HOME"])).get("result")
    plan.run("ingest db stop (its own database)", plan.cli("ingest", "db", "stop"), control)
    for title, argv in steps[measured:]:
        out = plan.run(f"{big}: {title}", argv)
        if title.startswith("queries"):
            figures["big"] = out.get("result")
    figures["parallel"] = plan.run(f"{big}: exact, parallel workers vs one", plan.step("parallel", name=big)).get("result")
    figures["sizes"] = plan.run("partition sizes", plan.step("sizes", names=names + [big])).get("result")
    figures["remove"] = remove_beside_search(plan, home, big)
    figures["upgrade"] = {key: upgrade_from_0006(plan, home / f"upgrade-{key}", n, raw, args["dims"])
                          for key, n, raw in (("big", args["n"], False), ("raw", rows, True))}
    figures["projection"] = projection(figures, big, rows, args["n"])
    print_figures(results)


def remove_beside_search(plan: Plan, home: Path, name: str) -> dict:
    """`ingest remove` of a collection while another process searches the probe collection: the remove's wall time,
    and the searches that ran before it and during it."""
    stop, ready = home / "search.stop", home / "search.ready"
    for f in (stop, ready):
        f.unlink(missing_ok=True)
    searcher = subprocess.Popen(plan.step("search_loop", stop=str(stop), ready=str(ready)), env=plan.env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.time() + 300
        while not ready.exists() and searcher.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # searches before the remove: their baseline
        started = time.time()
        removed = plan.run(f"ingest remove -c {name} --yes (a search loop beside)", plan.cli("ingest", "remove", "-c", name, "--yes"))
        ended = time.time()
        time.sleep(3)
    finally:
        stop.touch()
    out = searcher.communicate(timeout=300)[0].strip()
    found = json.loads(out.splitlines()[-1])["queries"] if out else []
    before = [ms for t, ms in found if t + ms / 1000 < started]
    during = [ms for t, ms in found if t < ended and t + ms / 1000 > started]
    return {"remove_s": removed.get("seconds"), "searches_before": percentiles(before) if before else None,
            "searches_during": (percentiles(during) | {"max_ms": round(max(during), 1)}) if during else None}


def upgrade_from_0006(plan: Plan, home: Path, n: int, raw: bool, dims: int) -> dict:
    """A database of its own built at revision 0006, then `ingest db upgrade` timed on it, then its server stopped."""
    env = {**plan.env, "RIS_HOME": str(home)}
    what = f"{n:,} rows" + (", float32 raw features" if raw else ", no raw features")
    made = plan.run(f"revision 0006, one-table layout: {what}",
                    plan.step("old_layout", name="old", n=n, dims=dims, raw=raw, seed=7), env)
    upgraded = plan.run(f"ingest db upgrade ({what})", plan.cli("ingest", "db", "upgrade", "--json"), env)
    plan.run("ingest db stop", plan.cli("ingest", "db", "stop"), env)
    return {"rows": n, "raw": raw, "before_bytes": (made.get("result") or {}).get("database_bytes"),
            "upgrade_s": upgraded.get("seconds"), "report": upgraded.get("result")}


def per_million(size: int, rows: int) -> float:
    return size * 1e6 / rows if rows else 0.0


def projection(figures: dict, big: str, small_rows: int, big_rows: int) -> dict:
    """10M rows from what was measured: sizes per million times ten; a query's time multiplied again by its growth from
    the small collection (beside the others) to the big one, over the same factor of rows. A projection, not a run."""
    out = {"rows": 10_000_000, "sizes_gb": {}, "p50_ms": {}}
    sizes = (figures.get("sizes") or {}).get("sizes", {})
    if s := sizes.get(big):
        images = s["images"]["total"] - s["hnsw"]
        out["sizes_gb"] = {"images (heap, TOAST, b-trees)": images, "hnsw index": s["hnsw"], "image_paths": s["image_paths"]["total"]}
        out["sizes_gb"] = {k: round(per_million(v, s["rows"]) * 10 / 1e9, 1) for k, v in out["sizes_gb"].items()}
    raw = max(sizes.values(), key=lambda v: v["features"]["total"] / v["rows"], default=None)
    if raw and raw["features"]["heap"]:
        out["sizes_gb"]["raw features (half precision)"] = round(per_million(raw["features"]["total"], raw["rows"]) * 10 / 1e9, 1)
    beside = {e["engine"]: e["p50_ms"] for e in (figures.get("beside") or {}).get("engines", [])}
    big = {e["engine"]: e["p50_ms"] for e in (figures.get("big") or {}).get("engines", [])}
    decades = np.log10(10_000_000 / big_rows) / np.log10(big_rows / small_rows)
    for engine in beside:
        if engine in big and not engine.startswith("numpy"):
            out["p50_ms"][engine] = round(big[engine] * (big[engine] / beside[engine]) ** decades, 1)
    return out


def print_figures(results: dict) -> None:
    f = results["figures"]
    alone, beside = ({e["engine"]: e for e in (f.get(k) or {}).get("engines", [])} for k in ("alone", "beside"))
    control = {e["engine"]: e for e in (f.get("beside") or {}).get("control") or []}
    click.echo(f"\n{PROBE} ({results['collection_rows']:,} rows), p50 / p95 ms: first alone, later beside "
               f"{results['collections'] - 1} others and {results['n']:,} rows, and meanwhile in a database of its own")
    click.echo(f"{'engine':30} {'alone (first)':>15} {'beside':>15} {'own db (same time)':>19} {'ratio':>6} {'same-time ratio':>15}")
    for name in (n for n in alone if n in beside and n in control):
        (a, b, c), ratio = (alone[name], beside[name], control[name]), beside[name]["p50_ms"] / alone[name]["p50_ms"]
        same = b["p50_ms"] / c["p50_ms"]
        bar = f"  {'PASS' if same <= EXACT_BESIDE_BAR else 'FAIL'} (<= {EXACT_BESIDE_BAR})" if name.startswith("pgvector") else ""
        click.echo(f"{name:30} " + " ".join(f"{e['p50_ms']:7.2f} /{e['p95_ms']:6.1f}" for e in (a, b, c))
                   + f" {ratio:6.2f} {same:15.2f}  recall {a['recall@10']:.3f} {b['recall@10']:.3f} {c['recall@10']:.3f}{bar}")
    for phase in ("alone", "beside"):
        if f.get(phase):
            click.echo(f"  {phase}: {f[phase]['collections']} collections, {f[phase]['rows_in_database']:,} rows; cores busy "
                       f"meanwhile: {f[phase]['cores']}; exact plan: {f[phase]['exact_plan']}")
    for e in (f.get("big") or {}).get("engines", []):
        if "queries_with_k_results" in e:
            ok = e["p50_ms"] <= FILTERED_P50_BAR_MS and e["queries_with_k_results"] == QUERIES
            click.echo(f"\n{results['n']:,} rows, {e['engine']}: {e['p50_ms']:.2f} / {e['p95_ms']:.2f} ms p50/p95, answered by "
                       f"{e['answered_by']}, {e['queries_with_k_results']}/{QUERIES} with k rows: "
                       f"{'PASS' if ok else 'FAIL'} (<= {FILTERED_P50_BAR_MS} ms, k rows every time)")
    if p := f.get("parallel"):
        t = p["times"]
        ratio = t["parallel"]["p50_ms"] / t["one process"]["p50_ms"]
        click.echo(f"exact, parallel workers {t['parallel']['p50_ms']:.1f} / {t['parallel']['p95_ms']:.1f} ms, one process "
                   f"{t['one process']['p50_ms']:.1f} / {t['one process']['p95_ms']:.1f} ms: ratio {ratio:.2f} "
                   f"{'PASS' if ratio <= PARALLEL_BAR else 'FAIL'} (<= {PARALLEL_BAR})")
        for name, plans in p["plans"].items():
            for kind, s in plans.items():
                click.echo(f"  plan, {name}, {kind}: {s['nodes']} (workers {s['workers_planned']} planned, "
                           f"{s['workers_launched']} launched; cost {s['total_cost']:.0f}; {s['execution_ms']} ms)")
        click.echo(f"  settings: {json.dumps(p['settings'])}")
    print_sizes((f.get("sizes") or {}).get("sizes", {}))
    if r := f.get("remove"):
        click.echo(f"\nremove: {r['remove_s']} s; searches before {r['searches_before']}, during {r['searches_during']}")
    for key, u in (f.get("upgrade") or {}).items():
        click.echo(f"upgrade from 0006 ({u['rows']:,} rows, raw {u['raw']}): {u['upgrade_s']} s; "
                   f"{(u['before_bytes'] or 0) / 1e9:.2f} GB before")
    click.echo(f"\nprojection to 10M rows (not measured): {json.dumps(f.get('projection'))}")


def print_sizes(sizes: dict) -> None:
    click.echo(f"\n{'per million rows, MB':20} {'rows':>9} {'img heap':>9} {'TOAST,maps':>10} {'b-trees':>8} {'hnsw':>7}"
               f" {'paths':>7} {'features':>9}")
    for name, s in sizes.items():
        pm = lambda v: per_million(v, s["rows"]) / 1e6  # noqa: E731
        img = s["images"]
        click.echo(f"{name:20} {s['rows']:9,} {pm(img['heap']):9.0f} {pm(img['table'] - img['heap']):10.0f}"
                   f" {pm(img['indexes'] - s['hnsw']):8.0f} {pm(s['hnsw']):7.0f} {pm(s['image_paths']['total']):7.0f}"
                   f" {pm(s['features']['total']):9.0f}")
