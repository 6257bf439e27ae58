"""The "annoy" engine: the collection's Annoy file (ingest/annoy_index.py) for the rows it was built from, merged
with an exact search of the rows written since (its delta).

The file is opened by mmap once per process and followed across rebuilds (a load that passes the delta threshold
swaps in a new one): every question first compares the sidecar with the one the open file came from. Whether it
can answer is decided from the collection row and the sidecar, never by scanning images.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import islice
from typing import TYPE_CHECKING, Iterator

import numpy as np

from ingest import store
from ingest.annoy_index import METRIC, read_sidecar, sidecar_path, staleness
from ingest.db import Database
from ingest.engines import Engine, EngineName, Hit, Neighbourhood, QueryArgs, ranked
from ingest.errors import IndexFileError, RisError
from ingest.filters import Filter
from ingest.reader import reading
from ingest.store import CollectionRow, raw_cursor

if TYPE_CHECKING:
    from ingest.config import Settings

SEARCH_K_FACTOR = 2  # Annoy's search_k, in multiples of its default (trees x items asked for)
SCAN_BLOCK = 2000  # items per task of a whole-file scan (`neighbourhoods`): one thread per core, Annoy releases the GIL


class AnnoySearch(Engine):
    """Approximate k nearest neighbours: the Annoy file for the rows it holds, exact SQL for the rows written
    since it was built (the delta), merged by distance. Rows removed since are dropped by the row lookup, and
    the file is asked for as many more items as were removed, so k rows still come back."""

    name = EngineName.ANNOY
    exact = False
    _open: dict[tuple, tuple] = {}  # one mmap per built file and process

    def __init__(self, db: Database, coll: CollectionRow, settings: Settings):
        super().__init__(db, coll, settings)
        self.annoy_dir = settings.annoy_dir
        self.open(self.sidecar_stamp())

    def open(self, stamp: tuple | None) -> None:
        """Open the file the sidecar names now, or remember why it cannot answer."""
        self.opened_at = stamp
        self.removed = 0  # rows removed since the build, as last seen: the file is asked for that many more
        try:
            self.sidecar, self.index, self.ids = self.open_checked()
            self.failure = None
        except IndexFileError as e:
            self.sidecar = self.index = self.ids = None
            self.failure = str(e)

    def sidecar_stamp(self) -> tuple | None:
        try:
            stat = sidecar_path(self.annoy_dir, self.coll.name).stat()
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns

    @property
    def hint(self) -> str:
        return f"; run `ingest index --collection {self.coll.name}`"

    def open_checked(self):
        """Open the file, refusing anything that could return wrong rows: missing, stale, damaged, other dims."""
        from annoy import AnnoyIndex

        sidecar = read_sidecar(self.annoy_dir, self.coll.name)
        problem = staleness(sidecar, self.annoy_dir, self.coll)
        if problem:
            raise IndexFileError(problem + self.hint)
        path = self.annoy_dir / sidecar.file
        stat = path.stat()
        key = (path, stat.st_ino, stat.st_size, stat.st_mtime_ns)  # a rebuilt or damaged file is a new key
        if key not in self._open:
            index = AnnoyIndex(sidecar.dims, METRIC)
            try:
                index.load(str(path))
                ids = np.load(self.annoy_dir / sidecar.ids_file, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise IndexFileError(f"cannot open the Annoy index {path}: {e}{self.hint}") from None
            if index.get_n_items() != sidecar.items or len(ids) != sidecar.items or index.f != self.coll.pca_dims:
                raise IndexFileError(f"the Annoy index {path} is damaged or of other dimensions{self.hint}")
            self._open[key] = (index, ids)
        return (sidecar, *self._open[key])

    def problem(self) -> str | None:
        """Why the file cannot answer, after switching to a rebuilt one if the sidecar changed since it was opened."""
        stamp = self.sidecar_stamp()
        if stamp != self.opened_at:
            self.open(stamp)
        return self.failure

    def require(self) -> None:
        problem = self.problem()
        if problem:
            raise IndexFileError(problem)

    def search(self, vector: np.ndarray, k: int, flt: Filter = Filter(), args: QueryArgs = QueryArgs()) -> list[Hit]:
        """Over-fetch when filtering or after removals, keep what passes, add the delta's nearest; fewer than k
        may remain only when a filter leaves fewer. One statement a query as a rule (a second one only when it
        shows more rows removed than the file was asked to make up for), outside a transaction unless a
        --where must run read-only: at a million rows each round trip to the server costs about as much as
        the Annoy lookup itself."""
        self.require()
        q = np.asarray(vector, dtype=np.float32)
        with self.cursor(flt) as cur:
            while True:
                found, rows, removed = self.lookup(cur, q, k, flt, args)
                if removed <= self.removed:
                    break
                self.removed = removed  # rows removed since the build: ask the file for that many more
        merged = sorted((found.get(r[0], r[3]), r[0], r[1], r[2]) for r in rows)
        return ranked((i, path, label, d) for d, i, path, label in merged[:k])

    @contextmanager
    def cursor(self, flt: Filter):
        """A cursor outside any transaction (one statement needs none), on the reader for a --where."""
        with (reading(self.db, self.timeout) if flt.where is not None else self.db.connect()) as conn:
            yield raw_cursor(conn.execution_options(isolation_level="AUTOCOMMIT"))

    def lookup(self, cur, q: np.ndarray, k: int, flt: Filter, args: QueryArgs) -> tuple[dict, list, int]:
        """The file's nearest items, their rows (those still stored that pass the filter) and the delta's k
        nearest, with the collection row read by the same statement; refuse if its PCA changed since the build."""
        wanted = k + len(flt.exclude) + self.removed
        fetch = min(max(wanted * 10, 100) if flt.narrows else wanted, self.sidecar.items)
        items, distances = self.index.get_nns_by_vector(q.tolist(), fetch, search_k=self.search_k_for(fetch, args), include_distances=True)
        found = dict(zip(self.ids[items].tolist(), distances))
        cur.execute(self.lookup_sql(flt), flt.params(self.coll.id) | {"ids": list(found), "q": q, "k": k, "seq": self.sidecar.embedding_seq})
        rows = cur.fetchall()
        if not rows:
            raise RisError(f"collection {self.coll.name!r} was removed")
        pca_dims, pca_version, removed_rows = rows[0][4:]
        if (pca_dims, pca_version) != (self.sidecar.dims, self.sidecar.pca_version):
            raise IndexFileError(f"the Annoy index of {self.coll.name!r} is stale (the PCA changed since it was built){self.hint}")
        return found, [r[:4] for r in rows if r[0] is not None], max(0, removed_rows - self.sidecar.removed_rows)

    def search_k_for(self, n: int, args: QueryArgs) -> int:
        """Annoy's search_k for n items: the one given, else twice Annoy's own default (trees x n). At 1M rows
        its default gave recall@10 0.929, twice that 0.989 for 0.12 ms more (bench/scale.py's data)."""
        return args.search_k or SEARCH_K_FACTOR * self.sidecar.trees * n

    def ids_near(self, vector: np.ndarray, n: int, args: QueryArgs = QueryArgs()) -> list[int]:
        """Image ids of the file's n nearest items to a vector: the bare index lookup, without rows or delta."""
        self.require()
        q = np.asarray(vector, dtype=np.float32).tolist()
        return self.ids[self.index.get_nns_by_vector(q, n, search_k=self.search_k_for(n, args))].tolist()

    def neighbours_of_stored(self, image_id: int, n: int, args: QueryArgs = QueryArgs()) -> list[int]:
        """Image ids of the file's n nearest other items to a stored image, or [] if it is not in the file (the bare
        index lookup: removed rows are not dropped, the delta is not searched)."""
        self.require()
        item = int(np.searchsorted(self.ids, image_id))
        if item >= len(self.ids) or self.ids[item] != image_id:
            return []
        found = self.ids[self.index.get_nns_by_item(item, n + 1, search_k=self.search_k_for(n + 1, args))].tolist()
        return [i for i in found if i != image_id][:n]

    def neighbourhoods(self, n: int, args: QueryArgs = QueryArgs()) -> Iterator[Neighbourhood]:
        """Every item of the file still stored, with its n nearest other such items: by item number, without SQL
        (one read of the stored ids first), a block of items per thread. Asks for as many more items as were
        removed since the build (up to 2n), so n still come back; rows written since are `pending_ids`."""
        self.require()
        index, ids = self.index, np.asarray(self.ids)
        living = np.isin(ids, store.image_ids(self.db, self.coll.id, "embedding"))
        fetch = n + 1 + min(int((~living).sum()), 2 * n)
        search_k = self.search_k_for(n + 1, args)

        def scan(items: np.ndarray) -> list[Neighbourhood]:
            found = []
            for item in items.tolist():
                near, distances = index.get_nns_by_item(item, fetch, search_k=search_k, include_distances=True)
                near, distances = np.asarray(near, np.int64), np.asarray(distances)
                keep = living[near] & (near != item)
                found.append(Neighbourhood(int(ids[item]), ids[near[keep][:n]], distances[keep][:n]))
            return found

        items = np.flatnonzero(living)
        blocks = iter(np.array_split(items, max(1, len(items) // SCAN_BLOCK)))
        with ThreadPoolExecutor(scan_threads()) as pool:  # a few blocks in flight: memory stays flat whatever n is
            running = deque(pool.submit(scan, block) for block in islice(blocks, 2 * scan_threads()))
            while running:
                done = running.popleft().result()
                following = next(blocks, None)
                if following is not None:
                    running.append(pool.submit(scan, following))
                yield from done

    def pending_ids(self) -> np.ndarray:
        """Stored rows the file does not hold: written since its build (`search` finds them exactly, as its delta)."""
        self.require()
        return np.setdiff1d(store.image_ids(self.db, self.coll.id, "embedding"), np.asarray(self.ids))

    def describe(self, n: int, args: QueryArgs = QueryArgs()) -> dict:
        self.require()
        return {"trees": self.sidecar.trees, "search_k": self.search_k_for(n + 1, args), "items": self.sidecar.items,
                "threads": scan_threads()}

    def lookup_sql(self, flt: Filter) -> str:
        """The file's candidates that are still rows and pass the filter, plus the delta's k nearest that pass
        it, each beside the collection row (which comes back alone when nothing matched)."""
        indexed = flt.scoped("id, path, label, NULL::float8 AS distance", "id = ANY(%(ids)s)", self.coll.id)
        delta = flt.scoped("id, path, label, embedding <-> %(q)s AS distance", "embedding_seq > %(seq)s AND embedding IS NOT NULL",
                           self.coll.id)
        return (f"WITH hits AS ({indexed} UNION ALL ({delta} ORDER BY distance, id LIMIT %(k)s))"
                " SELECT h.id, h.path, h.label, h.distance, c.pca_dims, c.pca_version, c.removed_rows"
                " FROM collections c LEFT JOIN hits h ON true WHERE c.id = %(c)s")


def scan_threads() -> int:
    return os.cpu_count() or 1
