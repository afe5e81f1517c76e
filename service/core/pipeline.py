"""Both stages for a batch of requests of one ranker: rows and buckets, FAISS search, one ORT call.

Stage 2 is fed straight from stage 1: each candidate's retrieved positions and their scores (the
attention logits before scaling), with each distinct retrieved behavior of a request passed once.
A ranker trained with `recent_k` > 0 has its newest behaviors kept in front of the searched ones
(`Stage1Engine.search`), as in training. A ranker trained with an FM history gets the newest of the
user's stored entries of its FM and encoder versions before the request time, decoded
(`fm_history_input`).

Plain synchronous numpy / FAISS / ONNX Runtime: the service runs `score_jobs` in a worker thread,
benchmarks and tests call it directly. No I/O, no asyncio, no HTTP.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from exporters.bundle import Bundle, FmHistorySpec, Manifest
from exporters.features import N_TIME_BUCKETS, time_buckets
from feature_store.base import FmLookup, FmStatus
from feature_store.fm_history import HistoryEntries, select_history
from service.core.ranking import FeedPool, RankInput, rank_batch, rank_input
from service.core.search import Stage1Engine, checked_result, search_pairs


@dataclass(frozen=True, slots=True, eq=False)
class ScoringModel:
    """A loaded ranker bundle with what serving adds: its feed buffers and the providers in use."""

    bundle: Bundle
    feeds: FeedPool
    providers: tuple[str, ...]
    loaded_at: float

    @classmethod
    def from_bundle(cls, bundle: Bundle, warm_batch: int = 2, warm_candidates: int = 1) -> ScoringModel:
        """Wrap a verified ranker bundle and run it once at the largest batch it will be given.

        The first run at a larger shape grows ONNX Runtime's memory arena and the pooled feed
        buffers: a model fresh from a (re)load took about 2.5x its steady time on its first batch
        of 32 x 200 candidates and of 32 x 1,000. Running `warm_batch` requests of
        `warm_candidates` candidates here makes every later batch up to that size take its steady
        time (measured: 32 x 1,000 warms in about 0.5 s for a d=64 ranker).
        """
        if bundle.manifest.model == "fm" or bundle.search_table is None or bundle.time_bias is None:
            raise ValueError(f"{bundle.path} is not a ranker bundle")
        m = bundle.manifest
        if not 0 <= recent_k_of(m) <= m.top_k:
            raise ValueError(f"{bundle.path}: recent_k {recent_k_of(m)} outside [0, top_k={m.top_k}]")
        history_dim = m.fm_history.dim if m.fm_history is not None else 0
        pool = FeedPool(m.top_k, m.dims.fm, fm_history_dim=history_dim)
        model = cls(bundle, pool, tuple(bundle.session.get_providers()), time.time())
        history = (m.fm_history.length, m.fm_history.dim) if m.fm_history is not None else None
        # a small run first: measured, a large first run alone left later batches as slow as unwarmed
        score_jobs(model, warm_jobs(m.n_items, m.top_k, m.dims.fm, 2, 1, history))
        if warm_batch * warm_candidates > 2:
            score_jobs(model, warm_jobs(m.n_items, m.top_k, m.dims.fm, warm_batch, warm_candidates, history))
        return model

    @property
    def variant(self) -> str:
        return self.bundle.manifest.variant

    @property
    def version(self) -> str:
        return self.bundle.manifest.version

    @property
    def top_k(self) -> int:
        return self.bundle.manifest.top_k

    @property
    def recent_k(self) -> int:
        """Newest behaviors stage 1 always keeps (0: all searched)."""
        return recent_k_of(self.bundle.manifest)

    @property
    def fm_dim(self) -> int:
        return self.bundle.manifest.dims.fm

    @property
    def fm_version(self) -> str | None:
        return self.bundle.manifest.fm_version

    @property
    def fm_history(self) -> FmHistorySpec | None:
        """Which FM-history entries the ranker reads; None: it takes none."""
        return self.bundle.manifest.fm_history

    @property
    def max_seq_len(self) -> int:
        """The training window; serving reads as deep as its search depth setting, not this."""
        return self.bundle.manifest.max_seq_len


def recent_k_of(manifest: Manifest) -> int:
    """The ranker config's `recent_k`; 0 for a bundle trained before it existed."""
    config = (manifest.model_extra or {}).get("config") or {}
    return int(config.get("recent_k", 0))


