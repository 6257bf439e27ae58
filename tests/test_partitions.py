"""A partition per collection, on the real server beside other collections: every engine's statement plans and reads
the collection's own partitions only, also once psycopg has prepared it; `ingest remove` drops them; HNSW lives on the
partition and a selective filter goes exact; raw features are half precision, refused beyond it, or not kept at all."""
from __future__ import annotations

import hashlib
import json
import re
import time
from contextlib import contextmanager

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from ingest import collection as collection_module
from ingest import store
from ingest.annoy_index import read_sidecar
from ingest.cli import cli as ingest_cli
from ingest.collection import Collection
from ingest.db import Database, open_engine
from ingest.engines import ENGINES, estimated_rows
from ingest.errors import CollectionError
from ingest.features import register_extractor
from ingest.filters import Filter
from ingest.hnsw import index_name
from ingest.images import decode_image, read_file
from ingest.partitions import TABLES, partition
from search.cli import cli as search_cli
from search.evaluation import brute_force
from tests.helpers import COLOURS, FakeExtractor, add_rows, make_folder, make_picture, raw_features, synthetic

MAIN, NEIGHBOUR, THIRD = "part-main", "part-neighbour", "part-third"
DOOMED, LOUD, NO_RAW = "part-doomed", "part-loud", "part-no-raw"
DIMS = 16
LABELS = ["rare" if i % 33 == 0 else "common" for i in range(3000)]  # 'rare': 91 rows, 3% of the main collection
RARE_ROWS = LABELS.count("rare")
PARTITION = re.compile(r"^(?:images|features|image_paths|finetune_splits)_p(\d+)(?:_|$)")


@pytest.fixture(scope="module")
def colls(db, settings):
    """The main collection (3000 rows, HNSW) and two neighbours with the same labels, one with an HNSW index of its own:
    a statement that reached beyond its partition would find rows, plan tables and read rows of theirs."""
    main = synthetic(db, settings, MAIN, 3000, dims=DIMS, labels=LABELS)
    main.build_hnsw()
    neighbour = synthetic(db, settings, NEIGHBOUR, 600, dims=DIMS, labels=LABELS[:600])
    neighbour.build_hnsw()
    third = synthetic(db, settings, THIRD, 200, dims=DIMS, labels=LABELS[:200])
    return main, neighbour, third


