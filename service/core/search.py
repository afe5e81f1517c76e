"""Stage 1: for each candidate, the top-K behaviors of one user by attention inner product.

Keys are the behaviors' attention vectors with the folded time bias as one extra dimension,
queries are the candidates' attention vectors with a 1 in that dimension, so the search is a
plain exact inner-product top-K.

On CPU, `faiss.knn` spends most of its time selecting: with K=64 every one of the ~K*ln(L/K)
heap insertions per candidate costs a sift through the heap. `knn_threshold` gives FAISS's heap a
head start instead: it splits each row of scores into G strided groups and takes the K-th largest
group maximum as a lower bound on the row's K-th score (K groups each hold an element at least
that large). Short rows seed FAISS's heap with the bound and let it scan the row; long rows keep
only the scores at or above the bound (a few more than K) and hand those to the heap. Either way
almost only the true top-K enter the heap. Results are exact: the same behaviors as `faiss.knn`
(up to the order of exactly tied scores), with scores that differ only in float rounding, because
BLAS sums the products in another order. On GPU the search is FAISS's brute-force `knn_gpu`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
from faiss import swig_ptr


@dataclass(frozen=True, slots=True)
class SearchResult:
    """Top-k positions into the user's sequence, [C, k] (k = min(K, L)), best first, and their scores."""

    positions: np.ndarray
    scores: np.ndarray


def search_keys(
    attention: np.ndarray, time_bias: np.ndarray, beh_rows: np.ndarray, beh_buckets: np.ndarray
) -> np.ndarray:
    """[L, d+1] float32 keys: each behavior's attention vector and its time bias."""
    keys = np.empty((len(beh_rows), attention.shape[1] + 1), dtype=np.float32)
    keys[:, :-1] = attention[beh_rows]
    keys[:, -1] = time_bias[beh_buckets]
    return keys


def search_queries(attention: np.ndarray, cand_rows: np.ndarray) -> np.ndarray:
    """[C, d+1] float32 queries: each candidate's attention vector and a 1 for the time bias."""
    queries = np.empty((len(cand_rows), attention.shape[1] + 1), dtype=np.float32)
    queries[:, :-1] = attention[cand_rows]
    queries[:, -1] = 1.0
    return queries


def knn_plain(queries: np.ndarray, keys: np.ndarray, k: int) -> SearchResult:
    """Reference stage 1: one `faiss.knn` call (exact inner product, heap selection)."""
    k = min(k, len(keys))
    if k == 0:
        empty = np.zeros((len(queries), 0))
        return SearchResult(empty.astype(np.int64), empty.astype(np.float32))
    scores, positions = faiss.knn(queries, keys, k, metric=faiss.METRIC_INNER_PRODUCT)
    return SearchResult(positions, scores)


# Rows shorter than this many times k gain nothing from the threshold pass.
_MIN_LEN_FACTOR = 4
# From this many scores per row on, compacting the survivors beats letting the heap scan the row.
_FILTER_MIN_LEN = 4096


