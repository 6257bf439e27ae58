"""A collection kept in step with its folder: moves, renames, copies, files gone and --prune, content changed in
place, --include/--exclude, `ingest remove`, `ingest status`. The fake extractor stands in for ResNet50 (the
model is not the subject here); it counts its calls, so a test can prove that no CNN ran."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from ingest.annoy_index import data_files, read_sidecar, sidecar_path
from ingest.cli import cli as ingest_cli
from ingest.collection import Collection
from ingest.patterns import PathFilter
from ingest.store import stored_image
from tests.helpers import COLOURS, collection_row, make_folder, make_picture


@pytest.fixture
def calls(fake_extractor, monkeypatch):
    """How many pictures the (fake) CNN embedded during the test."""
    counted = {"images": 0}
    embed = type(fake_extractor).embed

    def counting(pixels):
        counted["images"] += len(pixels)
        return embed(fake_extractor, pixels)

    monkeypatch.setattr(fake_extractor, "embed", counting)
    return counted


def load(folder, name, *extra):
    result = CliRunner().invoke(ingest_cli, ["load", "folder", str(folder), "--collection", name, "--weights", "fake",
                                             "--pca-dims", "4", "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def paths(db, name) -> dict[str, int]:
    """path -> image id of every file recorded for a collection."""
    with db.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT p.path, p.image_id FROM image_paths p JOIN collections c ON c.id = p.collection_id"
                                    " WHERE c.name = :n"), {"n": name})
        return dict(rows.all())


def images(db, name) -> dict[int, tuple[str, str]]:
    """id -> (shown path, label) of a collection's images."""
    with db.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT i.id, i.path, i.label FROM images i JOIN collections c ON c.id = i.collection_id"
                                    " WHERE c.name = :n"), {"n": name})
        return {r.id: (r.path, r.label) for r in rows}


def state(db, settings, name):
    """Everything a load could change: rows, paths, failures, the collection row, the index files."""
    with db.engine.connect() as conn:
        tables = [conn.execute(sa.text(sql), {"n": name}).all() for sql in (
            "SELECT i.id, i.path, i.label, i.sha256, i.embedding_seq, i.embedding::text FROM images i"
            " JOIN collections c ON c.id = i.collection_id WHERE c.name = :n ORDER BY i.id",
            "SELECT p.* FROM image_paths p JOIN collections c ON c.id = p.collection_id WHERE c.name = :n ORDER BY p.image_id, p.path",
            "SELECT f.path, f.reason, f.at FROM ingest_failures f JOIN collections c ON c.id = f.collection_id WHERE c.name = :n",
            "SELECT pca_version, embedding_seq, removed_rows, updated_at FROM collections WHERE name = :n")]
    return tables, sidecar_path(settings.annoy_dir, name).read_text(), sorted(p.name for p in data_files(settings.annoy_dir, name))


def test_rerun_on_an_unchanged_folder_changes_nothing_and_runs_no_cnn(db, settings, picture_folder, calls):
    (picture_folder / "red" / "broken.jpg").write_bytes(b"not a picture")
    shutil.copy(picture_folder / "red" / "red_0.jpg", picture_folder / "blue" / "copy.jpg")
    first = load(picture_folder, "steady")
    assert (first["ingested"], first["duplicates"], first["failed"], calls["images"]) == (12, 1, 1, 12)
    before = state(db, settings, "steady")
    calls["images"] = 0
    again = load(picture_folder, "steady", "--prune")
    assert calls["images"] == 0
    assert (again["ingested"], again["present"], again["moved"], again["duplicates"], again["missing"], again["pruned"]) == (0, 13, 0, 0, 0, 0)
    after = state(db, settings, "steady")
    for table, (was, now) in enumerate(zip(before[0], after[0])):
        assert was == now, table
    assert after[1:] == before[1:]


def test_move_and_rename_repoint_the_row_without_the_cnn(db, picture_folder, calls):
    load(picture_folder, "moves")
    ids_before = {path: i for path, i in paths(db, "moves").items()}
    old, new = picture_folder / "red" / "red_0.jpg", picture_folder / "green" / "renamed.jpg"
    old.rename(new)
    (picture_folder / "blue" / "blue_1.jpg").rename(picture_folder / "blue" / "blue_renamed.jpg")
    calls["images"] = 0
    summary = load(picture_folder, "moves")
    assert calls["images"] == 0
    assert (summary["ingested"], summary["moved"], summary["duplicates"], summary["missing"]) == (0, 2, 0, 0)
    after = paths(db, "moves")
    assert str(old) not in after and after[str(new)] == ids_before[str(old)]
    assert images(db, "moves")[ids_before[str(old)]] == (str(new), "green")  # the shown path and its label follow
    assert len(after) == len(images(db, "moves")) == 12


