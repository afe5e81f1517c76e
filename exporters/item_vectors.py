"""Item vectors learned from the behavior stream alone (no labels): which items go together.

Click labels are a weak signal for arranging thousands of item rows by relatedness; the event
sequences themselves are a strong one: items a user engages with close together in time tend to
belong to the same interest. This module factorises that co-occurrence, as word embeddings are
learned from text (Levy & Goldberg: skip-gram with negative sampling implicitly factorises a
shifted PMI matrix; PPMI + truncated SVD does it explicitly, deterministically and fast):

1. Co-occurrence counts of item pairs at most `window` positions apart in a user's sequence.
2. Positive PMI with context-distribution smoothing (context counts ** 0.75, which damps the pull of
   very popular items).
3. A randomized truncated SVD (Halko et al.) of the sparse PPMI matrix; item vectors are
   U * sqrt(S), so that inner products approximate PPMI. Components come ordered by singular value,
   so the first d columns are the best rank-d vectors for any smaller table.

Category vectors are the mean of their items' vectors: a category whose items share an interest
gets a strong vector, one that mixes interests gets a weak one.

Only events the training may see are used: `visible_events` drops, per user, everything from the
user's first validation or test impression on, so evaluation never profits from the future.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

FORMAT = "dare-item-vectors/1"


@dataclass(frozen=True)
class ItemVectors:
    """Self-supervised vectors for raw item ids, ordered by singular value along the columns."""

    item_ids: np.ndarray  # int64 raw ids, sorted
    vectors: np.ndarray  # float32 [n_items, dim]
    singular_values: np.ndarray  # float32 [dim]
    window: int
    n_events: int

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def save(self, path: str | Path) -> Path:
        """One .npz (no pickle) holding the arrays and the settings."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            np.savez(
                f,
                format=np.array(FORMAT),
                item_ids=self.item_ids,
                vectors=self.vectors,
                singular_values=self.singular_values,
                window=np.array(self.window),
                n_events=np.array(self.n_events),
            )
        return path

    @classmethod
    def load(cls, path: str | Path) -> ItemVectors:
        with np.load(Path(path), allow_pickle=False) as z:
            if "format" not in z.files or str(z["format"]) != FORMAT:
                raise ValueError(f"{path}: not an item-vectors file ({FORMAT})")
            ids, vec = z["item_ids"].astype(np.int64), z["vectors"].astype(np.float32)
            if vec.ndim != 2 or len(ids) != len(vec) or np.any(np.diff(ids) <= 0):
                raise ValueError(f"{path}: item ids and vectors do not match")
            return cls(
                ids, vec, z["singular_values"].astype(np.float32), int(z["window"]), int(z["n_events"])
            )

    def table(self, raw_ids: np.ndarray, dim: int, norm: float) -> np.ndarray:
        """[len(raw_ids), dim] rows of length `norm` for raw ids (zeros for ids without a vector).

        Unit length, not the raw factor scale: with raw factors, frequent items carry long vectors
        and win every inner-product search; normalised, the search ranks by direction (relatedness).
        """
        if dim > self.dim:
            raise ValueError(f"asked for {dim}-d vectors, the file holds {self.dim}")
        q = np.asarray(raw_ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.item_ids, q), max(len(self.item_ids) - 1, 0))
        found = (self.item_ids[pos] == q) if len(self.item_ids) else np.zeros(len(q), bool)
        out = np.where(found[:, None], self.vectors[pos, :dim], 0.0).astype(np.float32)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return np.where(norms > 0, out * (norm / np.maximum(norms, 1e-12)), 0.0).astype(np.float32)


def cooccurrence(event_user: np.ndarray, event_item: np.ndarray, n_items: int, window: int) -> sp.csr_matrix:
    """Symmetric [n, n] counts of item pairs at most `window` positions apart in one user's sequence.

    Events must be grouped by user and in time order; item indices are 0..n_items-1. Nearer pairs
    count more (weight (window - gap + 1) / window, word2vec's dynamic window in expectation).
    """
    total = sp.csr_matrix((n_items, n_items), dtype=np.float64)
    for gap in range(1, window + 1):
        same = event_user[gap:] == event_user[:-gap]
        a, b = event_item[gap:][same], event_item[:-gap][same]
        w = np.full(len(a), (window - gap + 1) / window)
        part = sp.coo_matrix((w, (a, b)), shape=(n_items, n_items)).tocsr()
        total = total + part + part.T
    total.sum_duplicates()
    return total


