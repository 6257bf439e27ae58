"""`ingest watch`: real watcher processes (the real ResNet50 with random weights, the real embedded PostgreSQL) keep a
collection in step with a folder while the test adds, changes, moves and deletes files; the collection then equals
what a load of the folder makes. Also: excluded files, a folder that vanishes or empties at once, a restart, SIGTERM
and Ctrl-C in the middle of a batch, a collection removed under the watcher, a database that goes away, and the rule
by which a growing collection refits its PCA.

Every wait polls for its condition until a deadline; pick-up deadlines are the watcher's promises (10 s under
inotify, the poll interval plus 10 s when polling), counted from the change.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from ingest.collection import Collection
from ingest.db import sqlalchemy_url
from ingest.load import load_collection
from ingest.patterns import PathFilter
from ingest.sources import walk_folder
from tests.helpers import COLOURS, cli, make_folder, make_picture, pg_ctl, restart, Running

BIN = Path(sys.executable).parent
WEIGHTS = ("--weights", "random")
PICKUP = 10.0  # seconds for a change to be stored under inotify
POLL = 2.0
START = 240.0  # seconds for a watcher to start: model, then a load of the folder (a busy machine is slow)


# --- the watcher and the tables --------------------------------------------------------------------


def lines(run: Running) -> list[str]:
    """What the watcher printed on stdout so far: its batch lines."""
    return bytes(run.out).decode("utf-8", "replace").splitlines()


def notices(run: Running) -> str:
    return bytes(run.err).decode("utf-8", "replace")


def wait_for_line(run: Running, text: str, timeout: float = START, stream: str = "out") -> None:
    run.wait_for(lambda: text in (notices(run) if stream == "err" else "\n".join(lines(run))), repr(text), timeout)


@pytest.fixture
def watch(spawn):
    """Start `ingest watch` (killed at the end if it still runs)."""
    def start(folder: Path, name: str, *extra, database_url: str | None = None) -> Running:
        return spawn("ingest", "watch", folder, "--collection", name, *WEIGHTS, *extra, database_url=database_url)
    return start


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def on_disk(folder: Path, path_filter: PathFilter = PathFilter()) -> dict[str, str]:
    """path -> sha256 of every picture a load of the folder considers."""
    return {str(c.path): sha256_of(c.path) for c in walk_folder(folder, path_filter=path_filter)[0]}


def recorded(engine, name: str) -> dict[str, str]:
    """path -> sha256 of every file recorded for a collection."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT p.path, i.sha256 FROM image_paths p JOIN images i ON i.collection_id = p.collection_id AND i.sha256 = p.sha256"
                                    " JOIN collections c ON c.id = p.collection_id WHERE c.name = :n"), {"n": name})
        return dict(rows.all())


def pictures(engine, name: str) -> dict[str, str | None]:
    """sha256 -> label of every picture stored in a collection."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT i.sha256, i.label FROM images i JOIN collections c ON c.id = i.collection_id"
                                    " WHERE c.name = :n"), {"n": name})
        return dict(rows.all())


def engine_of(db):
    return db.engine


def wait_until(condition, what: str, timeout: float, run: Running | None = None) -> float:
    """Poll `condition` until it holds; returns the seconds it took. Fails at the deadline, or if the watcher ended."""
    began = time.monotonic()
    while not condition():
        if run is not None and not run.running():
            raise AssertionError(f"the watcher ended (exit {run.proc.returncode}) before {what}: {notices(run)[-2000:]}")
        if time.monotonic() - began > timeout:
            raise AssertionError(f"not {what} within {timeout:g} s" + (f": {notices(run)[-2000:]}" if run else ""))
        time.sleep(0.1)
    return time.monotonic() - began


def in_step(db, name: str, folder: Path, path_filter: PathFilter = PathFilter()):
    """The pruned collection holds exactly the folder's pictures, each file recorded with its content."""
    def check() -> bool:
        disk = on_disk(folder, path_filter)
        return recorded(engine_of(db), name) == disk and set(pictures(engine_of(db), name)) == set(disk.values())
    return check


def new_picture(path: Path, seed: int, colour: str = "yellow") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_picture(COLOURS[colour], "circle", 50_000 + seed).save(path, quality=90)
    return path


def equals_a_fresh_load(db, ris_home: Path, name: str, folder: Path, *extra: str) -> None:
    """A load of the folder into a new collection stores the same pictures, with the same files and labels."""
    fresh = f"{name}-load"
    done = cli(ris_home, "ingest", "load", "folder", folder, "--collection", fresh, *WEIGHTS, "--prune", "--json", *extra)
    assert done.returncode == 0, done.stderr
    engine = engine_of(db)
    assert recorded(engine, name) == recorded(engine, fresh)
    assert pictures(engine, name) == pictures(engine, fresh)