def fm_input(
    lookup: FmLookup, wanted: str | None, fm_dim: int, use_expired: bool
) -> tuple[np.ndarray | None, FmStatus]:
    """The FM vector to feed (None: absent, presence flag 0) and the status to report.

    A stale vector of *another* FM version lives in a different embedding space: never fed. A
    stale vector of the bundle's own version is only old (past the TTL): fed when `use_expired`.
    """
    status, vector = lookup.status, lookup.vector
    if fm_dim == 0 or vector is None or status is FmStatus.MISS:
        return None, status
    if vector.shape != (fm_dim,):
        # Written by another FM than the bundle expects; feeding it would be garbage in.
        return None, FmStatus.MISS
    if status is FmStatus.STALE and not (use_expired and wanted is not None and lookup.version == wanted):
        return None, status
    return np.ascontiguousarray(vector, dtype=np.float32), status


@dataclass(frozen=True, slots=True, eq=False)
class HistoryInput:
    """The FM-history entries fed to a request (None: none, or the ranker takes none), and how many of
    the user's entries before the request were left out as stale (another FM or encoder version)."""

    vectors: np.ndarray | None
    stale: int = 0

    @property
    def used(self) -> int:
        return 0 if self.vectors is None else len(self.vectors)


NO_HISTORY = HistoryInput(None)


def fm_history_input(spec: FmHistorySpec | None, entries: HistoryEntries | None, now: int) -> HistoryInput:
    """The newest `spec.length` stored entries of the ranker's FM and encoder versions strictly before
    `now`, decoded to the graph's prefix; entries of other versions are left out and counted."""
    if spec is None or entries is None or len(entries) == 0:
        return NO_HISTORY
    chosen = select_history(
        entries,
        now=now,
        fm_version=spec.fm_version,
        encoder_version=spec.encoder_version,
        length=spec.length,
        prefix=spec.dim,
    )
    return HistoryInput(chosen.vectors if len(chosen) else None, chosen.stale)


@dataclass(frozen=True, slots=True, eq=False)
class PreparedJob:
    """One request in bundle rows: candidates [C], the user's behaviors [L] with time buckets, and the
    FM inputs (the cached vector [d_fm], FM-history entries [n, d'])."""

    cand_rows: np.ndarray
    beh_rows: np.ndarray
    beh_buckets: np.ndarray
    fm: np.ndarray | None
    unknown_candidates: int
    fm_history: np.ndarray | None = None


def prepare_job(
    model: ScoringModel,
    candidates: np.ndarray,
    items: np.ndarray,
    timestamps: np.ndarray,
    now: int,
    fm: np.ndarray | None,
    fm_history: np.ndarray | None = None,
) -> PreparedJob:
    """Map raw candidate and behavior ids to rows (unknown: row 0) and behavior ages to buckets."""
    cand_rows = model.bundle.rows(candidates)
    beh_rows = model.bundle.rows(items)
    buckets = time_buckets(np.int64(now) - np.asarray(timestamps, np.int64))
    return PreparedJob(cand_rows, beh_rows, buckets, fm, int(np.count_nonzero(cand_rows == 0)), fm_history)


