"""sql/*.sql: every example is one commented statement, runs through `search sql`, and gives the answer numpy gives.

One small collection (4 labels x 5 pictures, a re-saved near-duplicate, an unlabelled picture, and a label of
look-alikes of the others) is loaded once through the CLI with the real ResNet50 (random weights) and PCA to 16
dims. Each example is run as a user would: its params line edited (the collection name by replacing 'caltech101'),
written to a file, `search sql -f FILE --json`. Its rows are then compared with the same question answered in numpy
over read_vectors and the labels.
"""
from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from PIL import Image

from ingest.cli import cli as ingest_cli
from ingest.store import read_vectors
from search.cli import cli as search_cli
from tests.helpers import COLOURS, collection_row, make_folder, make_picture

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
SQL_FILES = sorted(SQL_DIR.glob("*.sql"))
COLLECTION = "sql_examples"
DUPLICATE = "red/red_0_again.jpg"  # red/red_0.jpg saved again at another JPEG quality: other bytes, same picture


@dataclass(frozen=True)
class Loaded:
    """The collection as numpy sees it: ids in order, their embeddings, labels (None: unlabelled) and paths."""

    ids: np.ndarray
    vectors: np.ndarray
    labels: list[str | None]
    paths: list[str]

    def distances(self) -> np.ndarray:
        """All pairwise euclidean distances, in float64."""
        v = self.vectors.astype(np.float64)
        return np.sqrt(((v[:, None, :] - v[None, :, :]) ** 2).sum(axis=2))

    def index(self, path_suffix: str) -> int:
        return next(i for i, p in enumerate(self.paths) if p.endswith(path_suffix))


@pytest.fixture(scope="module")
def loaded(db, ris_home, tmp_path_factory) -> Loaded:
    folder = make_folder(tmp_path_factory.mktemp("sql") / "pics", labels=tuple(COLOURS), per_label=5, seed=7)
    Image.open(folder / "red" / "red_0.jpg").save(folder / DUPLICATE, quality=60)
    make_picture((128, 0, 128), "circle", seed=99).save(folder / "unlabelled.jpg", quality=90)
    (folder / "copies").mkdir()
    shutil.copy(folder / "blue" / "blue_1.jpg", folder / "copies" / "blue_1.jpg")  # same bytes: one image, two paths
    # A label whose pictures look like the other labels', so precision is not simply 1.
    (folder / "mixed").mkdir()
    for i, colour in enumerate(COLOURS.values()):
        picture = make_picture(colour, ("circle", "square")[i % 2], seed=50 + i)
        picture.save(folder / "mixed" / f"mixed_{i}.jpg", quality=90)
    # Module fixtures run before the per-test RIS_HOME fixture, so point the command at the session's home here.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RIS_HOME", str(ris_home))
        mp.delenv("DATABASE_URL", raising=False)
        args = ["load", "folder", str(folder), "--collection", COLLECTION, "--weights", "random", "--pca-dims", "16"]
        result = CliRunner().invoke(ingest_cli, args)
    assert result.exit_code == 0, result.output
    coll = collection_row(db, COLLECTION)
    ids, vectors = read_vectors(db, coll.id, "embedding")
    with db.engine.connect() as conn:
        sql = "SELECT label, path FROM images WHERE collection_id = :c ORDER BY id"
        rows = conn.execute(sa.text(sql), {"c": coll.id}).all()
    assert len(ids) == len(rows) == 26
    return Loaded(ids, vectors, [r.label for r in rows], [r.path for r in rows])


def with_params(text: str, **values) -> str:
    """The example's text with its params line edited: the collection, and any `<value> AS <name>` given."""
    text = text.replace("'caltech101'", f"'{COLLECTION}'")
    for name, value in values.items():
        text, n = re.subn(rf"\S+(?= AS {name}\b)", str(value), text, count=1)
        assert n == 1, f"no parameter {name} in the params line"
    return text


