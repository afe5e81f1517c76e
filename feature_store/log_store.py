"""The impression and event logs: Redis Streams (bounded XADD), or bounded lists in process memory.

Entries are opaque bytes (the service writes JSON records); each gets a stream id `<ms>-<seq>`,
the time it was written, so a time range of a stream is an id range. Both implementations bound
what they keep: by count (`maxlen`, approximate in Redis: whole macro nodes are dropped) and,
optionally, by age (`retention_s`). The layout is in docs/feature-store.md.
"""

from __future__ import annotations

import abc
import asyncio
import bisect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.exceptions as rexc
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from feature_store.errors import FeatureStoreError, FeatureStoreUnavailable
from feature_store.keys import LOG_STREAMS, KeySpace
from feature_store.redis_store import _UNAVAILABLE

# The one field of a stream entry: the record's bytes.
FIELD = b"r"
DEFAULT_LOG_MAXLEN = 1_000_000
# Most entries one read returns; callers page with `after`.
MAX_PAGE = 100_000


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One stored record and its stream id (`<ms>-<seq>`: when it was written, then arrival order)."""

    id: str
    data: bytes

    @property
    def ms(self) -> int:
        """Milliseconds since the epoch when the entry was written."""
        return int(self.id.partition("-")[0])


def parse_id(entry_id: str) -> tuple[int, int]:
    """(`ms`, `seq`) of a stream id; raises ValueError for anything else."""
    ms, sep, seq = entry_id.partition("-")
    if not ms.isdigit() or (sep and not seq.isdigit()):
        raise ValueError(f"{entry_id!r} is not a stream id (<ms>-<seq>)")
    return int(ms), int(seq or 0)


def check_stream(stream: str) -> None:
    """Raise ValueError unless `stream` names a log stream."""
    if stream not in LOG_STREAMS:
        raise ValueError(f"no log stream {stream!r}; the streams are {', '.join(LOG_STREAMS)}")


def _check_read(stream: str, count: int) -> None:
    check_stream(stream)
    if not 1 <= count <= MAX_PAGE:
        raise ValueError(f"count must lie in [1, {MAX_PAGE}], got {count}")


class LogStore(abc.ABC):
    """Append-only, bounded streams of records."""

    def __init__(self, *, maxlen: int = DEFAULT_LOG_MAXLEN, retention_s: float | None = None) -> None:
        if maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {maxlen}")
        if retention_s is not None and retention_s <= 0:
            raise ValueError(f"retention_s must be positive or None, got {retention_s}")
        self.maxlen = maxlen
        self.retention_s = retention_s

    @abc.abstractmethod
    async def append(self, entries: Sequence[tuple[str, bytes]]) -> None:
        """Append (stream, record) pairs in one round trip, in order; trims each stream to its bounds."""

    @abc.abstractmethod
    async def read(
        self,
        stream: str,
        *,
        after: str | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        count: int = 10_000,
    ) -> list[LogEntry]:
        """Up to `count` entries, oldest first: after the id `after` (exclusive), else from `since_ms`,
        up to `until_ms` (inclusive)."""

    @abc.abstractmethod
    async def length(self, stream: str) -> int:
        """Entries the stream holds now."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections."""

    def _min_ms(self) -> int | None:
        return None if self.retention_s is None else int((time.time() - self.retention_s) * 1000)


