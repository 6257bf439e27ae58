"""search report: a small collection stored through the fake extractor (the report reads stored vectors; the model is
not its subject), reports built on it, files and numbers checked against an independent computation (read_vectors +
brute force by hand, Annoy searched one query at a time)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from PIL import Image

from ingest.reduce import normalize
from ingest.collection import Collection
from ingest.load import load_collection
from ingest.sources import walk_folder
from ingest.store import read_vectors
from search.cli import cli as search_cli
from search.evaluation import brute_force, exact_neighbours
from search.figures import grid_cells
from search.report import build_report
from search.tsne import tsne_perplexity
from tests.helpers import collection_row, make_folder

NAME = "report-shapes"
K = 4


@pytest.fixture(scope="module")
def collection(tmp_path_factory, db, settings, fake_extractor):
    """24 pictures, 4 labels x 6, stored at 4 dims through the fake extractor."""
    folder = make_folder(tmp_path_factory.mktemp("report") / "pictures", labels=("red", "green", "blue", "yellow"), per_label=6)
    summary = load_collection(db, settings, NAME, walk_folder(folder)[0], fake_extractor, pca_dims=4, root=folder, progress=False)
    assert summary.ingested == 24 and summary.failed == 0
    return collection_row(db, NAME)


@pytest.fixture(scope="module")
def report(collection, db, settings, tmp_path_factory):
    out = tmp_path_factory.mktemp("report-out")
    return build_report(db, settings, NAME, out, seed=0, k=K, progress=False)


def by_hand(db, settings, coll):
    """Leave-one-out precision@k (exact and Annoy) and Annoy's recall, one query at a time."""
    ids, vectors = read_vectors(db, coll.id, "embedding")
    with db.engine.connect() as conn:
        label = dict(conn.execute(sa.text("SELECT id, label FROM images WHERE collection_id = :c"), {"c": coll.id}).all())
    annoy = Collection.named(db, settings, coll.name)
    exact_p, annoy_p, recall = [], [], []
    for item, vector in zip(ids.tolist(), vectors):
        near, _ = brute_force(ids, vectors, vector, K + 1)
        near = [i for i in near.tolist() if i != item][:K]
        approx = [h.id for h in annoy.similar(vector, K, engine="annoy", exclude=item)]
        exact_p.append(sum(label[i] == label[item] for i in near) / K)
        annoy_p.append(sum(label[i] == label[item] for i in approx) / K)
        recall.append(len(set(near) & set(approx)) / K)
    return np.mean(exact_p), np.mean(annoy_p), np.mean(recall)


def test_every_file_is_written_and_linked(report):
    html = report.files[0]
    assert html.name == "index.html" and html.parent == report.out
    pngs = report.files[1:]
    names = {p.name for p in pngs}
    assert {"tsne_labels.png", "tsne_clusters.png", "tsne_thumbnails.png", "pca_variance.png", "quality_labels.png", "latency.png"} <= names
    assert {"tsne_raw_labels.png", "tsne_raw_clusters.png", "tsne_raw_thumbnails.png", "dims_sweep.png"} <= names
    assert {f"neighbours_{i}.png" for i in range(1, 6)} | {"grid_raw.png", "grid_pca.png", "grid_annoy.png"} <= names
    page = html.read_text()
    for png in pngs:
        assert png.exists() and png.parent == report.out
        with Image.open(png) as img:
            img.verify()
        with Image.open(png) as img:
            assert img.format == "PNG" and img.width >= 400 and img.height >= 200, (png.name, img.size)
        assert f'src="{png.name}"' in page
    assert set(re.findall(r'src="([^"]+)"', page)) == names  # relative links only, nothing missing or extra
    for number in (report.precision_exact, report.precision_annoy, report.annoy_recall):
        assert f"{number:.3f}" in page
    assert "openTSNE" in page and "perplexity" in page and {"t-SNE", "t-SNE, raw features", "dims sweep"} <= set(report.timings)
    sections = [page.index(h) for h in ("<h2>1. KNN on the raw 2048-d features", "<h2>2. KNN after PCA", "<h2>3. Annoy")]
    assert sections == sorted(sections) and "Which method to pick" in page and "Quality against dimensions" in page
    for start, end, files in ((sections[0], sections[1], ("tsne_raw_labels", "tsne_raw_clusters", "tsne_raw_thumbnails", "grid_raw")),
                              (sections[1], sections[2], ("tsne_labels", "tsne_clusters", "tsne_thumbnails", "grid_pca")),
                              (sections[2], len(page), ("grid_annoy",))):
        assert all(f'src="{f}.png"' in page[start:end] for f in files)
    assert json.loads((report.out / "summary.json").read_text()) == json.loads(json.dumps(report.to_dict()))


