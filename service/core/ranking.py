"""Stage 2: assemble the ranker's padded inputs for a batch, one ONNX Runtime call, split.

Each request brings its stage-1 result: per candidate, the positions of its k <= K retrieved
behaviors and their scores. The graph takes each distinct retrieved behavior of a request once
(`behaviors`, `buckets` [B, U]) and per slot an index into them (`retrieved` [B, C, K]) with the
slot's stage-1 score (`scores`), so that per-behavior work is done once per request and not once
per (candidate, behavior) pair (`exporters/stage2_graph.py`).

Requests of a batch have different candidate counts C_i, slot counts k_i <= K and distinct counts
U_i: each is padded to the batch's largest C with row-0 candidates, its slots to K with index 0,
score 0 and mask 0 (the graph gives masked slots zero weight), and its behaviors to the batch's
largest U with row 0, bucket 0 (reached by no unmasked slot). A ranker with an FM history gets each
request's decoded entries padded to the batch's largest count H with mask 0. Padding is dropped from
the outputs, so a request scores the same alone or in any batch.
"""

from __future__ import annotations

import queue
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True, eq=False)
class RankInput:
    """One request's stage-2 input: candidates [C], distinct behaviors [U], slots [C, k] (k <= K), FM.

    `retrieved[c, j]` indexes `beh_rows` / `beh_buckets`: the behavior in candidate c's j-th slot;
    `scores[c, j]` is its stage-1 score (the raw inner product, time bias included).
    """

    cand_rows: np.ndarray
    beh_rows: np.ndarray
    beh_buckets: np.ndarray
    retrieved: np.ndarray
    scores: np.ndarray
    fm: np.ndarray | None  # [fm_dim] float32 when the FM embedding is used, else None
    fm_history: np.ndarray | None = None  # [n, d'] float32 decoded FM-history entries, oldest first


@dataclass(frozen=True, slots=True, eq=False)
class RankOutput:
    """One request's stage-2 output: probabilities [C] and attention over its k slots [C, k]."""

    probabilities: np.ndarray
    attention: np.ndarray


