"""Stage 1: for each candidate, the top-K behaviors of one user by attention inner product.

Keys are the behaviors' attention vectors with the folded time bias as one extra dimension,
queries are the candidates' attention vectors with a 1 in that dimension, so the search is a
plain exact inner-product top-K.

On CPU, `knn_exact` computes the scores with BLAS, a block of candidates at a time (a 4 MB tile),
and `service.core.topk` selects each row's top-K in compiled code: a lower bound from strided group
maxima, one vectorised compare that rejects all but about K scores, and a sort of the survivors by
rank. At 10,000 behaviors selecting then costs about as much as the inner products at d=16 and a
quarter of those at d=64, so a smaller attention dim makes the search much cheaper; the kernels
release the GIL, so `Stage1Engine`'s threads run in parallel. Results are exact: the same
behaviors as `faiss.knn`, best first, equal scores in position order; the scores differ from
FAISS's only in float rounding (BLAS sums the products in another order). On GPU the search is
FAISS's brute-force `knn_gpu`.

A ranker trained with `recent_k` = R > 0 always keeps its newest R behaviors: `Stage1Engine.search`
then puts a sequence's last min(R, L) keys (sequences are ordered oldest first) in the first columns,
newest first, with their inner products as scores, and searches the top k - R of the older keys
for the columns after them, best first: the order of `TwoStageRanker.search`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import faiss
import numpy as np

from service.core.topk import topk_rows


@dataclass(frozen=True, slots=True)
class SearchResult:
    """Top-k positions into the user's sequence, [C, k] (k = min(K, L)), best first, and their scores."""

    positions: np.ndarray
    scores: np.ndarray


def search_keys(
    table: np.ndarray, time_bias: np.ndarray, beh_rows: np.ndarray, beh_buckets: np.ndarray
) -> np.ndarray:
    """[L, d+1] float32 keys: each behavior's attention vector and its time bias.

    `table` is a bundle's `search_table`: attention rows with a free last column, so one gather
    (`np.take`, a quarter of the time of fancy indexing plus a copy) builds the keys.
    """
    keys = np.take(table, beh_rows, axis=0)
    keys[:, -1] = time_bias[beh_buckets]
    return keys


def search_queries(table: np.ndarray, cand_rows: np.ndarray) -> np.ndarray:
    """[C, d+1] float32 queries: each candidate's attention vector and a 1 for the time bias."""
    queries = np.take(table, cand_rows, axis=0)
    queries[:, -1] = 1.0
    return queries