# --- files appear, change, move and go ---------------------------------------------------------------


@pytest.mark.parametrize("mode, extra, pickup", [("inotify", (), PICKUP), ("poll", ("--poll", POLL), POLL + PICKUP)])
def test_added_changed_moved_and_deleted_files_are_picked_up_and_equal_a_load(db, ris_home, tmp_path, watch, mode, extra, pickup):
    folder = make_folder(tmp_path / "photos", per_label=2)
    name = f"watch-{mode}"
    run = watch(folder, name, "--prune", *extra)
    wait_for_line(run, f"{name}: start: 6 added")
    assert wait_until(in_step(db, name, folder), "in step at start", 5, run) < 5

    changes = [
        ("added", lambda: new_picture(folder / "red" / "new.jpg", 1)),
        ("changed", lambda: new_picture(folder / "green" / "green_0.jpg", 2, "blue")),
        ("moved", lambda: (folder / "blue" / "blue_0.jpg").rename(folder / "red" / "from_blue.jpg")),
        ("gone", lambda: (folder / "red" / "red_1.jpg").unlink()),
        ("copied", lambda: shutil.copy(folder / "red" / "red_0.jpg", folder / "red" / "red_0_copy.jpg")),
        ("new folder", lambda: new_picture(folder / "yellow" / "deep" / "one.jpg", 3)),
        ("a file in the new folder", lambda: new_picture(folder / "yellow" / "deep" / "two.jpg", 4)),  # its watch was added
    ]
    for what, change in changes:
        change()
        wait_until(in_step(db, name, folder), f"{what} picked up", pickup, run)

    said = lines(run)
    assert any(" 1 added, 0 changed, 0 moved" in line for line in said), said
    assert any(" 1 changed," in line for line in said) and any(" 1 moved," in line for line in said), said
    assert any(" 1 gone," in line for line in said), said
    labels = pictures(engine_of(db), name)
    assert labels[sha256_of(folder / "red" / "from_blue.jpg")] == "red"  # a moved picture takes its new folder's label
    assert labels[sha256_of(folder / "yellow" / "deep" / "one.jpg")] == "yellow/deep"
    equals_a_fresh_load(db, ris_home, name, folder)
    again = cli(ris_home, "ingest", "load", "folder", folder, "--collection", name, *WEIGHTS, "--prune", "--json")
    summary = json.loads(again.stdout)
    assert {k: summary[k] for k in ("ingested", "moved", "duplicates", "missing", "pruned", "removed")} == dict.fromkeys(
        ("ingested", "moved", "duplicates", "missing", "pruned", "removed"), 0), summary
    assert "Traceback" not in notices(run)


def test_excluded_files_are_ignored(db, ris_home, tmp_path, watch):
    folder = make_folder(tmp_path / "photos", labels=("red",), per_label=2)
    name = "watch-exclude"
    run = watch(folder, name, "--exclude", "raw/", "--exclude", "*.png", "--prune")
    wait_for_line(run, f"{name}: start: 2 added")
    new_picture(folder / "raw" / "unprocessed.jpg", 1)
    new_picture(folder / "red" / "screenshot.png", 2)
    new_picture(folder / ".hidden" / "secret.jpg", 3)
    new_picture(folder / "red" / "kept.jpg", 4)
    wanted = PathFilter.of((), ("raw/", "*.png"))
    wait_until(in_step(db, name, folder, wanted), "the kept file picked up", PICKUP, run)
    paths = recorded(engine_of(db), name)
    assert str(folder / "red" / "kept.jpg") in paths and len(paths) == 3
    with engine_of(db).connect() as conn:
        failures = conn.execute(sa.text("SELECT count(*) FROM ingest_failures f JOIN collections c ON c.id = f.collection_id"
                                        " WHERE c.name = :n"), {"n": name}).scalar()
    assert failures == 0
    equals_a_fresh_load(db, ris_home, name, folder, "--exclude", "raw/", "--exclude", "*.png")


