"""search report at scale: a sampled report reads only the sampled rows' vectors, and a collection whose rows
have no raw features (embeddings only, as bench/scale.py makes) still gets a report, with the raw sections
skipped and saying why, never a traceback."""
from __future__ import annotations

import json

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from ingest.collection import Collection
from search.cli import cli as search_cli
from search.report import build_report
from tests.helpers import COLOURS, make_folder

NAME = "report-no-raw"


@pytest.fixture(scope="module")
def no_raw(db, settings, fake_extractor, tmp_path_factory):
    """32 pictures of the fake model (4 labels x 8), then every raw feature deleted."""
    from ingest.load import load_collection
    from ingest.sources import walk_folder

    folder = make_folder(tmp_path_factory.mktemp("no-raw") / "pics", labels=tuple(COLOURS), per_label=8, seed=31)
    load_collection(db, settings, NAME, walk_folder(folder)[0], fake_extractor, pca_dims=3, progress=False)
    coll = Collection.named(db, settings, NAME)
    with db.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM features WHERE collection_id = :c"), {"c": coll.id})
    return coll


@pytest.fixture
def reads(monkeypatch):
    """Every vector read of a report, by kind and row count; reading a whole collection fails the test."""
    seen = []
    original = Collection.vectors_of

    def vectors_of(self, kind, ids):
        seen.append((kind, len(ids)))
        return original(self, kind, ids)

    def whole(self, *args, **kwargs):
        raise AssertionError("the report read every vector of the collection")

    monkeypatch.setattr(Collection, "vectors_of", vectors_of)
    monkeypatch.setattr(Collection, "read_vectors", whole)
    monkeypatch.setattr(Collection, "vectors", whole)
    return seen


def test_a_sampled_report_reads_only_the_sample_and_skips_raw_sections(no_raw, db, settings, tmp_path, reads):
    report = build_report(db, settings, NAME, tmp_path / "r", sample=12, seed=1, k=3, progress=False)
    assert reads and all(n == 12 for _, n in reads) and {kind for kind, _ in reads} == {"embedding", "raw"}
    assert report.images == 32 and report.sampled == 12
    assert report.raw_note.startswith("12 of the 12 images in this report have no raw features stored")
    assert report.precision_raw is None and report.sweep == [] and report.explained_variance is None and report.tsne_raw_xy is None
    assert report.precision_exact is not None and report.precision_annoy is not None and report.tsne_xy.shape == (12, 2)
    assert report.pgvector_agreement is None  # numpy searched the sample, SQL the collection: not comparable
    names = {f.name for f in report.files}
    assert {"tsne_labels.png", "tsne_thumbnails.png", "grid_pca.png", "grid_annoy.png", "latency.png"} <= names
    assert not {"tsne_raw_labels.png", "grid_raw.png", "dims_sweep.png", "pca_variance.png"} & names
    page = (report.out / "index.html").read_text()
    assert "Skipped: 12 of the 12 images" in page and "<h2>1. KNN on the raw 2048-d features" in page
    assert json.loads((report.out / "summary.json").read_text())["raw_note"] == report.raw_note


def test_the_command_and_a_raw_query_say_so_in_one_line(no_raw, db, tmp_path):
    result = CliRunner().invoke(search_cli, ["report", "-c", NAME, "--out", str(tmp_path / "cli"), "--sample", "10", "-k", "2"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "raw features: skipped" in result.output
    item = int(no_raw.image_ids("embedding")[0])
    result = CliRunner().invoke(search_cli, ["similar", "-c", NAME, "--id", str(item), "--space", "raw"])
    assert result.exit_code == 1 and "has no raw features stored" in result.output and "Traceback" not in result.output


def test_annoy_keeps_k_neighbours_within_a_sample(no_raw, db, settings, tmp_path):
    report = build_report(db, settings, NAME, tmp_path / "s", sample=8, seed=2, k=3, progress=False)
    assert 0 <= report.annoy_recall <= 1 and report.annoy_recall >= 0.5  # over-fetched from the file, filtered to the sample
    assert np.isfinite(report.tsne_xy).all()