def distinct_positions(positions: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct positions [U] of a stage-1 result [C, k] into a sequence of `length`, ascending,
    and each slot's index into them [C, k].

    A mark per sequence position instead of `np.unique`: O(L + C k) with no sort, several times
    faster at C k = 12,800 slots.
    """
    seen = np.zeros(length, np.bool_)
    seen[positions] = True
    distinct = np.flatnonzero(seen)
    index = np.zeros(length, np.int64)
    index[distinct] = np.arange(len(distinct))
    return distinct, index[positions]


def rank_input(
    cand_rows: np.ndarray,
    beh_rows: np.ndarray,
    beh_buckets: np.ndarray,
    positions: np.ndarray,
    scores: np.ndarray,
    fm: np.ndarray | None,
    fm_history: np.ndarray | None = None,
) -> RankInput:
    """One request's stage-2 input from its sequence [L] and stage-1 result (positions, scores [C, k])."""
    distinct, retrieved = distinct_positions(positions, len(beh_rows))
    return RankInput(
        cand_rows,
        beh_rows[distinct],
        beh_buckets[distinct],
        retrieved,
        np.asarray(scores, np.float32),
        fm,
        fm_history,
    )


class _Buffers:
    """Flat input arrays whose prefixes are reshaped into contiguous [B, C(, K)] and [B, U] views."""

    def __init__(
        self,
        rows: int,
        batch: int,
        distinct: int,
        top_k: int,
        fm_dim: int,
        entries: int = 0,
        history_dim: int = 0,
    ) -> None:
        self.rows, self.batch, self.distinct, self.entries = rows, batch, distinct, entries
        self.candidates = np.zeros(rows, np.int64)
        self.retrieved = np.zeros(rows * top_k, np.int64)
        self.scores = np.zeros(rows * top_k, np.float32)
        self.mask = np.zeros(rows * top_k, np.float32)
        self.behaviors = np.zeros(distinct, np.int64)
        self.buckets = np.zeros(distinct, np.int64)
        self.fm = np.zeros(batch * fm_dim, np.float32)
        self.fm_present = np.zeros(batch, np.float32)
        self.fm_history = np.zeros(entries * history_dim, np.float32)
        self.fm_history_mask = np.zeros(entries, np.float32)


CANDIDATE_ALIGN = 16
"""The candidate axis of the feeds is padded to a multiple of this.

ONNX Runtime's CPU element-wise kernels (Log, Exp, ...) compute a tensor in SIMD packets and the
last elements in a scalar tail, whose results can differ in the last bit. Padding every request's
rows to a multiple of the packet width puts each score in the same lane alone and in any batch,
with no tail: batched scores stay bit-identical to unbatched ones (`tests/service/test_batching.py`).
"""


def _padded_candidates(c: int) -> int:
    return -(-c // CANDIDATE_ALIGN) * CANDIDATE_ALIGN


def _grown(have: int, need: int) -> int:
    return max(have, 1 << max(need - 1, 1).bit_length())


class FeedPool:
    """Preallocated input buffers for one ranker, reused across batches (thread-safe).

    A batch takes a buffer set, ORT reads straight from it (contiguous arrays of the declared
    dtypes are not copied), and it goes back afterwards. A set grows (doubling) when a batch
    needs more rows, so after warm-up a batch allocates nothing for its inputs.
    """

    def __init__(
        self,
        top_k: int,
        fm_dim: int,
        rows: int = 4096,
        batch: int = 64,
        distinct: int = 16384,
        fm_history_dim: int = 0,
    ) -> None:
        self.top_k, self.fm_dim, self.fm_history_dim = top_k, fm_dim, fm_history_dim
        # FM-history entry rows (batch x entries per request): none without a history input
        entries = batch * 64 if fm_history_dim else 0
        self._initial = (rows, batch, distinct, entries)
        self._free: queue.SimpleQueue[_Buffers] = queue.SimpleQueue()

    def _take(self, rows: int, batch: int, distinct: int, entries: int) -> _Buffers:
        try:
            buf = self._free.get_nowait()
        except queue.Empty:
            buf = self._buffers(*self._initial)
        if buf.rows < rows or buf.batch < batch or buf.distinct < distinct or buf.entries < entries:
            buf = self._buffers(
                _grown(buf.rows, rows),
                _grown(buf.batch, batch),
                _grown(buf.distinct, distinct),
                _grown(buf.entries, entries) if self.fm_history_dim else 0,
            )
        return buf

    def _buffers(self, rows: int, batch: int, distinct: int, entries: int) -> _Buffers:
        return _Buffers(rows, batch, distinct, self.top_k, self.fm_dim, entries, self.fm_history_dim)

    def feeds(self, inputs: Sequence[RankInput]) -> tuple[dict[str, np.ndarray], _Buffers]:
        """Padded ONNX feeds of a batch (views into a pooled buffer set) and that set."""
        b = len(inputs)
        c = _padded_candidates(max(len(x.cand_rows) for x in inputs))
        # at least one behavior column: an all-cold batch still gives the graph a row to gather
        u = max(1, max(len(x.beh_rows) for x in inputs))
        k = self.top_k
        # at least one entry column, for the same reason
        h = max(1, max(0 if x.fm_history is None else len(x.fm_history) for x in inputs))
        buf = self._take(b * c, b, b * u, b * h if self.fm_history_dim else 0)
        n = b * c
        candidates = buf.candidates[:n].reshape(b, c)
        behaviors = buf.behaviors[: b * u].reshape(b, u)
        buckets = buf.buckets[: b * u].reshape(b, u)
        retrieved = buf.retrieved[: n * k].reshape(b, c, k)
        scores = buf.scores[: n * k].reshape(b, c, k)
        mask = buf.mask[: n * k].reshape(b, c, k)
        # Reused memory: clear what this batch uses, then write each request's block.
        for arr in (candidates, behaviors, buckets, retrieved, scores, mask):
            arr.fill(0)
        for i, x in enumerate(inputs):
            ci, ki = x.retrieved.shape
            ui = len(x.beh_rows)
            candidates[i, :ci] = x.cand_rows
            behaviors[i, :ui] = x.beh_rows
            buckets[i, :ui] = x.beh_buckets
            retrieved[i, :ci, :ki] = x.retrieved
            scores[i, :ci, :ki] = x.scores
            mask[i, :ci, :ki] = 1.0
        feeds: dict[str, np.ndarray] = {
            "candidates": candidates,
            "behaviors": behaviors,
            "buckets": buckets,
            "retrieved": retrieved,
            "scores": scores,
            "mask": mask,
        }
        if self.fm_dim:
            fm = buf.fm[: b * self.fm_dim].reshape(b, self.fm_dim)
            present = buf.fm_present[:b]
            fm.fill(0.0)
            present.fill(0.0)
            for i, x in enumerate(inputs):
                if x.fm is not None:
                    fm[i] = x.fm
                    present[i] = 1.0
            feeds |= {"fm": fm, "fm_present": present}
        if self.fm_history_dim:
            d = self.fm_history_dim
            history = buf.fm_history[: b * h * d].reshape(b, h, d)
            history_mask = buf.fm_history_mask[: b * h].reshape(b, h)
            history.fill(0.0)
            history_mask.fill(0.0)
            for i, x in enumerate(inputs):
                if x.fm_history is not None and len(x.fm_history):
                    history[i, : len(x.fm_history)] = x.fm_history
                    history_mask[i, : len(x.fm_history)] = 1.0
            feeds |= {"fm_history": history, "fm_history_mask": history_mask}
        return feeds, buf

    def give_back(self, buf: _Buffers) -> None:
        """Return a buffer set once ORT has finished reading it."""
        self._free.put(buf)


def check_input(x: RankInput, top_k: int, fm_dim: int, fm_history_dim: int = 0) -> None:
    """Raise ValueError if a request's stage-2 input does not fit the graph."""
    c, u = len(x.cand_rows), len(x.beh_rows)
    if x.retrieved.ndim != 2 or x.retrieved.shape != x.scores.shape or x.retrieved.shape[0] != c:
        raise ValueError(f"retrieved {x.retrieved.shape} / scores {x.scores.shape} for {c} candidates")
    if x.retrieved.shape[1] > top_k:
        raise ValueError(f"{x.retrieved.shape[1]} behaviors per candidate, the graph takes {top_k}")
    if x.beh_rows.ndim != 1 or x.beh_buckets.shape != x.beh_rows.shape:
        raise ValueError(f"behaviors {x.beh_rows.shape} / buckets {x.beh_buckets.shape}: expected [U] each")
    # an index past this request's behaviors would silently read another request's rows in a batch
    if x.retrieved.size and (x.retrieved.min() < 0 or x.retrieved.max() >= u):
        raise ValueError(f"retrieved indices outside [0, {u}), the request's distinct behaviors")
    if x.fm is not None and x.fm.shape != (fm_dim,):
        raise ValueError(f"FM embedding of shape {x.fm.shape}, the graph takes ({fm_dim},)")
    if x.fm_history is not None and (x.fm_history.ndim != 2 or x.fm_history.shape[1] != fm_history_dim):
        raise ValueError(
            f"FM-history entries of shape {x.fm_history.shape}, the graph takes [n, {fm_history_dim}]"
        )


def rank_batch(session: Any, pool: FeedPool, inputs: Sequence[RankInput]) -> list[RankOutput]:
    """Stage 2 of a batch: one `session.run`, outputs split per request without padding."""
    if not inputs:
        return []
    for x in inputs:
        check_input(x, pool.top_k, pool.fm_dim, pool.fm_history_dim)
    feeds, buf = pool.feeds(inputs)
    try:
        probabilities, attention = session.run(["probability", "attention"], feeds)
    finally:
        pool.give_back(buf)
    out = []
    for i, x in enumerate(inputs):
        c, k = x.retrieved.shape
        out.append(RankOutput(probabilities[i, :c].copy(), attention[i, :c, :k].copy()))
    return out


def effective_behaviors(attention: np.ndarray) -> np.ndarray:
    """[C]: exp(entropy) of each candidate's attention weights [C, K], the number of behaviors it
    effectively attends to: K for mean pooling, 1 when one behavior takes all the weight, 0 when the
    candidate has no behaviors (all weights 0)."""
    w = np.asarray(attention, dtype=np.float64)
    logs = np.log(np.where(w > 0, w, 1.0))
    entropy = -(w * logs).sum(axis=1)
    return np.where(w.sum(axis=1) > 0, np.exp(entropy), 0.0)