def search_pairs(
    table: np.ndarray,
    time_bias: np.ndarray,
    cand_rows: np.ndarray,
    beh_rows: np.ndarray,
    beh_buckets: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Stage-1 inputs of one request: candidate queries [C, d+1] and behavior keys [L, d+1]."""
    return search_queries(table, cand_rows), search_keys(table, time_bias, beh_rows, beh_buckets)


def checked_result(
    res: SearchResult, n_candidates: int, n_behaviors: int, top_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions and scores [C, k] (k = min(K, L)) of one request, validated against its shape.

    A wrong shape or an out-of-range position from an engine would otherwise index another
    request's behaviors or crash stage 2 with an unclear error.
    """
    c, k = n_candidates, min(top_k, n_behaviors)
    positions = np.asarray(res.positions, dtype=np.int64)
    scores = np.asarray(res.scores, dtype=np.float32)
    out_of_range = positions.size and (positions.min() < 0 or positions.max() >= n_behaviors)
    if positions.shape != (c, k) or out_of_range:
        raise RuntimeError(f"stage 1 returned positions of shape {positions.shape}, expected ({c}, {k})")
    if scores.shape != (c, k) or not np.isfinite(scores).all():
        raise RuntimeError(f"stage 1 returned scores of shape {scores.shape}, expected ({c}, {k}), finite")
    return positions, scores


def knn_plain(queries: np.ndarray, keys: np.ndarray, k: int) -> SearchResult:
    """Reference stage 1: one `faiss.knn` call (exact inner product, heap selection)."""
    k = min(k, len(keys))
    if k == 0:
        empty = np.zeros((len(queries), 0))
        return SearchResult(empty.astype(np.int64), empty.astype(np.float32))
    scores, positions = faiss.knn(queries, keys, k, metric=faiss.METRIC_INNER_PRODUCT)
    return SearchResult(positions, scores)


# Scores per block of queries (4 MB): blocks this tall keep BLAS as fast as on all queries at once.
_TILE_SCORES = 1 << 20


def _search_into(
    queries: np.ndarray, keys: np.ndarray, k: int, positions: np.ndarray, scores: np.ndarray
) -> None:
    """Fill positions and scores [C, k] from float32 queries [C, d] and keys [L, d], by blocks of queries."""
    n_q, length = len(queries), len(keys)
    rows = max(1, min(n_q, _TILE_SCORES // length))
    tile = np.empty((rows, length), dtype=np.float32)
    for start in range(0, n_q, rows):
        stop = min(start + rows, n_q)
        block = tile[: stop - start]
        np.matmul(queries[start:stop], keys.T, out=block)
        topk_rows(block, k, positions[start:stop], scores[start:stop])


def _float32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def knn_exact(queries: np.ndarray, keys: np.ndarray, k: int) -> SearchResult:
    """Exact top-k by inner product: BLAS scores per block of queries, compiled top-k selection."""
    n_q, length = len(queries), len(keys)
    k = min(k, length)
    positions = np.empty((n_q, k), dtype=np.int64)
    scores = np.empty((n_q, k), dtype=np.float32)
    if k > 0 and n_q > 0:
        _search_into(_float32(queries), _float32(keys), k, positions, scores)
    return SearchResult(positions, scores)


def knn_gpu(resources: Any, queries: np.ndarray, keys: np.ndarray, k: int) -> SearchResult:
    """Stage 1 on GPU: FAISS brute-force search (bfKnn) over the raw arrays, no index built."""
    k = min(k, len(keys))
    if k == 0 or len(queries) == 0:
        return knn_plain(queries, keys, k)
    scores, positions = faiss.knn_gpu(resources, queries, keys, k, metric=faiss.METRIC_INNER_PRODUCT)
    return SearchResult(positions, scores)


def with_newest(queries: np.ndarray, keys: np.ndarray, recent: int, older: SearchResult) -> SearchResult:
    """The newest min(`recent`, L) keys (the last rows), newest first, with their scores, in front of
    `older`, the search result over the keys before them."""
    length = len(keys)
    kept = np.arange(length - 1, length - 1 - min(recent, length), -1, dtype=np.int64)
    # the same float32 inner products as the searched scores (their rounding may differ in the last bit)
    scores = _float32(queries) @ _float32(keys[kept]).T
    positions = np.broadcast_to(kept, (len(queries), len(kept)))
    return SearchResult(
        np.concatenate([positions, older.positions], axis=1),
        np.concatenate([scores, older.scores], axis=1).astype(np.float32, copy=False),
    )


# Below this many scores per task, splitting a search across threads costs more than it saves.
_MIN_SCORES_PER_TASK = 200_000


@dataclass
class Stage1Engine:
    """Runs stage 1 for a batch of users on the CPU thread pool, or on the GPU when there is one."""

    threads: int = 2
    device: str = "cpu"  # "cpu" or "cuda"
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)
    _gpu: Any = field(default=None, init=False, repr=False)
    # one StandardGpuResources must not be used from two threads at once (its scratch memory and
    # cuBLAS handle are shared); the service's compute threads take turns on the GPU
    _gpu_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.device == "cuda":
            if not gpu_available():
                raise RuntimeError("device 'cuda' asked for, but FAISS sees no GPU")
            self._gpu = faiss.StandardGpuResources()
            # as the FAISS wiki advises for brute-force search without an index: the default
            # stream (no cross-stream sync needed) and a small scratch area instead of ~18% of memory
            self._gpu.setDefaultNullStreamAllDevices()
            self._gpu.setTempMemory(64 * 1024 * 1024)
        elif self.threads > 1:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="stage1")

    def search(
        self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], k: int, recent: int = 0
    ) -> list[SearchResult]:
        """Top-k for each (queries, keys) pair; large searches are split by query rows across threads.

        With `recent` = R > 0, each pair's newest min(R, L) keys come first, newest first, and the
        best k - min(R, L) of its older keys after them (see the module docstring).
        """
        if recent == 0:
            return self._search(pairs, k)
        if not 0 < recent <= k:
            raise ValueError(f"recent must be in [0, k={k}], got {recent}")
        older = [(q, keys[: max(len(keys) - recent, 0)]) for q, keys in pairs]
        searched = self._search(older, k - recent)
        return [with_newest(q, keys, recent, res) for (q, keys), res in zip(pairs, searched, strict=True)]

    def _search(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> list[SearchResult]:
        if self._gpu is not None:
            with self._gpu_lock:
                return [knn_gpu(self._gpu, q, keys, k) for q, keys in pairs]
        results: list[SearchResult] = []
        tasks: list[tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]] = []
        for q, keys in pairs:
            n_q, k_pair = len(q), min(k, len(keys))
            res = SearchResult(np.empty((n_q, k_pair), np.int64), np.empty((n_q, k_pair), np.float32))
            results.append(res)
            if n_q == 0 or k_pair == 0:
                continue
            q32, keys32 = _float32(q), _float32(keys)
            parts = 1
            if self._pool is not None:
                parts = min(self.threads, max(1, (n_q * len(keys)) // _MIN_SCORES_PER_TASK))
            edges = [n_q * i // parts for i in range(parts + 1)]
            for lo, hi in zip(edges[:-1], edges[1:], strict=True):
                tasks.append((q32[lo:hi], keys32, k_pair, res.positions[lo:hi], res.scores[lo:hi]))
        if self._pool is None or len(tasks) == 1:
            for task in tasks:
                _search_into(*task)
        else:
            # each task writes its own rows of the results; the kernels release the GIL
            list(self._pool.map(lambda task: _search_into(*task), tasks))
        return results

    @property
    def faiss_device(self) -> Literal["cpu", "cuda"]:
        return "cuda" if self._gpu is not None else "cpu"

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def gpu_available() -> bool:
    """Whether this FAISS build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
