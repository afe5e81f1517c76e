"""Dynamic batching: one consumer coalesces concurrent requests of one key into one call.

Requests are queued with their key (here: the `ScoringModel` they picked, i.e. one variant at one
version). The consumer takes the first waiting request, then collects more until `max_size` or
until `max_wait` after the first has passed (the deadline shrinks as it waits), groups them by
key and runs one `process(key, items)` per group. Results and exceptions are fanned out to the
per-request futures (Ray Serve's batching, without its decorator magic). Up to `max_concurrency`
groups run at once, so one batch can read features while another computes; requests arriving
meanwhile form the next batch. When no batch is running the consumer does not wait at all: an
idle service answers a lone request without the batching delay.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from service.errors import ShuttingDown

logger = logging.getLogger("dare.service")

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")


@dataclass(slots=True)
class _Pending(Generic[K, T, R]):
    key: K
    item: T
    future: asyncio.Future[R]


class Batcher(Generic[K, T, R]):
    """Coalesces `submit(key, item)` calls; `process(key, items)` returns one result or exception each."""

    def __init__(
        self,
        process: Callable[[K, list[T]], Awaitable[list[R | BaseException]]],
        *,
        max_size: int,
        max_wait_s: float,
        max_concurrency: int,
    ) -> None:
        if max_size < 1 or max_wait_s < 0 or max_concurrency < 1:
            raise ValueError("max_size and max_concurrency must be >= 1, max_wait_s >= 0")
        self._process = process
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self._slots = asyncio.Semaphore(max_concurrency)
        self._pending: collections.deque[_Pending[K, T, R]] = collections.deque()
        self._arrived = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        self._consumer: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        """Start the consumer task on the running loop."""
        if self._consumer is None:
            self._consumer = asyncio.create_task(self._consume(), name="dare-batcher")

    async def submit(self, key: K, item: T) -> R:
        """Queue one item and wait for its result (or its exception)."""
        if self._closed:
            raise ShuttingDown("the service is shutting down")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(key, item, future))
        self._arrived.set()
        return await future

    async def _collect(self) -> list[_Pending[K, T, R]]:
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        batch = [self._pending.popleft()]
        # Waiting pays only when requests overlap: an idle batcher (no batch running) sends what is
        # already queued at once, so a lone request never waits; under load, batches form.
        wait = self.max_wait_s if self._running else 0.0
        deadline = time.monotonic() + wait
        while len(batch) < self.max_size:
            if self._pending:
                batch.append(self._pending.popleft())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                break
        return batch

    async def _consume(self) -> None:
        while True:
            try:
                batch = await self._collect()
                groups: dict[K, list[_Pending[K, T, R]]] = {}
                for p in batch:
                    if not p.future.done():  # the caller may have gone (cancelled)
                        groups.setdefault(p.key, []).append(p)
                for key, group in groups.items():
                    await self._slots.acquire()
                    task = asyncio.create_task(self._run(key, group))
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
            except asyncio.CancelledError:
                raise
            except Exception:  # the consumer must outlive any single batch
                logger.exception("batch consumer error")

    async def _run(self, key: K, group: list[_Pending[K, T, R]]) -> None:
        try:
            results = await self._process(key, [p.item for p in group])
            if len(results) != len(group):
                raise RuntimeError(f"batch of {len(group)} returned {len(results)} results")
        except asyncio.CancelledError:
            for p in group:
                if not p.future.done():
                    p.future.set_exception(ShuttingDown("the service is shutting down"))
            raise
        except Exception as exc:
            for p in group:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        finally:
            self._slots.release()
        for p, result in zip(group, results, strict=True):
            if p.future.done():
                continue
            if isinstance(result, BaseException):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)

    async def aclose(self) -> None:
        """Stop taking requests, let running batches finish, fail whatever is still queued."""
        self._closed = True
        if self._consumer is not None:
            self._consumer.cancel()
            await asyncio.gather(self._consumer, return_exceptions=True)
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        while self._pending:
            p = self._pending.popleft()
            if not p.future.done():
                p.future.set_exception(ShuttingDown("the service is shutting down"))
