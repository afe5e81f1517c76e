"""Stage 2: assemble the ranker's padded [B, C, K] inputs for a batch, one ONNX Runtime call, split.

Requests of a batch have different candidate counts C_i and retrieved-behavior counts k_i <= K:
each is padded to the batch's largest C with row-0 candidates, and each candidate's behaviors to K
with row 0, bucket 0 and mask 0 (the graph gives masked behaviors zero weight). Padding is dropped
from the outputs, so a request scores the same alone or in any batch.
"""

from __future__ import annotations

import queue
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True, eq=False)
class RankInput:
    """One request's stage-2 input: candidate rows [C], retrieved behaviors [C, k] (k <= K), FM."""

    cand_rows: np.ndarray
    beh_rows: np.ndarray
    beh_buckets: np.ndarray
    fm: np.ndarray | None  # [fm_dim] float32 when the FM embedding is used, else None


@dataclass(frozen=True, slots=True, eq=False)
class RankOutput:
    """One request's stage-2 output: probabilities [C] and attention over its k behaviors [C, k]."""

    probabilities: np.ndarray
    attention: np.ndarray


class _Buffers:
    """Flat input arrays whose prefixes are reshaped into contiguous [B, C(, K)] views."""

    def __init__(self, rows: int, batch: int, top_k: int, fm_dim: int) -> None:
        self.rows, self.batch = rows, batch
        self.candidates = np.zeros(rows, np.int64)
        self.behaviors = np.zeros(rows * top_k, np.int64)
        self.buckets = np.zeros(rows * top_k, np.int64)
        self.mask = np.zeros(rows * top_k, np.float32)
        self.fm = np.zeros(batch * fm_dim, np.float32)
        self.fm_present = np.zeros(batch, np.float32)


class FeedPool:
    """Preallocated input buffers for one ranker, reused across batches (thread-safe).

    A batch takes a buffer set, ORT reads straight from it (contiguous arrays of the declared
    dtypes are not copied), and it goes back afterwards. A set grows (doubling) when a batch
    needs more rows, so after warm-up a batch allocates nothing for its inputs.
    """

    def __init__(self, top_k: int, fm_dim: int, rows: int = 4096, batch: int = 64) -> None:
        self.top_k, self.fm_dim = top_k, fm_dim
        self._initial = (rows, batch)
        self._free: queue.SimpleQueue[_Buffers] = queue.SimpleQueue()

    def _take(self, rows: int, batch: int) -> _Buffers:
        try:
            buf = self._free.get_nowait()
        except queue.Empty:
            buf = _Buffers(*self._initial, self.top_k, self.fm_dim)
        if buf.rows < rows or buf.batch < batch:
            grow_rows = max(buf.rows, 1 << max(rows - 1, 1).bit_length())
            grow_batch = max(buf.batch, 1 << max(batch - 1, 1).bit_length())
            buf = _Buffers(grow_rows, grow_batch, self.top_k, self.fm_dim)
        return buf

    def feeds(self, inputs: Sequence[RankInput]) -> tuple[dict[str, np.ndarray], _Buffers]:
        """Padded ONNX feeds of a batch (views into a pooled buffer set) and that set."""
        b = len(inputs)
        c = max(len(x.cand_rows) for x in inputs)
        k = self.top_k
        buf = self._take(b * c, b)
        n = b * c
        candidates = buf.candidates[:n].reshape(b, c)
        behaviors = buf.behaviors[: n * k].reshape(b, c, k)
        buckets = buf.buckets[: n * k].reshape(b, c, k)
        mask = buf.mask[: n * k].reshape(b, c, k)
        # Reused memory: clear what this batch uses, then write each request's block.
        candidates.fill(0)
        behaviors.fill(0)
        buckets.fill(0)
        mask.fill(0.0)
        for i, x in enumerate(inputs):
            ci, ki = x.beh_rows.shape
            candidates[i, :ci] = x.cand_rows
            behaviors[i, :ci, :ki] = x.beh_rows
            buckets[i, :ci, :ki] = x.beh_buckets
            mask[i, :ci, :ki] = 1.0
        feeds = {"candidates": candidates, "behaviors": behaviors, "buckets": buckets, "mask": mask}
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
        return feeds, buf

    def give_back(self, buf: _Buffers) -> None:
        """Return a buffer set once ORT has finished reading it."""
        self._free.put(buf)


def rank_batch(session: Any, pool: FeedPool, inputs: Sequence[RankInput]) -> list[RankOutput]:
    """Stage 2 of a batch: one `session.run`, outputs split per request without padding."""
    if not inputs:
        return []
    for x in inputs:
        c = len(x.cand_rows)
        if x.beh_rows.shape != x.beh_buckets.shape or x.beh_rows.ndim != 2 or x.beh_rows.shape[0] != c:
            raise ValueError(
                f"behaviors {x.beh_rows.shape} / buckets {x.beh_buckets.shape} for {c} candidates"
            )
        if x.beh_rows.shape[1] > pool.top_k:
            raise ValueError(f"{x.beh_rows.shape[1]} behaviors per candidate, the graph takes {pool.top_k}")
        if x.fm is not None and x.fm.shape != (pool.fm_dim,):
            raise ValueError(f"FM embedding of shape {x.fm.shape}, the graph takes ({pool.fm_dim},)")
    feeds, buf = pool.feeds(inputs)
    try:
        probabilities, attention = session.run(["probability", "attention"], feeds)
    finally:
        pool.give_back(buf)
    out = []
    for i, x in enumerate(inputs):
        c, k = x.beh_rows.shape
        out.append(RankOutput(probabilities[i, :c].copy(), attention[i, :c, :k].copy()))
    return out