def test_a_copy_in_two_folders_is_one_image_with_two_paths(db, picture_folder, calls):
    copy = picture_folder / "green" / "copy_of_red.jpg"
    shutil.copy(picture_folder / "red" / "red_0.jpg", copy)
    summary = load(picture_folder, "copies")
    assert (summary["ingested"], summary["duplicates"], summary["present"]) == (12, 1, 0)
    recorded = paths(db, "copies")
    assert recorded[str(copy)] == recorded[str(picture_folder / "red" / "red_0.jpg")] and len(recorded) == 13
    status = next(c for c in json.loads(CliRunner().invoke(ingest_cli, ["status", "--json"]).stdout)["collections"] if c["name"] == "copies")
    assert (status["images"], status["paths"], status["duplicates"], status["missing"]) == (12, 13, 1, 0)
    # The shown copy goes away: the image stays, shown at the other path; --prune forgets the dead path only.
    (picture_folder / "red" / "red_0.jpg").unlink()
    summary = load(picture_folder, "copies")
    assert (summary["missing"], summary["moved"]) == (1, 0)
    assert images(db, "copies")[recorded[str(copy)]] == (str(copy), "green")
    summary = load(picture_folder, "copies", "--prune")
    assert (summary["pruned"], summary["removed"], summary["missing"]) == (1, 0, 0)
    assert len(paths(db, "copies")) == len(images(db, "copies")) == 12


def test_deleted_files_are_counted_then_pruned_and_vanish_from_every_engine(db, settings, picture_folder, calls):
    load(picture_folder, "prune")
    coll = Collection.named(db, settings, "prune")
    gone = picture_folder / "blue" / "blue_1.jpg"
    image_id = paths(db, "prune")[str(gone)]
    vector = stored_image(db, coll.id, image_id=image_id).embedding
    assert coll.similar(vector, 1, engine="annoy")[0].id == image_id
    coll.build_hnsw()
    sidecar = read_sidecar(settings.annoy_dir, "prune")
    gone.unlink()
    (picture_folder / "red" / "bad.jpg").write_bytes(b"")
    load(picture_folder, "prune")
    (picture_folder / "red" / "bad.jpg").unlink()
    result = CliRunner().invoke(ingest_cli, ["load", "folder", str(picture_folder), "--collection", "prune", "--weights", "fake"])
    assert "2 missing (gone from disk; --prune forgets them)" not in result.output  # a failure is not a stored file
    assert "1 missing (gone from disk; --prune forgets them)" in result.output
    assert image_id in images(db, "prune")
    summary = load(picture_folder, "prune", "--prune")
    assert (summary["pruned"], summary["removed"], summary["missing"]) == (1, 1, 0)
    assert image_id not in images(db, "prune") and str(gone) not in paths(db, "prune")
    with db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM ingest_failures WHERE collection_id = :c"), {"c": coll.id}).scalar() == 0
    coll.reload()
    assert coll.row.removed_rows == 1
    assert read_sidecar(settings.annoy_dir, "prune") == sidecar  # no rebuild: the engines skip the row themselves
    for engine in ("pgvector", "annoy", "hnsw"):
        hits = Collection.named(db, settings, "prune").similar(vector, 11, engine=engine)
        assert image_id not in [h.id for h in hits] and len(hits) == 11, engine


def test_content_changed_in_place_belongs_to_the_new_picture(db, picture_folder, calls):
    shutil.copy(picture_folder / "red" / "red_1.jpg", picture_folder / "red" / "z_copy.jpg")
    load(picture_folder, "edited")
    path, edited_copy = picture_folder / "red" / "red_2.jpg", picture_folder / "red" / "red_1.jpg"
    old_id, kept_id = paths(db, "edited")[str(path)], paths(db, "edited")[str(edited_copy)]
    make_picture(COLOURS["yellow"], "circle", seed=999).save(path, quality=90)
    make_picture(COLOURS["yellow"], "circle", seed=998).save(edited_copy, quality=90)
    summary = load(picture_folder, "edited")
    assert (summary["ingested"], summary["missing"]) == (2, 1)  # the old red_2: no file holds it any more
    assert paths(db, "edited")[str(path)] != old_id
    assert images(db, "edited")[kept_id] == (str(picture_folder / "red" / "z_copy.jpg"), "red")  # shown where it still is
    summary = load(picture_folder, "edited", "--prune")
    assert (summary["removed"], summary["missing"]) == (1, 0) and old_id not in images(db, "edited")


