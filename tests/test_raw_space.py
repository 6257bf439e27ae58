"""search similar --space raw: exact KNN over the stored 2048-d features equals numpy brute force over
normalised features.raw, keeps filters inside the collection, and refuses approximate engines in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ingest.collection import Collection
from ingest.reduce import normalize
from ingest.store import read_vectors
from search.cli import cli as search_cli
from search.evaluation import brute_force
from tests.helpers import COLOURS, make_folder, make_picture

NAME, OTHER = "raw-space", "raw-space-other"


@pytest.fixture(scope="module")
def colls(db, settings, fake_extractor, tmp_path_factory):
    """Two collections of the fake model: 4 labels x 5 pictures, and a neighbour whose rows a filter must never reach."""
    from ingest.load import load_collection
    from ingest.sources import walk_folder

    root = tmp_path_factory.mktemp("raw-space")
    folder = make_folder(root / "pics", labels=tuple(COLOURS), per_label=5, seed=21)
    load_collection(db, settings, NAME, walk_folder(folder)[0], fake_extractor, pca_dims=3, progress=False)
    other = make_folder(root / "other", labels=("red",), per_label=3, seed=22)
    load_collection(db, settings, OTHER, walk_folder(other)[0], fake_extractor, pca_dims=2, progress=False)
    return folder, Collection.named(db, settings, NAME)


def raw_matrix(db, coll):
    ids, raw = read_vectors(db, coll.id, "raw")
    return ids, normalize(raw)


def similar_json(*args):
    result = CliRunner().invoke(search_cli, ["similar", "-c", NAME, "--json", "--space", "raw", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_raw_space_equals_numpy_brute_force(db, colls):
    _, coll = colls
    ids, raw = raw_matrix(db, coll)
    rng = np.random.default_rng(0)
    for q in [*raw[:4], np.abs(rng.normal(size=raw.shape[1])).astype(np.float32) * 7]:  # any scale: normalised first
        hits = coll.similar(q, 9, space="raw")
        want_ids, want_d = brute_force(ids, raw, normalize(q[np.newaxis])[0], 9)
        assert [h.id for h in hits] == want_ids.tolist()
        np.testing.assert_allclose([h.distance for h in hits], want_d, rtol=1e-3, atol=1e-4)  # stored and searched in half precision


def test_by_id_by_file_and_by_new_picture(db, colls, tmp_path):
    folder, coll = colls
    ids, raw = raw_matrix(db, coll)
    item = int(ids[7])
    by_id = similar_json("--id", str(item), "-k", "5")
    assert [h["id"] for h in by_id] == brute_force(ids, raw, raw[7], 5)[0].tolist() and by_id[0]["distance"] == pytest.approx(0, abs=1e-6)
    assert similar_json(by_id[0]["path"], "-k", "5") == by_id  # a stored file: its stored features, no CNN
    excluded = similar_json("--id", str(item), "-k", "5", "--exclude-self")
    assert [h["id"] for h in excluded] == [h["id"] for h in by_id[1:]] + [brute_force(ids, raw, raw[7], 6)[0][5]]
    new = tmp_path / "new.png"
    make_picture(COLOURS["blue"], "circle", seed=4242).save(new)
    query = coll.query(image=new, space="raw")
    assert query.raw.shape == (2048,) and query.vector.shape == (coll.dims,)  # embedded once: both vectors
    want = brute_force(ids, raw, normalize(query.raw[np.newaxis])[0], 4)[0].tolist()
    assert [h["id"] for h in similar_json(str(new), "-k", "4")] == want
    plot = tmp_path / "raw.png"
    similar_json(str(new), "-k", "3", "--plot", str(plot))
    with Image.open(plot) as img:
        assert img.format == "PNG"


def test_filters_stay_inside_the_collection(db, colls):
    _, coll = colls
    ids, raw = raw_matrix(db, coll)
    hits = similar_json("--id", str(ids[0]), "-k", "50", "--where", "true")
    assert sorted(h["id"] for h in hits) == sorted(ids.tolist())  # every row of this collection, none of the other
    blue = similar_json("--id", str(ids[0]), "-k", "3", "--label", "blue")
    assert len(blue) == 3 and {h["label"] for h in blue} == {"blue"}
    where = similar_json("--id", str(ids[0]), "-k", "20", "--where", "path LIKE '%_1.jpg'")
    assert len(where) == 4 and all(h["path"].endswith("_1.jpg") for h in where)


@pytest.mark.parametrize("args, error", [
    (["--engine", "annoy"], "--engine annoy searches the PCA space only"),
    (["--engine", "hnsw"], "--engine hnsw searches the PCA space only"),
    (["--where", "1=1) OR (1=1"], "is not a SQL condition: syntax error"),
])
def test_refusals_are_one_line(db, colls, args, error):
    item = str(read_vectors(db, colls[1].id, "raw")[0][0])
    result = CliRunner().invoke(search_cli, ["similar", "-c", NAME, "--space", "raw", "--id", item, *args])
    assert result.exit_code == 1 and error in result.output and "Traceback" not in result.output, result.output
