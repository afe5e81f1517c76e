"""Stage-1 retrieval quality: planted-truth precision / recall / lift, and the DARE paper's mutual-information
ground truth with the NDCG of a ranking against it. Pure numpy; docs/retrieval.md defines every number.

Conventions shared by every function here:

- An impression's history is `event_cat[hist_start[i]:hist_end[i]]`, oldest first (the layout of
  `exporters.samples.Samples`; a ragged array with `indptr` is `hist_start=indptr[:-1], hist_end=indptr[1:]`).
- A *history index* counts from the oldest behavior (0 .. n-1), as the ranker's stage-1 top-K does.
- A *relative position* counts back from the target: the newest behavior is 0, the oldest n-1.
- `topk` is an int array [N, >= 0 columns]: impression i's stage-1 history indices, best first. Only the
  first min(k, n_i) columns count; entries outside [0, n_i) (padding such as -1) score nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

DEFAULT_EXACT = 8
"""Relative positions below this get a bucket each; beyond it, two buckets per doubling."""

# chi-square(1) critical value at p = 0.001: a G statistic below it is indistinguishable from no association
DEFAULT_MIN_G = 10.83
DEFAULT_MIN_COUNT = 100
DEFAULT_MAX_BEHAVIORS = 20_000_000
_CHUNK_BEHAVIORS = 4_000_000  # peak memory of one step is a few arrays of this many int64
_DENSE_CELLS = 1 << 22  # tables up to this many cells are looked up through a dense array


# -- planted truth -------------------------------------------------------------------------------------------


def csr_take(
    indptr: np.ndarray, values: np.ndarray, rows: np.ndarray, offsets: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Rows `rows` of a CSR list (indptr, values) as a new CSR list; `offsets[j]` is subtracted from row j."""
    indptr = np.asarray(indptr, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    counts = indptr[rows + 1] - indptr[rows]
    out_indptr = np.concatenate([np.zeros(1, np.int64), np.cumsum(counts)])
    taken = np.asarray(values)[np.repeat(indptr[rows], counts) + _ragged_arange(counts)]
    if offsets is not None:
        taken = taken - np.repeat(np.asarray(offsets, dtype=np.int64), counts)
    return out_indptr, taken


def planted_metrics(
    hist_len: np.ndarray,
    topk: np.ndarray,
    related_indptr: np.ndarray,
    related_pos: np.ndarray,
    k: int,
) -> dict[str, float]:
    """Precision, recall, base rate and lift of stage-1 top-k against a known set of related behaviors.

    `related_pos[related_indptr[i]:related_indptr[i + 1]]` are impression i's related history indices
    (entries outside its history are ignored, duplicates count once). Impressions without history are
    skipped; "long" ones have a history longer than k. Lift is mean precision over mean base rate.
    """
    n = np.asarray(hist_len, dtype=np.int64)
    top = _topk_matrix(topk, len(n), k)
    indptr = np.asarray(related_indptr, dtype=np.int64)
    if len(indptr) != len(n) + 1:
        raise ValueError(f"related_indptr has {len(indptr)} entries, expected {len(n) + 1}")
    rel_row = np.repeat(np.arange(len(n)), np.diff(indptr))
    rel_pos = np.asarray(related_pos, dtype=np.int64)
    stride = int(n.max(initial=0)) + 1
    keep = (rel_pos >= 0) & (rel_pos < n[rel_row])
    rel_keys = np.unique(rel_row[keep] * stride + rel_pos[keep])
    n_rel = np.bincount(rel_keys // stride, minlength=len(n))

    kk = np.minimum(k, n)
    counted = (np.arange(k)[None, :] < kk[:, None]) & (top >= 0) & (top < n[:, None])
    rows = np.broadcast_to(np.arange(len(n))[:, None], top.shape)[counted]
    chosen = rows * stride + top[counted]
    hit = np.isin(chosen, rel_keys)
    hits = np.bincount(rows[hit], minlength=len(n))

    has = n > 0
    prec = np.divide(hits, kk, out=np.zeros(len(n)), where=has)
    base = np.divide(n_rel, n, out=np.zeros(len(n)), where=has)
    denom = np.minimum(n_rel, kk)
    recall = np.divide(hits, denom, out=np.zeros(len(n)), where=denom > 0)
    long = has & (n > k)
    out: dict[str, float] = {"k": k, "n": int(has.sum()), "n_long": int(long.sum())}
    for suffix, sel in (("", has), ("_long", long)):
        p, b = _mean(prec[sel]), _mean(base[sel])
        out[f"precision_at_k{suffix}"] = p
        out[f"recall_at_k{suffix}"] = _mean(recall[sel & (denom > 0)])
        out[f"base_rate{suffix}"] = b
        out[f"lift{suffix}"] = p / b if b > 0 else math.nan
    return out


# -- mutual-information ground truth -------------------------------------------------------------------------


def position_buckets(rel_pos: np.ndarray, exact: int = DEFAULT_EXACT) -> np.ndarray:
    """Bucket of each relative position: p itself below `exact`, then two buckets per doubling of p.

    With exact = 8: 0..7 -> 0..7, [8, 12) -> 8, [12, 16) -> 9, [16, 24) -> 10, [24, 32) -> 11, ...
    """
    _check_exact(exact)
    p = np.asarray(rel_pos, dtype=np.int64)
    # frexp is exact on integers: p = m * 2**e with m in [0.5, 1), so floor(log2 p) = e - 1
    m, e = np.frexp(np.maximum(p, 1).astype(np.float64))
    log_bucket = exact + 2 * (e.astype(np.int64) - 1 - int(math.log2(exact))) + (m >= 0.75)
    return np.where(p < exact, p, log_bucket)


def bucket_bounds(bucket: int, exact: int = DEFAULT_EXACT) -> tuple[int, int]:
    """The relative positions [lo, hi) of one bucket."""
    _check_exact(exact)
    if bucket < exact:
        return bucket, bucket + 1
    octave, half = divmod(bucket - exact, 2)
    base = exact << octave
    return (base, base * 3 // 2) if half == 0 else (base * 3 // 2, base * 2)


@dataclass(frozen=True, eq=False)  # array fields: compare tables by their arrays, not ==
class MiTable:
    """MI(click ; a behavior of category c at relative-position bucket b) for a target of category t, in bits.

    Only cells that pass the count and significance thresholds are stored; every other cell is 0.
    """

    n_categories: int  # category ids are 0 .. n_categories - 1
    n_buckets: int
    exact: int
    keys: np.ndarray  # sorted int64 cell keys (t * n_categories + c) * n_buckets + b
    mi: np.ndarray  # float64 bits per stored cell
    n_impressions: int  # training impressions (with a history) the table was counted from
    n_impressions_available: int  # training impressions with a history before sampling
    n_behaviors: int
    n_cells_counted: int  # cells seen at least once, before the thresholds
    min_count: int
    min_g: float

    @classmethod
    def fit(
        cls,
        target_cat: np.ndarray,
        label: np.ndarray,
        event_cat: np.ndarray,
        hist_start: np.ndarray,
        hist_end: np.ndarray,
        *,
        exact: int = DEFAULT_EXACT,
        min_count: int = DEFAULT_MIN_COUNT,
        min_g: float = DEFAULT_MIN_G,
        max_behaviors: int = DEFAULT_MAX_BEHAVIORS,
        seed: int = 0,
    ) -> MiTable:
        """Counts (target category, behavior category, bucket, label) over training impressions; keeps a
        cell's MI when >= min_count impressions of its target category reach the bucket and the G statistic
        2 * ln 2 * (that many impressions) * MI is >= min_g. Impressions are sampled uniformly
        (seeded) when their histories hold more than max_behaviors behaviors."""
        _check_exact(exact)
        tc = np.asarray(target_cat, dtype=np.int64)
        y = (np.asarray(label) > 0.5).astype(np.int64)
        ec = np.asarray(event_cat, dtype=np.int64)
        start = np.asarray(hist_start, dtype=np.int64)
        n = np.asarray(hist_end, dtype=np.int64) - start
        if not (len(tc) == len(y) == len(start) == len(n)):
            raise ValueError("target_cat, label, hist_start and hist_end must have one entry per impression")
        if (tc < 0).any() or (ec < 0).any():
            raise ValueError("category ids must be >= 0")
        if max_behaviors < 1:
            raise ValueError("max_behaviors must be >= 1")
        n_cat = int(max(tc.max(initial=-1), ec.max(initial=-1))) + 1
        has = np.flatnonzero(n > 0)
        chosen = _sample_by_budget(has, n, max_behaviors, seed)
        n_buckets = int(position_buckets(np.array([max(int(n.max(initial=1)), 1) - 1]), exact)[0]) + 1

        keys, counts = _count_cells(tc, y, ec, start, n, chosen, n_cat, n_buckets, exact)
        cell, lab = keys >> 1, keys & 1
        ucell, inv = np.unique(cell, return_inverse=True)
        pos = np.bincount(inv, weights=counts * lab, minlength=len(ucell))
        neg = np.bincount(inv, weights=counts * (1 - lab), minlength=len(ucell))
        # every position in a bucket holds exactly one behavior, so summing the cells over c gives the
        # (t, b) population: all (impression, position) pairs of targets t at positions in bucket b
        tb = (ucell // (n_cat * n_buckets)) * n_buckets + ucell % n_buckets
        pop_pos = np.bincount(tb, weights=pos, minlength=n_cat * n_buckets)[tb]
        pop_neg = np.bincount(tb, weights=neg, minlength=n_cat * n_buckets)[tb]
        mi = _mi_2x2(pos, neg, pop_pos - pos, pop_neg - neg)
        # positions of one impression are not independent draws: the G statistic counts impressions
        reach = _impressions_reaching(tc[chosen], n[chosen], n_cat, n_buckets, exact)[tb]
        keep = (reach >= min_count) & (2.0 * math.log(2.0) * reach * mi >= min_g) & (mi > 0)
        return cls(
            n_categories=n_cat,
            n_buckets=n_buckets,
            exact=exact,
            keys=ucell[keep],
            mi=mi[keep],
            n_impressions=len(chosen),
            n_impressions_available=len(has),
            n_behaviors=int(n[chosen].sum()),
            n_cells_counted=len(ucell),
            min_count=min_count,
            min_g=min_g,
        )

    @cached_property
    def _dense(self) -> np.ndarray | None:
        size = self.n_categories * self.n_categories * self.n_buckets
        if size > _DENSE_CELLS:
            return None
        dense = np.zeros(size, np.float64)
        dense[self.keys] = self.mi
        return dense

    def relevance(self, target_cat: np.ndarray, behavior_cat: np.ndarray, rel_pos: np.ndarray) -> np.ndarray:
        """MI of each (target category, behavior category, relative position), broadcast; 0 for unknown
        categories. Positions past the longest training history share its last bucket."""
        t, c, p = np.broadcast_arrays(
            np.asarray(target_cat, dtype=np.int64),
            np.asarray(behavior_cat, dtype=np.int64),
            np.asarray(rel_pos, dtype=np.int64),
        )
        known = (t >= 0) & (t < self.n_categories) & (c >= 0) & (c < self.n_categories) & (p >= 0)
        b = np.minimum(position_buckets(np.maximum(p, 0), self.exact), self.n_buckets - 1)
        key = (np.where(known, t, 0) * self.n_categories + np.where(known, c, 0)) * self.n_buckets + b
        dense = self._dense
        if dense is not None:
            return np.where(known, dense[key], 0.0)
        if len(self.keys) == 0:
            return np.zeros(key.shape, np.float64)
        at = np.minimum(np.searchsorted(self.keys, key), len(self.keys) - 1)
        return np.where(known & (self.keys[at] == key), self.mi[at], 0.0)

    def summary(self) -> dict[str, float]:
        """Counts and settings worth logging next to the NDCG."""
        return {
            "n_train_impressions": self.n_impressions,
            "n_train_impressions_available": self.n_impressions_available,
            "n_train_behaviors": self.n_behaviors,
            "n_cells_counted": self.n_cells_counted,
            "n_cells_kept": len(self.keys),
            "n_buckets": self.n_buckets,
            "exact": self.exact,
            "min_count": self.min_count,
            "min_g": self.min_g,
        }


def mi_ndcg(
    table: MiTable,
    target_cat: np.ndarray,
    event_cat: np.ndarray,
    hist_start: np.ndarray,
    hist_end: np.ndarray,
    topk: np.ndarray,
    k: int,
    *,
    max_impressions: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Mean NDCG@k of the stage-1 ranking `topk` against the MI relevance of every history behavior, and of
    two reference rankings on the same impressions: uniformly random (its exact expectation) and recency
    (newest first). Impressions without history or without any relevant behavior are not scored."""
    tc = np.asarray(target_cat, dtype=np.int64)
    ec = np.asarray(event_cat, dtype=np.int64)
    start = np.asarray(hist_start, dtype=np.int64)
    n = np.asarray(hist_end, dtype=np.int64) - start
    if not (len(tc) == len(start) == len(n)):
        raise ValueError("target_cat, hist_start and hist_end must have one entry per impression")
    if k < 1:
        raise ValueError("k must be >= 1")
    top = _topk_matrix(topk, len(n), k)
    has = np.flatnonzero(n > 0)
    rows = has
    if max_impressions is not None and len(has) > max_impressions:
        rows = np.sort(np.random.default_rng(seed).choice(has, max_impressions, replace=False))
    rows = rows[np.argsort(n[rows], kind="stable")]
    discount = 1.0 / np.log2(np.arange(k) + 2.0)

    ideal = np.zeros(len(rows))
    model = np.zeros(len(rows))
    recency = np.zeros(len(rows))
    random = np.zeros(len(rows))
    n_sorted = n[rows]
    a = 0
    while a < len(rows):
        # rows are sorted by length, so a chunk's padded size is its row count times its last length
        cand = np.arange(a + 1, min(len(rows), a + _CHUNK_BEHAVIORS) + 1)
        b = max(a + 1, a + int(np.searchsorted((cand - a) * n_sorted[cand - 1], _CHUNK_BEHAVIORS, "right")))
        width = int(n_sorted[b - 1])
        r = rows[a:b]
        nr = n[r]
        j = np.arange(width)[None, :]
        valid = j < nr[:, None]
        cat = ec[np.where(valid, start[r][:, None] + j, 0)] if len(ec) else np.zeros(valid.shape, np.int64)
        rel = np.where(valid, table.relevance(tc[r][:, None], cat, nr[:, None] - 1 - j), 0.0)
        kk = np.minimum(k, nr)
        in_k = np.arange(k)[None, :] < kk[:, None]

        if width > k:
            best = -np.sort(-np.partition(rel, width - k, axis=1)[:, width - k :], axis=1)
        else:
            best = np.zeros((len(r), k))
            best[:, :width] = -np.sort(-rel, axis=1)
        ideal[a:b] = best @ discount

        # column `width` is a zero sink for ranks that hold no behavior
        rel_ext = np.concatenate([rel, np.zeros((len(r), 1))], axis=1)
        t = top[r]
        ok = in_k & (t >= 0) & (t < nr[:, None])
        model[a:b] = np.take_along_axis(rel_ext, np.where(ok, t, width), 1) @ discount
        newest = nr[:, None] - 1 - np.arange(k)[None, :]
        recency[a:b] = np.take_along_axis(rel_ext, np.where(in_k, newest, width), 1) @ discount

        # a uniformly random ranking puts, at every rank, a behavior of expected relevance mean(rel)
        random[a:b] = rel.sum(1) / nr * (in_k * discount).sum(1)
        a = b

    scored = ideal > 0
    long = scored & (n[rows] > k)
    out: dict[str, float] = {
        "k": k,
        "n_impressions": len(rows),
        "n_impressions_available": len(has),
        "n_scored": int(scored.sum()),
        "n_scored_long": int(long.sum()),
    }
    safe = np.where(scored, ideal, 1.0)
    for suffix, sel in (("", scored), ("_long", long)):
        out[f"ndcg{suffix}"] = _mean(model[sel] / safe[sel])
        out[f"ndcg_random{suffix}"] = _mean(random[sel] / safe[sel])
        out[f"ndcg_recency{suffix}"] = _mean(recency[sel] / safe[sel])
    return out


# -- internals -----------------------------------------------------------------------------------------------


def _check_exact(exact: int) -> None:
    # from 2 on, each half-octave [2^k, 1.5 * 2^k) and [1.5 * 2^k, 2^(k+1)) holds at least one integer
    if exact < 2 or exact & (exact - 1):
        raise ValueError(f"exact must be a power of two >= 2, got {exact}")


def _mean(v: np.ndarray) -> float:
    return float(v.mean()) if len(v) else math.nan


def _ragged_arange(counts: np.ndarray) -> np.ndarray:
    """[0..c0), [0..c1), ... concatenated."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def _topk_matrix(topk: np.ndarray, n_rows: int, k: int) -> np.ndarray:
    """topk as int64 [n_rows, k]: extra columns dropped, missing ones padded with -1."""
    top = np.asarray(topk, dtype=np.int64)
    if top.ndim != 2 or top.shape[0] != n_rows:
        raise ValueError(f"topk must be [{n_rows}, K], got shape {top.shape}")
    if top.shape[1] >= k:
        return top[:, :k]
    return np.concatenate([top, np.full((n_rows, k - top.shape[1]), -1, np.int64)], axis=1)


def _sample_by_budget(rows: np.ndarray, n: np.ndarray, budget: int, seed: int) -> np.ndarray:
    """All rows when their histories fit the budget, else a seeded uniform sample that does (sorted)."""
    if int(n[rows].sum()) <= budget:
        return rows
    order = np.random.default_rng(seed).permutation(rows)
    fits = int(np.searchsorted(np.cumsum(n[order]), budget, side="right"))
    return np.sort(order[: max(fits, 1)])


def _count_cells(
    tc: np.ndarray,
    y: np.ndarray,
    ec: np.ndarray,
    start: np.ndarray,
    n: np.ndarray,
    rows: np.ndarray,
    n_cat: int,
    n_buckets: int,
    exact: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys cell * 2 + label over every behavior of `rows`, with their counts."""
    parts_k, parts_c = [], []
    cum = np.cumsum(n[rows])
    lo = 0
    while lo < len(rows):
        done = int(cum[lo - 1]) if lo else 0
        hi = max(lo + 1, int(np.searchsorted(cum, done + _CHUNK_BEHAVIORS, side="right")))
        r = rows[lo:hi]
        lo = hi
        nr = n[r]
        imp = np.repeat(np.arange(len(r)), nr)
        j = _ragged_arange(nr)
        b = position_buckets(nr[imp] - 1 - j, exact)
        key = ((tc[r][imp] * n_cat + ec[start[r][imp] + j]) * n_buckets + b) * 2 + y[r][imp]
        u, c = np.unique(key, return_counts=True)
        parts_k.append(u)
        parts_c.append(c)
    if not parts_k:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    keys, inv = np.unique(np.concatenate(parts_k), return_inverse=True)
    return keys, np.bincount(inv, weights=np.concatenate(parts_c), minlength=len(keys))


def _impressions_reaching(
    tc: np.ndarray, n: np.ndarray, n_cat: int, n_buckets: int, exact: int
) -> np.ndarray:
    """Flat [(t, b)] number of impressions of target category t whose history reaches bucket b."""
    last = np.minimum(position_buckets(n - 1, exact), n_buckets - 1)
    ends = np.bincount(tc * n_buckets + last, minlength=n_cat * n_buckets).reshape(n_cat, n_buckets)
    return np.cumsum(ends[:, ::-1], axis=1)[:, ::-1].reshape(-1)


def _mi_2x2(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Mutual information in bits of a 2x2 table of counts: a (x=1, y=1), b (x=1, y=0), c (x=0, y=1),
    d (x=0, y=0); empty cells contribute 0."""
    s = a + b + c + d
    x1, x0, y1, y0 = a + b, c + d, a + c, b + d
    total = np.zeros(len(a))
    for cell, row, col in ((a, x1, y1), (b, x1, y0), (c, x0, y1), (d, x0, y0)):
        ok = cell > 0
        ratio = np.divide(cell * s, row * col, out=np.ones(len(a)), where=ok)
        total += np.where(ok, cell / np.where(s > 0, s, 1.0) * np.log2(ratio), 0.0)
    return np.maximum(total, 0.0)
