"""search audit on a collection with planted faults, loaded once per module with the real ResNet50 (random weights):
five labels of pictures that share a colour family, split by folder into train/ and test/, in which three pictures
are put under the wrong label, one picture is stored under two labels' folders, three checkerboards sit far from
everything, and two identical copies and two resized, re-encoded copies cross from train to test. The audit must
find each planted fault with precision and recall of at least 0.9, and agree with `search report` on precision@k.

Near-identical leaks are looked for at --threshold 0.005: the planted copies lie about 0.001 from their originals
and distinct pictures of one family 0.01 or more apart (with random weights, small synthetic pictures sit closer
together than photos, for which the default of 0.045 was measured).
"""
from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ingest.cli import cli as ingest_cli
from ingest.collection import Collection
from ingest.splits import ensure_split, labelled_images
from search import audit as audit_module
from search.audit_page import CSV_COLUMNS
from search.cli import cli as search_cli
from search.evaluation import exact_neighbours
from search.split_rule import SplitRule
from tests.helpers import make_folder

NAME = "audit-planted"  # unique among the test files: a worker shares one database across them
FLAT = "audit-flat"
DELTA = "audit-delta"
SPLIT = "/(train|test)/"
THRESHOLD = "0.005"
LABELS = ["apple", "pear", "plum", "fig", "kiwi"]
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (240, 220, 50), (200, 60, 220)]
WRONG = [("apple", "train", "pear"), ("plum", "test", "fig"), ("kiwi", "train", "apple")]  # (family, split, folder)
ODD = [("train", "apple"), ("train", "plum"), ("test", "kiwi")]


def family_picture(family: int, seed: int) -> Image.Image:
    """A smooth field of colours near the family's own colour; every seed gives another picture of the family."""
    own = np.random.default_rng(1000 + 100 * family + seed).integers(0, 256, (3, 3, 3))
    grid = (0.75 * np.array(COLOURS[family]) + 0.25 * own).astype(np.uint8)
    return Image.fromarray(grid, "RGB").resize((160, 120), Image.Resampling.BICUBIC)


def checkerboard(seed: int) -> Image.Image:
    """Far from every family: hard-edged 8-pixel squares of two random colours."""
    rng = np.random.default_rng(5000 + seed)
    cells = np.kron(rng.integers(0, 2, (15, 20)), np.ones((8, 8), int))
    return Image.fromarray(rng.integers(0, 256, (2, 3))[cells].astype(np.uint8), "RGB")


def planted_folder(root):
    """root/{train,test}/<label>/...: 10 + 4 pictures per label, and the faults, as `expected` says."""
    for family, label in enumerate(LABELS):
        for split, seeds in (("train", range(10)), ("test", range(10, 14))):
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for seed in seeds:
                family_picture(family, seed).save(root / split / label / f"{label}_{seed}.jpg", quality=90)
    for n, (family, split, folder) in enumerate(WRONG):
        family_picture(LABELS.index(family), 50 + n).save(root / split / folder / f"wrong_{n}.jpg", quality=90)
    for n, (split, folder) in enumerate(ODD):
        checkerboard(n).save(root / split / folder / f"odd_{n}.jpg", quality=90)
    for label, seed in (("pear", 3), ("fig", 2)):  # identical copies across splits
        shutil.copy(root / "train" / label / f"{label}_{seed}.jpg", root / "test" / label / f"{label}_{seed}_copy.jpg")
    for label, seed in (("apple", 5), ("kiwi", 1)):  # near copies across splits: half size, JPEG quality 60
        with Image.open(root / "train" / label / f"{label}_{seed}.jpg") as img:
            img.resize((80, 60), Image.Resampling.BILINEAR).save(root / "test" / label / f"{label}_{seed}_small.jpg", quality=60)
    shutil.copy(root / "train" / "plum" / "plum_4.jpg", root / "train" / "fig" / "plum_4.jpg")  # one picture, two labels
    return root


