"""Filling a store with a known data set in one call: behavior sequences from an events table, and
one version of FM embeddings, made the active one (tests, benchmarks).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import numpy as np
import pandas as pd

from feature_store.base import FeatureStore
from feature_store.factory import open_feature_store
from feature_store.ingest import ingest_events


async def fill_store(
    store: FeatureStore,
    *,
    events: pd.DataFrame | None = None,
    fm: Mapping[str, np.ndarray] | None = None,
    fm_version: str | None = None,
    activate: bool = True,
) -> None:
    """Replace the sequences of the users in `events` and write `fm` (user -> vector) under `fm_version`.

    With `activate` that version becomes the one readers use; without, the vectors wait for a
    later switch (an FM version rolled out under load).
    """
    if events is not None:
        await ingest_events(store, events, progress=False)
    if fm:
        if not fm_version:
            raise ValueError("FM embeddings need the fm_version they belong to")
        users = list(fm)
        await store.write_fm_embeddings(fm_version, users, np.stack([fm[u] for u in users]))
        if activate:
            await store.set_active_fm_version(fm_version)


def fill(
    redis_url: str,
    namespace: str,
    *,
    events: pd.DataFrame | None = None,
    fm: Mapping[str, np.ndarray] | None = None,
    fm_version: str | None = None,
    activate: bool = True,
    timeout_s: float = 30.0,
) -> None:
    """`fill_store` into `namespace` of the Redis at `redis_url`, blocking (opens and closes the store)."""

    async def run() -> None:
        store = open_feature_store(redis_url, timeout_s=timeout_s, namespace=namespace)
        try:
            await fill_store(store, events=events, fm=fm, fm_version=fm_version, activate=activate)
        finally:
            await store.aclose()

    asyncio.run(run())