def test_every_section_shows_the_same_queries(report):
    with Image.open(report.out / "grid_raw.png") as a, Image.open(report.out / "grid_annoy.png") as b:
        assert a.size == b.size  # one row per query, k + 1 pictures a row, in every section
    assert report.raw_note is None and report.precision_raw is not None and report.raw_agreement == 1.0
    page = (report.out / "index.html").read_text()
    assert page.count("query 1") >= 1 and "KNN, raw features (exact, SQL)" in page and "Annoy (approximate)" in page


def test_numbers_match_an_independent_computation(report, collection, db, settings):
    exact, annoy, recall = by_hand(db, settings, collection)
    assert report.images == report.sampled == 24 and report.labels == 4 and report.k == K
    assert report.precision_exact == pytest.approx(exact, abs=1e-12)
    assert report.precision_annoy == pytest.approx(annoy, abs=1e-12)
    assert report.annoy_recall == pytest.approx(recall, abs=1e-12) and 0 <= report.annoy_recall <= 1
    assert report.pgvector_agreement == 1.0  # pgvector's own answers equal the numpy ones
    scores = report.best_labels + report.worst_labels
    assert {s.label for s in scores} == {"red", "green", "blue", "yellow"} and all(s.queries == 6 for s in scores)
    assert report.best_labels[0].exact == max(s.exact for s in scores)
    assert np.mean([s.exact for s in report.best_labels]) == pytest.approx(exact)  # equal-sized labels
    _, raw = read_vectors(db, collection.id, "raw")
    from sklearn.decomposition import PCA

    kept = PCA().fit(normalize(raw)).explained_variance_ratio_[: collection.pca_dims].sum()
    assert report.explained_variance == pytest.approx(kept, abs=1e-4)
    engines = [t.engine for t in report.latency]
    assert engines[0].startswith("pgvector") and any(e.startswith("Annoy") for e in engines) and engines[-1] == "numpy brute force"
    assert all(0 < t.p50_ms <= t.p95_ms for t in report.latency)
    assert report.tsne_xy.shape == (24, 2) and np.isfinite(report.tsne_xy).all()
    assert report.tsne_raw_xy.shape == (24, 2) and np.isfinite(report.tsne_raw_xy).all()


def test_raw_precision_and_the_dims_sweep_match_numpy(report, collection, db):
    """Raw KNN and each sweep dims recomputed by hand: sklearn's PCA of that many components fitted on the normalised
    raw features, then one brute-force query at a time, leaving the query out."""
    from sklearn.decomposition import PCA

    ids, raw = read_vectors(db, collection.id, "raw")
    raw = normalize(raw)
    with db.engine.connect() as conn:
        label = dict(conn.execute(sa.text("SELECT id, label FROM images WHERE collection_id = :c"), {"c": collection.id}).all())

    def precision(vectors):
        found = [[i for i in brute_force(ids, vectors, v, K + 1)[0].tolist() if i != item][:K] for item, v in zip(ids.tolist(), vectors)]
        return np.mean([sum(label[i] == label[item] for i in near) / K for item, near in zip(ids.tolist(), found)])

    assert report.precision_raw == pytest.approx(precision(raw), abs=1e-12)
    sweep = {(r.method, r.dims): r for r in report.sweep}
    assert sorted(d for m, d in sweep if m == "exact KNN, PCA") == [10, 20]  # the reference's dims below 24 images
    for d in (10, 20):
        projected = PCA(n_components=d, svd_solver="full").fit_transform(raw).astype(np.float32)
        assert sweep[("exact KNN, PCA", d)].precision == pytest.approx(precision(projected), abs=1e-12), d
        assert sweep[("exact KNN, PCA", d)].reference == {10: 0.66, 20: 0.80}[d]  # the published precision@4 beside ours
    assert sweep[("exact KNN, raw", 2048)].precision == report.precision_raw and sweep[("exact KNN, raw", 2048)].reference == 0.8846
    assert sweep[("Annoy (stored PCA)", collection.pca_dims)].precision == report.precision_annoy
    assert all(r.p50_ms > 0 for r in report.sweep)


