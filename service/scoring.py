"""The asynchronous edge of scoring: feature read, then the pure core in a worker thread.

`BatchScorer.run_batch` serves a batch of requests of one model: one `read_users` round trip for
the batch's distinct users, then `score_jobs` (the batch's stage 1 on the engine, one ORT call) in
the compute thread pool, never on the event loop. `Scorer` takes each request to it, through the
`Batcher` that the lifespan built around `run_batch` when batching is on, else as a batch of one:
both paths share this code and give identical scores.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from feature_store.base import FeatureStore, FmStatus, UserFeatures
from feature_store.errors import CorruptFeatureData, FeatureStoreError, FeatureStoreUnavailable
from service.batching import Batcher
from service.core.pipeline import (
    NO_HISTORY,
    HistoryInput,
    ScoredJob,
    ScoringModel,
    fm_history_input,
    fm_input,
    prepare_job,
    score_jobs,
)
from service.core.search import Stage1Engine
from service.errors import StoreDownAnswer, UndecodableUserAnswer, store_error, store_error_kind
from service.loop_lag import LoopLagMonitor
from service.metrics import Metrics

logger = logging.getLogger("dare.service")

# A feature read is tried again when event-loop stalls took at least this share of its budget.
STALL_SHARE = 0.1


@dataclass(frozen=True, slots=True, eq=False)
class ScoreJob:
    """One score request as the scorer takes it."""

    user_id: str
    candidates: np.ndarray  # raw item ids, int64 [C]
    now: int  # reference time of the behaviors' ages (seconds)
    submitted: float  # perf_counter() when the request reached the scorer


@dataclass(frozen=True, slots=True, eq=False)
class ScoreOutcome:
    """A scored request, with what the response and the metrics report."""

    scored: ScoredJob
    items: np.ndarray  # the user's behaviors that were searched (raw ids), for explain
    timestamps: np.ndarray
    sequence_length: int
    fm: FmStatus
    fm_used: bool
    unknown_candidates: int
    queue_s: float
    feature_s: float
    stages_at: float = 0.0  # perf_counter() when the batch's stage 1 began (stage 2 follows it)
    batch_size: int = 1
    fm_history: HistoryInput = NO_HISTORY  # the FM-history entries fed, and those left out as stale

    @property
    def cold_start(self) -> bool:
        return self.sequence_length == 0 and not self.fm_used and not self.fm_history.used


ScoreBatcher = Batcher[ScoringModel, ScoreJob, ScoreOutcome]


class Scorer:
    """Scores one request of a chosen model, batched or not, and records its metrics."""

    def __init__(self, batches: BatchScorer, metrics: Metrics, batcher: ScoreBatcher | None = None) -> None:
        self.batches = batches
        self.metrics = metrics
        self.batcher = batcher

    async def score(self, model: ScoringModel, job: ScoreJob) -> ScoreOutcome:
        m, variant = self.metrics, model.variant
        try:
            if self.batcher is not None:
                outcome = await self.batcher.submit(model, job)
            else:
                result = (await self.batches.run_batch(model, [job]))[0]
                if isinstance(result, BaseException):
                    raise result
                outcome = result
        except StoreDownAnswer:
            m.child(m.score_requests, variant, "unavailable").inc()
            raise
        except UndecodableUserAnswer:
            m.child(m.score_requests, variant, "corrupt").inc()
            raise
        except Exception:
            m.child(m.score_requests, variant, "error").inc()
            raise
        self._observe(variant, job, outcome)
        return outcome

    def _observe(self, variant: str, job: ScoreJob, o: ScoreOutcome) -> None:
        m = self.metrics
        child = m.child
        child(m.score_requests, variant, "ok").inc()
        child(m.score_latency, variant).observe(time.perf_counter() - job.submitted)
        child(m.stage_latency, variant, "queue").observe(o.queue_s)
        child(m.stage_latency, variant, "feature").observe(o.feature_s)
        child(m.stage_latency, variant, "search").observe(o.scored.search_s)
        child(m.stage_latency, variant, "rank").observe(o.scored.rank_s)
        child(m.fm_embeddings, variant, o.fm.value).inc()
        child(m.candidates, variant).observe(len(job.candidates))
        if o.unknown_candidates:
            child(m.unknown_items, variant).inc(o.unknown_candidates)
        if o.cold_start:
            child(m.cold_starts, variant).inc()


class BatchScorer:
    """Scores a batch of requests of one model: one feature read, one compute call."""

    def __init__(
        self,
        store: FeatureStore,
        executor: Executor,
        metrics: Metrics,
        *,
        retry_after_s: int,
        fm_use_expired: bool,
        engine: Stage1Engine | None = None,
        feature_timeout_s: float | None = None,
        search_depth: Callable[[str], int] | None = None,
        loop_lag: LoopLagMonitor | None = None,
    ) -> None:
        self.store = store
        self.executor = executor
        self.metrics = metrics
        self.retry_after_s = retry_after_s
        self.fm_use_expired = fm_use_expired
        self.engine = engine
        self.feature_timeout_s = feature_timeout_s
        # newest stored behaviors read per request of a variant; None: all the store keeps
        self.search_depth = search_depth
        self.loop_lag = loop_lag
        # set by a feature read that failed for want of the store, cleared by the next one that works
        self.store_failing = False

    async def read_features(
        self, model: ScoringModel, user_ids: list[str], budget_s: float | None = None
    ) -> dict[str, UserFeatures | None]:
        """One round trip for the batch's users (a second when the event loop stalled through the
        first); None for a user whose stored data is corrupt."""
        try:
            if budget_s is not None and budget_s <= 0:
                raise FeatureStoreUnavailable("the feature budget ran out while the store was failing")
            users = await self._read_users(model, user_ids, budget_s)
        except CorruptFeatureData as exc:
            self.store_failing = False
            self.metrics.feature_store_errors.labels("corrupt").inc()
            if exc.partial is None:  # e.g. the FM version pointer itself: nothing is usable
                raise store_error(exc, self.retry_after_s) from exc
            return dict(zip(user_ids, exc.partial, strict=True))
        except TimeoutError as exc:
            self.store_failing = True
            self.metrics.feature_store_errors.labels("unavailable").inc()
            raise store_error(FeatureStoreUnavailable("feature budget exceeded"), self.retry_after_s) from exc
        except FeatureStoreError as exc:
            self.store_failing = True
            self.metrics.feature_store_errors.labels(store_error_kind(exc)).inc()
            raise store_error(exc, self.retry_after_s) from exc
        self.store_failing = False
        return dict(zip(user_ids, users, strict=True))

    async def _read_users(
        self, model: ScoringModel, user_ids: list[str], budget_s: float | None
    ) -> list[UserFeatures]:
        """The store's read within the budget, asked again once if loop stalls took the budget.

        A deadline counts wall time, and wall time passes while the event loop is held elsewhere
        (a long callback, a garbage-collection pause, the OS not running the thread): a reply that
        arrived in time sits unread in its socket until the deadline has passed. A store is only
        unavailable if it had its budget of loop time and did not answer; when stalls took a share
        of it, the read is tried again with the part of the budget the store did not get.
        """
        started = time.perf_counter()
        depth = self.depth_of(model)
        history = model.fm_history is not None
        try:
            async with asyncio.timeout(budget_s):
                return await self.store.read_users(
                    user_ids, fm_version=model.fm_version, max_len=depth, fm_history=history
                )
        except (TimeoutError, FeatureStoreUnavailable):
            retry_s = self._budget_lost_to_stalls(started, budget_s)
            if retry_s is None:
                raise
        self.metrics.feature_retries.inc()
        async with asyncio.timeout(retry_s):
            return await self.store.read_users(
                user_ids, fm_version=model.fm_version, max_len=depth, fm_history=history
            )

    def _budget_lost_to_stalls(self, started: float, budget_s: float | None) -> float | None:
        """Seconds of a read's budget that event-loop stalls took since `started`; None when too few
        to matter (the store had its budget) or when nothing measures the loop."""
        budget = budget_s if budget_s is not None else self.feature_timeout_s
        if self.loop_lag is None or budget is None:
            return None
        now = time.perf_counter()
        store_s = (now - started) - self.loop_lag.stalled_between(started, now)
        lost = budget - max(0.0, store_s)
        return lost if lost >= STALL_SHARE * budget else None

    def depth_of(self, model: ScoringModel) -> int | None:
        """Newest stored behaviors a request of this model reads (None: all the store keeps)."""
        return None if self.search_depth is None else self.search_depth(model.variant)

    def feature_budget(self, jobs: list[ScoreJob]) -> float | None:
        """Seconds left for this batch's feature read; None: the store's own timeout alone.

        While the store is failing, time a request spent queued behind batches stuck on it counts
        against its budget, so every request gets its 503 within one feature timeout instead of
        one per batch ahead of it. While the store works, queueing (CPU saturation) never turns
        into a 503: a slow service is not an unreachable store.
        """
        if not self.store_failing or self.feature_timeout_s is None:
            return None
        return self.feature_timeout_s - (time.perf_counter() - min(j.submitted for j in jobs))

    async def run_batch(
        self, model: ScoringModel, jobs: list[ScoreJob]
    ) -> list[ScoreOutcome | BaseException]:
        """Score a batch of requests of one model: one feature read, one compute call."""
        started = time.perf_counter()
        self.metrics.child(self.metrics.batch_size, model.variant).observe(len(jobs))
        users = list(dict.fromkeys(j.user_id for j in jobs))
        features = await self.read_features(model, users, self.feature_budget(jobs))
        feature_s = time.perf_counter() - started
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.executor, self._compute, model, jobs, features, started, feature_s
        )

    def _compute(
        self,
        model: ScoringModel,
        jobs: list[ScoreJob],
        features: dict[str, UserFeatures | None],
        started: float,
        feature_s: float,
    ) -> list[ScoreOutcome | BaseException]:
        """Worker-thread part: rows, buckets and FM choice per request, then both stages."""
        results: list[ScoreOutcome | BaseException] = []
        prepared = []
        for job in jobs:
            user = features[job.user_id]
            if user is None:
                results.append(store_error(CorruptFeatureData("corrupt user data"), self.retry_after_s))
                continue
            vector, status = fm_input(user.fm, model.fm_version, model.fm_dim, self.fm_use_expired)
            history = fm_history_input(model.fm_history, user.fm_history, job.now)
            seq = user.sequence
            prep = prepare_job(
                model, job.candidates, seq.items, seq.timestamps, job.now, vector, history.vectors
            )
            prepared.append((len(results), job, user, prep, status, history))
            results.append(RuntimeError("not scored"))  # replaced below
        if prepared:
            stages_at = time.perf_counter()
            scored = score_jobs(model, [p[3] for p in prepared], self.engine)
            for (slot, job, user, prep, status, history), s in zip(prepared, scored, strict=True):
                seq = user.sequence
                results[slot] = ScoreOutcome(
                    scored=s,
                    items=seq.items,
                    timestamps=seq.timestamps,
                    sequence_length=len(seq),
                    fm=status,
                    fm_used=prep.fm is not None,
                    unknown_candidates=prep.unknown_candidates,
                    queue_s=max(0.0, started - job.submitted),
                    feature_s=feature_s,
                    stages_at=stages_at,
                    batch_size=len(jobs),
                    fm_history=history,
                )
        return results
