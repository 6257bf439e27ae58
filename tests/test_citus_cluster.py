"""The Citus test cluster itself (tests/citus.py): a coordinator and two workers that spread a vector table over both
workers, answer top-k like exact brute force, build HNSW on every shard, take per-transaction settings to the shards,
and fail a query, then work again, when a worker goes away and comes back."""
from __future__ import annotations

import numpy as np
import psycopg
import pytest

from tests.citus import cluster_or_skip

ROWS, DIMS, SHARDS, K = 2000, 8, 4, 10


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with cluster_or_skip(tmp_path_factory) as started:
        yield started


@pytest.fixture(scope="module")
def vectors(cluster) -> np.ndarray:
    """The same ROWS random vectors (id = row index) in two distributed tables: `flat` without an index and
    `indexed` with HNSW built after the load, both COPYed through the coordinator."""
    data = np.random.default_rng(7).random((ROWS, DIMS), dtype=np.float32)
    with psycopg.connect(cluster.url, autocommit=True) as conn:
        for table in ("flat", "indexed"):
            conn.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, embedding vector({DIMS}) NOT NULL)")
            conn.execute(f"SELECT create_distributed_table('{table}', 'id', shard_count := {SHARDS})")
            with conn.cursor().copy(f"COPY {table} (id, embedding) FROM STDIN") as copy:
                for i, row in enumerate(data):
                    copy.write_row((i, literal(row)))
        conn.execute("CREATE INDEX indexed_hnsw ON indexed USING hnsw (embedding vector_l2_ops)")
    return data


def literal(vector: np.ndarray) -> str:
    return "[" + ",".join(str(x) for x in vector) + "]"


def per_shard(conn, table: str, command: str) -> list[tuple[int, str]]:
    """(worker port, result) of `command` run on every shard of `table`; %s in it names the shard."""
    rows = conn.execute(
        "SELECT s.nodeport, r.success, r.result FROM run_command_on_shards(%s, %s) r"
        " JOIN citus_shards s USING (shardid) ORDER BY s.shardid", (table, command)).fetchall()
    assert all(success for _, success, _ in rows), rows
    return [(port, result) for port, _, result in rows]


def worker_ports(cluster) -> set[int]:
    return {node.port for node in cluster.workers}


def test_copy_through_the_coordinator_spreads_rows_over_both_workers(cluster, vectors):
    with psycopg.connect(cluster.url) as conn:
        counts: dict[int, int] = {}
        for port, result in per_shard(conn, "flat", "SELECT count(*) FROM %s"):
            counts[port] = counts.get(port, 0) + int(result)
    assert set(counts) == worker_ports(cluster)  # nothing on the coordinator, something on each worker
    assert all(count > ROWS // 4 for count in counts.values()), counts
    assert sum(counts.values()) == ROWS


def test_top_k_equals_brute_force(cluster, vectors):
    queries = np.random.default_rng(8).random((5, DIMS), dtype=np.float32)
    with psycopg.connect(cluster.url) as conn:
        for q in queries:
            found = conn.execute("SELECT id FROM flat ORDER BY embedding <-> %s::vector LIMIT %s",
                                 (literal(q), K)).fetchall()
            exact = np.argsort(np.linalg.norm(vectors.astype(np.float64) - q, axis=1))[:K]
            assert [i for (i,) in found] == exact.tolist()


def test_hnsw_index_made_on_the_coordinator_exists_on_every_shard(cluster, vectors):
    command = ("SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam"
               " WHERE i.indrelid = '%s'::regclass AND a.amname = 'hnsw'")
    with psycopg.connect(cluster.url) as conn:
        shards = per_shard(conn, "indexed", command)
    assert len(shards) == SHARDS
    assert [result for _, result in shards] == ["1"] * SHARDS
    assert {port for port, _ in shards} == worker_ports(cluster)


def rows_with(conn, ef_search: int, propagate: bool) -> int:
    """Rows of a top-K query over `indexed` with hnsw.ef_search and enable_seqscan = off set for this transaction.

    HNSW without iterative scan gives at most ef_search rows per index scan, so with the settings on the shards
    the coordinator gets at most ef_search rows from each shard."""
    q = literal(np.full(DIMS, 0.5, dtype=np.float32))
    with conn.transaction():
        if propagate:
            conn.execute("SET LOCAL citus.propagate_set_commands = 'local'")
        conn.execute("SET LOCAL enable_seqscan = off")
        conn.execute(f"SET LOCAL hnsw.ef_search = {ef_search}")
        return len(conn.execute("SELECT id FROM indexed ORDER BY embedding <-> %s::vector LIMIT %s", (q, K)).fetchall())


def test_set_local_reaches_the_shards_only_when_propagated(cluster, vectors):
    with psycopg.connect(cluster.url) as conn:
        assert rows_with(conn, ef_search=1, propagate=True) == SHARDS  # one row from each shard's HNSW scan
        assert rows_with(conn, ef_search=40, propagate=True) == K
        assert rows_with(conn, ef_search=1, propagate=False) == K  # the shards kept their default ef_search


def test_a_query_fails_while_a_worker_is_down_and_works_once_it_is_back(cluster, vectors):
    down = cluster.workers[0]
    with psycopg.connect(cluster.url, autocommit=True) as conn:
        conn.execute("SELECT count(*) FROM flat")  # a cached connection to the worker that will go away
        cluster.stop_worker(0)
        try:
            with pytest.raises(psycopg.OperationalError) as failure:
                conn.execute("SELECT count(*) FROM flat")
        finally:
            cluster.start_worker(0)
        assert str(failure.value).startswith(f"connection to the remote node postgres@127.0.0.1:{down.port} failed")
        assert conn.execute("SELECT count(*) FROM flat").fetchone() == (ROWS,)  # the same session recovers
    with psycopg.connect(cluster.url) as conn:
        assert conn.execute("SELECT count(*) FROM flat").fetchone() == (ROWS,)
