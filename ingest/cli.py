"""`ingest`: load pictures into a collection, refit PCA, rebuild the Annoy file, manage the database.

Only click and the light option module are imported here; each command imports what it needs when it runs,
so that Ctrl-C at any point after start-up is handled by ErrorHandlingGroup (one line, exit 130).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from ingest.config import DEFAULT_BATCH_SIZE, DEFAULT_MAX_FILE_MB, DEFAULT_TREES
from ingest.options import (ErrorHandlingGroup, LoadOptions, collection_option, database_option, json_option, new_collection_name,
                            open_database, precision_option, print_json, runtime_option)
from ingest.feeding import GPU_BATCH_SIZE

if TYPE_CHECKING:
    from ingest.batches import LoadSummary


@click.group(cls=ErrorHandlingGroup)
@click.version_option(package_name="reverse-image-search")
def cli():
    """Turn a folder of pictures into a searchable index (PostgreSQL + pgvector, and an Annoy file)."""


@cli.group(cls=ErrorHandlingGroup)
def load():
    """Embed pictures with ResNet50 and store them in a collection."""


def load_options(f):
    """Options every `ingest load` source takes."""
    for option in reversed(
        [
            click.option("--collection", "-c", metavar="NAME", callback=new_collection_name,
                         help="Collection name: letters, digits, '.', '_', '-' (default: caltech101, or the folder's name made so)."),
            click.option("--weights", default="imagenet", show_default=True, metavar="imagenet|random|PATH",
                         help="ResNet50 weights: ImageNet (downloaded by Keras), seeded random (offline), or a local file."),
            click.option("--pca-dims", type=click.IntRange(1, 2000), metavar="N",
                         help="Dims kept by PCA (default 128, or the collection's)."),
            click.option("--limit-per-class", type=click.IntRange(1), metavar="N", help="At most N images per label (quick runs)."),
            click.option("--batch-size", type=click.IntRange(1, 1024), metavar="N",
                         help=f"Pictures per forward pass (default {DEFAULT_BATCH_SIZE}, {GPU_BATCH_SIZE} on a GPU)."),
            click.option("--workers", type=click.IntRange(1, 256), metavar="N",
                         help="Decode threads (default 2, one per core on a GPU)."),
            precision_option,
            runtime_option,
            click.option("--trees", type=click.IntRange(1), default=DEFAULT_TREES, show_default=True, help="Annoy trees."),
            click.option("--raw-features", type=click.Choice(["half", "none"]), default="half", show_default=True,
                         help="A new collection's raw 2048-d features: kept in half precision (4 KB a picture; refits and "
                              "--space raw need them), or none (dropped once the PCA is fitted)."),
            click.option("--strict", is_flag=True, help="Exit non-zero if any file could not be ingested."),
            click.option("--max-file-mb", type=click.IntRange(1), default=DEFAULT_MAX_FILE_MB, show_default=True, envvar="RIS_MAX_FILE_MB",
                         metavar="MB", help="Refuse larger files unread, recorded as failures (env RIS_MAX_FILE_MB)."),
            click.option("--prune", is_flag=True, help="Forget files gone from the folder; delete pictures no file holds any more."),
            click.option("--ray", "ray_address", metavar="ADDRESS",
                         help="Embed on a Ray cluster: auto, ray://HOST:10001, HOST:6379, or local (a Ray on this machine's "
                              "cores). Needs the ray extra."),
            click.option("--ray-actors", type=click.IntRange(1), metavar="N",
                         help="Embedding actors with --ray, one model each (default: one per GPU, else one per two CPUs)."),
            click.option("--include", multiple=True, metavar="GLOB", help="Only files matching (gitignore-like; repeatable)."),
            click.option("--exclude", multiple=True, metavar="GLOB", help="Leave out files and folders matching (repeatable)."),
            database_option,
            json_option,
        ]
    ):
        f = option(f)
    return f


@load.command("caltech101")
@click.option("--source", type=click.Path(path_type=Path), help="caltech-101.zip, 101_ObjectCategories.tar.gz, or the extracted folder.")
@load_options
def load_caltech101(source, **options):
    """Load Caltech 101 (without BACKGROUND_Google), downloading the official archive unless --source is given.

    Example: ingest load caltech101 --source 101_ObjectCategories.tar.gz --weights random --limit-per-class 2
    """
    from ingest.caltech101 import EXCLUDED_CALTECH_LABELS, prepare_caltech101
    from ingest.errors import SourceError
    from ingest.patterns import PathFilter
    from ingest.sources import walk_folder

    if source is not None and not source.exists():
        raise SourceError(f"no such file or folder: {source}")
    path_filter = PathFilter.of(options.pop("include"), options.pop("exclude"))
    settings, db = open_database(options.pop("database_url"), runtime=options.pop("runtime"))

    def find_candidates():
        root = prepare_caltech101(source, settings.datasets_dir)
        return root, *walk_folder(root, exclude_labels=EXCLUDED_CALTECH_LABELS, path_filter=path_filter)

    name, as_json = options.pop("collection") or "caltech101", options.pop("as_json")
    run_load(settings, db, name, find_candidates, LoadOptions(**options), as_json=as_json)


@load.command("folder")
@click.argument("path", type=click.Path(path_type=Path))
@load_options
def load_folder(path, **options):
    """Load every picture under PATH; sub-folder names become labels. A rerun brings the collection in step:
    new files are added, moved ones re-pointed, copies recorded, files gone counted (forgotten with --prune).

    Example: ingest load folder ~/Pictures/shoes --weights random --exclude 'raw/' --prune
    """
    from ingest.names import folder_collection_name
    from ingest.patterns import PathFilter
    from ingest.sources import walk_folder

    path_filter = PathFilter.of(options.pop("include"), options.pop("exclude"))
    settings, db = open_database(options.pop("database_url"), runtime=options.pop("runtime"))
    found = walk_folder(path, path_filter=path_filter)
    name, as_json = options.pop("collection") or folder_collection_name(path), options.pop("as_json")
    run_load(settings, db, name, lambda: (path, *found), LoadOptions(**options), as_json=as_json)


def run_load(settings, db, name: str, find_candidates, options: LoadOptions, *, as_json: bool = False):
    """Shared tail of every load: build the model first, so weights that cannot be had fail before any
    download or extraction; then find the pictures, load them and bring the collection in step with the
    folder (ingest/sync.py), report. With --ray, Ray starts first: TensorFlow must not be loaded here before it."""
    from ingest.features import extractor_for
    from ingest.images import file_size_limit
    from ingest.load import load_collection
    from ingest.feeding import feeding
    from ingest.precision import plan_load
    from ingest.sources import limit_per_label

    o, cluster = options, None
    if o.ray_address:
        from ingest import distributed

        distributed.start(o.ray_address)
        cluster = distributed.Cluster(o.ray_address, o.ray_actors, o.batch_size)
    elif o.ray_actors:
        raise click.UsageError("--ray-actors needs --ray")
    precision, hw = plan_load(db, name, o.precision)
    extractor = extractor_for(o.weights, precision, settings.runtime, models_dir=settings.models_dir)
    feed = feeding(hw, precision, o.batch_size, o.workers, runtime=extractor.runtime)
    if feed.device_line:
        click.echo(feed.device_line, err=True)
    root, candidates, skipped = find_candidates()
    if o.limit_per_class:
        candidates = limit_per_label(candidates, o.limit_per_class)
    with file_size_limit(o.max_file_mb * 2**20):
        summary = load_collection(db, settings, name, candidates, extractor, pca_dims=o.pca_dims, batch_size=feed.batch_size,
                                  workers=feed.workers, trees=o.trees, skipped=skipped, progress=not as_json, root=root,
                                  prune=o.prune, cluster=cluster, raw_features=o.raw_features)
    report_load(summary, as_json)
    if o.strict and summary.failed:
        raise click.ClickException(f"{summary.failed} file(s) could not be ingested (--strict); see table ingest_failures")


def report_load(summary: LoadSummary, as_json: bool) -> None:
    if as_json:
        print_json({k: v for k, v in vars(summary).items()} | {"images_per_second": round(summary.images_per_second, 2)})
        return
    for path, reason in summary.failures[:10]:
        shown = path.replace("\n", "\\n")  # one line per failure, as search's tables show newlines
        click.echo(f"failed: {shown}: {reason}", err=True)
    if len(summary.failures) > 10:
        click.echo(f"... and {len(summary.failures) - 10} more (SELECT * FROM ingest_failures)", err=True)
    s = summary
    synced = [(s.moved, f"{s.moved} moved"), (s.duplicates, f"{s.duplicates} duplicate paths")]
    gone = [(s.missing, f"{s.missing} missing (gone from disk; --prune forgets them)"),
            (s.pruned or s.removed, f"{s.pruned} pruned ({s.removed} images removed)")]
    click.echo(
        f"{s.collection}: {s.ingested} ingested, {s.present} already present{''.join(f', {t}' for n, t in synced if n)}, "
        f"{s.failed} failed{f', {s.skipped} non-image files skipped' if s.skipped else ''}{''.join(f', {t}' for n, t in gone if n)} "
        f"in {s.seconds:.1f} s ({s.images_per_second:.1f} images/s)"
    )


@cli.command("watch")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--collection", "-c", metavar="NAME", callback=new_collection_name, help="Collection name (default: the folder's name made so).")
@click.option("--poll", type=click.FloatRange(0.1), metavar="SECONDS", help="Scan every SECONDS instead of using inotify (network shares: 60).")
@click.option("--debounce", type=click.FloatRange(0), default=1.0, show_default=True, metavar="SECONDS",
              help="A batch waits for this much quiet; a file is taken once unchanged for this long.")
@click.option("--prune", is_flag=True, help="Forget files gone from the folder; delete pictures no file holds any more.")
@click.option("--include", multiple=True, metavar="GLOB", help="Only files matching (gitignore-like; repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave out files and folders matching (repeatable).")
@click.option("--weights", default="imagenet", show_default=True, metavar="imagenet|random|PATH", help="ResNet50 weights, as for a load.")
@click.option("--pca-dims", type=click.IntRange(1, 2000), metavar="N", help="A new PCA's dims, and a refit's once outgrown (default 128).")
@click.option("--batch-size", type=click.IntRange(1, 1024), metavar="N", help=f"Pictures per forward pass (default {DEFAULT_BATCH_SIZE}).")
@click.option("--workers", type=click.IntRange(1, 256), metavar="N", help="Decode threads (default 2, one per core on a GPU).")
@click.option("--trees", type=click.IntRange(1), default=DEFAULT_TREES, show_default=True, help="Annoy trees.")
@click.option("--max-file-mb", type=click.IntRange(1), default=DEFAULT_MAX_FILE_MB, show_default=True, envvar="RIS_MAX_FILE_MB",
              metavar="MB", help="Refuse larger files unread (env RIS_MAX_FILE_MB).")
@precision_option
@runtime_option
@database_option
@json_option
def watch_command(path, include, exclude, max_file_mb, database_url, runtime, as_json, **options):
    """Keep a collection in step with a folder as files appear, change, move and go: a load of the folder at start, then
    of the changed files in debounced batches, one line each. Ctrl-C or SIGTERM finishes the batch in hand. docs/watch.md.

    Example: ingest watch ~/Pictures/shoes --weights random --prune --exclude 'raw/'
    """
    from ingest.images import file_size_limit
    from ingest.patterns import PathFilter
    from ingest.watch import watch_folder

    settings, db = open_database(database_url, runtime=runtime)
    with file_size_limit(max_file_mb * 2**20):
        code = watch_folder(settings, db, path, PathFilter.of(include, exclude), as_json=as_json, **options)
    raise SystemExit(code)


@cli.command("status")
@database_option
@json_option
def status_command(database_url, as_json):
    """Collections, their sizes, and whether each Annoy index is fresh.

    Example: ingest status --json
    """
    from ingest.status import status

    settings, db = open_database(database_url)
    info = status(db, settings)
    if as_json:
        print_json(info)
        return
    click.echo(f"database: {info['database']}")
    for c in info["collections"]:
        annoy = c["annoy"]
        fresh = (f"fresh + {annoy['delta']} newer rows searched exactly" if annoy["delta"] else "fresh") if annoy["fresh"] \
            else "STALE (run `ingest index`)"
        click.echo(
            f"{c['name']}: {c['images']} images, {c['paths']} paths ({c['duplicates']} duplicate, {c['missing']} missing), "
            f"{c['labels']} labels, {c['dims']} dims, weights {c['weights']} at {c['precision']} on {c['runtime']}, "
            f"{c['failures']} failures; annoy {annoy['items']} items, {fresh}; hnsw {'yes' if c['hnsw'] else 'no'}"
        )
    if not info["collections"]:
        click.echo("no collections yet: run `ingest load`")


@cli.command("remove")
@click.option("--collection", "-c", required=True, metavar="NAME", help="The collection to delete.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@database_option
def remove_command(collection, yes, database_url):
    """Delete a collection: its images, features, paths, failures and index files (the pictures stay on disk).

    Example: ingest remove --collection old-shoes --yes
    """
    from ingest.collection import Collection
    from ingest.remove import describe, remove_collection

    settings, db = open_database(database_url)
    coll = Collection.named(db, settings, collection)
    if not yes:
        click.confirm(f"remove {describe(coll)}?", abort=True)
    remove_collection(coll)
    click.echo(f"{coll.name}: removed")


@cli.command("reduce")
@click.option("--pca-dims", type=click.IntRange(1, 2000), required=True, metavar="N", help="Dims to keep.")
@click.option("--trees", type=click.IntRange(1), default=DEFAULT_TREES, show_default=True)
@collection_option
@database_option
def reduce_command(pca_dims, trees, collection, database_url):
    """Refit PCA from the stored raw features (no CNN run), rewrite embeddings and the Annoy file.

    Example: ingest reduce --pca-dims 64 --collection caltech101
    """
    from ingest.collection import Collection

    settings, db = open_database(database_url)
    coll = Collection.named(db, settings, collection).refit(pca_dims, trees=trees)
    kept = " and HNSW" if coll.row.hnsw else ""
    click.echo(f"{coll.name}: PCA refitted to {coll.dims} dims (version {coll.row.pca_version}); embeddings, Annoy{kept} index rewritten")


@cli.command("index")
@click.option("--trees", type=click.IntRange(1), default=DEFAULT_TREES, show_default=True)
@click.option("--annoy/--no-annoy", default=True, show_default=True, help="Rebuild the Annoy file.")
@click.option("--hnsw", is_flag=True, help="Build a pgvector HNSW index for `search similar --engine hnsw`; loads keep it.")
@click.option("--drop-hnsw", is_flag=True, help="Drop the HNSW index and stop keeping one.")
@collection_option
@database_option
def index_command(trees, annoy, hnsw, drop_hnsw, collection, database_url):
    """Rebuild the collection's Annoy file from the images table; build or drop its HNSW index.

    Example: ingest index --collection caltech101 --trees 100 --hnsw
    """
    from ingest.collection import Collection

    if hnsw and drop_hnsw:
        raise click.UsageError("--hnsw and --drop-hnsw contradict each other")
    settings, db = open_database(database_url)
    coll = Collection.named(db, settings, collection)
    if coll.pca is None:
        coll.finish(trees=trees)
    if annoy:
        sidecar = coll.build_index(trees)
        click.echo(f"{coll.name}: Annoy index of {sidecar.items} items, {sidecar.trees} trees, {sidecar.dims} dims")
    if hnsw:
        click.echo(f"{coll.name}: HNSW index {coll.build_hnsw(progress=True)} on {coll.dims} dims")
    if drop_hnsw:
        coll.drop_hnsw()
        click.echo(f"{coll.name}: HNSW index dropped")


@cli.command("finetune")
@collection_option
@click.option("--epochs", type=click.IntRange(1), default=10, show_default=True, help="Epochs per phase (early stopping may end one sooner).")
@click.option("--unfreeze", type=click.Choice(["conv5", "none"]), default="conv5", show_default=True,
              help="After training the head, also train the last ResNet block (at lr/10); 'none' trains the head only, "
                   "which leaves the search features unchanged.")
@click.option("--augment/--no-augment", default=True, show_default=True, help="Random flips, turns, zooms, shifts, contrast while training.")
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2, show_default=True,
              help="Share of each label held out to measure loss (recorded once per run).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--into", metavar="NAME", callback=new_collection_name, help="New collection for the re-embedded pictures (default: NAME-ft).")
@click.option("--batch-size", type=click.IntRange(1, 1024), default=16, show_default=True)
@click.option("--learning-rate", type=click.FloatRange(0, min_open=True), default=1e-3, show_default=True)
@precision_option
@runtime_option
@database_option
@json_option
def finetune_command(collection, epochs, unfreeze, augment, holdout, seed, into, batch_size, learning_rate, precision, runtime,
                     database_url, as_json):
    """Fine-tune the collection's ResNet50 on its labels, save the weights, re-embed into a new collection.

    Rerunning the same command resumes from the last completed epoch.

    Example: ingest finetune --collection shoes --epochs 5 --unfreeze conv5
    """
    from dataclasses import asdict

    from ingest.collection import Collection
    from ingest.finetune import finetune

    settings, db = open_database(database_url, runtime=runtime)
    name = Collection.named(db, settings, collection).name
    unfreeze = None if unfreeze == "none" else unfreeze
    summary = finetune(db, settings, name, into=into, epochs=epochs, unfreeze=unfreeze, augment=augment, holdout=holdout, seed=seed,
                       batch_size=batch_size, learning_rate=learning_rate, progress=not as_json, precision=precision)
    if as_json:
        print_json({k: v for k, v in asdict(summary).items() if k not in ("train_ids", "holdout_ids")})
        return
    if unfreeze is None:
        click.echo("note: with --unfreeze none only the head learnt; the backbone, and so the search features, are unchanged", err=True)
    click.echo(
        f"{summary.into}: {summary.epochs_run} epoch(s) from epoch {summary.initial_epoch}, "
        f"{summary.train_size} train / {summary.holdout_size} hold-out pictures, "
        f"hold-out loss {summary.holdout_loss:.3f} accuracy {summary.holdout_accuracy:.2f} "
        f"({summary.images_per_second:.1f} training images/s); weights {summary.weights_path}"
    )


from ingest.db_commands import db  # noqa: E402  (the `ingest db` group)

cli.add_command(db)
