"""The "hnsw" engine: the collection's pgvector HNSW index (ingest/hnsw.py), approximate and always up to date."""
from __future__ import annotations

import numpy as np

from ingest.engines import Engine, EngineName, Hit, QueryArgs, filtered_cursor, ranked, set_local
from ingest.errors import IndexFileError
from ingest.filters import Filter

# A filter the planner expects to keep at most this many rows is answered exactly instead (Collection.searcher_for): the
# exact scan reads those rows through the label's b-tree, while HNSW's iterative scan walks ~ef_search/selectivity nodes.
EXACT_FILTER_ROWS = 25_000
DEFAULT_EF_SEARCH = 800  # HNSW candidate list per query: at 1M rows recall@10 0.971, 7.3 ms p50; 200 gave 0.89-0.95 (bench/scale.py)


class HnswSearch(Engine):
    """Approximate k nearest neighbours from the collection's pgvector HNSW index, always up to date.

    Sorting is switched off for the query, so the planner answers from the index (an ordered scan) even when
    its statistics make a small collection look cheaper to sort. Filtered queries use pgvector's iterative index
    scans (relaxed order, re-sorted here), so a label that holds 1% of the rows still gives k results."""

    name = EngineName.HNSW
    exact = False
    ready = False  # the index was seen: a refit or `--no-hnsw` changes the collection row, and the engine with it

    def problem(self) -> str | None:
        from ingest.hnsw import has_index

        if not self.ready:
            self.ready = self.coll.pca is not None and has_index(self.db, self.coll.id, self.coll.pca_dims)
        if self.ready:
            return None
        return f"collection {self.coll.name!r} has no HNSW index; run `ingest index --hnsw --collection {self.coll.name}`"

    def sql(self, flt: Filter) -> str:
        """Ordered by the indexed expression, within the index's collection: the only shape the planner matches."""
        distance = f"embedding::vector({int(self.coll.pca_dims)}) <-> %(q)s"
        return flt.scoped(f"id, path, label, {distance} AS distance", "embedding IS NOT NULL", self.coll.id) + f" ORDER BY {distance} LIMIT %(k)s"

    def run(self, vector: np.ndarray, k: int, flt: Filter, args: QueryArgs, *, explain: bool = False) -> list[tuple]:
        problem = self.problem()
        if problem:
            raise IndexFileError(problem)
        with filtered_cursor(self.db, flt, timeout=self.timeout) as cur:
            set_local(cur, self.db, plan_cache_mode="force_custom_plan", enable_sort="off", hnsw__ef_search=self.ef_search(k, args),
                      hnsw__iterative_scan="relaxed_order" if flt.narrows or flt.exclude else "off")
            cur.execute(("EXPLAIN " if explain else "") + self.sql(flt),
                        flt.params(self.coll.id) | {"q": np.asarray(vector, dtype=np.float32), "k": k})
            return cur.fetchall()

    @staticmethod
    def ef_search(k: int, args: QueryArgs) -> int:
        """The candidate list of one query: the one given (else the default), never below k (pgvector's cap is 1000)."""
        return min(1000, max(args.ef_search or DEFAULT_EF_SEARCH, k))

    def search(self, vector: np.ndarray, k: int, flt: Filter = Filter(), args: QueryArgs = QueryArgs()) -> list[Hit]:
        rows = sorted(self.run(vector, k, flt, args), key=lambda r: (r[3], r[0]))  # relaxed order: nearly sorted
        return ranked(rows)

    def explain(self, vector: np.ndarray, k: int, flt: Filter = Filter(), args: QueryArgs = QueryArgs()) -> str:
        """The plan of exactly the query `search` runs (tests prove the index is used)."""
        return "\n".join(r[0] for r in self.run(vector, k, flt, args, explain=True))

    def describe(self, n: int, args: QueryArgs = QueryArgs()) -> dict:
        return {"ef_search": self.ef_search(n, args)}
