"""The Engine interface (ingest/engines.py): every registered engine implements it, names round-trip through the
registry, the CLI and the web API, knobs travel with each query to the same engine object, and duplicates,
evaluation and audits get what they need through its methods, on every engine, never from an engine's attributes."""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from fastapi.testclient import TestClient

import search.audit as audit_module
from ingest import annoy_engine, store
from ingest.annoy_index import sidecar_path
from ingest.collection import Collection
from ingest.engines import ENGINES, REGISTRY, Engine, EngineName, QueryArgs, engine_name, make_engine
from ingest.errors import IndexFileError, RisError
from ingest.store import ImageRow
from search.cli import cli as search_cli
from search.duplicates import find_duplicates
from search.evaluation import brute_force, engine_neighbours, exact_neighbours, recall
from search.serve import create_app

ROOT = Path(__file__).resolve().parent.parent
K = 10
THRESHOLD = 0.02  # the planted copies lie within 0.005 of their originals, distinct rows 0.13 apart or more


def add_rows(coll: Collection, raw: np.ndarray, *, tag: str) -> np.ndarray:
    """Store rows as a load's batch does (projected with the collection's PCA, if it has one); returns their ids."""
    rows = [ImageRow(f"/synthetic/{coll.name}/{tag}{i}.jpg", f"c{i % 5}", hashlib.sha256(f"{coll.name}/{tag}{i}".encode()).hexdigest(),
                     1, 1, 1) for i in range(len(raw))]
    store.insert_images(coll.db, coll.id, rows, raw, coll.pca.project(raw) if coll.pca is not None else None,
                        pca_version=coll.row.pca_version)
    with coll.db.connect() as conn:
        ids = conn.execute(sa.text("SELECT id FROM images WHERE collection_id = :c AND sha256 = ANY(:s) ORDER BY id"),
                           {"c": coll.id, "s": [r.sha256 for r in rows]}).scalars().all()
    return np.array(ids, dtype=np.int64)


def features(n: int, seed: int) -> np.ndarray:
    """Non-negative 2048-d vectors without clusters (like pooled CNN features, but hard for an approximate index)."""
    return np.abs(np.random.default_rng(seed).normal(size=(n, 2048))).astype(np.float32)


def made(db, settings, name: str, n: int, *, dims: int, trees: int, hnsw: bool = False) -> Collection:
    row = store.create_row(db, name, "synthetic", "0" * 64, dims)
    coll = Collection(db, settings, row)
    add_rows(coll, features(n, seed=len(name)), tag="r")
    coll.finish(trees=trees)
    if hnsw:
        coll.build_hnsw()
    return coll


@pytest.fixture(scope="module")
def hard(db, settings):
    """3000 unclustered rows in 32 dims, a 3-tree Annoy file and an HNSW index: knobs matter here."""
    return made(db, settings, "engines-hard", 3000, dims=32, trees=3, hnsw=True)


@pytest.fixture(scope="module")
def twins(db, settings):
    """200 rows and near-copies of 5 of them (the last copy written after the Annoy build: the file's delta), every index."""
    coll = made(db, settings, "engines-twins", 200, dims=16, trees=20, hnsw=True)
    _, raw = store.vectors_of(db, coll.id, "raw", store.image_ids(db, coll.id)[:5])
    copies = raw + np.random.default_rng(3).normal(scale=0.05, size=raw.shape).astype(np.float32)
    add_rows(coll, copies[:4], tag="copy")
    coll.finish(trees=20, rebuild=True)
    add_rows(coll, copies[4:], tag="late")  # not in the file
    return Collection.named(db, settings, coll.name)


def truth(coll: Collection, vectors: np.ndarray, k: int) -> list[list[int]]:
    ids, stored = coll.read_vectors("embedding")
    return [brute_force(ids, stored, v, k)[0].tolist() for v in vectors]


def test_every_registered_engine_implements_the_interface(twins):
    assert set(REGISTRY) == set(EngineName)
    for name, cls in REGISTRY.items():
        assert issubclass(cls, Engine) and not cls.__abstractmethods__ and cls.name is name and isinstance(cls.exact, bool)
        engine = twins.engine(name)
        assert isinstance(engine, cls) and engine.problem() is None
    assert [n for n in EngineName if REGISTRY[n].exact] == [EngineName.PGVECTOR]
    assert Engine.__abstractmethods__ == {"problem", "search"}


def test_the_registry_round_trips_names(db, settings, twins):
    assert ENGINES == ("pgvector", "annoy", "hnsw") and all(type(n) is str for n in ENGINES)
    for text in ENGINES:
        name = engine_name(text)
        assert name == text and str(name) == text and engine_name(name) is name
        assert make_engine(text, db, twins.row, settings).name is name and twins.engine(text) is twins.engine(name)
    choice = next(p for p in search_cli.commands["similar"].params if p.name == "engine")
    assert list(choice.type.choices) == list(ENGINES) and choice.default == "pgvector"
    with TestClient(create_app(settings, db, collection=twins.name, allowed_hosts=["testserver"])) as client:
        assert client.get("/api/status").json()["engines"] == list(ENGINES)
        listed = {c["name"]: c for c in client.get("/api/collections").json()}
        assert listed[twins.name]["engines"] == {name: None for name in ENGINES}


