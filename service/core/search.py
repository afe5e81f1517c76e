"""Stage 1: for each candidate, the top-K behaviors of one user by attention inner product.

Keys are the behaviors' attention vectors with the folded time bias as one extra dimension,
queries are the candidates' attention vectors with a 1 in that dimension, so the search is a
plain exact inner-product top-K that FAISS runs (`faiss.knn` on CPU, `bfKnn` on GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np


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


def search_topk(queries: np.ndarray, keys: np.ndarray, k: int) -> SearchResult:
    """Stage 1 as the service runs it: exact top-k by inner product, best first."""
    return knn_plain(queries, keys, k)
