"""The Redis (single node or Cluster) store: one pipeline per read, Lua for atomic capped appends."""

from __future__ import annotations

import asyncio
import hashlib
import time
from asyncio import timeout as _timeout
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import redis.exceptions as rexc
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from feature_store import codec
from feature_store.base import (
    DEFAULT_FM_HISTORY_MAX_LEN,
    DEFAULT_MAX_LEN,
    FeatureStore,
    UserFeatures,
    UserSequence,
    check_version,
)
from feature_store.errors import CorruptFeatureData, FeatureStoreError, FeatureStoreUnavailable
from feature_store.fm_history import HistoryEntries, version_id
from feature_store.keys import KeySpace

T = TypeVar("T")
RedisClient = Redis | RedisCluster

# Appends run server-side so concurrent writers never read-modify-write from Python. The length
# check keeps a corrupt value from being extended into a misaligned one. The trim rewrites the
# string to its newest `cap` bytes only once it is `slack` bytes over the cap: a full history then
# pays one copy of the cap per `slack` appended bytes instead of one per append (at a cap of
# 100,000 events that copy is ~2 ms of Redis time). Reads never return more than the cap.
APPEND_SCRIPT = """
local rec = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local slack = tonumber(ARGV[4])
local cur = redis.call('STRLEN', KEYS[1])
if cur % rec ~= 0 then
  return redis.error_reply('DARECORRUPT sequence length ' .. cur .. ' is not a multiple of ' .. rec)
end
local n = redis.call('APPEND', KEYS[1], ARGV[1])
if n > cap + slack then
  redis.call('SET', KEYS[1], redis.call('GETRANGE', KEYS[1], n - cap, -1))
  n = cap
end
return n
"""
# A stored sequence may run this share of the cap past it between two trims (memory for CPU).
TRIM_SLACK_SHARE = 16

# Keeps at most two versions per user: the one written and the one readers use now, so writing
# a new FM version in the background never takes the active vector away.
FM_WRITE_SCRIPT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local fields = redis.call('HKEYS', KEYS[1])
for _, f in ipairs(fields) do
  if f ~= ARGV[1] and f ~= ARGV[3] then redis.call('HDEL', KEYS[1], f) end