@pytest.mark.parametrize("call", [
    lambda coll: coll.engine("faiss"),
    lambda coll: coll.similar(np.zeros(16, np.float32), 3, engine="faiss"),
    lambda coll: coll.check_searchable("faiss"),
    lambda coll: coll.similar(coll.query(image_id=int(coll.image_ids()[0]), space="raw"), 3, engine="faiss", space="raw"),
])
def test_an_unknown_engine_is_one_line(twins, call):
    with pytest.raises(RisError) as refused:
        call(twins)
    assert str(refused.value) == "unknown engine 'faiss'; choose one of pgvector, annoy, hnsw"


def test_an_unknown_engine_on_the_command_line_is_one_line(twins):
    result = CliRunner().invoke(search_cli, ["similar", "-c", twins.name, "--id", "1", "--engine", "faiss"])
    assert result.exit_code == 2 and "'faiss' is not one of 'pgvector', 'annoy', 'hnsw'" in result.output
    assert "Traceback" not in result.output


def test_annoy_search_k_per_query_changes_recall_not_the_engine(hard):
    engine = hard.engine(EngineName.ANNOY)
    _, vectors = hard.vectors_of("embedding", hard.image_ids()[:30])
    queries = vectors + np.random.default_rng(1).normal(scale=0.05, size=vectors.shape).astype(np.float32)
    want = truth(hard, queries, K)
    found = {search_k: [[h.id for h in hard.similar(q, K, engine="annoy", search_k=search_k)] for q in queries]
             for search_k in (1, 10**6)}
    assert recall(found[1], want) < 0.5 and recall(found[10**6], want) == 1.0
    assert hard.engine("annoy") is engine  # one engine, whatever the knobs
    assert engine.describe(K, QueryArgs(search_k=77))["search_k"] == 77
    assert engine.describe(K)["search_k"] == 2 * 3 * (K + 1)  # the default: twice Annoy's own


def test_hnsw_ef_search_per_query_changes_recall_not_the_engine(hard):
    engine = hard.engine(EngineName.HNSW)
    _, vectors = hard.vectors_of("embedding", hard.image_ids()[:40])
    queries = vectors + np.random.default_rng(2).normal(scale=0.3, size=vectors.shape).astype(np.float32)
    want = truth(hard, queries, K)
    found = {ef: [[h.id for h in hard.similar(q, K, engine="hnsw", ef_search=ef)] for q in queries] for ef in (1, 1000)}
    assert recall(found[1], want) < recall(found[1000], want) and recall(found[1000], want) >= 0.98
    assert hard.engine("hnsw") is engine
    assert engine.describe(K, QueryArgs(ef_search=1)) == {"ef_search": K} and engine.describe(K) == {"ef_search": 800}
    assert "Index Scan using" in engine.explain(queries[0], K, args=QueryArgs(ef_search=1))


def test_query_args_refuse_what_no_engine_takes():
    assert QueryArgs.of(-1, None) == QueryArgs() and QueryArgs.of(0) == QueryArgs() and QueryArgs.of(50, 40) == QueryArgs(50, 40)
    with pytest.raises(RisError, match="--ef-search must be between 1 and 1000, got 1001"):
        QueryArgs(ef_search=1001)
    with pytest.raises(RisError, match="search_k must be at least 1"):
        QueryArgs(search_k=0)


def test_each_engine_says_what_to_run_when_it_cannot_answer(db, settings):
    coll = made(db, settings, "engines-unready", 60, dims=8, trees=5)
    assert coll.engine("pgvector").problem() is None
    assert coll.engine("hnsw").problem() == ("collection 'engines-unready' has no HNSW index; "
                                             "run `ingest index --hnsw --collection engines-unready`")
    annoy = coll.engine("annoy")
    saved = sidecar_path(settings.annoy_dir, coll.name).read_text()
    sidecar_path(settings.annoy_dir, coll.name).unlink()
    problem = annoy.problem()
    assert problem.startswith("no Annoy index at ") and problem.endswith("; run `ingest index --collection engines-unready`")
    for call in (lambda: annoy.search(np.zeros(8, np.float32), 3), lambda: annoy.neighbours_of_stored(1, 3),
                 lambda: list(annoy.neighbourhoods(3)), annoy.pending_ids):
        with pytest.raises(IndexFileError) as refused:
            call()
        assert str(refused.value) == problem
    sidecar_path(settings.annoy_dir, coll.name).write_text(saved)
    assert annoy.problem() is None and coll.engine("annoy") is annoy  # the same engine answers once the file is back
    coll.build_hnsw()
    assert coll.engine("hnsw").problem() is None