def warm_jobs(
    n_items: int,
    top_k: int,
    fm_dim: int,
    batch: int,
    candidates: int,
    fm_history: tuple[int, int] | None = None,
) -> list[PreparedJob]:
    """`batch` requests of `candidates` candidates over distinct behaviors, as many as a request's
    stage 1 can retrieve (candidates x K) up to 4,096: the feed shapes of a large real batch (with
    `fm_history` = (length, dim), that many FM-history entries each)."""
    known = max(n_items - 1, 1)
    length = min(candidates * top_k, 4096)
    cand_rows = np.arange(candidates, dtype=np.int64) % known + 1
    beh_rows = np.arange(length, dtype=np.int64) % known + 1
    buckets = np.arange(length, dtype=np.int64) % N_TIME_BUCKETS
    fm = np.zeros(fm_dim, np.float32) if fm_dim else None
    entries = np.zeros(fm_history, np.float32) if fm_history is not None else None
    return [PreparedJob(cand_rows, beh_rows, buckets, fm, 0, entries) for _ in range(max(batch, 1))]


@dataclass(frozen=True, slots=True, eq=False)
class ScoredJob:
    """Scores [C] in candidate order; positions [C, k] into the user's sequence and their attention.

    The first `kept` columns of `positions` are the newest behaviors kept by recency (`recent_k`),
    newest first; the others were searched, best first.
    """

    probabilities: np.ndarray
    positions: np.ndarray
    attention: np.ndarray
    search_s: float  # the batch's stage 1 (the engine searches the batch's requests together)
    rank_s: float  # the batch's stage 2 (one ORT call shared by the batch)
    kept: int = 0


_SERIAL = Stage1Engine(threads=1)


def score_jobs(
    model: ScoringModel, jobs: Sequence[PreparedJob], engine: Stage1Engine | None = None
) -> list[ScoredJob]:
    """Both stages for a batch of one model: the batch's searches on the stage-1 engine, one ORT call."""
    engine = engine if engine is not None else _SERIAL
    t0 = time.perf_counter()
    # cold-start users have nothing to search; stage 2 sees no behaviors and all-padding slots
    searched = [i for i, job in enumerate(jobs) if len(job.beh_rows)]
    b = model.bundle
    assert b.search_table is not None and b.time_bias is not None
    pairs = [
        search_pairs(b.search_table, b.time_bias, jobs[i].cand_rows, jobs[i].beh_rows, jobs[i].beh_buckets)
        for i in searched
    ]
    results = engine.search(pairs, model.top_k, model.recent_k)
    positions = [np.zeros((len(job.cand_rows), 0), np.int64) for job in jobs]
    scores = [np.zeros((len(job.cand_rows), 0), np.float32) for job in jobs]
    for i, res in zip(searched, results, strict=True):
        job = jobs[i]
        positions[i], scores[i] = checked_result(res, len(job.cand_rows), len(job.beh_rows), model.top_k)
    search_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    inputs: list[RankInput] = [
        rank_input(job.cand_rows, job.beh_rows, job.beh_buckets, pos, sc, job.fm, job.fm_history)
        for job, pos, sc in zip(jobs, positions, scores, strict=True)
    ]
    outputs = rank_batch(model.bundle.session, model.feeds, inputs)
    rank_s = time.perf_counter() - t0
    return [
        ScoredJob(
            out.probabilities, pos, out.attention, search_s, rank_s, min(model.recent_k, len(job.beh_rows))
        )
        for out, pos, job in zip(outputs, positions, jobs, strict=True)
    ]


def model_summary(model: ScoringModel) -> dict[str, Any]:
    """What `/v1/models` shows of one loaded model."""
    m = model.bundle.manifest
    return {
        "variant": m.variant,
        "version": m.version,
        "model": m.model,
        "dims": m.dims.model_dump(),
        "top_k": m.top_k,
        "max_seq_len": m.max_seq_len,
        "n_items": m.n_items,
        "fm_version": m.fm_version,
        "metrics": m.metrics,
        "created_at": m.created_at,
        "loaded_at": model.loaded_at,
        "execution_providers": list(model.providers),
    }
