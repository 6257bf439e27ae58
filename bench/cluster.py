"""Cluster benchmark: one synthetic collection (N clustered 128-d rows) on a loopback Citus cluster (coordinator + two
workers, tests/citus.py, `ingest db upgrade --shards 8`) and on the embedded server, in one run: each step runs on one
side then the other, in its own process.

    python bench/cluster.py [--n 100000] [--shards 8] [--batches 50] [--home DIR] [--json out.json]

All nodes share this 2-core machine: the figures show what distribution costs (hops, two-phase commits, the
coordinator's merge), not a speed-up. Both sides run with fsync and synchronous commit on (the embedded server's own;
`--no-fsync`: off on both). Steps: binary COPY of the rows as bench/scale.py inserts them; batches of 64 pictures
through store.insert_images, each statement timed, and the collection-row bump alone (a reference table on a cluster:
a write on every node); the Annoy and HNSW builds; 100 queries per engine (p50/p95, recall@10 against numpy), a label
of 1% of the rows through HNSW and exactly; on the cluster, per shard: rows, sizes, and one shard's query and
index-build times alone on its worker, what a projection to more machines needs.
"""
from __future__ import annotations

import atexit
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import click
import numpy as np
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import scale  # noqa: E402
from bench.machine import cpu_model, machine_busy_seconds  # noqa: E402

NAME = "cluster-bench"
BATCH = 64  # pictures in a typical load batch
SIDES = ("embedded", "cluster")
DURABILITY = ("fsync", "synchronous_commit", "full_page_writes")


# --- the steps (each runs in a child process, on the side DATABASE_URL names) ------------------------------


def step_load(args: dict) -> dict:
    """The collection made as the library makes one, then N rows by binary COPY in committed chunks of scale.CHUNK
    rows (timed alone), then ANALYZE of its partitions (timed alone)."""
    from ingest.options import open_database
    from ingest.partitions import TABLES, partition

    _, db = open_database(None)
    scale.make_collection(db, NAME, 0, args["dims"], args["clusters"], raw=False)
    coll = scale.open_collection(NAME)
    vectors, which = scale.clustered(args["n"], args["dims"], args["clusters"], 0)
    started = time.perf_counter()
    for start in range(0, args["n"], scale.CHUNK):
        scale.insert(db, coll.id, vectors[start:start + scale.CHUNK], which[start:start + scale.CHUNK], start, raw=False)
    loaded = time.perf_counter() - started
    started = time.perf_counter()
    with db.begin() as conn:
        conn.exec_driver_sql("ANALYZE " + ", ".join(partition(t, coll.id) for t in TABLES))
        analyzed = time.perf_counter() - started
        durability = {s: conn.exec_driver_sql(f"SHOW {s}").scalar() for s in DURABILITY}
    return {"rows": args["n"], "copy_s": round(loaded, 2), "rows_per_s": round(args["n"] / loaded),
            "analyze_s": round(analyzed, 2), "durability": durability}


def step_batches(args: dict) -> dict:
    """`batches` batches of 64 pictures stored as a load stores one (store.insert_images, with embeddings, raw features
    not kept; each statement timed), then the collection-row bump alone in as many transactions, then a bare round trip."""
    from ingest import store

    coll = scale.open_collection(NAME)
    size, count, first = BATCH, args["batches"], args["n"]
    vectors, which = scale.clustered(size * count, args["dims"], args["clusters"], seed=7)
    raw = np.zeros((size, 2048), np.float32)  # checked for half range, not stored: the collection keeps no raw features

    def batch(b: int) -> None:
        at = range(b * size, (b + 1) * size)
        rows = [store.ImageRow(f"/synthetic/b{first + i:x}.jpg", f"c{which[i] % 100}", f"{first + i:064x}", 224, 224, 20000)
                for i in at]
        added = store.insert_images(coll.db, coll.id, rows, raw, vectors[at.start:at.stop], pca_version=coll.row.pca_version)
        if added != size:
            raise RuntimeError(f"batch {b} stored {added} of {size} new pictures")

    def bump(_) -> None:
        with coll.db.begin() as conn:
            store.bump_embedding_seq(store.raw_cursor(conn), coll.id)

    parts, plain = {}, store.raw_cursor
    store.raw_cursor = lambda conn: TimedCursor(plain(conn), parts)  # what insert_images's statements take, each
    _, batch_ms = scale.timed(batch, range(count))
    store.raw_cursor = plain
    parts["COMMIT and the rest"] = float(batch_ms.sum()) - sum(parts.values())
    _, bump_ms = scale.timed(bump, range(count))
    with coll.db.connect() as conn:
        _, trip_ms = scale.timed(lambda _: conn.exec_driver_sql("SELECT 1").scalar(), range(count))
    return {"batches": count, "batch_size": size, "batch": percentiles(batch_ms), "bump": percentiles(bump_ms),
            "round_trip": percentiles(trip_ms), "rows_per_s": round(size * count / (batch_ms.sum() / 1000)),
            "batch_parts_mean_ms": {k: round(v / count, 2) for k, v in parts.items()}}


