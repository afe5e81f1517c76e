"""Feature store benchmark: read latency, batched vs sequential reads, appends, ingest rate, memory,
and lifelong histories (10,000 and 100,000 events per user: memory per event, reads, capped appends).

Fixed seeds and sizes; side-by-side ratios from one run. Not a test. Starts a private redis-server
on a free loopback port unless --redis-url is given (a scratch namespace is used and deleted).

    .venv/bin/python -m benchmarks.feature_store [--redis-url URL [--cluster]] [--quick] [--lifelong-only]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable

import numpy as np
import pandas as pd
import redis

from feature_store import codec
from feature_store.base import FeatureStore, UserSequence
from feature_store.factory import open_feature_store
from feature_store.ingest import ingest_events
from feature_store.redis_store import TRIM_SLACK_SHARE, RedisFeatureStore

SEED = 20240601
T0 = 1_700_000_000
LONG_LEN = 10_000
BATCH_USERS, BATCH_LEN = 32, 2_000
FM_DIM = 64
# Lifelong histories: events per user, and users stored of that length (~2 M events each)
LIFELONG = ((10_000, 200), (100_000, 20))


def make_sequence(rng: np.random.Generator, n: int) -> UserSequence:
    """n events: random item ids, increasing timestamps."""
    items = rng.integers(1, 10**9, n, dtype=np.int64)
    return UserSequence(items, T0 + np.cumsum(rng.integers(1, 60, n)).astype(np.int64))


def make_events(rng: np.random.Generator, n_events: int, n_users: int, prefix: str) -> pd.DataFrame:
    """A canonical events table sorted by user and time: n_users with n_events / n_users each."""
    per_user = n_events // n_users
    users = np.repeat(np.array([f"{prefix}-{i:07d}" for i in range(n_users)], dtype=object), per_user)
    ts = T0 + np.tile(np.arange(per_user, dtype=np.int64) * 30, n_users)
    return pd.DataFrame({"user_id": users, "item_id": rng.integers(1, 10**9, users.size), "timestamp": ts})


async def timed(fn: Callable[[], Awaitable[object]], n: int, warmup: int = 20) -> np.ndarray:
    """Wall times in milliseconds of n sequential awaits of fn."""
    for _ in range(warmup):
        await fn()
    out = np.empty(n)
    for i in range(n):
        t = time.perf_counter()
        await fn()
        out[i] = (time.perf_counter() - t) * 1e3
    return out


class Table:
    """Collects rows and prints them aligned."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def latency(self, name: str, ms: np.ndarray, note: str = "") -> float:
        p50, p99 = np.percentile(ms, [50, 99])
        self.rows.append((name, f"{p50:.3f}", f"{p99:.3f}", note))
        return float(p50)

    def line(self, name: str, value: str, note: str = "") -> None:
        self.rows.append((name, value, "", note))

    def print(self, title: str) -> None:
        head = ("measure", "p50 ms / value", "p99 ms", "note")
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(4)]
        print(f"\n{title}")
        for row in [head, tuple("-" * w for w in widths), *self.rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


async def bench_reads(
    store: FeatureStore, raw: redis.asyncio.Redis | None, n: int, table: Table, label: str
) -> None:
    rng = np.random.default_rng(SEED)
    long_seq = make_sequence(rng, LONG_LEN)
    users = [f"batch-{i}" for i in range(BATCH_USERS)]
    await store.replace_sequences({"long": long_seq, **{u: make_sequence(rng, BATCH_LEN) for u in users}})
    vectors = rng.standard_normal((BATCH_USERS + 1, FM_DIM)).astype(np.float32)
    await store.write_fm_embeddings("fm-1", [*users, "long"], vectors)
    await store.set_active_fm_version("fm-1")
    got = await store.read_sequence("long")
    assert np.array_equal(got.items, long_seq.items) and np.array_equal(got.timestamps, long_seq.timestamps)

    p_long = table.latency(
        f"{label}: read_sequence, 10,000 events", await timed(lambda: store.read_sequence("long"), n)
    )
    if raw is not None and isinstance(store, RedisFeatureStore):
        key = store.keys.sequence("long")
        p_raw = table.latency(
            f"{label}: raw redis-py GETRANGE, same 120 kB",
            await timed(lambda: raw.getrange(key, -120_000, -1), n),
        )
        table.line(
            f"{label}: store / raw GETRANGE",
            f"{p_long / p_raw:.2f}x",
            "the store decodes too; raw returns bytes",
        )
    blob = long_seq.items.size * codec.EVENT_BYTES
    data = codec.encode_events(long_seq.items, long_seq.timestamps)
    t = time.perf_counter()
    for _ in range(n):
        codec.decode_events(data)
    table.line(
        f"{label}: decode only, 10,000 events",
        f"{(time.perf_counter() - t) / n * 1e3:.3f}",
        f"{blob:,} bytes",
    )

    p_batch = table.latency(
        f"{label}: read_users, 32 users x 2,000 + FM",
        await timed(lambda: store.read_users(users), max(n // 4, 50)),
    )

    async def sequential() -> None:
        for u in users:
            await store.read_users([u])

    async def concurrent() -> None:
        await asyncio.gather(*(store.read_users([u]) for u in users))

    p_seq = table.latency(
        f"{label}: 32 sequential read_users([u])", await timed(sequential, max(n // 20, 20), 3)
    )
    p_conc = table.latency(
        f"{label}: 32 concurrent read_users([u])", await timed(concurrent, max(n // 20, 20), 3)
    )
    table.line(f"{label}: batched-32 speed-up vs sequential", f"{p_seq / p_batch:.1f}x")
    table.line(f"{label}: batched-32 speed-up vs concurrent", f"{p_conc / p_batch:.1f}x")

    one = (np.array([1], np.int64), np.array([T0 + 10**7], np.int64))
    table.latency(
        f"{label}: append 1 event, 2,000 stored", await timed(lambda: store.append_events(users[0], *one), n)
    )
    table.latency(
        f"{label}: append 1 event at the 10,000 cap",
        await timed(lambda: store.append_events("long", *one), n),
    )


async def bench_lifelong(
    open_store: Callable[[int], FeatureStore],
    raw: redis.asyncio.Redis | None,
    n: int,
    table: Table,
    label: str,
) -> None:
    """Per history length: memory per stored event, full and depth-2,000 reads, an append at the cap."""
    rng = np.random.default_rng(SEED + 1)
    one = (np.array([1], np.int64), np.array([T0 + 10**8], np.int64))
    for length, n_users in LIFELONG:
        store = open_store(length)  # the cap is the history length: reads of everything are one GET
        try:
            users = [f"life{length}-{i}" for i in range(n_users)]
            sequences = {u: make_sequence(rng, length) for u in users}
            before = (await raw.info("memory"))["used_memory"] if raw is not None else 0
            tracemalloc.start()
            await store.replace_sequences(sequences)
            held, _ = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            used = (await raw.info("memory"))["used_memory"] - before if raw is not None else held
            table.line(
                f"{label}: memory per event, {n_users} users of {length:,} events",
                f"{used / (length * n_users):.2f} B",
                f"{used / n_users:,.0f} B per user (payload {length * codec.EVENT_BYTES:,} B)",
            )
            got = await store.read_sequence(users[0])
            assert np.array_equal(got.items, sequences[users[0]].items)
            vectors = rng.standard_normal((3, FM_DIM)).astype(np.float32)
            await store.write_fm_embeddings("fm-1", users[:3], vectors)
            await store.set_active_fm_version("fm-1")
            reps = max(n // (length // 1_000), 30)
            table.latency(
                f"{label}: read_sequence, {length:,} events (cap {length:,})",
                await timed(lambda s=store, u=users[0]: s.read_sequence(u), reps, 5),
            )
            table.latency(
                f"{label}: read_users, 1 user of {length:,} events + FM",
                await timed(lambda s=store, u=users[1]: s.read_users([u]), reps, 5),
            )
            table.latency(
                f"{label}: read_users at depth 2,000 of {length:,}",
                await timed(lambda s=store, u=users[2]: s.read_users([u], max_len=2_000), reps, 5),
            )
            # enough appends to a full history to pass at least one trim back to the cap (Redis)
            every = length // TRIM_SLACK_SHARE + 1
            ms = await timed(lambda s=store, u=users[3]: s.append_events(u, *one), max(reps, every), 5)
            table.latency(
                f"{label}: append 1 event to a full history of {length:,}",
                ms,
                f"mean {ms.mean():.3f}, max {ms.max():.2f} ms of {len(ms):,} (Redis trims every {every:,})",
            )
            if isinstance(store, RedisFeatureStore) and raw is not None:
                await raw.delete(*(store.keys.sequence(u) for u in users))
        finally:
            await store.aclose()


async def bench_ingest(
    store: FeatureStore,
    n_events: int,
    n_users: int,
    table: Table,
    label: str,
    raw: redis.asyncio.Redis | None,
) -> float:
    df = make_events(np.random.default_rng(SEED + n_users), n_events, n_users, prefix=f"ingest{n_users}")
    before = (await raw.info("memory"))["used_memory"] if raw is not None else 0
    first = await ingest_events(store, df, progress=False)
    if raw is not None:
        used = (await raw.info("memory"))["used_memory"] - before
        per_user = n_events // n_users
        table.line(
            f"{label}: memory per event, users of {per_user:,} events",
            f"{used / n_events:.2f} B",
            f"{used / n_users:,.0f} B per user incl. key overhead (payload {per_user * 12:,} B)",
        )
    again = await ingest_events(store, df, progress=False)
    table.line(
        f"{label}: ingest {first.events:,} events / {first.users:,} users",
        f"{first.events_per_s:,.0f} ev/s",
        f"{first.seconds:.2f}s; rerun (idempotent) {again.events_per_s:,.0f} ev/s",
    )
    return first.events_per_s


async def run(
    quick: bool, redis_url: str | None = None, cluster: bool = False, lifelong_only: bool = False
) -> Table:
    """Every measurement, on a private redis-server unless `redis_url` is given, then in memory."""
    n = 300 if quick else 2_000
    n_events, n_users = (200_000, 1_000) if quick else (1_000_000, 5_000)

    proc = None
    url = redis_url
    if url is None:
        from tests.redis_proc import RedisProcess

        proc = RedisProcess().start()
        url = proc.url
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    table = Table()
    try:
        store = open_feature_store(url, cluster=cluster, timeout_s=5.0, namespace=namespace)
        raw = None if cluster else redis.asyncio.Redis.from_url(url)
        try:
            if not lifelong_only:
                await bench_reads(store, raw, n, table, "redis")
                rate = await bench_ingest(store, n_events, n_users, table, "redis", raw)
                # The shape of the capacity estimate in docs/feature-store.md: users of 2,000 events.
                await bench_ingest(store, n_events, n_events // 2_000, table, "redis", raw)
                table.line("redis: ingest goal (>= 200,000 ev/s)", "met" if rate >= 200_000 else "MISSED")
            await bench_lifelong(
                lambda cap: open_feature_store(
                    url, cluster=cluster, timeout_s=5.0, namespace=namespace, max_len=cap
                ),
                raw,
                n,
                table,
                "redis",
            )
        finally:
            if raw is not None and redis_url:
                async for key in raw.scan_iter(match=f"{namespace}:*", count=1000):
                    await raw.delete(key)
            if raw is not None:
                await raw.aclose()
            await store.aclose()
        if not lifelong_only:
            memory = open_feature_store(None)
            await bench_reads(memory, None, n, table, "memory")
            await bench_ingest(memory, n_events, n_users, table, "memory", None)
        await bench_lifelong(lambda cap: open_feature_store(None, max_len=cap), None, n, table, "memory")
    finally:
        if proc is not None:
            proc.cleanup()
    return table


def section(quick: bool) -> list[str]:
    """Section e of benchmarks/suite.py: the same measurements as a markdown table."""
    from benchmarks._common import md_table

    table = asyncio.run(run(quick))
    n = 300 if quick else 2_000
    n_events = 200_000 if quick else 1_000_000
    return [
        "## e. Feature store",
        "",
        f"`benchmarks/feature_store.py`: a private redis-server on loopback (redis-py {redis.__version__}, "
        f"hiredis), then the in-memory store; {n:,} timed calls per latency row after 20 warm-up calls "
        f"(fewer for the 32-user rows), ingest of {n_events:,} events. Sequences are 12-byte records "
        "(item int64, time uint32); `read_users` is the service's per-batch read (sequences + FM "
        f"embeddings of all users in one pipeline). Seed {SEED}.",
        "",
        *md_table(["measure", "p50 ms / value", "p99 ms", "note"], table.rows),
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", help="use this Redis instead of a private redis-server")
    parser.add_argument("--cluster", action="store_true", help="--redis-url is a Redis Cluster node")
    parser.add_argument("--quick", action="store_true", help="fewer iterations and 200k ingest events")
    parser.add_argument("--lifelong-only", action="store_true", help="only the 10,000 / 100,000-event rows")
    args = parser.parse_args()
    table = await run(args.quick, args.redis_url, args.cluster, args.lifelong_only)
    server = f"redis-server at {args.redis_url}" if args.redis_url else "private redis-server on loopback"
    title = (
        f"feature store benchmark: {server}, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, redis-py {redis.__version__}, seed {SEED}"
    )
    table.print(title)


if __name__ == "__main__":
    asyncio.run(main())