def expected(root) -> dict:
    path = lambda *parts: str(root.joinpath(*parts))  # noqa: E731
    return {
        "suspects": {(path(split, folder, f"wrong_{n}.jpg"), family) for n, (family, split, folder) in enumerate(WRONG)}
        | {(path("train", "fig", "plum_4.jpg"), "plum")},
        "outliers": {path(split, folder, f"odd_{n}.jpg") for n, (split, folder) in enumerate(ODD)},
        "leaks": {frozenset({path("train", label, f"{label}_{seed}.jpg"), path("test", label, f"{label}_{seed}_{kind}.jpg")})
                  for label, seed, kind in (("pear", 3, "copy"), ("fig", 2, "copy"), ("apple", 5, "small"), ("kiwi", 1, "small"))},
    }


def load(ris_home, folder, name, *extra):
    with pytest.MonkeyPatch.context() as mp:  # the autouse private_home is per test, and these fixtures per module
        mp.setenv("RIS_HOME", str(ris_home))
        mp.delenv("DATABASE_URL", raising=False)
        result = CliRunner().invoke(ingest_cli, ["load", "folder", str(folder), "--collection", name, "--weights", "random", *extra])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def planted(tmp_path_factory, ris_home, extractor):
    root = planted_folder(tmp_path_factory.mktemp("audit") / "shop")
    load(ris_home, root, NAME, "--pca-dims", "16")
    return root