class TimedCursor:
    """A psycopg cursor whose execute and copy add their time to `spent`, under the statement's first words."""

    def __init__(self, cur, spent: dict):
        self.cur, self.spent = cur, spent

    def __getattr__(self, name):
        return getattr(self.cur, name)

    @contextmanager
    def timing(self, sql: str):
        started = time.perf_counter()
        yield
        key = " ".join(sql.split()[:3])
        self.spent[key] = self.spent.get(key, 0.0) + (time.perf_counter() - started) * 1000

    def execute(self, sql, params=None):
        with self.timing(sql):
            return self.cur.execute(sql, params)

    @contextmanager
    def copy(self, sql):
        with self.timing(sql), self.cur.copy(sql) as copy:
            yield copy


def percentiles(ms: list[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "mean_ms": round(float(np.mean(ms)), 2)}


def step_annoy(args: dict) -> dict:
    coll = scale.open_collection(NAME)
    started = time.perf_counter()
    sidecar = coll.build_index(args["trees"])
    return {"seconds": round(time.perf_counter() - started, 2), "items": sidecar.items, "trees": args["trees"]}


def step_hnsw(args: dict) -> dict:
    """hnsw.build through the library (on a cluster Citus builds every shard's index), then the sizes on one server (a
    cluster's are its shards' sums, from the per-shard step: the coordinator's own partition is an empty shell)."""
    from ingest.hnsw import index_name
    from ingest.partitions import partition

    coll = scale.open_collection(NAME)
    started = time.perf_counter()
    coll.build_hnsw()
    seconds = time.perf_counter() - started
    table, index = partition("images", coll.id), index_name(coll.id, coll.dims)
    with coll.db.connect() as conn:
        sizes = conn.exec_driver_sql(f"SELECT pg_relation_size('{table}'), pg_relation_size('{index}')").one()
    return {"seconds": round(seconds, 2)} | ({} if coll.db.distributed else dict(zip(("table_bytes", "index_bytes"), sizes)))


def step_queries(args: dict) -> dict:
    """bench/scale.py's queries (every engine, recall against numpy, the label of 1% of the rows through --engine hnsw),
    then that label through the exact engine: on one server the hnsw query goes exact by itself, on a cluster not."""
    from ingest.engines import EngineName

    found = scale.step_queries({"name": NAME, "ef": args["ef"]})
    coll = scale.open_collection(NAME)
    qs, _, brute_ms = scale.workload(coll)
    coll.similar(qs[0], scale.K, engine=EngineName.PGVECTOR, label="c7")
    answers, ms = scale.timed(lambda q: coll.similar(q, scale.K, engine=EngineName.PGVECTOR, label="c7"), qs)
    exact = scale.summary("pgvector exact label=c7 (1% of rows)", ms, None, brute_ms)
    exact["queries_with_k_results"] = sum(len(a) == scale.K for a in answers)
    return {"engines": found["engines"] + [exact]}


def step_shards(args: dict) -> dict:
    """Per shard of the collection's pictures (on its worker, directly): rows, table and HNSW index bytes, p50/p95 of the
    same 100 queries answered by that shard alone through its index (the lowest and highest ef_search) and exactly;
    and the first shard's index built again alone, timed (a machine holding S shards pays that S times over its cores)."""
    from ingest.hnsw import index_name
    from ingest.partitions import partition

    coll = scale.open_collection(NAME)
    qs, _, _ = scale.workload(coll)
    table, index, dims = partition("images", coll.id), index_name(coll.id, coll.dims), coll.dims
    with coll.db.connect() as conn:
        placed = conn.exec_driver_sql("SELECT shardid, nodename, nodeport FROM citus_shards"
                                      " WHERE table_name = %s::regclass ORDER BY shardid", (table,)).all()
    shards, build_s = [], None
    for shard, host, port in placed:
        with psycopg.connect(f"postgresql://postgres@{host}:{port}/postgres", autocommit=True) as conn:
            conn.execute("SET citus.show_shards_for_app_name_prefixes = '*'")
            figures = one_shard(conn, f"{table}_{shard}", f"{index}_{shard}", dims, qs, [args["ef"][0], args["ef"][-1]])
            shards.append(figures | {"shard": shard, "port": port})
            build_s = build_s or shard_build(conn, f"{table}_{shard}", dims)
    return {"shards": shards, "one_shard_hnsw_build_s": build_s, "shard_of_build": placed[0][0]}


def one_shard(conn, table: str, index: str, dims: int, qs: np.ndarray, ef: list[int]) -> dict:
    """One shard's rows and sizes, and its query times in the engines' own SQL shapes (ingest/engines.py ExactSearch,
    ingest/hnsw_engine.py) with their planner settings."""
    rows, table_bytes, index_bytes = conn.execute(f"SELECT count(*), pg_relation_size(%s), pg_relation_size(%s) FROM {table}",
                                                  (table, index)).fetchone()
    hnsw = (f"SELECT id, path, label, embedding::vector({dims}) <-> %(q)s::vector AS distance FROM {table}"
            f" WHERE embedding IS NOT NULL ORDER BY embedding::vector({dims}) <-> %(q)s::vector LIMIT 10")
    exact = (f"SELECT id, path, label, embedding <-> %(q)s::vector AS distance FROM {table}"
             " WHERE embedding IS NOT NULL ORDER BY distance, id LIMIT 10")
    kinds = {f"hnsw_ef{e}": (hnsw, f"SET enable_sort = off; SET enable_indexscan = on; SET hnsw.ef_search = {e}")
             for e in ef}
    kinds["exact"] = (exact, "SET enable_sort = on; SET enable_indexscan = off")
    literals, timings = ["[" + ",".join(f"{x:.9g}" for x in q) + "]" for q in qs], {}
    for kind, (sql, settings) in kinds.items():
        conn.execute(settings)
        timings[kind] = percentiles(scale.timed(lambda q: conn.execute(sql, {"q": q}).fetchall(), literals)[1])  # noqa: B023
    return {"rows": rows, "table_bytes": table_bytes, "index_bytes": index_bytes, **timings}


def shard_build(conn, table: str, dims: int) -> float:
    """Build the HNSW index of one shard again, under another name, with the build settings of ingest/hnsw.py; drop it."""
    from ingest.hnsw import BUILD_MEMORY, EF_CONSTRUCTION, HNSW_M

    conn.execute("SET citus.enable_manual_changes_to_shards = on")
    conn.execute(f"SET maintenance_work_mem = '{BUILD_MEMORY}'")
    started = time.perf_counter()
    conn.execute(f"CREATE INDEX bench_shard_hnsw ON {table} USING hnsw ((embedding::vector({dims})) vector_l2_ops)"
                 f" WITH (m = {HNSW_M}, ef_construction = {EF_CONSTRUCTION})")
    seconds = time.perf_counter() - started
    conn.execute("DROP INDEX bench_shard_hnsw")
    return round(seconds, 2)


# --- the driver -------------------------------------------------------------------------------------------


def start_cluster(folder: Path, durable: bool):
    """A coordinator and two workers on 127.0.0.1 (tests/citus.py), with the embedded server's durability when
    `durable` (the test cluster runs without fsync)."""
    from tests.citus import CitusCluster, citus_build

    build = citus_build()
    if isinstance(build, str):
        raise click.ClickException(build)
    cluster = CitusCluster(build, folder, workers=2)
    atexit.register(cluster.stop)  # also when a node fails to start, or the run is interrupted
    cluster.start()
    for node in cluster.nodes:
        with psycopg.connect(node.url, autocommit=True) as conn:
            for setting in DURABILITY:
                conn.execute(f"ALTER SYSTEM SET {setting} = {'on' if durable else 'off'}")
            conn.execute("SELECT pg_reload_conf()")
    return cluster


STEPS = [("load: COPY rows", "load", SIDES), ("batches of 64 + bumps", "batches", SIDES), ("Annoy build", "annoy", SIDES),
         ("HNSW build", "hnsw", SIDES), ("queries (100 per engine)", "queries", SIDES), ("per shard", "shards", ("cluster",))]


def run(home: Path, args: dict, durable: bool) -> dict:
    """Each step on one side then the other, so that both meet the same machine; the servers stopped at the end."""
    others = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    results = {**args, "workers": 2, "machine": cpu_model(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
               "durable": durable, "beside": [p[:120] for p in others if "bench/" in p and "bench/cluster.py" not in p],
               **{side: {"steps": []} for side in SIDES}}
    cluster = start_cluster(home / "citus", durable)
    envs = {side: {**os.environ, "RIS_HOME": str(home / side)} for side in SIDES}
    envs["embedded"].pop("DATABASE_URL", None)
    envs["cluster"]["DATABASE_URL"] = cluster.url
    try:
        upgrade = [str(scale.BIN / "ingest"), "db", "upgrade", "--shards", str(args["shards"]), "--json"]
        done = subprocess.run(upgrade, env=envs["cluster"], capture_output=True, text=True)
        if done.returncode != 0:
            raise click.ClickException(f"ingest db upgrade --shards failed: {done.stderr.strip()[-300:]}")
        for title, step, sides in STEPS:
            for side in sides:
                argv = [sys.executable, __file__, "--step", step, "--args", json.dumps(args)]
                watch = NeighbourWatch([home / "embedded" / "pgdata", *(node.data for node in cluster.nodes)])
                scale.run_step(f"{side:8} {title}", argv, envs[side], results[side])  # adds one entry, figures or error
                results[side]["steps"][-1] |= {"key": step, "neighbour_cores": watch.cores()}
    finally:
        cluster.stop()
        subprocess.run([str(scale.BIN / "ingest"), "db", "stop"], env=envs["embedded"], capture_output=True)
    return results


class NeighbourWatch:
    """Cores that processes other than ours kept busy during a step: the machine's busy time less that of the step's
    process (a reaped child of ours) and of our servers (each postmaster with its live and its reaped children)."""

    def __init__(self, pgdatas: list[Path]):
        self.pgdatas = pgdatas
        self.wall, self.machine, self.ours = time.perf_counter(), machine_busy_seconds(), self.our_seconds()

    def our_seconds(self) -> float:
        children, ticks = resource.getrusage(resource.RUSAGE_CHILDREN), 0
        postmasters = {int(f.read_text().split()[0]) for d in self.pgdatas if (f := d / "postmaster.pid").exists()}
        for proc in Path("/proc").iterdir():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split() if proc.name.isdigit() else None
            except OSError:  # gone meanwhile
                continue
            if fields and (int(proc.name) in postmasters or int(fields[1]) in postmasters):
                ticks += sum(int(v) for v in fields[11:15 if int(proc.name) in postmasters else 13])
        return children.ru_utime + children.ru_stime + ticks / os.sysconf("SC_CLK_TCK")

    def cores(self) -> float:
        wall = time.perf_counter() - self.wall
        return round(max(machine_busy_seconds() - self.machine - (self.our_seconds() - self.ours), 0.0) / wall, 2)


@click.command()
@click.option("--n", default=100_000, show_default=True, help="Rows of the collection (on each side).")
@click.option("--shards", default=8, show_default=True, help="Shards of the pictures' tables on the cluster.")
@click.option("--batches", default=50, show_default=True, help=f"Batches of {BATCH} pictures stored through store.insert_images.")
@click.option("--trees", default=100, show_default=True)
@click.option("--fsync/--no-fsync", "durable", default=True, show_default=True,
              help="Durability of both sides: fsync and synchronous commit on (the embedded server's own) or off.")
@click.option("--home", type=click.Path(path_type=Path), help="Folder of both sides (default: a temporary one, removed).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the figures here.")
@click.option("--step", hidden=True)
@click.option("--args", "step_args", hidden=True)
def main(n, shards, batches, trees, durable, home, json_out, step, step_args):
    if step:
        print(json.dumps(globals()[f"step_{step}"](json.loads(step_args))))
        return
    args = {"n": n, "dims": 128, "clusters": 1000, "shards": shards, "batches": batches, "trees": trees, "ef": [40, 200, 800]}
    with nullcontext(home) if home else tempfile.TemporaryDirectory(prefix="ris-cluster-", ignore_cleanup_errors=True) as folder:
        results = run(Path(folder), args, durable)
    print_report(results)
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))