@pytest.mark.parametrize("target, extra, error", [
    ("missing", (), "Error: source folder {path} does not exist"),
    ("a-file.jpg", (), "Error: source folder {path} is not a folder"),
    ("photos", ("--exclude", "/"), "Error: empty pattern '/' in --include/--exclude"),
    ("photos", ("--debounce", "-1"), "Invalid value for '--debounce'"),
])
def test_bad_input_is_one_line_and_makes_no_collection(db, ris_home, tmp_path, target, extra, error):
    make_folder(tmp_path / "photos", labels=("red",), per_label=1)
    (tmp_path / "a-file.jpg").write_bytes(b"x")
    name = f"watch-bad-{len(target)}-{len(extra)}"
    done = cli(ris_home, "ingest", "watch", tmp_path / target, "--collection", name, *WEIGHTS, *extra, timeout=120)
    assert done.returncode in (1, 2) and "Traceback" not in done.stderr
    assert error.format(path=tmp_path / target) in done.stderr
    with engine_of(db).connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM collections WHERE name = :n"), {"n": name}).scalar() == 0


# --- a folder that vanishes, a restart ---------------------------------------------------------------


def test_a_vanished_or_emptied_folder_is_not_pruned_and_is_waited_for(db, tmp_path, watch):
    folder = make_folder(tmp_path / "share", per_label=1)
    name = "watch-vanish"
    run = watch(folder, name, "--prune")
    wait_for_line(run, f"{name}: start: 3 added")
    stored = recorded(engine_of(db), name)

    away = tmp_path / "away"
    folder.rename(away)  # the share's mount point is gone
    wait_for_line(run, "is gone (an unmounted share?): nothing is pruned; waiting for it", 30, stream="err")
    assert recorded(engine_of(db), name) == stored
    away.rename(folder)
    wait_for_line(run, f"{os.path.realpath(folder)} is back", 30, stream="err")

    aside = tmp_path / "aside"
    aside.mkdir()
    for label in ("red", "green", "blue"):
        (folder / label).rename(aside / label)  # unmounted: an empty mount point
    wait_for_line(run, "is empty (an unmounted share?): nothing is pruned; waiting for it", 30, stream="err")
    assert recorded(engine_of(db), name) == stored
    for label in ("red", "green", "blue"):
        (aside / label).rename(folder / label)
    wait_until(lambda: notices(run).count("is back") == 2, "the folder back", 30, run)
    assert recorded(engine_of(db), name) == stored
    new_picture(folder / "red" / "after.jpg", 1)
    wait_until(in_step(db, name, folder), "a new file picked up after the folder came back", PICKUP, run)
    assert not any(re.search(r" [1-9]\d* gone,", line) for line in lines(run)), lines(run)


def test_a_restart_picks_up_what_changed_while_it_was_down(db, ris_home, tmp_path, watch):
    folder = make_folder(tmp_path / "photos", per_label=2)
    name = "watch-restart"
    first = watch(folder, name)
    wait_for_line(first, f"{name}: start: 6 added")
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish().returncode == 0

    new_picture(folder / "green" / "while_down.jpg", 1)
    new_picture(folder / "red" / "red_0.jpg", 2, "blue")
    (folder / "blue" / "blue_0.jpg").rename(folder / "green" / "moved.jpg")
    (folder / "blue" / "blue_1.jpg").unlink()

    second = watch(folder, name)
    wait_for_line(second, f"{name}: start: 1 added, 1 changed, 1 moved, 1 gone, 0 failed")
    disk = on_disk(folder)
    paths = recorded(engine_of(db), name)
    assert {p: paths[p] for p in disk} == disk
    assert str(folder / "blue" / "blue_1.jpg") in paths  # without --prune a file gone stays recorded, as a load keeps it
    before = (paths, pictures(engine_of(db), name))
    again = cli(ris_home, "ingest", "load", "folder", folder, "--collection", name, *WEIGHTS, "--json")
    assert json.loads(again.stdout)["ingested"] == 0 and json.loads(again.stdout)["moved"] == 0
    assert (recorded(engine_of(db), name), pictures(engine_of(db), name)) == before


# --- stopping --------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)], ids=["sigterm", "ctrl-c"])
def test_a_stop_signal_mid_batch_finishes_the_batch_and_exits_cleanly(db, tmp_path, watch, signum, code):
    folder = make_folder(tmp_path / "photos", labels=("red",), per_label=1)
    name = f"watch-stop-{signum.name.lower()}"
    run = watch(folder, name, "--batch-size", "1", "--prune")
    wait_for_line(run, f"{name}: start: 1 added")
    staged = tmp_path / "staged" / "purple"
    for i in range(24):
        new_picture(staged / f"p{i}.jpg", i)
    staged.rename(folder / "purple")  # 24 files appear at once: one batch, committed a picture at a time
    new = {sha256_of(p) for p in (folder / "purple").iterdir()}
    stored_new = lambda: len(new & set(pictures(engine_of(db), name)))  # noqa: E731
    wait_until(lambda: stored_new() >= 1, "the batch under way", PICKUP, run)
    run.proc.send_signal(signum)
    at_signal = stored_new()
    finished = run.finish(timeout=START)
    assert finished.returncode == code, finished.stderr
    assert at_signal < len(new), "the signal came after the batch: nothing was tested"
    assert in_step(db, name, folder)(), "the batch in hand was not finished"
    assert f"{name}: stopped" in finished.stderr and "Traceback" not in finished.stderr
    assert any("24 added" in line for line in finished.stdout.splitlines()), finished.stdout