class RedisLogStore(LogStore):
    """Streams in Redis; owns its client (not the feature store's: log writes never take its pool)."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        namespace: str = "dare",
        timeout_s: float = 1.0,
        maxlen: int = DEFAULT_LOG_MAXLEN,
        retention_s: float | None = None,
    ) -> None:
        super().__init__(maxlen=maxlen, retention_s=retention_s)
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self._client = client
        self._timeout_s = timeout_s
        self.keys = KeySpace(namespace)

    @property
    def client(self) -> Redis | RedisCluster:
        """The underlying redis-py client (for operators and tests)."""
        return self._client

    async def _call(self, what: str, fn: Any) -> Any:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await fn()
        except (TimeoutError, rexc.TimeoutError) as exc:
            raise FeatureStoreUnavailable(f"{what}: no answer within {self._timeout_s:g}s") from exc
        except _UNAVAILABLE as exc:
            raise FeatureStoreUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc
        except rexc.RedisError as exc:
            raise FeatureStoreError(f"{what}: {type(exc).__name__}: {exc}") from exc

    async def append(self, entries: Sequence[tuple[str, bytes]]) -> None:
        """XADD each record with `MAXLEN ~`; with a retention, one `XTRIM MINID ~` per stream written."""
        if not entries:
            return
        keys = {stream: self.keys.log(stream) for stream in {s for s, _ in entries}}
        min_ms = self._min_ms()

        async def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for stream, data in entries:
                # Approximate trimming drops whole radix-tree nodes, which costs O(1) per XADD; an
                # exact MAXLEN would trim on every call.
                pipe.xadd(keys[stream], {FIELD: data}, maxlen=self.maxlen, approximate=True)
            if min_ms is not None:
                for key in keys.values():
                    pipe.xtrim(key, minid=min_ms, approximate=True)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            error = next((r for r in results if isinstance(r, Exception)), None)
            if error is not None:
                raise error
            return results

        await self._call("log append", run)

    async def read(
        self,
        stream: str,
        *,
        after: str | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        count: int = 10_000,
    ) -> list[LogEntry]:
        """XRANGE over the stream's ids."""
        _check_read(stream, count)
        if after is not None:
            parse_id(after)
            low = f"({after}"
        else:
            low = "-" if since_ms is None else str(since_ms)
        high = "+" if until_ms is None else str(until_ms)
        key = self.keys.log(stream)
        rows = await self._call("log read", lambda: self._client.xrange(key, low, high, count=count))
        out = []
        for entry_id, fields in rows:
            data = fields.get(FIELD)
            if data is None:
                raise FeatureStoreError(f"log entry {entry_id!r} of {stream} has no {FIELD!r} field")
            out.append(LogEntry(entry_id.decode("ascii"), bytes(data)))
        return out

    async def length(self, stream: str) -> int:
        """XLEN of the stream (0 when it does not exist yet)."""
        key = self.keys.log(stream)
        return int(await self._call("log length", lambda: self._client.xlen(key)))

    async def aclose(self) -> None:
        """Close the client and its pool."""
        await self._client.aclose()


class InMemoryLogStore(LogStore):
    """The embedded default: each stream a list of records with a moving head; ids as Redis makes them."""

    def __init__(self, *, maxlen: int = DEFAULT_LOG_MAXLEN, retention_s: float | None = None) -> None:
        super().__init__(maxlen=maxlen, retention_s=retention_s)
        self._ids: dict[str, list[tuple[int, int]]] = {s: [] for s in LOG_STREAMS}
        self._data: dict[str, list[bytes]] = {s: [] for s in LOG_STREAMS}
        self._head: dict[str, int] = dict.fromkeys(LOG_STREAMS, 0)

    async def append(self, entries: Sequence[tuple[str, bytes]]) -> None:
        """Append with ids `<ms>-<seq>` that only grow, then trim each stream to its bounds."""
        now_ms = int(time.time() * 1000)
        touched = set()
        for stream, data in entries:
            ids = self._ids[stream]
            last = ids[-1] if ids else (0, -1)
            ms = max(now_ms, last[0])
            ids.append((ms, last[1] + 1 if ms == last[0] else 0))
            self._data[stream].append(data)
            touched.add(stream)
        for stream in touched:
            self._trim(stream)

    def _trim(self, stream: str) -> None:
        ids, head = self._ids[stream], self._head[stream]
        head = max(head, len(ids) - self.maxlen)
        min_ms = self._min_ms()
        if min_ms is not None:
            head = max(head, bisect.bisect_left(ids, (min_ms, 0), lo=head))
        # Dropping the head only now and then keeps appends O(1) amortized.
        if head > 1024 and head * 2 > len(ids):
            del ids[:head], self._data[stream][:head]
            head = 0
        self._head[stream] = head

    async def read(
        self,
        stream: str,
        *,
        after: str | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        count: int = 10_000,
    ) -> list[LogEntry]:
        """The same ranges as XRANGE."""
        _check_read(stream, count)
        ids, head = self._ids[stream], self._head[stream]
        if after is not None:
            start = bisect.bisect_right(ids, parse_id(after), lo=head)
        else:
            start = bisect.bisect_left(ids, (since_ms or 0, 0), lo=head)
        stop = len(ids) if until_ms is None else bisect.bisect_right(ids, (until_ms, 1 << 62), lo=start)
        stop = min(stop, start + count)
        data = self._data[stream]
        return [LogEntry(f"{ms}-{seq}", data[i]) for i, (ms, seq) in enumerate(ids[start:stop], start)]

    async def length(self, stream: str) -> int:
        """Entries held."""
        check_stream(stream)
        return len(self._ids[stream]) - self._head[stream]

    async def aclose(self) -> None:
        """Nothing to release; the entries stay until the process ends."""