def test_same_seed_same_report(report, db, settings, tmp_path):
    again = build_report(db, settings, NAME, tmp_path / "again", seed=0, k=K, progress=False)
    np.testing.assert_array_equal(again.tsne_xy, report.tsne_xy)
    np.testing.assert_array_equal(again.tsne_raw_xy, report.tsne_raw_xy)
    numbers = lambda r: {k: v for k, v in r.to_dict().items() if k not in ("out", "files", "timings", "latency", "sweep")}  # noqa: E731
    assert numbers(again) == numbers(report)
    assert [(r.method, r.dims, r.precision) for r in again.sweep] == [(r.method, r.dims, r.precision) for r in report.sweep]


def test_command_writes_a_sampled_report_drawn_with_the_seed(collection, db, settings, tmp_path):
    args = ["report", "--collection", NAME, "--out", str(tmp_path / "cli"), "--sample", "12", "--seed", "3", "-k", "2", "--json"]
    result = CliRunner().invoke(search_cli, args)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["sampled"] == 12 and printed["images"] == 24 and printed["files"][0].endswith("index.html")
    assert set(printed["timings"]) >= {"t-SNE", "PCA variance curve", "neighbour grids"}
    library = build_report(db, settings, NAME, tmp_path / "lib", sample=12, seed=3, k=2, progress=False)
    assert library.tsne_xy.shape == (12, 2)
    for key in ("precision_exact", "precision_annoy", "annoy_recall", "explained_variance", "best_labels", "tsne"):
        assert json.loads(json.dumps(library.to_dict()[key])) == printed[key]


@pytest.mark.parametrize(
    "args, exit_code, error",
    [
        (["--collection", "nope"], 1, "no collection named 'nope'"),
        (["--collection", NAME, "--sample", "3"], 1, "--sample must be at least 5"),
        (["--collection", NAME, "-k", "0"], 2, "Invalid value"),
        (["--collection", NAME, "-k", "30"], 1, "needs at least 31 searchable images"),
    ],
)
def test_command_errors(collection, tmp_path, args, exit_code, error):
    result = CliRunner().invoke(search_cli, ["report", "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == exit_code and error in result.output and "Traceback" not in result.output


def test_exact_neighbours_equal_brute_force_without_the_query():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 8)).astype(np.float32)
    vectors[10] = vectors[11]  # a tie at distance 0, broken by id
    ids = np.arange(1000, 1300)
    rows = np.array([0, 10, 11, 150, 299])
    found = exact_neighbours(ids, vectors, rows, 5)
    for row, near in zip(rows, found):
        expected = [i for i in brute_force(ids, vectors, vectors[row], 6)[0].tolist() if i != ids[row]][:5]
        assert near.tolist() == expected


def test_grid_cells_give_each_point_its_own_cell_in_map_order():
    xy = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0], [5.0, 5.0]])
    g, cells = grid_cells(xy)
    assert g == 3 and len({tuple(c) for c in cells.tolist()}) == 5
    assert cells[0].tolist() == [0, 0] and cells[3].tolist() == [2, 2] and cells[4].tolist() == [1, 1]


def test_perplexity_shrinks_for_small_collections():
    assert tsne_perplexity(8677) == 30 and tsne_perplexity(24) == 7 and tsne_perplexity(5) == 1
