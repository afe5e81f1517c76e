"""The impression log's writer: what each arm served, and the events that followed, off the request path.

A request hands its record to `LogWriter.offer`, which never awaits and never raises: the record
goes into a bounded queue, or is dropped and counted when the queue is full. One background task
(started in the lifespan) drains the queue in batches, encodes the records as JSON and appends each
batch to the log store in one round trip. A write that fails or runs out of time drops its batch,
counted by reason in `dare_impression_log_dropped_total`; scoring never waits for the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import orjson

from feature_store.log_store import LogStore
from service.core.ab import in_log_sample
from service.metrics import Metrics

logger = logging.getLogger("dare.service")

RECORD_FORMAT = 1
DropReason = Literal["queue_full", "write_failed", "shutdown", "error"]
DROP_REASONS: tuple[DropReason, ...] = ("queue_full", "write_failed", "shutdown", "error")
# Seconds between two warnings about dropped records (a log outage would otherwise log per batch).
_WARN_EVERY_S = 10.0


@dataclass(frozen=True, slots=True, eq=False)
class ServedImpression:
    """One answered score request: who was shown what, by which arm, with which scores."""

    request_id: str
    ts: int  # the request's reference time: its `timestamp`, else the server's clock (seconds)
    served_at: float  # the server's clock when it answered (seconds)
    user_id: str
    variant: str
    model_version: str
    assigned_by: Literal["hash", "header"]  # the A/B hash, or an `X-Experiment` override
    fm_embedding: str
    candidates: np.ndarray  # int64 [C], request order
    scores: np.ndarray  # [C] the served probabilities

    stream: ClassVar[str] = "impressions"


@dataclass(frozen=True, slots=True, eq=False)
class LoggedEvents:
    """One accepted `POST /v1/events`: a user's behaviors and their type."""

    user_id: str
    items: np.ndarray  # int64 [E]
    timestamps: np.ndarray  # int64 [E], the client's seconds
    type: str
    logged_at: float

    stream: ClassVar[str] = "events"


Record = ServedImpression | LoggedEvents


def score_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of each score, highest first; equal scores keep their candidate order."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(1, len(order) + 1)
    return ranks