# --- the report -------------------------------------------------------------------------------------------


def result(results: dict, side: str, step: str) -> dict:
    """What a step printed on one side ({} if it failed), found by its step name."""
    return next((e.get("result") or {} for e in results[side]["steps"] if e.get("key") == step), {})


def figures(results: dict) -> list[tuple[str, float | None, float | None]]:
    """(what, embedded, cluster) of every figure either side has."""
    get = lambda step, *keys: tuple(dig(result(results, side, step), keys) for side in SIDES)  # noqa: E731
    mib = lambda pair: tuple(None if b is None else round(b / 2**20) for b in pair)  # noqa: E731
    rows = [("load: rows/s (binary COPY, 50k-row chunks)", *get("load", "rows_per_s")),
            ("load: ANALYZE s", *get("load", "analyze_s"))]
    for what, key in (("batch of 64 (insert_images)", "batch"), ("collection-row bump alone", "bump"),
                      ("round trip SELECT 1", "round_trip")):
        rows += [(f"{what} p50 ms", *get("batches", key, "p50_ms")), (f"{what} p95 ms", *get("batches", key, "p95_ms"))]
    share = [None if b is None or u is None else round(100 * u / b, 1)
             for b, u in zip(get("batches", "batch", "mean_ms"), get("batches", "bump", "mean_ms"))]
    rows.append(("bump share of a batch %", *share))
    for part in {k: None for side in SIDES for k in result(results, side, "batches").get("batch_parts_mean_ms", {})}:
        rows.append((f"  batch part: {part} mean ms", *get("batches", "batch_parts_mean_ms", part)))
    rows += [("batches: rows/s", *get("batches", "rows_per_s")), ("Annoy build s", *get("annoy", "seconds")),
             ("HNSW build s", *get("hnsw", "seconds"))]
    shards = result(results, "cluster", "shards").get("shards") or []
    for what, key in (("table MB (cluster: its shards' sum)", "table_bytes"), ("HNSW index MB (cluster: ditto)", "index_bytes")):
        rows.append((what, *mib((get("hnsw", key)[0], sum(s[key] for s in shards) if shards else None))))
    engines = [{e["engine"]: e for e in result(results, side, "queries").get("engines", [])} for side in SIDES]
    for name in engines[0] or engines[1]:
        for key in ("p50_ms", "p95_ms", "recall@10", "queries_with_k_results", "answered_by"):
            pair = tuple(e.get(name, {}).get(key) for e in engines)
            if any(v is not None for v in pair) and not (key == "recall@10" and name.startswith("numpy")):
                rows.append((f"{name} {key}", *pair))
    busy = [max((e.get("neighbour_cores") or 0 for e in results[side]["steps"]), default=None) for side in SIDES]
    return rows + [("other processes' cores, most in one step", *busy)]