def test_a_collection_removed_under_the_watcher_stops_it_with_one_line(db, ris_home, tmp_path, watch):
    folder = make_folder(tmp_path / "photos", labels=("red",), per_label=1)
    name = "watch-removed"
    run = watch(folder, name)
    wait_for_line(run, f"{name}: start: 1 added")
    removed = cli(ris_home, "ingest", "remove", "--collection", name, "--yes")
    assert removed.returncode == 0, removed.stderr
    new_picture(folder / "red" / "after.jpg", 1)
    finished = run.finish(timeout=60)
    assert finished.returncode == 0
    said = [line for line in finished.stderr.splitlines() if "was removed" in line]
    assert said == [f"{name}: the collection was removed: stopped watching {os.path.realpath(folder)}"], finished.stderr
    assert "Traceback" not in finished.stderr
    with engine_of(db).connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM collections WHERE name = :n"), {"n": name}).scalar() == 0


def test_a_database_that_goes_away_is_retried_until_it_is_back(ris_home, tmp_path, tcp_server, watch):
    url = tcp_server.url()
    engine = sa.create_engine(sqlalchemy_url(url), poolclass=sa.pool.NullPool)
    folder = make_folder(tmp_path / "photos", labels=("red",), per_label=1)
    name = "watch-db-away"
    run = watch(folder, name, database_url=url)
    wait_for_line(run, f"{name}: start: 1 added")
    pg_ctl(tcp_server, "-m", "fast", "stop")
    new_picture(folder / "red" / "while_away.jpg", 1)
    wait_for_line(run, f"{name}: database unavailable", 30, stream="err")
    restart(tcp_server)
    wait_for_line(run, f"{name}: database reachable again", 90, stream="err")
    assert str(folder / "red" / "while_away.jpg") in recorded(engine, name)
    assert run.running() and "Traceback" not in notices(run)
    engine.dispose()


# --- a growing collection refits its PCA ---------------------------------------------------------------


def grow(db, settings, fake_extractor, folder: Path, name: str, total: int, **options) -> Collection:
    """Add pictures to the folder up to `total` and load them into the collection (the fake model: the rule is the subject)."""
    have = len(list(folder.rglob("*.jpg")))
    for i in range(have, total):
        new_picture(folder / "all" / f"{i:04d}.jpg", i, tuple(COLOURS)[i % 4])
    load_collection(db, settings, name, walk_folder(folder)[0], fake_extractor, progress=False, **options)
    return Collection.named(db, settings, name)


def test_a_pca_fitted_on_a_dozen_pictures_is_refitted_as_the_collection_grows(db, settings, fake_extractor, tmp_path):
    folder = tmp_path / "growing"
    coll = grow(db, settings, fake_extractor, folder, "refit-small", 12)
    assert coll.dims == 12  # cut to the pictures there were
    assert coll.refit_due(128) is None  # fewer than 100 pictures
    coll = grow(db, settings, fake_extractor, folder, "refit-small", 99)
    assert coll.refit_due(128) is None
    coll = grow(db, settings, fake_extractor, folder, "refit-small", 100)
    assert coll.refit_due(128) == 100  # 100 pictures and more than 4x those of the fit
    assert coll.refit(100).refit_due(128) is None
    coll = grow(db, settings, fake_extractor, folder, "refit-small", 128)
    assert coll.refit_due(128) == 128  # as many pictures as the default dims: the cut fit is outgrown
    assert coll.refit(128).refit_due(128) is None
    assert coll.dims == 128


def test_a_pca_with_dims_chosen_is_refitted_at_those_dims_after_fourfold_growth(db, settings, fake_extractor, tmp_path):
    folder = tmp_path / "chosen"
    coll = grow(db, settings, fake_extractor, folder, "refit-chosen", 30, pca_dims=8)
    assert coll.dims == 8 and coll.refit_due(128) is None
    coll = grow(db, settings, fake_extractor, folder, "refit-chosen", 119)
    assert coll.refit_due(128) is None  # not yet 4 x 30
    coll = grow(db, settings, fake_extractor, folder, "refit-chosen", 120)
    assert coll.refit_due(128) == 8  # the dims chosen are kept
