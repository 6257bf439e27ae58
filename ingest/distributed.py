"""A load spread over a Ray cluster: Ray Data reads and decodes in tasks, an actor pool embeds and commits.

The driver (the `ingest load --ray` process) does what a one-machine load does around the CNN (ingest/load.py:
list the candidates, read what the collection stores, record where files live, `Collection.finish`); only the
middle moves out. Ray Data streams the candidates through `decode_batch` tasks (read, sha256, skip what is
stored, decode), then through an actor pool of `Embedder`s: one ResNet50 per actor with the collection's weights
and precision, which commits each batch itself with `batches.store_batch` (COPY, idempotent on (collection,
sha256), failures recorded with their reason). Back to the driver come only paths, hashes, reasons and counts.

Faults: a committed batch is never lost (it is in PostgreSQL) and a batch in flight is one transaction, rolled
back when its process dies. We rely on Ray's own retries, as Ray Data sets them: an actor pool's actors are
restarted without limit (`max_restarts=-1`) and a batch whose actor died is tried again on another
(`max_task_retries=-1`); a decode task whose worker died is run again (Ray's `max_retries=3`). A batch retried
after it committed finds its rows stored (ON CONFLICT DO NOTHING) and counts them present. A killed driver ends
its Ray job, whose workers Ray stops; a rerun skips what is stored, as on one machine.
Limits: the candidate list and the stored hashes travel through Ray's object store whole (about 100 bytes a
file), fine for millions of files, not for billions.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from ingest.config import DEFAULT_BATCH_SIZE, Settings
from ingest.errors import RisError
from ingest.features import INPUT_SHAPE
from ingest.images import DecodedImage
from ingest.batches import LoadSummary, Prepared, first_copies, prepare, store_batch, stored_path
from ingest.sources import Candidate

if TYPE_CHECKING:
    from ingest.collection import Collection

INSTALL_HINT = "--ray needs Ray: pip install 'reverse-image-search[ray]' (in a checkout: pip install -e '.[ray]')"
LOCAL = "local"  # --ray local: a Ray started here with this machine's cores
MAX_BLOCKS = 5_000  # the candidate list is cut into a block per batch, at most this many: a decode task each
DECODE_CPUS = 0.5  # per decode task: two share a CPU beside each actor's; unequal to the actors' 1, which also
# keeps Ray Data from fusing decoding into the actors (it fuses stages of equal resources), so files are decoded while the model runs


@dataclass(frozen=True)
class Cluster:
    """Where and how wide a load runs: a Ray address, the number of embedding actors (None: one per GPU when the
    cluster has GPUs, else one per two CPUs, leaving the other CPU of each pair to decoding) and pictures per
    forward pass (None: as on one machine with the cluster's kind of device)."""

    address: str
    actors: int | None = None
    batch_size: int | None = None

    def plan(self) -> tuple[int, int, float]:
        """(actors, batch size, GPUs per actor) from what the cluster has."""
        import ray

        from ingest.feeding import GPU_BATCH_SIZE

        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        actors = self.actors or (gpus or max(1, cpus // 2))
        if not gpus and actors >= cpus:  # Ray would wait for ever for a CPU to decode on
            raise RisError(f"{actors} actor(s) of one CPU each leave none of the cluster's {cpus} CPUs to decode on; "
                           f"pass --ray-actors {max(1, cpus - 1)} or fewer")
        return actors, self.batch_size or (GPU_BATCH_SIZE if gpus else DEFAULT_BATCH_SIZE), 1.0 if gpus else 0.0


def start(address: str) -> None:
    """Join the Ray cluster at `address` ('auto', 'ray://host:10001', 'host:6379'), or start one here ('local').

    Called before anything imports TensorFlow in the driver. A process already connected (a test's shared Ray)
    stays on its cluster. Ray's own chatter (start-up lines, progress bars) is turned down: our bar says it all.
    """
    try:
        import ray
    except ImportError:
        raise RisError(INSTALL_HINT) from None
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # its C++ side's warnings, e.g. on Ray Data's own actors
    if address not in (LOCAL, "auto"):
        check_listening(address)
    quiet = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    try:
        with silent_stderr():  # the C++ core writes a line to fd 2 as it starts, whatever the level
            ray.init(**({"num_cpus": os.cpu_count()} if address == LOCAL else {"address": address}), **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RisError(f"cannot reach the Ray cluster at {address}: {str(e).strip().splitlines()[0]}") from None
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def check_listening(address: str) -> None:
    """Fail in seconds, with one line, when nothing listens at HOST:PORT: Ray itself retries for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise RisError(f"--ray takes local, auto, HOST:PORT or ray://HOST:PORT, not {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise RisError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


@contextmanager
def silent_stderr():
    """File descriptor 2 to /dev/null for a while (Python's own errors are raised, not written, meanwhile)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def check_reachable_database(coll: Collection, address: str) -> None:
    """The embedded server listens on a Unix socket of this machine: refuse it when the cluster has other nodes, or
    is reached through Ray Client (ray://), whose workers run elsewhere."""
    import ray

    if coll.db.kind == "embedded" and (address.startswith("ray://") or len([n for n in ray.nodes() if n.get("Alive")]) > 1):
        raise RisError("the embedded PostgreSQL is reachable from this machine only; give the Ray workers a shared "
                       "server with --database-url (or DATABASE_URL)")


class KnownHashes:
    """The hashes the collection stored before the load (shared by every task, never changed) plus those decoded
    in this batch: `first_copies` adds to it, and a retried task must not find its own additions."""

    def __init__(self, stored: frozenset[str]):
        self.stored, self.added = stored, set()

    def __contains__(self, sha: str) -> bool:
        return sha in self.stored or sha in self.added

    def add(self, sha: str) -> None:
        self.added.add(sha)


def decode_batch(batch: dict, stored: frozenset[str]) -> dict:
    """A Ray task: read, hash and (if new) decode some files, as one machine's decode threads do (`prepare`).
    Text columns hold "" for None (Arrow would turn None into NaN); pixels travel as bytes, empty for a file
    stored already or failed."""
    known = KnownHashes(stored)
    prepared = list(first_copies((prepare(Candidate(Path(p), label or None), known) for p, label in zip(batch["path"], batch["label"])), known))
    decoded = [p.decoded for p in prepared]
    return {
        "path": batch["path"],
        "label": batch["label"],
        "sha256": np.array([p.sha256 or "" for p in prepared], dtype=object),
        "bytes": np.array([p.size for p in prepared], dtype=np.int64),
        "width": np.array([d.width if d else 0 for d in decoded], dtype=np.int64),
        "height": np.array([d.height if d else 0 for d in decoded], dtype=np.int64),
        "failure": np.array([p.failure or "" for p in prepared], dtype=object),
        "pixels": np.array([d.pixels.tobytes() if d else b"" for d in decoded], dtype=object),
    }


def as_prepared(batch: dict) -> list[Prepared]:
    """`decode_batch`'s columns back into what `store_batch` takes."""
    prepared = []
    for i, path in enumerate(batch["path"]):
        candidate = Candidate(Path(path), batch["label"][i] or None)
        pixels = batch["pixels"][i]
        decoded = DecodedImage(np.frombuffer(pixels, np.uint8).reshape(INPUT_SHAPE), int(batch["width"][i]),
                               int(batch["height"][i])) if len(pixels) else None
        failure = batch["failure"][i]
        prepared.append(Prepared(candidate, batch["sha256"][i] or None, int(batch["bytes"][i]), decoded, failure or None))
    return prepared


class Embedder:
    """A Ray actor: the collection's ResNet50, built once (checked against the recorded fingerprint and precision)
    on the driver's runtime, with OpenVINO's inference threads set to the CPUs Ray gives the actor, and a connection
    pool to the primary; each call embeds one batch and commits it (`store_batch`).
    `for_collection` makes the class Ray starts, with what it needs as class attributes: constructor arguments
    would sit in the object store, which Ray warns about for restartable actors."""

    database_url: str
    home: str
    collection: str
    runtime: str

    @classmethod
    def for_collection(cls, coll: Collection) -> type:
        return type("Embedder", (cls,), {"database_url": coll.db.url, "home": str(coll.settings.home), "collection": coll.name,
                                         "runtime": coll.extractor().runtime})

    def __init__(self):
        import ray

        from ingest.collection import Collection
        from ingest.db import connect
        from ingest.features import extractor_for, quiet_tensorflow

        if self.runtime == "tensorflow":
            tf = quiet_tensorflow()
            for gpu in tf.config.list_physical_devices("GPU"):  # share a GPU with other actors rather than take all of it
                tf.config.experimental.set_memory_growth(gpu, True)
        settings = Settings(home=Path(self.home), database_url=self.database_url, runtime=self.runtime)
        self.coll = Collection.named(connect(settings, migrate=False), settings, self.collection)
        cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))
        extractor = extractor_for(self.coll.weights, self.coll.precision, self.runtime, models_dir=settings.models_dir,
                                  threads=cpus or None)
        self.coll.use_extractor(extractor, remedy="re-ingest or restore those weights")

    def __call__(self, batch: dict) -> dict:
        summary = LoadSummary(self.coll.name)
        store_batch(self.coll, as_prepared(batch), summary)
        first = np.zeros(len(batch["path"]), np.int64)
        first[:1] = 1
        return {
            "path": batch["path"], "label": batch["label"], "sha256": batch["sha256"], "failure": batch["failure"],
            "ingested": first * summary.ingested, "present": first * summary.present,  # the batch's counts, on its first row
        }


def store_on_ray(coll: Collection, candidates: list[Candidate], known: set[str], summary: LoadSummary,
                 cluster: Cluster) -> Iterator[list[tuple[str, str | None, str | None]]]:
    """Run the candidates through the cluster, yielding (path, sha256, label) of each file as its batch commits,
    and counting into `summary` as `store_batch` does on one machine."""
    import ray.data

    check_reachable_database(coll, cluster.address)
    actors, batch, gpus = cluster.plan()
    items = [{"path": stored_path(c), "label": c.label or ""} for c in candidates]
    if not items:
        return
    stored = frozenset(known)
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // batch, MAX_BLOCKS)))
    ds = ds.map_batches(decode_batch, batch_size=batch, batch_format="numpy", fn_kwargs={"stored": stored},
                        num_cpus=DECODE_CPUS)
    ds = ds.map_batches(
        Embedder.for_collection(coll), batch_size=batch, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1, num_gpus=gpus,
    )
    for out in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
        summary.ingested += int(out["ingested"].sum())
        summary.present += int(out["present"].sum())
        failures = [(p, f) for p, f in zip(out["path"], out["failure"]) if f]
        summary.failures.extend(failures)
        summary.failed += len(failures)
        yield [(str(p), s or None, lab or None) for p, s, lab in zip(out["path"], out["sha256"], out["label"])]