def dig(value, keys):
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def print_report(results: dict) -> None:
    click.echo(f"\n{results['n']:,} rows x {results['dims']}-d; cluster: coordinator + 2 workers on loopback, "
               f"{results['shards']} shards; {results['cores']} cores for all (the overhead of distribution, not a speed-up)"
               f"\ndurability: {dict(zip(SIDES, (result(results, side, 'load').get('durability') for side in SIDES)))}")
    click.echo(f"{'figure':52} {'embedded':>10} {'cluster':>10} {'cluster/emb':>12}")
    for what, one, many in figures(results):
        ratio = f"{many / one:.2f}" if all(isinstance(v, (int, float)) for v in (one, many)) and one else ""
        click.echo(f"{what:52} {fmt(one):>10} {fmt(many):>10} {ratio:>12}")
    shards = result(results, "cluster", "shards")
    if shards:
        click.echo(f"\nper shard, alone on its worker; one shard's HNSW build alone: {shards['one_shard_hnsw_build_s']} s")
        kinds = [k for k in shards["shards"][0] if k.startswith("hnsw_") or k == "exact"]
        click.echo(f"{'shard':>8} {'port':>6} {'rows':>9} {'table MB':>9} {'index MB':>9} "
                   + " ".join(f"{k + ' p50/p95 ms':>22}" for k in kinds))
        for s in shards["shards"]:
            times = " ".join(f"{s[k]['p50_ms']:>14.2f} /{s[k]['p95_ms']:>6.2f}" for k in kinds)
            click.echo(f"{s['shard']:>8} {s['port']:>6} {s['rows']:>9} {s['table_bytes'] / 2**20:>9.1f} "
                       f"{s['index_bytes'] / 2**20:>9.1f} {times}")


def fmt(value) -> str:
    if not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    return f"{value:,.3f}" if isinstance(value, float) and value < 10 else f"{value:,.0f}"


if __name__ == "__main__":
    main()