@pytest.fixture
def statements(monkeypatch):
    """Every statement psycopg is asked to run, with its parameters, as the engines send them."""
    seen: list[tuple[str, object]] = []
    execute = psycopg.Cursor.execute

    def recording(self, query, params=None, **kwargs):
        seen.append((query, params))
        return execute(self, query, params, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", recording)
    return seen


@contextmanager
def own_pool(db: Database):
    """A pool of its own that lends its connections last in, first out: queries run one at a time all run on one
    session (a checkout nested in another gets a second connection, handed back first)."""
    pool = open_engine(Database(sa.create_engine(db.engine.url, pool_use_lifo=True), db.kind, db.settings))
    try:
        yield pool
    finally:
        pool.dispose()


# --- 1. isolation -----------------------------------------------------------------------------------

CASES = {  # engine, filter: every statement shape a search sends
    "pgvector": ("pgvector", Filter()),
    "pgvector --label": ("pgvector", Filter.of("rare")),
    "pgvector --where": ("pgvector", Filter.of(where="label = 'rare' AND width > 0")),
    "raw": ("raw", Filter()),
    "raw --label": ("raw", Filter.of("rare")),
    "raw --where": ("raw", Filter.of(where="label LIKE 'ra%'")),
    "annoy": ("annoy", Filter()),
    "annoy --label": ("annoy", Filter.of("common")),  # the engine itself: a search of the 3% label would go exact
    "hnsw": ("hnsw", Filter()),
    "hnsw --label": ("hnsw", Filter.of("common")),
}
RUNS = 7  # psycopg prepares a statement on its 6th run; PostgreSQL may plan it generically from its 6th execution


def run_case(pool: Database, settings, main: Collection, case: str, queries: dict[str, np.ndarray]) -> None:
    """Search the main collection RUNS times with the case's engine and filter, through `pool`; every hit is its own."""
    engine, flt = CASES[case]
    coll = Collection(pool, settings, main.row)
    searcher = coll.raw_engine() if engine == "raw" else coll.engine(engine)
    for vector in queries[engine if engine == "raw" else "pca"][:RUNS]:
        hits = searcher.search(vector, 10, flt)
        assert len(hits) == 10 and {h.id for h in hits} <= queries["ids"], case


@pytest.fixture(scope="module")
def queries(db, colls) -> dict:
    main = colls[0]
    ids, pca = store.read_vectors(db, main.id, "embedding")
    return {"ids": set(ids.tolist()), "pca": pca[::97], "raw": store.read_vectors(db, main.id, "raw")[1][::97]}


def server_form(sql: str, params: dict) -> tuple[str, list]:
    """The statement as psycopg sends it ($1, $2, ... in order of first use; %% as %) and its values in that order."""
    order: list[str] = []

    def number(m: re.Match) -> str:
        if m.group(0) == "%%":
            return "%"
        if m.group(1) not in order:
            order.append(m.group(1))
        return f"${order.index(m.group(1)) + 1}"

    return re.sub(r"%%|%\((\w+)\)s", number, sql), [params[name] for name in order]


def plan_names(plan) -> tuple[set, set, int]:
    """(tables, indexes) a JSON plan reads, and how many partitions it holds that only its execution prunes
    ("Subplans Removed": a generic plan of `collection_id = $1`, which EXPLAIN EXECUTE shows pruned at start-up)."""
    tables, indexes, pruned = set(), set(), 0
    nodes = [plan]
    while nodes:
        node = nodes.pop()
        if isinstance(node, list):
            nodes.extend(node)
        elif isinstance(node, dict):
            tables.update([node["Relation Name"]] if "Relation Name" in node else [])
            indexes.update([node["Index Name"]] if "Index Name" in node else [])
            pruned += node.get("Subplans Removed", 0)
            nodes.extend(v for v in node.values() if isinstance(v, (list, dict)))
    return tables, indexes, pruned


def prepared_plans(conn: sa.Connection, sql: str, params: dict, *, engine: str) -> dict[str, tuple[set, set, int]]:
    """The plans of the statement this session has prepared for `sql`: as it runs after five executions
    (plan_cache_mode auto: PostgreSQL may have switched to a generic plan) and as a generic plan, whatever the values;
    for HNSW with sorting off, as the engine runs it."""
    text, values = server_form(sql, params)
    found = conn.exec_driver_sql("SELECT name, parameter_types FROM pg_prepared_statements"
                                 " WHERE statement = %s AND NOT from_sql", (text,)).all()
    assert len(found) == 1, f"this session has not prepared {text}"
    name, types = found[0]
    literal = psycopg.ClientCursor(conn.connection.driver_connection)  # EXECUTE takes values, not parameters
    plans = {}
    for mode in ("auto", "force_generic_plan"):
        literal.execute(f"SET LOCAL plan_cache_mode = {mode}" + ("; SET LOCAL enable_sort = off" if engine == "hnsw" else ""))
        literal.execute(f"EXPLAIN (FORMAT JSON) EXECUTE {name}({', '.join(f'%s::{t}' for t in types)})", values)
        plans[mode] = plan_names(literal.fetchone()[0])
    return plans


def engine_statement(statements: list, main: Collection) -> tuple[str, dict]:
    """The search statement the engine sent (the last), after checking it sent the same text every run."""
    sent = [(sql, params) for sql, params in statements if isinstance(sql, str) and f"collection_id = {main.id} " in sql]
    assert len(sent) >= RUNS and len({sql for sql, _ in sent[-RUNS:]}) == 1
    return sent[-1]


@pytest.mark.parametrize("case", CASES)
def test_every_statement_plans_only_its_collections_partitions_once_prepared(db, settings, colls, queries, statements, case):
    main = colls[0]
    engine, flt = CASES[case]
    ours = {partition("images", main.id), partition("features", main.id)}
    with own_pool(db) as pool:
        run_case(pool, settings, main, case, queries)
        sql, params = engine_statement(statements, main)
        paths = {}
        if flt.where is None:  # psycopg's own preparation, on the session that ran it (a --where runs on the reader,
            with pool.connect() as conn:  # whose read-only transactions end in a rollback: psycopg never prepares there)
                paths["automatic"] = prepared_plans(conn, sql, params, engine=engine)
        with (pool.reader() if flt.where else pool).connect() as conn:
            cur = store.raw_cursor(conn)
            for _ in range(RUNS):
                cur.execute(sql, params, prepare=True)
                cur.fetchall()
            paths["prepare=True"] = prepared_plans(conn, sql, params, engine=engine)
    for path, plans in paths.items():
        for mode, (tables, indexes, pruned) in plans.items():
            assert partition("images", main.id) in tables and tables <= ours | {"collections"}, (path, mode, tables)
            assert pruned == 0, (path, mode, f"{pruned} partitions pruned only when the plan runs")
            assert {int(m[1]) for m in map(PARTITION.match, indexes) if m} <= {main.id}, (path, mode, indexes)
            assert (partition("features", main.id) in tables) == (engine == "raw"), (path, mode, tables)
            if engine == "hnsw":
                assert index_name(main.id, DIMS) in indexes, (path, mode, indexes)


def partition_reads(db: Database, collection_ids: set[int]) -> dict[str, tuple[int, ...]]:
    """Scans and rows each partition of these collections has served so far, read afresh from the statistics."""
    with db.connect() as conn:
        conn.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
        rows = conn.exec_driver_sql("SELECT relname, seq_scan, seq_tup_read, coalesce(idx_scan, 0), coalesce(idx_tup_fetch, 0)"
                                    " FROM pg_stat_user_tables").all()
    return {r[0]: tuple(r[1:]) for r in rows if (m := PARTITION.match(r[0])) and int(m[1]) in collection_ids}


def flush_statistics(pool: Database) -> None:
    """Have every session of a pool publish what it has read now (a backend otherwise waits up to 10 s when idle)."""
    held = [pool.connect() for _ in range(pool.engine.pool.checkedin())]
    for conn in held:
        conn.exec_driver_sql("SELECT pg_stat_force_next_flush()")
        conn.commit()
        conn.close()


def settled_reads(db: Database, collection_ids: set[int], changed: str | None = None, before=None) -> dict:
    """`partition_reads` once two readings a second apart agree (and `changed` differs from `before`)."""
    deadline, last = time.monotonic() + 20, partition_reads(db, collection_ids)
    while True:
        time.sleep(1.0)
        now = partition_reads(db, collection_ids)
        if now == last and (changed is None or now[changed] != before[changed]):
            return now
        assert time.monotonic() < deadline, "the statistics did not settle"
        last = now


def test_searches_read_no_row_of_another_collection(db, settings, colls, queries):
    main, neighbour, third = colls
    others = {neighbour.id, third.id}
    db.engine.dispose()  # the fixture's sessions publish their statistics as they close
    before = settled_reads(db, others | {main.id})
    with own_pool(db) as pool:
        for case in CASES:
            run_case(pool, settings, main, case, queries)
        flush_statistics(pool)
        flush_statistics(pool.reader())
    after = settled_reads(db, others | {main.id}, changed=partition("features", main.id), before=before)
    grew = {name for name in after if after[name] != before[name]}
    assert {partition("images", main.id), partition("features", main.id)} <= grew  # the statistics do count these reads
    leaks = {name: (before[name], after[name]) for name in grew if int(PARTITION.match(name)[1]) != main.id}
    assert leaks == {}  # (seq_scan, seq_tup_read, idx_scan, idx_tup_fetch) before and after
    assert len([n for n in after if int(PARTITION.match(n)[1]) in others]) == 2 * len(TABLES)


# --- 2. ingest remove -----------------------------------------------------------------------------


def exists(db: Database, name: str) -> bool:
    with db.connect() as conn:
        return conn.exec_driver_sql("SELECT to_regclass(%s) IS NOT NULL", (name,)).scalar()


def invoke(cli, *args):
    return CliRunner().invoke(cli, [*map(str, args)])


def similar_json(*args) -> list[dict]:
    result = invoke(search_cli, "similar", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_remove_drops_the_partitions_and_a_new_collection_takes_the_name(db, settings, colls):
    _, neighbour, _ = colls
    doomed = synthetic(db, settings, DOOMED, 300, dims=DIMS)
    doomed.build_hnsw()
    gone = [partition(table, doomed.id) for table in TABLES] + [index_name(doomed.id, DIMS)]
    assert all(exists(db, name) for name in gone)
    probe = int(neighbour.image_ids()[5])
    searches = {e: similar_json("-c", NEIGHBOUR, "--id", probe, "--engine", e, "-k", 8) for e in ENGINES}

    removed = invoke(ingest_cli, "remove", "--collection", DOOMED, "--yes")
    assert removed.exit_code == 0 and f"{DOOMED}: removed" in removed.output, removed.output
    assert not [name for name in gone if exists(db, name)] and read_sidecar(settings.annoy_dir, DOOMED) is None
    with db.connect() as conn:
        left = [conn.exec_driver_sql(f"SELECT count(*) FROM {t} WHERE collection_id = %s", (doomed.id,)).scalar() for t in TABLES]
    assert left == [0] * len(TABLES)
    assert {e: similar_json("-c", NEIGHBOUR, "--id", probe, "--engine", e, "-k", 8) for e in ENGINES} == searches
    kept = Collection.named(db, settings, NEIGHBOUR).row
    assert len(searches["pgvector"]) == 8 and (kept.pca_version, kept.hnsw) == (neighbour.row.pca_version, True)

    again = synthetic(db, settings, DOOMED, 120, dims=8)  # the same name, paths and contents: nothing of the old one in the way
    assert again.id != doomed.id and exists(db, partition("images", again.id))
    again.build_hnsw()
    first, mine = int(again.image_ids()[0]), set(again.image_ids().tolist())
    for engine in ENGINES:
        hits = similar_json("-c", DOOMED, "--id", first, "--engine", engine, "-k", 5)
        assert hits[0]["id"] == first and len(hits) == 5 and {h["id"] for h in hits} <= mine, engine


# --- 3. HNSW per partition, selective filters exact ---------------------------------------------


def test_a_selective_filter_is_answered_exactly_and_an_unselective_one_by_the_partitions_hnsw(db, settings, colls, monkeypatch):
    main = colls[0]
    hnsw_index = index_name(main.id, DIMS)
    with db.connect() as conn:
        on = conn.exec_driver_sql("SELECT indrelid::regclass::text FROM pg_index WHERE indexrelid = to_regclass(%s)",
                                  (hnsw_index,)).all()
    assert on == [(partition("images", main.id),)]
    rare, common = Filter.of("rare"), Filter.of("common")
    # The load left statistics behind: the planner knows how many rows each label holds.
    expected = {flt: estimated_rows(db, main.id, flt, timeout=None) for flt in (rare, common)}
    assert expected[rare] == pytest.approx(RARE_ROWS, rel=0.2) and expected[common] == pytest.approx(3000 - RARE_ROWS, rel=0.2)
    monkeypatch.setattr(collection_module, "EXACT_FILTER_ROWS", 1000)  # between the two labels' sizes
    for flt in (rare, Filter.of(where="label = 'rare'")):
        assert main.searcher_for(flt, "hnsw").name == "pgvector", flt
    for flt in (common, Filter.of(where="label = 'common'"), Filter()):
        assert main.searcher_for(flt, "hnsw").name == "hnsw", flt
    assert main.searcher_for(rare, "annoy").name == "pgvector"  # Annoy's over-fetch could return fewer than k
    assert main.searcher_for(common, "annoy").name == "annoy"

    ids, vectors = store.read_vectors(db, main.id, "embedding")
    details = main.details(ids.tolist())
    labels = np.array([details[i].label for i in ids.tolist()])
    for q in vectors[::500]:
        hits = main.similar(q, 10, engine="hnsw", label="rare")
        want_ids, want_d = brute_force(ids[labels == "rare"], vectors[labels == "rare"], q, 10)
        assert [h.id for h in hits] == want_ids.tolist()
        np.testing.assert_allclose([h.distance for h in hits], want_d, rtol=1e-5, atol=1e-5)
        wide = main.similar(q, 10, engine="hnsw", label="common")
        assert len(wide) == 10 and {h.label for h in wide} == {"common"}
    assert f"Index Scan using {hnsw_index}" in main.engine("hnsw").explain(vectors[0], 10, common)


# --- 4. half precision ------------------------------------------------------------------------------


class LoudExtractor(FakeExtractor):
    """The fake model under weights of its own whose batches after the first come out 10^5 times larger: features half
    precision cannot hold. Remembers what it gave for each picture (by its pixels)."""

    weights = "fake-loud"
    fingerprint = hashlib.sha256(b"tests.test_partitions.LoudExtractor v1").hexdigest()

    def __init__(self):
        super().__init__()
        self.batches, self.gave = 0, {}

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        self.batches += 1
        raw = super().embed(pixels) * (1.0 if self.batches == 1 else 1e5)
        self.gave.update((hashlib.sha256(p.tobytes()).hexdigest(), r) for p, r in zip(pixels, raw))
        return raw


def test_features_beyond_half_precision_are_refused_in_one_line_and_not_stored(db, settings, tmp_path):
    folder = make_folder(tmp_path / "loud", per_label=4)  # 12 pictures: batches of 4, the 2nd and 3rd too loud
    loud = LoudExtractor()
    undo = register_extractor(loud, ("openvino", "tensorflow"))
    try:
        result = invoke(ingest_cli, "load", "folder", folder, "-c", LOUD, "--weights", "fake-loud", "--pca-dims", "2",
                        "--batch-size", "4", "--json")
    finally:
        undo()
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "beyond half precision's ±65504" in lines[0] and "--raw-features none" in lines[0]
    assert loud.batches >= 2 and max(np.abs(r).max() for r in loud.gave.values()) > 65504
    coll = Collection.named(db, settings, LOUD)
    ids, stored = store.read_vectors(db, coll.id, "raw")
    assert len(ids) == 4 and store.image_ids(db, coll.id, "embedding").size == 0  # the first batch only, never finished
    for image_id, raw in zip(ids.tolist(), stored):
        pixels = decode_image(read_file(coll.details([image_id])[image_id].path)).pixels
        given = loud.gave[hashlib.sha256(pixels.tobytes()).hexdigest()]
        np.testing.assert_array_equal(raw, given.astype(np.float16).astype(np.float32))  # half precision, nothing else lost


@pytest.mark.parametrize("worst", [65504.0, 65520.0, np.inf, np.nan])
def test_half_precisions_limit_is_checked_before_a_batch_is_written(db, settings, worst):
    coll = Collection(db, settings, store.create_row(db, f"part-limit-{worst}", "synthetic", "0" * 64, 4))
    raw, _ = raw_features(3, seed=5)
    raw[1, 7] = worst
    if worst == 65504.0:  # the largest half: stored as it is
        add_rows(coll, raw, ["x"] * 3, tag="h")
        assert store.read_vectors(db, coll.id, "raw")[1].max() == 65504.0
        return
    with pytest.raises(CollectionError, match="beyond half precision"):
        add_rows(coll, raw, ["x"] * 3, tag="h")
    with db.connect() as conn:
        assert [conn.exec_driver_sql(f"SELECT count(*) FROM {partition(t, coll.id)}").scalar() for t in TABLES] == [0] * 4


# --- 5. --raw-features none -------------------------------------------------------------------------


def one_line_error(result, says: str) -> None:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and says in lines[0] and "Traceback" not in result.output, result.output


def kept_features(db: Database, coll: Collection) -> int:
    with db.connect() as conn:
        return conn.exec_driver_sql(f"SELECT count(*) FROM {partition('features', coll.id)}").scalar()


def test_a_collection_that_keeps_no_raw_features(db, settings, fake_extractor, tmp_path):
    first = make_folder(tmp_path / "first", labels=tuple(COLOURS), per_label=4, seed=41)
    loaded = invoke(ingest_cli, "load", "folder", first, "-c", NO_RAW, "--weights", "fake", "--pca-dims", "3",
                    "--raw-features", "none", "--json")
    assert loaded.exit_code == 0, loaded.output
    coll = Collection.named(db, settings, NO_RAW)
    assert coll.row.raw_features == "none" and coll.pca is not None and kept_features(db, coll) == 0
    assert invoke(ingest_cli, "index", "-c", NO_RAW, "--no-annoy", "--hnsw").exit_code == 0
    item = int(coll.image_ids()[3])
    for engine in ENGINES:
        hits = similar_json("-c", NO_RAW, "--id", item, "--engine", engine, "-k", 5)
        assert hits[0]["id"] == item and len(hits) == 5, engine
    new = tmp_path / "new.png"
    make_picture(COLOURS["blue"], "circle", seed=4343).save(new)
    assert len(similar_json("-c", NO_RAW, new, "-k", 3)) == 3

    one_line_error(invoke(search_cli, "similar", "-c", NO_RAW, "--id", item, "--space", "raw"), "no raw features")
    one_line_error(invoke(search_cli, "similar", "-c", NO_RAW, new, "--space", "raw"), "--raw-features none")
    one_line_error(invoke(ingest_cli, "reduce", "-c", NO_RAW, "--pca-dims", "2"), "keeps no raw features")
    assert coll.reload().refit_due(3) is None and coll.dims == 3

    report = invoke(search_cli, "report", "-c", NO_RAW, "--out", tmp_path / "report", "-k", "2")
    assert report.exit_code == 0 and "Traceback" not in report.output, report.output
    assert f"raw features: skipped; collection '{NO_RAW}' keeps no raw features (loaded with --raw-features none)" \
        in report.output
    written = {p.name for p in (tmp_path / "report").iterdir()}
    assert "index.html" in written and not {"grid_raw.png", "tsne_raw_labels.png", "dims_sweep.png"} & written

    second = make_folder(tmp_path / "second", labels=("red", "green"), per_label=3, seed=42)
    again = invoke(ingest_cli, "load", "folder", second, "-c", NO_RAW, "--weights", "fake", "--json")  # keeps its own choice
    assert again.exit_code == 0 and json.loads(again.stdout)["ingested"] == 6, again.output
    coll.reload()
    assert kept_features(db, coll) == 0 and coll.image_ids().size == 22 and coll.row.hnsw
    newest = int(coll.image_ids()[-1])
    for engine in ENGINES:
        assert similar_json("-c", NO_RAW, "--id", newest, "--engine", engine, "-k", 3)[0]["id"] == newest, engine