def runner(path: Path, tmp_path: Path):
    """A function that runs the example with some parameters through `search sql -f` and returns its rows."""

    def run(**values) -> list[dict]:
        edited = tmp_path / path.name
        edited.write_text(with_params(path.read_text(), **values))
        result = CliRunner().invoke(search_cli, ["sql", "-f", str(edited), "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    return run


def close(a, b) -> bool:
    return np.allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5, atol=1e-7)


def ranked(keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions ordered by key, ties by id: the ORDER BY <key>, id of the examples."""
    return np.lexsort((ids, keys))


# ---- one numpy check per example; each runs it with its default parameters and with others ----


def check_duplicate_files(data: Loaded, run) -> None:
    shown = data.paths[data.index("blue/blue_1.jpg")]
    copy = shown.replace("/blue/blue_1.jpg", "/copies/blue_1.jpg")
    assert run() == [{"id": int(data.ids[data.index("blue/blue_1.jpg")]), "label": "blue", "files": 2,
                      "paths": [shown, copy], "shown": shown}]


def check_images_per_label(data: Loaded, run) -> None:
    counts = Counter(data.labels)
    rows = run()
    assert {r["label"]: r["images"] for r in rows} == counts
    assert [r["images"] for r in rows] == sorted(counts.values(), reverse=True)
    for r in rows:
        assert r["percent"] == pytest.approx(round(100 * counts[r["label"]] / len(data.labels), 2))


def check_nearest_neighbours(data: Loaded, run) -> None:
    d = data.distances()
    query = data.index(DUPLICATE)
    for values, q, k in [({}, 0, 10), ({"image_id": int(data.ids[query]), "k": 4}, query, 4)]:
        rows = run(**values)
        order = ranked(d[q], data.ids)[:k]
        assert [r["rank"] for r in rows] == list(range(1, k + 1))
        assert {r["query_id"] for r in rows} == {int(data.ids[q])}
        assert [r["id"] for r in rows] == data.ids[order].tolist()
        assert close([r["distance"] for r in rows], d[q, order])
        assert [r["label"] for r in rows] == [data.labels[i] for i in order]
    assert rows[1]["path"].endswith("red/red_0.jpg")  # the re-saved picture's nearest other image is its original


def check_label_centroids_outliers(data: Loaded, run) -> None:
    labels = np.array(data.labels, dtype=object)
    for values, per_label in [({}, 3), ({"outliers": 1}, 1)]:
        want = []
        for label in sorted({x for x in data.labels if x is not None}):
            members = np.flatnonzero(labels == label)
            centroid = data.vectors[members].astype(np.float64).mean(axis=0).astype(np.float32)
            dist = np.sqrt(((data.vectors[members].astype(np.float64) - centroid) ** 2).sum(axis=1))
            for rank, j in enumerate(ranked(-dist, data.ids[members])[:per_label], start=1):
                want.append({"label": label, "label_images": len(members), "label_mean_distance": dist.mean(),
                             "outlier_rank": rank, "id": int(data.ids[members[j]]), "distance": dist[j], "centroid": centroid})
        rows = run(**values)
        exact, approximate = ["label", "label_images", "outlier_rank", "id"], ["label_mean_distance", "distance", "centroid"]
        assert [[r[c] for c in exact] for r in rows] == [[w[c] for c in exact] for w in want]
        for c in approximate:
            assert close([r[c] for r in rows], [w[c] for w in want]), c


def check_near_duplicates(data: Loaded, run) -> None:
    d = data.distances()
    a, b = np.triu_indices(len(data.ids), k=1)  # ids ascend with position, so a < b is id_a < id_b
    pair_d = d[a, b]
    # A threshold from the data: halfway from the re-saved picture's pair to the next larger pair distance, so the
    # pair is found and float rounding cannot move any pair across.
    original, again = data.index("red/red_0.jpg"), data.index(DUPLICATE)
    duplicate = d[original, again]
    threshold = float(duplicate + pair_d[pair_d > duplicate].min()) / 2
    for values, limit in [({}, 0.05), ({"max_distance": f"{threshold!r}::float8"}, threshold)]:
        rows = run(**values)
        keep = np.flatnonzero(pair_d < limit)
        order = keep[np.lexsort((data.ids[b[keep]], data.ids[a[keep]], pair_d[keep]))]
        assert [(r["id_a"], r["id_b"]) for r in rows] == list(zip(data.ids[a[order]].tolist(), data.ids[b[order]].tolist()))
        assert close([r["distance"] for r in rows], pair_d[order])
        assert [r["same_label"] for r in rows] == [data.labels[a[i]] == data.labels[b[i]] for i in order]
    assert tuple(sorted((int(data.ids[original]), int(data.ids[again])))) in [(r["id_a"], r["id_b"]) for r in rows]


def leave_one_out(data: Loaded, k: int) -> dict[str, list[float]]:
    """Each labelled image's precision@k among its k nearest other images, grouped by its label."""
    d = data.distances()
    found: dict[str, list[float]] = {}
    for q, label in enumerate(data.labels):
        if label is None:
            continue
        others = ranked(d[q], data.ids)
        neighbours = [i for i in others if i != q][:k]
        found.setdefault(label, []).append(np.mean([data.labels[i] == label for i in neighbours]))
    return found


def chance(data: Loaded, label: str) -> float:
    return (data.labels.count(label) - 1) / (len(data.labels) - 1)


def check_precision_at_k(data: Loaded, run) -> None:
    for values, k in [({}, 5), ({"k": 1}, 1)]:
        per_label = leave_one_out(data, k)
        queries = [(p, label) for label, ps in per_label.items() for p in ps]
        overall, *rows = run(**values)
        assert (overall["label"], overall["k"], overall["queries"]) == ("(all)", k, len(queries))
        assert close(overall["precision_at_k"], np.mean([p for p, _ in queries]))
        assert close(overall["chance"], np.mean([chance(data, label) for _, label in queries]))
        assert {r["label"]: r["queries"] for r in rows} == {label: len(ps) for label, ps in per_label.items()}
        for r in rows:
            assert r["k"] == k
            assert close(r["precision_at_k"], np.mean(per_label[r["label"]]))
            assert close(r["chance"], chance(data, r["label"]))
        order = [(r["precision_at_k"], r["label"]) for r in rows]
        assert order == sorted(order)


CHECKS = {name.removeprefix("check_"): check for name, check in globals().items() if name.startswith("check_")}


def test_there_are_examples():
    assert len(SQL_FILES) >= 5


@pytest.mark.parametrize("path", SQL_FILES, ids=lambda p: p.name)
def test_example_agrees_with_numpy(path, loaded, tmp_path):
    assert path.stem in CHECKS, f"add check_{path.stem}(data, run) to this file: every example is checked against numpy"
    CHECKS[path.stem](loaded, runner(path, tmp_path))


def statements(sql: str) -> list[str]:
    """The statements of a SQL text: split on semicolons outside comments, strings and quoted names."""
    bare = re.sub(r"--[^\n]*|/\*.*?\*/|'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"", " ", sql, flags=re.S)
    return [s for s in bare.split(";") if s.strip()]


@pytest.mark.parametrize("path", SQL_FILES, ids=lambda p: p.name)
def test_example_is_one_commented_statement(path):
    text = path.read_text()
    assert text.startswith("-- "), "start with a comment saying what the example answers"
    header = "\n".join(line for line in text.splitlines() if line.startswith("--"))
    assert "Parameters:" in header and f"search sql -f sql/{path.name}" in header
    assert len(statements(text)) == 1
    assert text.count("'caltech101'") == 1, "the collection is named once, in the params line"


def test_statement_splitting_sees_through_comments_and_strings():
    assert len(statements("-- a; b\nSELECT ';' AS \"x;y\" /* ; */")) == 1
    assert len(statements("SELECT 1; SELECT 2")) == 2
