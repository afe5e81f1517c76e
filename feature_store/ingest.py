"""Bulk load of behavior sequences from an events table: grouped per user, replaced, pipelined."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm import tqdm

from feature_store.base import FeatureStore, UserSequence

REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp")


@dataclass(frozen=True, slots=True)
class IngestStats:
    """What one ingest run loaded and how fast."""

    events: int
    users: int
    seconds: float
    events_per_s: float


async def ingest_events(
    store: FeatureStore,
    events: pd.DataFrame,
    *,
    batch_users: int = 1_000,
    concurrency: int = 4,
    progress: bool = True,
) -> IngestStats:
    """Replace the sequence of every user in `events` (idempotent); returns counts and throughput.

    Rows need not be sorted: users are grouped here and each sequence is stably sorted by
    timestamp before it is written. Users absent from `events` are left untouched.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(f"events table lacks columns {missing}; it has {list(events.columns)}")
    if batch_users <= 0 or concurrency <= 0:
        raise ValueError("batch_users and concurrency must be positive")
    started = time.perf_counter()
    codes, users = pd.factorize(events["user_id"], sort=False)
    items = events["item_id"].to_numpy(dtype=np.int64)
    timestamps = events["timestamp"].to_numpy(dtype=np.int64)
    # factorize numbers users by first appearance, so the canonical user-sorted file has
    # non-decreasing codes and needs no sort; anything else is grouped with one stable sort.
    if codes.size > 1 and bool((codes[1:] < codes[:-1]).any()):
        order = np.argsort(codes, kind="stable")
        codes, items, timestamps = codes[order], items[order], timestamps[order]
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if codes.size else np.empty(0, np.int64)
    ends = np.r_[starts[1:], codes.size]

    names = [str(u) for u in users.take(codes[starts]).tolist()] if starts.size else []

    bar = tqdm(
        total=int(codes.size),
        unit="ev",
        unit_scale=True,
        file=sys.stderr,
        desc="ingest",
        disable=not progress,
    )
    ranges = iter(range(0, starts.size, batch_users))

    async def worker() -> None:
        # The workers share one iterator, so each batch is written exactly once; several batches
        # in flight overlap encoding in Python with Redis applying the previous pipeline.
        for lo in ranges:
            hi = min(lo + batch_users, starts.size)
            batch = {
                names[i]: UserSequence(items[s:e], timestamps[s:e])
                for i, s, e in zip(range(lo, hi), starts[lo:hi].tolist(), ends[lo:hi].tolist(), strict=True)
            }
            await store.replace_sequences(batch)
            bar.update(int(ends[hi - 1] - starts[lo]))

    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await asyncio.gather(*workers)
    except BaseException:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    return IngestStats(
        events=int(codes.size),
        users=int(starts.size),
        seconds=seconds,
        events_per_s=codes.size / seconds if seconds > 0 else 0.0,
    )