def run_audit(*args) -> dict:
    result = CliRunner().invoke(search_cli, ["audit", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def precision_recall(found: set, wanted: set) -> tuple[float, float]:
    hit = len(found & wanted)
    return (hit / len(found) if found else 1.0), hit / len(wanted)


@pytest.fixture(scope="module")
def split_audit(planted, ris_home):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RIS_HOME", str(ris_home))
        return run_audit("--collection", NAME, "--split-by", SPLIT, "--threshold", THRESHOLD)


def test_the_planted_label_suspects_are_found_with_the_right_label(planted, split_audit):
    found = {(s["path"], s["suggested"]) for s in split_audit["suspects"]}
    precision, recall = precision_recall(found, expected(planted)["suspects"])
    assert precision >= 0.9 and recall >= 0.9, split_audit["suspects"]
    agreements = [s["agreement"] for s in split_audit["suspects"]]
    assert all(a >= 0.6 for a in agreements[1:]) and agreements[1:] == sorted(agreements[1:], reverse=True)


def test_a_picture_under_two_labels_is_listed_first_as_a_conflict(planted, split_audit):
    first = split_audit["suspects"][0]
    assert (first["path"], first["label"], first["suggested"]) == (str(planted / "train" / "fig" / "plum_4.jpg"), "fig", "plum")


def test_the_planted_outliers_are_found_worst_first(planted, split_audit):
    found = {o["path"] for o in split_audit["outliers"]}
    precision, recall = precision_recall(found, expected(planted)["outliers"])
    assert precision >= 0.9 and recall >= 0.9, split_audit["outliers"]
    scores = [o["score"] for o in split_audit["outliers"]]
    assert scores == sorted(scores, reverse=True) and min(scores) >= 4


def test_identical_and_near_copies_across_splits_are_leaks(planted, split_audit):
    found = {frozenset({x["a"]["path"], x["b"]["path"]}) for x in split_audit["leaks"]}
    precision, recall = precision_recall(found, expected(planted)["leaks"])
    assert precision >= 0.9 and recall >= 0.9, split_audit["leaks"]
    for leak in split_audit["leaks"]:
        assert (leak["a"]["split"], leak["b"]["split"]) == ("train", "test")  # the larger split is side a
        assert f"/{leak['a']['split']}/" in leak["a"]["path"] and f"/{leak['b']['split']}/" in leak["b"]["path"]
        assert (leak["distance"] == 0) == (leak["a"]["id"] == leak["b"]["id"])


def test_labels_drop_the_split_folder(split_audit):
    assert sorted(q["label"] for q in split_audit["labels"]) == sorted(LABELS)
    assert sum(q["images"] for q in split_audit["labels"]) == 78  # every stored picture: identical copies are one


def test_json_has_exactly_the_documented_keys(split_audit):
    assert set(split_audit) == {"collection", "k", "leaks", "suspects", "outliers", "labels", "confused"}
    assert (split_audit["collection"], split_audit["k"]) == (NAME, 10)
    assert {key for x in split_audit["leaks"] for key in x} == {"a", "b", "distance"}
    assert {key for x in split_audit["leaks"] for side in "ab" for key in x[side]} == {"id", "path", "split"}
    assert {key for x in split_audit["suspects"] for key in x} == {"id", "path", "label", "suggested", "agreement"}
    assert {key for x in split_audit["outliers"] for key in x} == {"id", "path", "label", "score"}
    assert {key for x in split_audit["labels"] for key in x} == {"label", "images", "precision_at_k"}
    assert {key for x in split_audit["confused"] for key in x} == {"a", "b", "count"}
    counts = [c["count"] for c in split_audit["confused"]]
    assert counts == sorted(counts, reverse=True) and all(c["a"] != c["b"] for c in split_audit["confused"])


def test_per_label_precision_agrees_with_search_report_and_the_report_links_the_audit(planted, split_audit, tmp_path):
    out = tmp_path / "report"
    page = CliRunner().invoke(search_cli, ["audit", "-c", NAME, "--split-by", SPLIT, "--threshold", THRESHOLD, "--out", str(out / "audit")])
    assert page.exit_code == 0, page.output
    result = CliRunner().invoke(search_cli, ["report", "-c", NAME, "-k", "10", "--split-by", SPLIT, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    labels = split_audit["labels"]
    overall = sum(q["precision_at_k"] * q["images"] for q in labels) / sum(q["images"] for q in labels)
    assert report["labels"] == len(labels) and overall == pytest.approx(report["precision_exact"], abs=1e-12)
    by_label = {q["label"]: q["precision_at_k"] for q in labels}
    for score in report["best_labels"] + report["worst_labels"]:
        assert by_label[score["label"]] == pytest.approx(score["exact"], abs=1e-12)
    assert 'href="audit/index.html"' in (out / "index.html").read_text()
    assert 'href="../index.html"' not in (out / "audit" / "index.html").read_text()  # the report came after the audit


def test_the_page_shows_each_case_beside_its_neighbours(planted, split_audit, tmp_path):
    result = CliRunner().invoke(search_cli, ["audit", "-c", NAME, "--split-by", SPLIT, "--threshold", THRESHOLD, "--out", str(tmp_path),
                                             "--limit", "3"])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "index.html").read_text()
    thumbs = sorted(p.name for p in (tmp_path / "thumbs").iterdir())
    cases = min(3, len(split_audit["suspects"])) + min(3, len(split_audit["outliers"]))
    assert html.count('<div class="case">') == cases + min(3, len(split_audit["leaks"]))
    assert html.count("<figure") == cases * 11 + 2 * min(3, len(split_audit["leaks"]))  # a case and its 10 neighbours
    assert all(f'src="thumbs/{name}"' in html for name in thumbs) and len(thumbs) >= 11
    assert all(Image.open(tmp_path / "thumbs" / name).size[0] <= 256 for name in thumbs)
    assert split_audit["suspects"][0]["path"] in html and "Leaks across splits" in html
    assert "(first 3 shown)" in result.output or len(split_audit["suspects"]) <= 3


def test_exports_list_the_suspects_and_the_leaks_to_act_on(planted, split_audit):
    ids = CliRunner().invoke(search_cli, ["audit", "-c", NAME, "--split-by", SPLIT, "--threshold", THRESHOLD, "--export", "ids"])
    assert ids.exit_code == 0, ids.output
    wanted = list(dict.fromkeys([s["id"] for s in split_audit["suspects"]] + [x["b"]["id"] for x in split_audit["leaks"]]))
    assert [int(line) for line in ids.stdout.splitlines()] == wanted
    table = CliRunner().invoke(search_cli, ["audit", "-c", NAME, "--split-by", SPLIT, "--threshold", THRESHOLD, "--export", "csv"])
    assert table.exit_code == 0, table.output
    rows = list(csv.DictReader(io.StringIO(table.stdout)))
    assert list(rows[0]) == CSV_COLUMNS and len(rows) == len(split_audit["suspects"]) + len(split_audit["leaks"])
    assert {(r["path"], r["suggested"]) for r in rows if r["kind"] != "leak"} == {(s["path"], s["suggested"]) for s in split_audit["suspects"]}
    assert {(r["path"], r["split"], r["other_path"]) for r in rows if r["kind"] == "leak"} == \
        {(x["b"]["path"], x["b"]["split"], x["a"]["path"]) for x in split_audit["leaks"]}


def test_limit_cuts_every_section_to_its_worst_cases(planted, split_audit):
    cut = run_audit("-c", NAME, "--split-by", SPLIT, "--threshold", THRESHOLD, "--limit", "2")
    for section in ("leaks", "suspects", "outliers", "labels", "confused"):
        assert cut[section] == split_audit[section][:2]


def test_the_terminal_table_puts_the_worst_cases_first(planted, split_audit):
    result = CliRunner().invoke(search_cli, ["audit", "-c", NAME, "--split-by", SPLIT, "--threshold", THRESHOLD])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.index("Leaks across splits") < text.index("Label suspects") < text.index("Outliers") < text.index("Labels, worst")
    assert text.index(split_audit["outliers"][0]["path"]) < text.index(split_audit["outliers"][-1]["path"])
    assert f"{NAME}: 78 images, 5 labels, k=10, neighbours exact (numpy)" in text


@pytest.fixture(scope="module")
def flat(tmp_path_factory, ris_home, planted):
    """The same pictures without label folders: root/{train,test}/<file>, so --split-by leaves no label."""
    root = tmp_path_factory.mktemp("flat") / "shop"
    for path in sorted(planted.rglob("*.jpg")):
        split = path.relative_to(planted).parts[0]
        (root / split).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / split / f"{path.parent.name}-{path.name}")
    load(ris_home, root, FLAT, "--pca-dims", "16")
    return root


def test_an_unlabelled_collection_gets_leaks_and_outliers_only_and_says_why(flat):
    result = CliRunner().invoke(search_cli, ["audit", "--json", "-c", FLAT, "--split-by", SPLIT, "--threshold", THRESHOLD])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert found["suspects"] == found["labels"] == found["confused"] == []
    assert "no picture has a label" in result.stderr
    leaks = {frozenset(p.rsplit("/", 1)[1] for p in (x["a"]["path"], x["b"]["path"])) for x in found["leaks"]}
    wanted = {frozenset({f"{label}-{label}_{seed}.jpg", f"{label}-{label}_{seed}_{kind}.jpg"})
              for label, seed, kind in (("pear", 3, "copy"), ("fig", 2, "copy"), ("apple", 5, "small"), ("kiwi", 1, "small"))}
    assert min(precision_recall(leaks, wanted)) >= 0.9, found["leaks"]
    odd = {o["path"].rsplit("/", 1)[1] for o in found["outliers"]}
    assert min(precision_recall(odd, {f"{folder}-odd_{n}.jpg" for n, (_, folder) in enumerate(ODD)})) >= 0.9, found["outliers"]
    assert all(o["label"] is None for o in found["outliers"])


def test_splits_of_a_fine_tuning_run_are_read_by_content_in_its_base_and_its_own_collection(planted, flat, db, settings):
    base = Collection.named(db, settings, NAME)
    split = ensure_split(db, base, FLAT, labelled_images(db, base), 0.3, seed=1)  # as `ingest finetune --into audit-flat` records it
    by_sha = {d.sha256: split[i] for i, d in base.details(list(split)).items()}
    for name in (NAME, FLAT):  # the run's base collection, and the collection the run is named after (same pictures)
        coll = Collection.named(db, settings, name)
        found = run_audit("-c", name, "--threshold", "0.02")  # the only run of either: the default
        assert found == run_audit("-c", name, "--threshold", "0.02", "--run", FLAT)
        ids, vectors = coll.read_vectors("embedding")
        sha = {i: d.sha256 for i, d in coll.details(ids.tolist()).items()}
        near, distances = exact_neighbours(ids, vectors, np.arange(len(ids)), 10, distances=True)
        wanted = {frozenset({int(a), int(b)}) for a, row, d_row in zip(ids, near, distances) for b, d in zip(row, d_row)
                  if d <= 0.02 and by_sha[sha[int(a)]] != by_sha[sha[int(b)]]}
        assert wanted and {frozenset({x["a"]["id"], x["b"]["id"]}) for x in found["leaks"]} == wanted
        for leak in found["leaks"]:
            assert (leak["a"]["split"], leak["b"]["split"]) == ("train", "holdout")  # the larger split is side a
            assert by_sha[sha[leak["a"]["id"]]] == "train" and by_sha[sha[leak["b"]["id"]]] == "holdout"


@pytest.fixture(scope="module")
def delta(tmp_path_factory, ris_home, extractor):
    """A collection whose Annoy file lacks the rows of a second load (its delta)."""
    first = make_folder(tmp_path_factory.mktemp("delta") / "first", labels=("red", "green", "blue", "yellow"), per_label=8)
    later = make_folder(tmp_path_factory.mktemp("delta") / "later", labels=("red", "blue"), per_label=5, seed=7)
    load(ris_home, first, DELTA, "--pca-dims", "8")
    load(ris_home, later, DELTA)
    return DELTA


def test_neighbours_from_the_annoy_file_and_its_delta_match_exact_ones(delta, db, settings, monkeypatch):
    coll = Collection.named(db, settings, delta)
    assert coll.index_delta(100) == 10
    images = audit_module.load_images(coll, None)
    exact = audit_module.neighbours(coll, images, 5)
    monkeypatch.setattr(audit_module, "EXACT_MAX_ROWS", 0)
    approx = audit_module.neighbours(coll, images, 5)
    assert exact.engine["engine"] == "exact (numpy)" and approx.engine["engine"] == "annoy" and approx.engine["delta_rows"] == 10
    recall = np.mean([len(set(a) & set(e)) / 5 for a, e in zip(approx.rows.tolist(), exact.rows.tolist())])
    assert recall >= 0.95
    assert np.all(approx.rows >= 0) and np.all(np.diff(approx.distances, axis=1) >= -1e-6)
    assert not np.any(approx.rows == np.arange(len(images.ids))[:, None])


def test_without_splits_no_leaks_are_looked_for_and_it_says_why(delta):
    result = CliRunner().invoke(search_cli, ["audit", "--json", "-c", delta])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["leaks"] == [] and "no splits" in result.stderr


@pytest.mark.parametrize("args, error", [
    (["-c", "no-such-collection"], "no collection named 'no-such-collection'"),
    (["-c", NAME, "--split-by", "(train"], "is not a regular expression"),
    (["-c", NAME, "--split-by", "/train/"], "has no group to name the split"),
    (["-c", NAME, "--run", "no-such-run"], "no fine-tuning run 'no-such-run'"),
    (["-c", NAME, "--run", "x", "--split-by", SPLIT], "give --run or --split-by, not both"),
    (["-c", NAME, "--json", "--export", "ids"], "give --json or --export, not both"),
])
def test_command_errors(planted, args, error):
    result = CliRunner().invoke(search_cli, ["audit", *args])
    assert result.exit_code != 0 and error in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("path, label, split, kept", [
    ("/d/shop/train/apple/x.jpg", "train/apple", "train", "apple"),
    ("/d/shop/apple/test/x.jpg", "apple/test", "test", "apple"),
    ("/d/train/shop/apple/x.jpg", "apple", "train", "apple"),  # the split folder is above the folder loaded
    ("/d/shop/test/x.jpg", "test", "test", None),
    ("/d/shop/apple/x.jpg", "apple", None, "apple"),
])
def test_the_split_folder_is_dropped_from_the_label(path, label, split, kept):
    rule = SplitRule.parse(SPLIT)
    assert (rule.split(path), rule.label(path, label)) == (split, kept)