def test_duplicates_are_found_through_the_interface_on_every_engine(twins):
    engine = twins.engine("annoy")
    late = engine.pending_ids()
    assert len(late) == 1 and late[0] == twins.image_ids()[-1]  # the late copy is the file's delta
    assert all(len(e.pending_ids()) == 0 for e in (twins.engine("pgvector"), twins.engine("hnsw")))
    ids, vectors = twins.read_vectors("embedding")
    d = np.linalg.norm(vectors[:, None, :].astype(np.float64) - vectors[None, :, :], axis=2)
    within = [[int(ids[a]), int(ids[b])] for a, b in zip(*np.nonzero(np.triu(d <= THRESHOLD, 1)))]  # numpy, all pairs
    assert len(within) == 5 and {i for pair in within for i in pair} == set(ids[:5].tolist()) | set(ids[200:].tolist())
    for name in ENGINES:
        report = find_duplicates(twins, THRESHOLD, engine=name, search_k=10**6)
        assert sorted(sorted(m.id for m in g.members) for g in report.groups) == sorted(within), name
        assert report.images == 205 and all(g.kind == "near" for g in report.groups), name


def test_removed_rows_never_come_back_from_any_neighbourhood(db, settings, monkeypatch):
    monkeypatch.setattr(annoy_engine, "SCAN_BLOCK", 7)  # the file is scanned in many blocks, a few in flight at once
    coll = made(db, settings, "engines-removed", 150, dims=8, trees=10, hnsw=True)
    gone = coll.image_ids()[::10].tolist()
    assert store.remove_images(db, coll.id, gone) == len(gone)
    coll = Collection.named(db, settings, coll.name)
    living = set(coll.image_ids().tolist())
    for name in ENGINES:
        hoods = list(coll.engine(name).neighbourhoods(5, QueryArgs(search_k=10**6)))
        assert len(hoods) == len(living) and {h.image_id for h in hoods} == living, name
        assert all(len(h.ids) == 5 and set(h.ids.tolist()) <= living - {h.image_id} for h in hoods), name
        assert all(np.all(np.diff(h.distances) >= -1e-6) for h in hoods), name


def test_evaluation_reads_each_engines_own_neighbours(twins):
    ids, vectors = twins.read_vectors("embedding")
    rows = np.arange(0, len(ids), 7)
    exact = exact_neighbours(ids, vectors, rows, K).tolist()
    assert engine_neighbours(twins.engine("pgvector"), ids, rows, K) == exact
    in_file = exact_neighbours(ids[:-1], vectors[:-1], rows, K).tolist()  # the file lacks the late copy
    assert engine_neighbours(twins.engine("annoy"), ids[:-1], rows, K, args=QueryArgs(search_k=10**6)) == in_file
    assert recall(engine_neighbours(twins.engine("hnsw"), ids, rows, K), exact) >= 0.95
    assert twins.engine("annoy").neighbours_of_stored(int(ids[-1]), K) == []  # the late copy is not in the file


def test_audits_find_neighbours_with_any_engine(twins, monkeypatch):
    images = audit_module.load_images(twins, None)
    exact = audit_module.neighbours(twins, images, 5)
    monkeypatch.setattr(audit_module, "EXACT_MAX_ROWS", 0)
    for name in ENGINES:
        near = audit_module.neighbours(twins, images, 5, engine=name)
        assert near.engine["engine"] == name
        assert recall(near.rows.tolist(), exact.rows.tolist()) >= (1.0 if name == "pgvector" else 0.95), name
        assert not np.any(near.rows == np.arange(len(images.ids))[:, None]), name
    annoy = audit_module.neighbours(twins, images, 5, engine="annoy")
    assert annoy.engine["delta_rows"] == 1 and annoy.engine["trees"] == 20


BANNED = {"index", "ids", "sidecar", "search_k_for", "lookup", "removed", "open_checked", "ef_search", "run", "sql"}


def reaches_into_an_engine(node: ast.AST) -> bool:
    """`engine.index`, `annoy_engine.ids`, `coll.engine(...).sidecar`: an attribute of an engine that the interface lacks."""
    if not isinstance(node, ast.Attribute) or node.attr not in BANNED:
        return False
    owner = node.value
    if isinstance(owner, ast.Name):
        return "engine" in owner.id
    return isinstance(owner, ast.Call) and isinstance(owner.func, ast.Attribute) and owner.func.attr in ("engine", "searcher_for")


@pytest.mark.parametrize("path", sorted((ROOT / "search").glob("*.py")), ids=lambda p: p.name)
def test_search_never_reaches_into_an_engine(path):
    tree = ast.parse(path.read_text(), str(path))
    assert [ast.unparse(n) for n in ast.walk(tree) if reaches_into_an_engine(n)] == []