def test_files_left_out_by_the_walk_are_not_missing(db, picture_folder, calls):
    load(picture_folder, "scoped")
    summary = load(picture_folder, "scoped", "--exclude", "green/", "--prune")
    assert (summary["present"], summary["missing"], summary["removed"]) == (8, 0, 0)
    assert len(images(db, "scoped")) == 12
    other = make_folder(picture_folder.parent / "other", labels=("yellow",), per_label=2, seed=5)
    summary = load(other, "scoped", "--prune")  # another folder of the same collection: its own scope
    assert (summary["ingested"], summary["missing"], summary["removed"]) == (2, 0, 0)


def test_include_and_exclude_choose_files(db, picture_folder, calls):
    (picture_folder / "red" / "keep.png").write_bytes((picture_folder / "red" / "red_0.jpg").read_bytes())
    summary = load(picture_folder, "globs", "--include", "red/", "--include", "*_3.jpg", "--exclude", "*.png", "--exclude", "red_1.*")
    assert summary["ingested"] == 3 + 2
    assert sorted(p.split("/pictures/")[1] for p in paths(db, "globs")) == [
        "blue/blue_3.jpg", "green/green_3.jpg", "red/red_0.jpg", "red/red_2.jpg", "red/red_3.jpg"]


@pytest.mark.parametrize(("include", "exclude", "path", "kept"), [
    ((), ("*.png",), "a/b/c.png", False),
    ((), ("*.png",), "a/b/c.jpg", True),
    ((), ("/a/*.jpg",), "a/c.jpg", False),
    ((), ("a/*.jpg",), "x/a/c.jpg", True),  # a pattern with a slash is anchored at the folder
    ((), ("**/tmp/*.jpg",), "x/y/tmp/c.jpg", False),
    ((), ("IMG_[0-9]?.jpg",), "x/IMG_12.jpg", False),
    ((), ("IMG_[!0-9]*.jpg",), "x/IMG_12.jpg", True),
    (("2024/",), (), "2024/may/c.jpg", True),
    (("2024/",), (), "2023/may/c.jpg", False),
    (("*.heic",), (), "x/c.HEIC", False),  # case matters, as in git
    (("*.jpg",), ("c.jpg",), "x/c.jpg", False),  # exclude wins
])
def test_patterns_follow_gitignore_rules(include, exclude, path, kept):
    assert PathFilter.of(include, exclude).keeps_file(path) is kept


def test_excluded_folders_are_not_walked():
    flt = PathFilter.of(exclude=("tmp/", "/raw"))
    assert flt.skips_folder("a/tmp") and flt.skips_folder("raw") and not flt.skips_folder("a/raw")
    assert PathFilter.of(exclude=("tmp/",)).keeps_file("x/tmp")  # a file named tmp is not a folder


def test_remove_drops_the_collection_and_its_index_files_after_confirmation(db, settings, picture_folder, calls):
    load(picture_folder, "doomed")
    assert sidecar_path(settings.annoy_dir, "doomed").exists()
    runner = CliRunner()
    refused = runner.invoke(ingest_cli, ["remove", "--collection", "doomed"], input="n\n")
    assert refused.exit_code == 1 and collection_row(db, "doomed") is not None
    assert "12 images" in refused.output
    done = runner.invoke(ingest_cli, ["remove", "--collection", "doomed", "--yes"])
    assert done.exit_code == 0, done.output
    assert collection_row(db, "doomed") is None and paths(db, "doomed") == {}
    assert not sidecar_path(settings.annoy_dir, "doomed").exists() and data_files(settings.annoy_dir, "doomed") == []
    missing = runner.invoke(ingest_cli, ["remove", "--collection", "doomed", "--yes"])
    assert missing.exit_code == 1 and "no collection named 'doomed'" in missing.output
    assert runner.invoke(ingest_cli, ["remove", "--yes"]).exit_code == 2  # the name is required


def test_status_counts_paths_missing_files_duplicates_and_failures(db, picture_folder, calls):
    shutil.copy(picture_folder / "red" / "red_0.jpg", picture_folder / "red" / "again.jpg")
    (picture_folder / "red" / "empty.jpg").write_bytes(b"")
    load(picture_folder, "counted")
    (picture_folder / "green" / "green_0.jpg").unlink()
    result = CliRunner().invoke(ingest_cli, ["status", "--json"])
    entry = next(c for c in json.loads(result.stdout)["collections"] if c["name"] == "counted")
    assert {k: entry[k] for k in ("images", "paths", "missing", "duplicates", "failures")} == {
        "images": 12, "paths": 13, "missing": 1, "duplicates": 1, "failures": 1}
    text = CliRunner().invoke(ingest_cli, ["status"]).output
    assert "counted: 12 images, 13 paths (1 duplicate, 1 missing), 3 labels" in text and ", 1 failures;" in text
    assert np.isfinite(entry["dims"])
