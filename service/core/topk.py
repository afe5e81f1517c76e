"""Exact top-k of each row of a score matrix, best first, compiled with numba.

Per row, three passes, each either vectorised or over about k elements, so that selecting costs
little next to computing the scores:

1. A lower bound on the row's k-th score. The row is cut into G >= k strided groups; at least k
   group maxima reach the k-th largest group maximum, so at least k scores do. A bisection over the
   G maxima (vectorised counts) finds a value that k maxima reach, just below that one.
2. One vectorised compare of the row against the bound writes a flag byte per score; the flags are
   read as 64-bit words, so rejected scores cost one compare each and one test per eight. The
   survivors (typically k plus a few) are gathered in position order. Many survivors mean ties
   at the bound (repeated behaviors): the bound is then raised to the smallest group maximum at or
   above it, and of the scores equal to it only the first few in position order are kept.
3. Each survivor gets a 64-bit key, the score's bits made sortable in the high half and the
   inverted position in the low half: larger key = higher score, then lower position, with no ties
   (and a total order even for NaN). A quickselect with a branch-free partition keeps the k largest
   keys; each of those is placed by its rank among them, counted in one vectorised loop.

Rows shorter than 2k skip the bound: all their scores go to step 3.
"""

from __future__ import annotations

import numba
import numpy as np

# Groups per k for the bound: more groups give a tighter bound (fewer survivors) for a longer count.
_GROUPS_PER_K = 4
_BISECTION_STEPS = 12