def _groups(length: int, k: int) -> int:
    """Number of strided groups: well above k (a tight bound), at least two elements each."""
    return max(k, min(4 * k, length // 2))


def _lower_bound(scores: np.ndarray, k: int) -> np.ndarray:
    """[C] values at or below each row's k-th largest score: the k-th largest of G group maxima."""
    n_q, length = scores.shape
    g = _groups(length, k)
    m = length // g
    # strided groups (column j belongs to group j % g) reduce along a contiguous axis: fast
    group_max = scores[:, : g * m].reshape(n_q, m, g).max(axis=1)
    return np.partition(group_max, g - k, axis=1)[:, g - k]


def _survivors(scores: np.ndarray, bound: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's scores >= its bound, left-aligned in [C, W] arrays padded with -inf (values, columns).

    Every row keeps at least k (K groups reach the bound), typically a few more; one vectorised
    compare and one flatnonzero replace the heap's element-by-element scan of the whole row.
    """
    n_q, length = scores.shape
    flat = np.flatnonzero(scores >= bound[:, None])
    rows = flat // length
    counts = np.bincount(rows, minlength=n_q)
    slot = np.arange(len(flat)) - (np.cumsum(counts) - counts)[rows]
    width = int(counts.max())
    values = np.full((n_q, width), -np.inf, dtype=np.float32)
    values[rows, slot] = scores.reshape(-1)[flat]
    columns = np.full((n_q, width), -1, dtype=np.int64)
    columns[rows, slot] = flat - rows * length
    return values, columns


def knn_threshold(queries: np.ndarray, keys: np.ndarray, k: int) -> SearchResult:
    """Exact top-k by inner product: BLAS scores, a group-maximum lower bound, FAISS heap selection."""
    n_q, length = len(queries), len(keys)
    k = min(k, length)
    if k == 0 or n_q == 0:
        return knn_plain(queries, keys, k)
    scores = np.ascontiguousarray(queries @ keys.T, dtype=np.float32)
    values = np.full((n_q, k), -np.inf, dtype=np.float32)
    ids = np.full((n_q, k), -1, dtype=np.int64)
    heap = faiss.float_minheap_array_t()
    heap.nh, heap.k = n_q, k
    heap.val, heap.ids = swig_ptr(values), swig_ptr(ids)
    if length < _MIN_LEN_FACTOR * k:
        heap.addn(length, swig_ptr(scores))
    elif length < _FILTER_MIN_LEN:
        # seeds just below the bound: elements equal to it still enter the heap
        values[:] = np.nextafter(_lower_bound(scores, k), np.float32(-np.inf))[:, None]
        heap.addn(length, swig_ptr(scores))
    else:
        cand, cols = _survivors(scores, _lower_bound(scores, k))
        heap.addn_with_ids(cand.shape[1], swig_ptr(cand), swig_ptr(cols), cand.shape[1])
    heap.reorder()  # best first, in place
    return SearchResult(ids, values)


def knn_gpu(resources: Any, queries: np.ndarray, keys: np.ndarray, k: int) -> SearchResult:
    """Stage 1 on GPU: FAISS brute-force search (bfKnn) over the raw arrays, no index built."""
    k = min(k, len(keys))
    if k == 0 or len(queries) == 0:
        return knn_plain(queries, keys, k)
    scores, positions = faiss.knn_gpu(resources, queries, keys, k, metric=faiss.METRIC_INNER_PRODUCT)
    return SearchResult(positions, scores)


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
            self._pool = ThreadPoolExecutor(
                self.threads, thread_name_prefix="stage1", initializer=_one_omp_thread
            )

    def search(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> list[SearchResult]:
        """Top-k for each (queries, keys) pair; large searches are split by query rows across threads."""
        if self._gpu is not None:
            with self._gpu_lock:
                return [knn_gpu(self._gpu, q, keys, k) for q, keys in pairs]
        if self._pool is None:
            return [knn_threshold(q, keys, k) for q, keys in pairs]
        tasks: list[tuple[int, np.ndarray, np.ndarray]] = []
        for i, (q, keys) in enumerate(pairs):
            parts = min(self.threads, max(1, (len(q) * len(keys)) // _MIN_SCORES_PER_TASK))
            for chunk in np.array_split(q, parts) if parts > 1 else [q]:
                tasks.append((i, chunk, keys))
        if len(tasks) == 1:
            _, q, keys = tasks[0]
            return [knn_threshold(q, keys, k)]
        done = list(self._pool.map(lambda t: knn_threshold(t[1], t[2], k), tasks))
        out: list[list[SearchResult]] = [[] for _ in pairs]
        for (i, _, _), res in zip(tasks, done, strict=True):
            out[i].append(res)
        return [
            r[0]
            if len(r) == 1
            else SearchResult(np.vstack([x.positions for x in r]), np.vstack([x.scores for x in r]))
            for r in out
        ]

    @property
    def faiss_device(self) -> str:
        return "cuda" if self._gpu is not None else "cpu"

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _one_omp_thread() -> None:
    # the pool is the parallelism; FAISS's OpenMP threads on top would only spin against it
    faiss.omp_set_num_threads(1)


def gpu_available() -> bool:
    """Whether this FAISS build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
