"""The scale design, on small collections made straight through the write path (no CNN):
an Annoy file plus its delta, removed rows, the HNSW engine and its plan, files sized by their own
collection, and PCA fitted on a bounded sample."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from ingest import projections, store
from ingest.annoy_index import read_sidecar
from ingest.collection import Collection
from ingest.counts import count_searchable
from ingest.errors import IndexFileError
from ingest.filters import Filter
from ingest.reduce import fit_pca
from tests.helpers import add_rows, raw_features, synthetic


def exact(coll: Collection, vector: np.ndarray, k: int, **filters) -> list[int]:
    return [h.id for h in coll.similar(vector, k, engine="pgvector", **filters)]


def test_rows_added_after_the_build_are_searched_exactly_beside_the_file(db, settings):
    coll = synthetic(db, settings, "delta", 300)
    built = read_sidecar(settings.annoy_dir, "delta")
    new_raw, _ = raw_features(6, clusters=1, seed=7, shift=3.0)  # a new, distant cluster: the delta is the whole answer
    new_ids = add_rows(coll, new_raw, ["new"] * 6, tag="n")
    coll.reload()
    assert coll.index_delta(100) == 6 and read_sidecar(settings.annoy_dir, "delta") == built
    _, vectors = store.vectors_of(db, coll.id, "embedding", new_ids)
    hits = coll.similar(vectors[0], 6, engine="annoy")
    assert [h.id for h in hits] == exact(coll, vectors[0], 6) and {h.id for h in hits} == set(new_ids.tolist())
    np.testing.assert_allclose([h.distance for h in hits], [h.distance for h in coll.similar(vectors[0], 6)], atol=1e-4)
    # Anywhere else, file and delta merge into the exact answer when Annoy searches every tree fully.
    _, old = store.vectors_of(db, coll.id, "embedding", store.image_ids(db, coll.id, "embedding")[:5])
    for v in old:
        assert [h.id for h in coll.similar(v, 10, engine="annoy", search_k=10**6)] == exact(coll, v, 10)


def test_a_load_rebuilds_the_file_only_past_the_delta_threshold(db, settings):
    small = dataclasses.replace(settings, annoy_max_delta=10)
    coll = Collection.named(db, small, synthetic(db, settings, "threshold", 200).name)
    first = read_sidecar(settings.annoy_dir, "threshold")
    more, _ = raw_features(15, seed=3)
    add_rows(coll, more[:8], ["x"] * 8, tag="a")
    coll.finish(trees=10)
    assert read_sidecar(settings.annoy_dir, "threshold").file == first.file
    engine = coll.engine("annoy")  # opened on the first file; it follows the swap by itself
    assert engine.sidecar.file == first.file
    add_rows(coll, more[8:], ["x"] * 7, tag="b")
    coll.finish(trees=10)
    rebuilt = read_sidecar(settings.annoy_dir, "threshold")
    assert rebuilt.file != first.file and rebuilt.items == 215 and coll.index_delta(10) == 0
    assert not (settings.annoy_dir / first.file).exists()  # superseded files go
    assert engine.search(engine.index.get_item_vector(0), 1)[0].id == engine.ids[0] and engine.sidecar == rebuilt


def test_removed_rows_never_come_back_from_any_engine(db, settings):
    coll = synthetic(db, settings, "removed", 400)
    coll.build_hnsw()
    ids, vectors = store.vectors_of(db, coll.id, "embedding", store.image_ids(db, coll.id, "embedding"))
    query = vectors[0]
    nearest = exact(coll, query, 15)
    assert store.remove_images(db, coll.id, nearest[:12]) == 12
    coll = Collection.named(db, settings, "removed")
    assert coll.row.removed_rows == 12
    for engine in ("pgvector", "annoy", "hnsw"):
        found = [h.id for h in coll.similar(query, 10, engine=engine, search_k=10**6)]
        assert len(found) == 10 and not set(found) & set(nearest[:12]), engine
        assert found[:3] == nearest[12:15], engine


def test_hnsw_queries_use_the_collections_partition_index_and_stay_fresh(db, settings):
    coll = synthetic(db, settings, "hnsw", 2000, dims=16)
    name = coll.build_hnsw()
    assert name == f"images_p{coll.id}_hnsw_16"
    engine = coll.engine("hnsw")
    _, vectors = store.vectors_of(db, coll.id, "embedding", store.image_ids(db, coll.id, "embedding")[:20])
    for v in vectors:  # past psycopg's prepare threshold: a generic plan must still use the partition's index
        engine.search(v, 10, Filter())
    assert f"Index Scan using {name}" in engine.explain(vectors[0], 10, Filter())
    assert f"Index Scan using {name}" in engine.explain(vectors[0], 10, Filter.of(exclude=1))
    recall = np.mean([len(set(h.id for h in engine.search(v, 10)) & set(exact(coll, v, 10))) / 10 for v in vectors])
    assert recall >= 0.9
    # Always fresh: a row stored after the build is found at once.
    new_raw, _ = raw_features(1, clusters=1, seed=11, shift=3.0)
    (new_id,) = add_rows(coll, new_raw, ["new"], tag="n")
    assert engine.search(coll.pca.project(new_raw)[0], 1)[0].id == new_id
    # The exact engine never uses it.
    assert [h.id for h in coll.similar(vectors[1], 10)] == exact(coll, vectors[1], 10)


def test_filtered_hnsw_still_returns_k(db, settings):
    labels = ["rare" if i % 100 == 0 else "common" for i in range(3000)]  # 1% of the rows
    coll = synthetic(db, settings, "rare", 3000, labels=labels)
    coll.build_hnsw()
    _, vectors = store.vectors_of(db, coll.id, "embedding", store.image_ids(db, coll.id, "embedding")[:5])
    for v in vectors:
        hits = coll.similar(v, 10, engine="hnsw", label="rare", ef_search=40)
        assert len(hits) == 10 and {h.label for h in hits} == {"rare"}
        assert [h.distance for h in hits] == sorted(h.distance for h in hits)


def test_an_annoy_file_is_sized_by_its_own_collection(db, settings):
    synthetic(db, settings, "big-first", 3000)
    small = synthetic(db, settings, "ten", 10, dims=4)
    sidecar = read_sidecar(settings.annoy_dir, "ten")
    assert sidecar.items == 10 and min(store.image_ids(db, small.id, "embedding")) > 3000
    assert (settings.annoy_dir / sidecar.file).stat().st_size < 1_000_000
    assert len(small.engine("annoy").index.get_item_vector(9)) == 4 and small.engine("annoy").index.get_n_items() == 10


def test_an_open_annoy_engine_refuses_once_the_pca_changes(db, settings):
    coll = synthetic(db, settings, "refit-open", 100)
    engine = coll.engine("annoy")
    _, raw = store.vectors_of(db, coll.id, "raw", store.image_ids(db, coll.id))
    projections.save_pca(db, coll.id, fit_pca(raw, 8))
    with pytest.raises(IndexFileError, match="stale"):
        engine.search(np.zeros(8, np.float32), 5)


def test_pca_is_fitted_on_a_bounded_seeded_sample(db, settings, monkeypatch):
    from ingest import collection

    monkeypatch.setattr(collection, "PCA_SAMPLE", 60)
    coll = synthetic(db, settings, "sampled", 150, dims=4)
    ids = store.image_ids(db, coll.id)
    chosen = np.sort(np.random.default_rng(collection.PCA_SEED).choice(ids, 60, replace=False))
    _, raw = store.vectors_of(db, coll.id, "raw", chosen)
    np.testing.assert_allclose(coll.pca.components, fit_pca(raw, 4).components, atol=1e-5)
    assert count_searchable(db, coll.id) == 150  # every row is projected, not only the sample


def test_hnsw_from_the_command_line(db, settings):
    from click.testing import CliRunner

    from ingest.cli import cli as ingest_cli
    from search.cli import cli as search_cli

    coll = synthetic(db, settings, "hnsw-cli", 300)
    first = int(store.image_ids(db, coll.id, "embedding")[0])
    query = ["similar", "-c", "hnsw-cli", "--id", str(first), "--engine", "hnsw", "--json"]
    refused = CliRunner().invoke(search_cli, query)
    assert refused.exit_code == 1 and "ingest index --hnsw --collection hnsw-cli" in refused.output
    built = CliRunner().invoke(ingest_cli, ["index", "-c", "hnsw-cli", "--no-annoy", "--hnsw"])
    assert built.exit_code == 0 and f"images_p{coll.id}_hnsw_8" in built.output, built.output
    found = CliRunner().invoke(search_cli, query + ["--ef-search", "64"])
    assert found.exit_code == 0 and json.loads(found.stdout)[0]["id"] == first, found.output
    status = json.loads(CliRunner().invoke(ingest_cli, ["status", "--json"]).stdout)
    assert next(c for c in status["collections"] if c["name"] == "hnsw-cli")["hnsw"] is True
    assert CliRunner().invoke(ingest_cli, ["index", "-c", "hnsw-cli", "--no-annoy", "--drop-hnsw"]).exit_code == 0
    assert CliRunner().invoke(search_cli, query).exit_code == 1