@numba.njit(cache=True, nogil=True)
def _bound(row: np.ndarray, n_groups: int, k: int, gmax: np.ndarray) -> np.float32:
    """A value that at least k scores of the row reach (the k-th largest group maximum, or a bit less)."""
    gmax[:] = row[:n_groups]
    for b in range(1, len(row) // n_groups):
        block = row[b * n_groups : (b + 1) * n_groups]
        for g in range(n_groups):
            gmax[g] = block[g] if block[g] > gmax[g] else gmax[g]
    lo = gmax[0]
    hi = gmax[0]
    for g in range(1, n_groups):
        lo = gmax[g] if gmax[g] < lo else lo
        hi = gmax[g] if gmax[g] > hi else hi
    # invariant: at least k maxima are >= lo; float64 midpoints cannot overflow
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return lo
    for _ in range(_BISECTION_STEPS):
        mid = np.float32((np.float64(lo) + np.float64(hi)) * 0.5)
        if mid <= lo or mid >= hi:
            break
        count = 0
        for g in range(n_groups):
            count += gmax[g] >= mid
        if count >= k:
            lo = mid
        else:
            hi = mid
    return lo


@numba.njit(cache=True, nogil=True)
def _smallest_at_least(gmax: np.ndarray, bound: np.float32) -> np.float32:
    """The smallest group maximum >= bound: a tighter bound, as many maxima reach it, and a score."""
    tight = np.float32(np.inf)
    for g in range(len(gmax)):
        tight = gmax[g] if bound <= gmax[g] < tight else tight
    return tight if tight < np.inf else bound


@numba.njit(cache=True, nogil=True)
def _first_ties_only(
    row: np.ndarray, ids: np.ndarray, n: int, k: int, bound: np.float32, tied: np.ndarray
) -> int:
    """Keep the survivors above a bound that k scores reach and, if fewer than k, the first of its ties.

    Equal scores rank by position, so when fewer than k scores exceed the bound, the bound is the
    k-th score and the remaining places go to its first ties in position order; otherwise none
    of them is needed. Returns the new count; ids stay in position order.
    """
    n_above = 0
    n_tied = 0
    for j in range(n):
        i = ids[j]
        if row[i] > bound:
            ids[n_above] = i
            n_above += 1
        elif row[i] == bound and n_tied < k:
            tied[n_tied] = i
            n_tied += 1
    if n_above >= k:
        return n_above
    if n_above + n_tied < k:  # NaN scores only: leave it to the caller's fallback
        return 0
    ids[n_above:k] = tied[: k - n_above]
    return k


@numba.njit(cache=True, nogil=True)
def _survivor_keys(row: np.ndarray, ids: np.ndarray, n: int, keys: np.ndarray) -> None:
    """keys[i]: sortable int64 of (row[ids[i]], position ids[i]); larger is better, none equal."""
    bits = row.view(np.int32)
    for i in range(n):
        pos = ids[i]
        # -0.0 ranks as +0.0; negative floats order by flipped magnitude bits
        b = np.int64(bits[pos]) if row[pos] != 0 else np.int64(0)
        b ^= (b >> 31) & 0x7FFFFFFF
        keys[i] = (b << 32) | (0xFFFFFFFF - pos)


@numba.njit(cache=True, nogil=True)
def _keep_largest(keys: np.ndarray, n: int, k: int) -> None:
    """Move the k largest of keys[:n] to the front, in any order: quickselect, branch-free partition."""
    lo, hi = 0, n - 1
    while lo < hi:
        a, b, c = keys[lo], keys[(lo + hi) >> 1], keys[hi]
        pivot = max(min(a, b), min(max(a, b), c))  # median of three
        # move the pivot to hi (it is one of the three), then Lomuto with a conditional advance
        if pivot == a:
            keys[lo], keys[hi] = c, a
        elif pivot == b:
            keys[(lo + hi) >> 1], keys[hi] = c, b
        store = lo
        for i in range(lo, hi):
            x = keys[i]
            keys[i] = keys[store]
            keys[store] = x
            store += x > pivot
        keys[hi] = keys[store]
        keys[store] = pivot
        if store == k - 1:
            return
        if store < k - 1:
            lo = store + 1
        else:
            hi = store - 1


@numba.njit(cache=True, nogil=True)
def _place_by_rank(keys: np.ndarray, k: int, out: np.ndarray) -> None:
    """out[:k]: keys[:k] largest first; each key's rank is a vectorised count (keys are distinct)."""
    for i in range(k):
        key = keys[i]
        rank = 0
        for j in range(k):
            rank += keys[j] > key
        out[rank] = key


@numba.njit("void(float32[:, ::1], int64, int64[:, ::1], float32[:, ::1])", cache=True, nogil=True)
def topk_rows(scores: np.ndarray, k: int, positions: np.ndarray, values: np.ndarray) -> None:
    """Each row's k best (position, score) pairs, best first, into positions and values [m, k].

    scores: C-contiguous float32 [m, L] with 0 < k <= L; positions int64, values float32.
    """
    n_rows, length = scores.shape
    if not 0 < k <= length:
        raise ValueError("topk_rows needs 0 < k <= row length")
    if positions.shape != (n_rows, k) or values.shape != (n_rows, k):
        raise ValueError("topk_rows: positions and values must be [rows, k]")
    n_groups = max(k, min(_GROUPS_PER_K * k, length // 2))
    use_bound = length >= 2 * n_groups
    gmax = np.empty(n_groups, np.float32)
    flags = np.zeros((length + 7) // 8 * 8, np.uint8)
    words = flags.view(np.uint64)
    ids = np.empty(length + 8, np.int64)
    keys = np.empty(length, np.int64)
    best = np.empty(k, np.int64)
    tied = np.empty(k, np.int64)
    for r in range(n_rows):
        row = scores[r]
        n = 0
        if use_bound:
            bound = _bound(row, n_groups, k, gmax)
            for i in range(length):
                flags[i] = row[i] >= bound
            for w in range(len(words)):
                if words[w] != 0:
                    # branch-free gather of the word's (usually one) survivor
                    for i in range(8 * w, 8 * w + 8):
                        ids[n] = i
                        n += int(flags[i])
            if n > 2 * k:  # many survivors: usually ties at the bound
                n = _first_ties_only(row, ids, n, k, _smallest_at_least(gmax, bound), tied)
        if n < k:  # short rows, or a bound that NaN scores defeated: every score is a candidate
            for i in range(length):
                ids[i] = i
            n = length
        _survivor_keys(row, ids, n, keys)
        if n > k:
            _keep_largest(keys, n, k)
        _place_by_rank(keys, k, best)
        for i in range(k):
            pos = 0xFFFFFFFF - (best[i] & 0xFFFFFFFF)
            positions[r, i] = pos
            values[r, i] = row[pos]