end
return #fields
"""

# Replaces one (FM, encoder) version pair's FM-history entries atomically. ARGV: the pair's 8 id bytes
# (bytes 9-16 of an entry), the active FM's 4 id bytes (or empty), the cap, then the new entries.
# Entries of the written FM (other encoders) and of the active FM are kept, ahead of the new ones,
# so a reader of the version in use keeps its entries while another is written; everything else is
# dropped. The cap keeps the newest positions: the written entries first. RPUSH in pieces, because
# Lua's unpack has a limit of a few thousand values.
FM_HISTORY_WRITE_SCRIPT = """
local pair = ARGV[1]
local written_fm = string.sub(pair, 1, 4)
local keep_fm = ARGV[2]
local cap = tonumber(ARGV[3])
local entries = {}
for _, e in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  local fm = string.sub(e, 9, 12)
  if string.sub(e, 9, 16) ~= pair and (fm == written_fm or fm == keep_fm) then
    entries[#entries + 1] = e
  end
end
for i = 4, #ARGV do entries[#entries + 1] = ARGV[i] end
redis.call('DEL', KEYS[1])
local first = math.max(1, #entries - cap + 1)
for i = first, #entries, 1000 do
  redis.call('RPUSH', KEYS[1], unpack(entries, i, math.min(i + 999, #entries)))
end
return #entries - first + 1
"""

# Appends entries and keeps the newest `cap` (ARGV[1]); returns the count kept.
FM_HISTORY_APPEND_SCRIPT = """
local cap = tonumber(ARGV[1])
for i = 2, #ARGV, 1000 do
  redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('LTRIM', KEYS[1], -cap, -1)
return redis.call('LLEN', KEYS[1])
"""

_SHA = {
    script: hashlib.sha1(script.encode()).hexdigest()
    for script in (APPEND_SCRIPT, FM_WRITE_SCRIPT, FM_HISTORY_WRITE_SCRIPT, FM_HISTORY_APPEND_SCRIPT)
}

# Errors meaning "the store is not there right now" (the service answers 503). RedisClusterException
# is what the cluster client raises when no node of the topology answers.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.ClusterDownError,
    rexc.TryAgainError,
    rexc.ReadOnlyError,
    rexc.RedisClusterException,
    OSError,
)

# Bulk writes are cut into pipelines of this size, so each one stays well inside the per-call timeout.
_CHUNK_BYTES = 4 << 20
_CHUNK_USERS = 2_000


def _tail_range(n_bytes: int) -> tuple[int, int]:
    # A negative start clamps to 0: the newest n_bytes, or all of a shorter sequence. Start 1 >
    # end 0 reads nothing (for max_len=0; "-0" would read the whole string).
    return (-n_bytes, -1) if n_bytes else (1, 0)


def _split_sequence(replies: list[Any], n_bytes: int) -> tuple[bytes, int]:
    """(newest n_bytes, stored length) from the replies queued by `_queue_sequence`."""
    if len(replies) == 1:
        data = replies[0] or b""
        # Longer than asked between two trims of appends at the cap, or when max_len was lowered.
        return (data if len(data) <= n_bytes else data[-n_bytes:]), len(data)
    total, tail = replies
    return tail, int(total)


def _wrong_data(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, rexc.ResponseError) and ("WRONGTYPE" in text or "DARECORRUPT" in text)


class RedisFeatureStore(FeatureStore):
    """Feature store on a redis-py asyncio client (`Redis` or `RedisCluster`), which it owns and closes."""

    def __init__(
        self,
        client: RedisClient,
        *,
        timeout_s: float = 0.25,
        max_len: int = DEFAULT_MAX_LEN,
        fm_ttl_s: float | None = None,
        pool_size: int = 64,
        namespace: str = "dare",
        fm_history_max_len: int = DEFAULT_FM_HISTORY_MAX_LEN,
    ) -> None:
        super().__init__(max_len=max_len, fm_ttl_s=fm_ttl_s, fm_history_max_len=fm_history_max_len)
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self._client = client
        self._timeout_s = timeout_s
        self.keys = KeySpace(namespace)
        # The cluster client raises instead of waiting when a node's pool is exhausted; bounding the
        # calls in flight (inside the timeout) turns a burst into queueing, for both client kinds.
        self._slots = asyncio.Semaphore(pool_size)
        self._topology_lock = asyncio.Lock()

    @property
    def client(self) -> RedisClient:
        """The underlying redis-py client (for operators and tests)."""
        return self._client

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one round trip under the timeout; translate Redis failures into store errors."""
        try:
            async with _timeout(self._timeout_s), self._slots:
                await self._ensure_topology()
                return await fn()
        except (TimeoutError, rexc.TimeoutError) as exc:
            self.stats.errors += 1
            self.stats.timeouts += 1
            raise FeatureStoreUnavailable(f"{what}: no answer within {self._timeout_s:g}s") from exc
        except CorruptFeatureData:
            raise
        except _UNAVAILABLE as exc:
            self.stats.errors += 1
            raise FeatureStoreUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc
        except rexc.RedisError as exc:
            self.stats.errors += 1
            raise FeatureStoreError(f"{what}: {type(exc).__name__}: {exc}") from exc

    async def _ensure_topology(self) -> None:
        """Load the cluster's slot map once before commands are routed.

        redis-py's cluster client routes a command issued while it has no slot map (first use, or
        after it dropped the map on CLUSTERDOWN) to a random node; under concurrency the MOVED
        replies make it close every connection, including those of calls in flight. Loading the map
        here, one caller at a time, keeps concurrent first calls from racing.
        """
        if not isinstance(self._client, RedisCluster) or self._client.get_default_node() is not None:
            return
        async with self._topology_lock:
            if self._client.get_default_node() is None:
                await self._client.initialize()

    async def _execute(self, pipe: Any) -> list[Any]:
        """Execute a pipeline; per-command data errors stay in the results, outages raise."""
        results: list[Any] = await pipe.execute(raise_on_error=False)
        for result in results:
            # The cluster pipeline reports a node's connection failure per command, not by raising.
            if isinstance(result, _UNAVAILABLE):
                raise result
        return results

    async def _eval(self, script: str, key: bytes, *args: bytes | int) -> Any:
        try:
            return await self._client.evalsha(_SHA[script], 1, key, *args)
        except rexc.NoScriptError:
            # The node has not cached the script yet (new or restarted): EVAL sends and caches it.
            return await self._client.eval(script, 1, key, *args)

    async def read_users(
        self,
        user_ids: list[str],
        *,
        fm_version: str | None = None,
        max_len: int | None = None,
        fm_history: bool = False,
    ) -> list[UserFeatures]:
        """Sequences and FM embeddings (and FM histories) of many users in one pipeline (grouped by node
        on a cluster)."""
        n_bytes = self._read_len(max_len) * codec.EVENT_BYTES
        seq_width = self._sequence_width(n_bytes)
        width = seq_width + 1 + int(fm_history)
        if not user_ids:
            return []

        async def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            if fm_version is None:
                pipe.get(self.keys.fm_active())
            for uid in user_ids:
                self._queue_sequence(pipe, self.keys.sequence(uid), n_bytes)
                pipe.hgetall(self.keys.fm(uid))
                if fm_history:
                    # the whole list: it is capped, and which entries fit a request is decided later
                    pipe.lrange(self.keys.fm_history(uid), 0, -1)
            return await self._execute(pipe)

        results = await self._call("read_users", run)
        wanted = fm_version
        if fm_version is None:
            wanted = self._decode_pointer(results[0])
            results = results[1:]
        now = time.time()
        decoded: list[UserFeatures | str] = []
        for i, uid in enumerate(user_ids):
            replies = results[width * i : width * (i + 1)]
            error = next((r for r in replies if isinstance(r, Exception)), None)
            if error is not None:
                decoded.append(self._data_error(uid, error))
                continue
            tail, total = _split_sequence(replies[:seq_width], n_bytes)
            history = replies[seq_width + 1] if fm_history else None
            decoded.append(self._decode_user(uid, tail, total, replies[seq_width], wanted, now, history))
        return self._finish_batch(user_ids, decoded)

    def _sequence_width(self, n_bytes: int) -> int:
        return 1 if n_bytes >= self.max_len * codec.EVENT_BYTES else 2

    def _queue_sequence(self, pipe: Any, key: bytes, n_bytes: int) -> None:
        """Queue the reads of a sequence's newest n_bytes: GET when that is all the store keeps."""
        if self._sequence_width(n_bytes) == 1:
            # Stored values hold at most max_len plus the trim slack (1/16), so a full read is one
            # GET, and its length is the stored length that the alignment check needs.
            pipe.get(key)
        else:
            # Only the tail is fetched; STRLEN still checks the alignment of the whole value.
            pipe.strlen(key)
            pipe.getrange(key, *_tail_range(n_bytes))

    def _data_error(self, user_id: str, error: Exception) -> str:
        if not _wrong_data(error):
            self.stats.errors += 1
            raise FeatureStoreError(f"read of user {user_id!r} failed: {error}") from error
        return self._corrupt(user_id, "key", error)

    def _decode_pointer(self, raw: Any) -> str | None:
        if raw is None:
            return None
        try:
            if isinstance(raw, Exception):
                raise raw
            return bytes(raw).decode("utf-8")
        except (UnicodeDecodeError, rexc.ResponseError) as exc:
            self.stats.corrupt_reads += 1
            raise CorruptFeatureData(f"the active FM version pointer is corrupt: {exc}") from exc

    async def read_sequence(self, user_id: str, max_len: int | None = None) -> UserSequence:
        """The newest `max_len` events of one user in one round trip."""
        n_bytes = self._read_len(max_len) * codec.EVENT_BYTES
        key = self.keys.sequence(user_id)

        async def run() -> list[Any]:
            if self._sequence_width(n_bytes) == 1:
                # The common full read skips the pipeline machinery (a tenth of a millisecond).
                try:
                    return [await self._client.get(key)]
                except rexc.ResponseError as exc:
                    if not _wrong_data(exc):
                        raise
                    return [exc]
            pipe = self._client.pipeline(transaction=False)
            self._queue_sequence(pipe, key, n_bytes)
            return await self._execute(pipe)

        replies = await self._call("read_sequence", run)
        error = next((r for r in replies if isinstance(r, Exception)), None)
        if error is not None:
            raise CorruptFeatureData(self._data_error(user_id, error), user_ids=[user_id]) from error
        tail, total = _split_sequence(replies, n_bytes)
        return self._decode_sequence(user_id, tail, total)

    async def append_events(self, user_id: str, items: np.ndarray, timestamps: np.ndarray) -> int:
        """Append events atomically server-side (APPEND + trim in one Lua script); returns the length."""
        data = codec.encode_events(items, timestamps)
        key = self.keys.sequence(user_id)
        cap = self.max_len * codec.EVENT_BYTES
        slack = self.max_len // TRIM_SLACK_SHARE * codec.EVENT_BYTES

        async def run() -> int:
            try:
                if not data:
                    return int(await self._client.strlen(key))
                return int(await self._eval(APPEND_SCRIPT, key, data, codec.EVENT_BYTES, cap, slack))
            except rexc.ResponseError as exc:
                if not _wrong_data(exc):
                    raise
                message = self._corrupt(user_id, "sequence", exc)
                raise CorruptFeatureData(message, user_ids=[user_id]) from exc

        n_bytes = await self._call("append_events", run)
        if n_bytes % codec.EVENT_BYTES:
            message = self._corrupt(user_id, "sequence", f"{n_bytes} bytes stored")
            raise CorruptFeatureData(message, user_ids=[user_id])
        return min(n_bytes, cap) // codec.EVENT_BYTES  # the events a read returns

    async def replace_sequences(self, sequences: Mapping[str, UserSequence]) -> None:
        """SET whole sequences (DEL when empty) in pipelines of at most ~4 MB."""
        batch: list[tuple[bytes, bytes]] = []
        size = 0
        for uid, seq in sequences.items():
            data = self._encode_replacement(seq)
            batch.append((self.keys.sequence(uid), data))
            size += len(data)
            if size >= _CHUNK_BYTES or len(batch) >= _CHUNK_USERS:
                await self._replace_chunk(batch)
                batch, size = [], 0
        if batch:
            await self._replace_chunk(batch)

    async def _replace_chunk(self, batch: list[tuple[bytes, bytes]]) -> None:
        async def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for key, data in batch:
                if data:
                    pipe.set(key, data)
                else:
                    pipe.delete(key)
            return await self._execute(pipe)

        results = await self._call("replace_sequences", run)
        self._raise_first_error("replace_sequences", results)

    async def write_fm_embeddings(
        self, version: str, user_ids: list[str], vectors: np.ndarray, *, written_at: float | None = None
    ) -> None:
        """Store one embedding per user under `version` in pipelines; keeps the active version's vector."""
        blobs = self._encode_fm_batch(version, user_ids, vectors, written_at)
        keep = (await self.active_fm_version() or "").encode()
        pairs = list(zip(user_ids, blobs, strict=True))
        for start in range(0, len(pairs), _CHUNK_USERS):
            await self._write_fm_chunk(version.encode(), pairs[start : start + _CHUNK_USERS], keep)

    async def _write_fm_chunk(self, version: bytes, chunk: list[tuple[str, bytes]], keep: bytes) -> None:
        calls: list[tuple[bytes, list[bytes | int]]] = [
            (self.keys.fm(uid), [version, blob, keep]) for uid, blob in chunk
        ]
        results = await self._call("write_fm_embeddings", lambda: self._eval_each(FM_WRITE_SCRIPT, calls))
        self._check_script_writes(
            "write_fm_embeddings", "FM key", "a hash", [uid for uid, _ in chunk], results
        )

    async def _eval_each(self, script: str, calls: list[tuple[bytes, list[bytes | int]]]) -> list[Any]:
        """One pipeline running `script` once per (key, args); per-call errors stay in the results."""
        pipe = self._client.pipeline(transaction=False)
        for key, args in calls:
            # Through execute_command: redis-py blocks the evalsha *method* on cluster pipelines,
            # but the command routes by its key like any other; NOSCRIPT is handled below.
            pipe.execute_command("EVALSHA", _SHA[script], 1, key, *args)
        results = await self._execute(pipe)
        missing = [i for i, r in enumerate(results) if isinstance(r, rexc.NoScriptError)]
        if missing:
            # A node that has not cached the script yet: resend those calls with the body.
            retry = self._client.pipeline(transaction=False)
            for i in missing:
                key, args = calls[i]
                retry.eval(script, 1, key, *args)
            for i, result in zip(missing, await self._execute(retry), strict=True):
                results[i] = result
        return results

    def _check_script_writes(
        self, what: str, key_kind: str, type_name: str, user_ids: list[str], results: list[Any]
    ) -> None:
        """Raise CorruptFeatureData for users whose key held the wrong type, else the first other error."""
        bad = [uid for uid, r in zip(user_ids, results, strict=True) if _wrong_data(r)]
        if bad:
            for uid in bad:
                self._corrupt(uid, key_kind, f"holds a value that is not {type_name}")
            raise CorruptFeatureData(f"{key_kind}s of users {bad!r} hold the wrong type", user_ids=bad)
        self._raise_first_error(what, results)

    async def write_fm_history(
        self, fm_version: str, encoder_version: str, histories: Mapping[str, Sequence[bytes]]
    ) -> None:
        """Replace each user's entries of the two versions (one Lua script per user), in pipelines of at
        most ~4 MB / 2,000 users."""
        new = self._history_for_write(fm_version, encoder_version, histories)
        pair = version_id(fm_version).to_bytes(4, "little") + version_id(encoder_version).to_bytes(
            4, "little"
        )
        active = await self.active_fm_version()
        keep = version_id(active).to_bytes(4, "little") if active is not None else b""
        cap = self.fm_history_max_len
        chunk: list[tuple[str, list[bytes]]] = []
        size = 0
        for uid, entries in new.items():
            chunk.append((uid, entries))
            size += sum(map(len, entries))
            if size >= _CHUNK_BYTES or len(chunk) >= _CHUNK_USERS:
                await self._write_history_chunk(chunk, pair, keep, cap)
                chunk, size = [], 0
        if chunk:
            await self._write_history_chunk(chunk, pair, keep, cap)

    async def _write_history_chunk(
        self, chunk: list[tuple[str, list[bytes]]], pair: bytes, keep: bytes, cap: int
    ) -> None:
        calls: list[tuple[bytes, list[bytes | int]]] = [
            (self.keys.fm_history(uid), [pair, keep, cap, *entries]) for uid, entries in chunk
        ]
        results = await self._call(
            "write_fm_history", lambda: self._eval_each(FM_HISTORY_WRITE_SCRIPT, calls)
        )
        self._check_script_writes(
            "write_fm_history", "FM-history key", "a list", [u for u, _ in chunk], results
        )

    async def append_fm_history(self, user_id: str, entries: Sequence[bytes]) -> int:
        """Append entries and trim to the newest `fm_history_max_len`, atomically server-side."""
        checked = self._checked_entries(entries)
        key = self.keys.fm_history(user_id)

        async def run() -> int:
            try:
                if not checked.blobs:
                    return int(await self._client.llen(key))
                return int(
                    await self._eval(FM_HISTORY_APPEND_SCRIPT, key, self.fm_history_max_len, *checked.blobs)
                )
            except rexc.ResponseError as exc:
                if not _wrong_data(exc):
                    raise
                message = self._corrupt(user_id, "FM-history key", exc)
                raise CorruptFeatureData(message, user_ids=[user_id]) from exc

        return await self._call("append_fm_history", run)

    async def read_fm_history(self, user_id: str) -> HistoryEntries:
        """Every stored entry of one user, in one LRANGE."""
        key = self.keys.fm_history(user_id)

        async def run() -> list[Any] | Exception:
            try:
                return list(await self._client.lrange(key, 0, -1))
            except rexc.ResponseError as exc:
                if not _wrong_data(exc):
                    raise
                return exc

        found = await self._call("read_fm_history", run)
        if isinstance(found, Exception):
            raise CorruptFeatureData(self._data_error(user_id, found), user_ids=[user_id]) from found
        decoded = self._decode_history(user_id, found)
        if isinstance(decoded, str):
            raise CorruptFeatureData(decoded, user_ids=[user_id])
        return decoded

    def _raise_first_error(self, what: str, results: list[Any]) -> None:
        error = next((r for r in results if isinstance(r, Exception)), None)
        if error is not None:
            self.stats.errors += 1
            raise FeatureStoreError(f"{what}: {type(error).__name__}: {error}") from error

    async def set_active_fm_version(self, version: str) -> None:
        """Point readers at `version` with one SET (atomic for every reader)."""
        check_version(version)
        await self._call("set_active_fm_version", lambda: self._client.set(self.keys.fm_active(), version))

    async def active_fm_version(self) -> str | None:
        """The active FM version, if one was set."""
        raw = await self._call("active_fm_version", lambda: self._client.get(self.keys.fm_active()))
        return self._decode_pointer(raw)

    async def ping(self) -> None:
        """Raise FeatureStoreUnavailable unless Redis answers PING in time."""
        await self._call("ping", self._client.ping)

    async def aclose(self) -> None:
        """Close the client and its connection pool(s)."""
        await self._client.aclose()