def encode_impression(imp: ServedImpression, top_n: int | None = None) -> bytes:
    """The JSON record of an impression: candidates in request order with their scores and ranks,
    only the `top_n` best-ranked when given."""
    scores = np.asarray(imp.scores, dtype=np.float64)  # float64: the exact values the response carried
    ranks = score_ranks(scores)
    candidates = np.asarray(imp.candidates, dtype=np.int64)
    if top_n is not None and top_n < len(ranks):
        keep = ranks <= top_n
        candidates, scores, ranks = candidates[keep], scores[keep], ranks[keep]
    return orjson.dumps(
        {
            "v": RECORD_FORMAT,
            "request_id": imp.request_id,
            "ts": imp.ts,
            "served_at": imp.served_at,
            "user_id": imp.user_id,
            "variant": imp.variant,
            "model_version": imp.model_version,
            "assigned_by": imp.assigned_by,
            "fm_embedding": imp.fm_embedding,
            "n_candidates": len(imp.candidates),
            "candidates": candidates,
            "scores": scores,
            "ranks": ranks,
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


def encode_events(ev: LoggedEvents) -> bytes:
    """The JSON record of a user's appended behaviors."""
    return orjson.dumps(
        {
            "v": RECORD_FORMAT,
            "user_id": ev.user_id,
            "type": ev.type,
            "logged_at": ev.logged_at,
            "items": np.asarray(ev.items, dtype=np.int64),
            "timestamps": np.asarray(ev.timestamps, dtype=np.int64),
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


def encode_record(record: Record, top_n: int | None = None) -> bytes:
    """A record's bytes in the log."""
    if isinstance(record, ServedImpression):
        return encode_impression(record, top_n)
    return encode_events(record)


class LogWriter:
    """A bounded queue of records and the one task that writes them to the log store in batches."""

    def __init__(
        self,
        store: LogStore,
        metrics: Metrics,
        *,
        salt: str,
        sample: float = 1.0,
        top_n: int | None = None,
        queue_size: int = 10_000,
        batch_size: int = 256,
    ) -> None:
        if not 0 < sample <= 1:
            raise ValueError(f"sample must lie in (0, 1], got {sample}")
        if queue_size < 1 or batch_size < 1:
            raise ValueError("queue_size and batch_size must be >= 1")
        self.store = store
        self.metrics = metrics
        self.salt = salt
        self.sample = sample
        self.top_n = top_n
        self.batch_size = batch_size
        self._queue: asyncio.Queue[Record] = asyncio.Queue(queue_size)
        self._task: asyncio.Task[None] | None = None
        self._accepting = True
        self._last_warning = 0.0
        self._unreported = 0
        for stream in (ServedImpression.stream, LoggedEvents.stream):
            metrics.child(metrics.log_written, stream)
            for reason in DROP_REASONS:
                metrics.child(metrics.log_dropped, stream, reason)
        metrics.log_queue.set_function(self._queue.qsize)

    def keeps(self, user_id: str) -> bool:
        """Whether this user is in the logged sample."""
        return in_log_sample(user_id, self.salt, self.sample)

    def offer(self, record: Record) -> None:
        """Queue a record of a sampled user without waiting; a full queue drops it (counted)."""
        try:
            if not self.keeps(record.user_id):
                return
            if not self._accepting:
                self._drop(record.stream, "shutdown", 1)
                return
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self._drop(record.stream, "queue_full", 1)
        except Exception:  # the log must never fail the request that offers to it
            logger.exception("impression log: could not queue a record")
            self._drop(record.stream, "error", 1)

    def start(self) -> None:
        """Start the writing task (in the running event loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="dare-impression-log")

    async def flush(self) -> None:
        """Wait until every record queued so far is written or dropped."""
        await self._queue.join()

    async def aclose(self, drain_s: float = 5.0) -> None:
        """Stop taking records, write what is queued (within `drain_s`), drop and count the rest."""
        self._accepting = False
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_s):
                    await self._queue.join()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while not self._queue.empty():
            self._drop(self._queue.get_nowait().stream, "shutdown", 1)
            self._queue.task_done()

    async def _run(self) -> None:
        queue = self._queue
        while True:
            batch = [await queue.get()]
            while len(batch) < self.batch_size and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                await self._write(batch)
            finally:
                for _ in batch:
                    queue.task_done()

    async def _write(self, batch: list[Record]) -> None:
        entries: list[tuple[str, bytes]] = []
        for record in batch:
            try:
                entries.append((record.stream, encode_record(record, self.top_n)))
            except Exception:
                logger.exception("impression log: could not encode a record of user %r", record.user_id)
                self._drop(record.stream, "error", 1)
        if not entries:
            return
        try:
            await self.store.append(entries)
        except asyncio.CancelledError:  # closed while the log did not answer
            for stream, n in _per_stream(entries).items():
                self._drop(stream, "shutdown", n)
            raise
        except Exception as exc:  # a store error, a timeout, a bug: the batch is lost, scoring goes on
            for stream, n in _per_stream(entries).items():
                self._drop(stream, "write_failed", n, exc)
            return
        m = self.metrics
        for stream, n in _per_stream(entries).items():
            m.child(m.log_written, stream).inc(n)

    def _drop(self, stream: str, reason: DropReason, n: int, exc: BaseException | None = None) -> None:
        m = self.metrics
        m.child(m.log_dropped, stream, reason).inc(n)
        self._unreported += n
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            cause = f": {type(exc).__name__}: {exc}" if exc is not None else ""
            logger.warning(
                "impression log: dropped %d record(s) (%s, latest %s)%s",
                self._unreported, reason, stream, cause,
            )  # fmt: skip
            self._last_warning, self._unreported = now, 0


def _per_stream(entries: list[tuple[str, bytes]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for stream, _ in entries:
        counts[stream] = counts.get(stream, 0) + 1
    return counts