def ppmi(counts: sp.csr_matrix, alpha: float = 0.75) -> sp.csr_matrix:
    """Positive PMI of a symmetric count matrix, with context counts smoothed by ** alpha."""
    coo = counts.tocoo()
    row_sum = np.asarray(coo.sum(axis=1)).ravel()
    ctx = row_sum**alpha
    total, ctx_total = row_sum.sum(), ctx.sum()
    if total <= 0:
        # scipy-stubs type a matrix made from a shape only for float64, int, bool and complex
        return sp.csr_matrix(coo.shape, dtype=np.float32)  # type: ignore[arg-type]
    pmi = np.log(coo.data * ctx_total / (row_sum[coo.row] * ctx[coo.col]))
    keep = pmi > 0
    return sp.csr_matrix((pmi[keep].astype(np.float32), (coo.row[keep], coo.col[keep])), shape=coo.shape)


def randomized_svd(
    m: sp.csr_matrix, rank: int, seed: int, oversample: int = 16, power_iters: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """(U [rows, rank], S [rank]) of a sparse matrix by a randomized range finder."""
    width = min(*m.shape, rank + oversample)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(m @ rng.standard_normal((m.shape[1], width)).astype(np.float32))
    for _ in range(power_iters):
        # re-orthonormalise between products: keeps the small components from drowning in rounding
        q, _ = np.linalg.qr(m.T @ q)
        q, _ = np.linalg.qr(m @ q)
    b = (m.T @ q).T  # [width, n] = Q^T M
    u_b, s, _ = np.linalg.svd(b, full_matrices=False)
    u = q @ u_b
    r = min(rank, width)
    # a sign per component, fixed by its largest entry, so that equal inputs give equal files
    flip = np.sign(u[np.abs(u[:, :r]).argmax(axis=0), np.arange(r)])
    flip[flip == 0] = 1
    return (u[:, :r] * flip).astype(np.float32), s[:r].astype(np.float32)


def learn_item_vectors(
    event_user: np.ndarray,
    event_item_ids: np.ndarray,
    dim: int = 64,
    window: int = 5,
    seed: int = 0,
) -> ItemVectors:
    """Item vectors from event streams (grouped by user, time-ordered within a user)."""
    event_item_ids = np.asarray(event_item_ids, dtype=np.int64)
    ids, idx = np.unique(event_item_ids, return_inverse=True)
    if len(ids) == 0:
        return ItemVectors(ids, np.zeros((0, dim), np.float32), np.zeros(dim, np.float32), window, 0)
    counts = cooccurrence(np.asarray(event_user), idx.astype(np.int64), len(ids), window)
    u, s = randomized_svd(ppmi(counts), dim, seed)
    vectors = np.zeros((len(ids), dim), np.float32)
    vectors[:, : u.shape[1]] = u * np.sqrt(s)[None, :]
    singular = np.zeros(dim, np.float32)
    singular[: len(s)] = s
    return ItemVectors(ids, vectors, singular, window, len(event_item_ids))


def visible_events(
    event_user: np.ndarray,
    event_ts: np.ndarray,
    imp_user: np.ndarray,
    imp_ts: np.ndarray,
    imp_eval: np.ndarray,
) -> np.ndarray:
    """Mask of events a training run may learn from: per user, those strictly before the user's first
    evaluation (validation or test) impression; all of a user's events when it has none."""
    n_users = int(max(event_user.max(initial=-1), imp_user.max(initial=-1))) + 1
    cutoff = np.full(n_users, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(cutoff, imp_user[imp_eval], imp_ts[imp_eval])
    return event_ts < cutoff[event_user]


def category_table(item_table: np.ndarray, row_category: np.ndarray, n_categories: int) -> np.ndarray:
    """Mean item vector of each category (over item rows that have a vector); zeros elsewhere."""
    has = np.linalg.norm(item_table, axis=1) > 0
    sums = np.zeros((n_categories, item_table.shape[1]), np.float64)
    np.add.at(sums, row_category[has], item_table[has])
    counts = np.bincount(row_category[has], minlength=n_categories).astype(np.float64)
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
