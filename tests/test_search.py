"""search similar and search sql: exact pgvector equals brute force, Annoy agrees, filters stay inside their
collection, errors are one line. The collections are stored through the fake extractor, registered as a real model
is (ingest.features.register_extractor), so a query by a new file goes through the collection's model the same way:
SQL, Annoy and filters are the subject here, not ResNet50."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from PIL import Image

from ingest.annoy_index import index_path
from ingest.collection import Collection
from ingest.load import load_collection
from ingest.sources import walk_folder
from ingest.store import read_vectors
from search.cli import cli as search_cli
from search.evaluation import brute_force
from tests.helpers import COLOURS, collection_row, make_folder, make_picture


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, db, settings, fake_extractor):
    """One collection of 4 labels x 5 pictures at 6 dims, loaded once for the module."""
    folder = make_folder(tmp_path_factory.mktemp("search") / "pics", labels=tuple(COLOURS), per_label=5, seed=3)
    summary = load_collection(db, settings, "colours", walk_folder(folder)[0], fake_extractor, pca_dims=6, root=folder, progress=False)
    assert summary.ingested == 20 and summary.failed == 0
    return folder


def search(*args):
    return CliRunner().invoke(search_cli, list(args))


def similar_json(*args):
    result = search("similar", "-c", "colours", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_pgvector_equals_numpy_brute_force(db, settings, loaded):
    coll = Collection.named(db, settings, "colours")
    ids, vectors = read_vectors(db, coll.id, "embedding")
    engine = coll.engine("pgvector")
    rng = np.random.default_rng(0)
    queries = list(vectors[:5]) + [rng.normal(size=vectors.shape[1]).astype(np.float32) * vectors.std()]
    for q in queries:
        hits = engine.search(q, 7)
        want_ids, want_d = brute_force(ids, vectors, q, 7)
        assert [h.id for h in hits] == want_ids.tolist()
        np.testing.assert_allclose([h.distance for h in hits], want_d, rtol=1e-5, atol=1e-5)


def test_pgvector_stays_exact_with_an_approximate_index(db, settings, loaded):
    coll = Collection.named(db, settings, "colours")
    ids, vectors = read_vectors(db, coll.id, "embedding")
    with db.engine.begin() as conn:
        conn.execute(sa.text(
            f"CREATE INDEX colours_hnsw ON images USING hnsw ((embedding::vector({coll.dims})) vector_l2_ops) "
            f"WHERE collection_id = {coll.id}"))
    try:
        hits = coll.similar(vectors[3], 20)
        assert [h.id for h in hits] == brute_force(ids, vectors, vectors[3], 20)[0].tolist()
    finally:
        with db.engine.begin() as conn:
            conn.execute(sa.text("DROP INDEX colours_hnsw"))


def test_annoy_recall_against_exact(db, settings, loaded):
    coll = Collection.named(db, settings, "colours")
    ids, vectors = read_vectors(db, coll.id, "embedding")
    recalls = []
    for q in vectors:
        exact = set(brute_force(ids, vectors, q, 5)[0].tolist())
        recalls.append(len(exact & {h.id for h in coll.similar(q, 5, engine="annoy")}) / 5)
    assert np.mean(recalls) >= 0.9


@pytest.mark.parametrize("engine", ["pgvector", "annoy"])
def test_stored_image_comes_back_first_at_distance_zero(loaded, engine):
    by_file = similar_json(str(loaded / "blue" / "blue_2.jpg"), "--engine", engine, "-k", "3")
    assert by_file[0]["path"] == str(loaded / "blue" / "blue_2.jpg") and by_file[0]["distance"] == pytest.approx(0, abs=1e-6)
    assert [h["rank"] for h in by_file] == [1, 2, 3]
    assert set(by_file[0]) == {"rank", "id", "path", "label", "distance"}
    by_id = similar_json("--id", str(by_file[0]["id"]), "--engine", engine, "-k", "3")
    assert by_id == by_file
    excluded = similar_json("--id", str(by_file[0]["id"]), "--engine", engine, "-k", "3", "--exclude-self")
    assert by_file[0]["id"] not in [h["id"] for h in excluded] and len(excluded) == 3


def test_a_new_picture_is_embedded_with_the_collections_model(loaded, tmp_path, db):
    query = tmp_path / "new.png"
    make_picture(COLOURS["red"], "square", seed=999).save(query)
    hits = similar_json(str(query), "-k", "4")
    assert len(hits) == 4 and hits[0]["distance"] > 0
    # A renamed copy of a stored picture is recognised by content: no CNN, distance 0.
    copy = tmp_path / "copy.jpg"
    shutil.copy(loaded / "green" / "green_1.jpg", copy)
    assert similar_json(str(copy), "-k", "1")[0]["path"] == str(loaded / "green" / "green_1.jpg")


@pytest.mark.parametrize("engine", ["pgvector", "annoy"])
def test_label_and_where_filters(loaded, engine):
    hits = similar_json(str(loaded / "red" / "red_0.jpg"), "--engine", engine, "-k", "3", "--label", "blue")
    assert len(hits) == 3 and {h["label"] for h in hits} == {"blue"}
    result = search("similar", "-c", "colours", str(loaded / "red" / "red_0.jpg"), "--engine", engine, "-k", "8", "--label", "blue")
    assert result.exit_code == 0 and "only 5 of 8 neighbours match" in result.output
    hits = similar_json(str(loaded / "red" / "red_0.jpg"), "--engine", engine, "-k", "20", "--where", "path LIKE '%_1.jpg'")
    assert len(hits) == 4 and all(h["path"].endswith("_1.jpg") for h in hits)


@pytest.mark.parametrize("engine", ["pgvector", "annoy"])
def test_where_cannot_write(loaded, db, engine):
    def state():
        with db.connect() as conn:
            return conn.execute(sa.text("SELECT (SELECT last_value FROM images_id_seq), (SELECT count(*) FROM images)")).one()

    before = state()
    first = similar_json(str(loaded / "red" / "red_0.jpg"), "-k", "1")[0]
    for where in ["label = (SELECT setval('images_id_seq', 1)::text)", "label = (SELECT lo_import('/etc/passwd')::text)",
                  "pg_catalog.set_config('transaction_read_only', 'off', true) IS NULL"]:
        result = search("similar", "-c", "colours", "--id", str(first["id"]), "--engine", engine, "--where", where)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert state() == before


OTHER = "colours_other"


@pytest.fixture(scope="module")
def two_collections(loaded, db, settings, fake_extractor, tmp_path_factory):
    """A second collection beside `colours`, with other dims: a filter that escaped would meet its rows."""
    folder = make_folder(tmp_path_factory.mktemp("other") / "pics", labels=("red", "blue"), per_label=3, seed=11)
    load_collection(db, settings, OTHER, walk_folder(folder)[0], fake_extractor, pca_dims=2, progress=False)
    return Collection.named(db, settings, "colours"), Collection.named(db, settings, OTHER)


HOSTILE_WHERE = [
    "1=1)) OR ((vector_dims(embedding)=2",  # closes the parentheses it was put in
    "1=1) OR (1=1",
    "true) UNION ALL SELECT id, path, label, 0 FROM images WHERE (true",
    "true --",  # a comment that would swallow the closing parenthesis
    "true /* */",
    "true; DELETE FROM images",
    "label = 'red' OR $$x$$ = $$x$$",
    "label = 'unterminated",
    'label = "unterminated',
    "label = E'\\' ) OR (true) OR (label = '",  # E'\\' ends where PostgreSQL says, not where a naive scan would
    "label = '\\' ) OR (true) OR (label = '",  # standard strings: a backslash escapes nothing
    "(true",
    "id IN (SELECT id FROM images)",  # a sub-select would see every collection's rows
    "(select count(*) from images) > 0",
]


@pytest.mark.parametrize("where", HOSTILE_WHERE)
@pytest.mark.parametrize("engine", ["pgvector", "annoy"])
def test_a_filter_cannot_leave_its_collection(two_collections, where, engine):
    colours, other = two_collections
    first = int(read_vectors(colours.db, colours.id, "embedding")[0][0])
    result = search("similar", "-c", "colours", "--id", str(first), "--engine", engine, "-k", "50", "--json", "--where", where)
    if result.exit_code == 0:  # whatever it matched, it matched rows of colours only
        assert {h["id"] for h in json.loads(result.stdout)} <= set(read_vectors(colours.db, colours.id, "embedding")[0].tolist())
    else:
        assert result.exit_code == 1 and "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("engine", ["pgvector", "annoy"])
def test_filters_true_everywhere_still_see_one_collection(two_collections, engine):
    colours, other = two_collections
    colour_ids = set(read_vectors(colours.db, colours.id, "embedding")[0].tolist())
    query = read_vectors(colours.db, colours.id, "embedding")[1][0]
    for where in ["true", "collection_id <> 0 OR true", "label IN ('red', 'blue') OR label = ')' OR path LIKE '%(%'"]:
        hits = colours.similar(query, 100, engine=engine, where=where)
        assert hits and {h.id for h in hits} <= colour_ids
    assert {h.id for h in colours.similar(query, 100, engine=engine, label="red")} <= colour_ids
    # A label is a bound parameter: quotes in it are just characters.
    assert colours.similar(query, 5, engine=engine, label="red' OR 'a' = 'a") == []


def test_where_with_parentheses_and_quotes_inside_strings_works(two_collections):
    colours, _ = two_collections
    query = read_vectors(colours.db, colours.id, "embedding")[1][0]
    hits = colours.similar(query, 50, where="(label = 'it''s (not) here' OR label = E'r\\ed' OR \"label\" = 'red') AND (path ~ '_[0-9]\\.jpg$')")
    assert hits and {h.label for h in hits} == {"red"}


def test_statement_timeout_bounds_a_filter_and_sql(loaded, monkeypatch):
    monkeypatch.setenv("RIS_STATEMENT_TIMEOUT", "200ms")
    first = similar_json(str(loaded / "red" / "red_0.jpg"), "-k", "1")[0]
    slow = "lpad(path, 50000000, 'x') LIKE '%y%'"  # about 1 s over 20 rows, with functions a --where may call
    for args in (["similar", "-c", "colours", "--id", str(first["id"]), "--where", slow], ["sql", "SELECT pg_sleep(2)"]):
        result = search(*args)
        assert result.exit_code == 1 and "statement timeout" in result.output, result.output
    result = search("sql", "SELECT pg_sleep(0.3)", "--statement-timeout", "5s")
    assert result.exit_code == 0, result.output


def test_plot_writes_a_png(loaded, tmp_path):
    out = tmp_path / "n.png"
    result = search("similar", "-c", "colours", str(loaded / "yellow" / "yellow_0.jpg"), "-k", "4", "--plot", str(out))
    assert result.exit_code == 0, result.output
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 4 * 100


def test_stale_or_missing_annoy_index_is_refused(loaded, settings, tmp_path):
    ann = index_path(settings.annoy_dir, "colours")
    backup = tmp_path / "backup.ann"
    shutil.copy(ann, backup)
    try:
        ann.write_bytes(ann.read_bytes()[:100])
        result = search("similar", "-c", "colours", "--id", "1", "--engine", "annoy")
        assert result.exit_code == 1 and "ingest index" in result.output
        ann.unlink()
        result = search("similar", "-c", "colours", "--id", "1", "--engine", "annoy")
        assert result.exit_code == 1 and "no Annoy index" in result.output and "ingest index" in result.output
    finally:
        shutil.copy(backup, ann)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["similar", "/no/such/file.jpg"], "no such file"),
        (["similar", "--id", "999999"], "no image with id 999999"),
        (["similar"], "give either an image file or --id"),
        (["similar", "--id", "1", "-k", "0"], "Invalid value for '-k'"),
        (["similar", "--id", "1", "-c", "nope"], "no collection named 'nope'"),
        (["sql", "DELETE FROM images"], "refused"),
        (["sql", "UPDATE images SET label = 'x'"], "refused"),
        (["sql", "DROP TABLE images"], "refused"),
        (["sql", "INSERT INTO collections (name) VALUES ('x')"], "refused"),
        (["sql", "COPY images TO PROGRAM 'touch /tmp/ris-pwned'"], "refused"),
        (["sql", "SELECT 1; DELETE FROM images"], "refused"),
        (["sql", "SELEC 1"], "SQL error"),
    ],
)
def test_errors_are_one_line(loaded, args, expected):
    if args[0] == "similar" and "-c" not in args:
        args = args + ["-c", "colours"]
    result = search(*args)
    assert result.exit_code in (1, 2)
    assert expected in result.output and "Traceback" not in result.output


def test_a_non_image_query_is_one_line(loaded, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("hello")
    result = search("similar", str(bad), "-c", "colours")
    assert result.exit_code == 1 and "cannot use" in result.output and "not an image" in result.output


def test_sql_changes_nothing_and_prints_json(loaded, db):
    with db.engine.connect() as conn:
        before = conn.execute(sa.text("SELECT count(*) FROM images")).scalar()
    for statement in ["DELETE FROM images", "SELECT 1; DELETE FROM images", "DROP TABLE images CASCADE"]:
        assert search("sql", statement).exit_code == 1
    with db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM images")).scalar() == before
    result = search("sql", "SELECT label, count(*) AS n FROM images i JOIN collections c ON c.id = i.collection_id "
                    "WHERE c.name = 'colours' GROUP BY 1 ORDER BY 1", "--json")
    assert json.loads(result.stdout) == [{"label": l, "n": 5} for l in sorted(COLOURS)]
    assert not os.path.exists("/tmp/ris-pwned")


def test_an_empty_collection_is_refused(db, settings, fake_extractor):
    load_collection(db, settings, "empty", [], fake_extractor, progress=False)
    result = search("similar", "--id", "1", "-c", "empty")
    assert result.exit_code == 1 and "no searchable images" in result.output


def test_query_with_other_weights_is_refused(loaded, db, tmp_path):
    recorded = collection_row(db, "colours").weights_fingerprint
    with db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE collections SET weights_fingerprint = 'deadbeef' WHERE name = 'colours'"))
    try:
        query = tmp_path / "q.png"
        make_picture(COLOURS["green"], "circle", seed=4242).save(query)
        result = search("similar", str(query), "-c", "colours")
        assert result.exit_code == 1 and "differ from those collection 'colours' was built with" in result.output
    finally:
        with db.engine.begin() as conn:
            conn.execute(sa.text("UPDATE collections SET weights_fingerprint = :f WHERE name = 'colours'"), {"f": recorded})


@pytest.mark.parametrize("args", [["similar", "--id", "{id}"], ["similar", "{file}"], ["sql", "SELECT 1"], ["--help"]])
def test_stored_queries_sql_and_help_do_not_import_tensorflow(loaded, args):
    first = similar_json(str(loaded / "red" / "red_0.jpg"), "-k", "1")[0]
    args = [a.format(id=first["id"], file=first["path"]) for a in args] + (["-c", "colours"] if args[0] == "similar" else [])
    code = (
        "import sys; from click.testing import CliRunner; from search.cli import cli; "
        f"r = CliRunner().invoke(cli, {args!r}); assert r.exit_code == 0, r.output; "
        "print('tensorflow' in sys.modules or 'keras' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_sql_json_prints_vectors_as_arrays(loaded):
    result = search("sql", "SELECT embedding, embedding <-> embedding AS zero FROM images i JOIN collections c "
                    "ON c.id = i.collection_id WHERE c.name = 'colours' ORDER BY i.id LIMIT 1", "--json")
    row = json.loads(result.stdout)[0]
    assert isinstance(row["embedding"], list) and len(row["embedding"]) == 6 and row["zero"] == 0
