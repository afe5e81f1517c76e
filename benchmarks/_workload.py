"""The serving workload of the server benchmarks (sections c and f): trained bundles, users, requests.

Bundles: `dare-serve demo`'s build at its fixed seeds (synthetic data of 800 users and 5,000 items,
`fm`, then `dare` and `coupled` with FM input; K=64, attention d=16, max_seq_len 1,000), kept in a
work folder and reused; or an existing bundle root.

Load users: `USERS` users of exactly `EVENTS` behaviors each (items drawn by the dataset's event
frequencies, increasing timestamps over a year), so every request searches 1,000 behaviors, the
bundle's whole window. Their FM embeddings come from the trained FM's user tower; without an FM
bundle, uniform vectors in the tower's tanh range stand in (the cost is the same).

Requests: `N_BODIES` fixed bodies of a random load user and `CANDIDATES` distinct catalog items,
with a fixed `timestamp`, so scores are reproducible and comparable between servers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

SEED = 20240611
USERS = 1_000
EVENTS = 1_000
CANDIDATES = 200
N_BODIES = 4_096
NAMESPACE = "bench"
DAY = 86_400


@dataclass(frozen=True)
class Models:
    """Bundle root to serve, the ranker bundle in it, and the FM bundle (if known)."""

    root: Path
    ranker: Path
    fm: Path | None
    data: Path | None


def build_models(workdir: Path, bundles: Path | None = None, variant: str = "dare") -> Models:
    """Train (or reuse) the demo's bundles in `workdir`, or use the newest `variant` under `bundles`."""
    from exporters.bundle import list_versions

    if bundles is not None:
        versions = list_versions(bundles / variant)
        if not versions:
            raise SystemExit(f"--bundles {bundles}: no {variant} bundle under it")
        fm_versions = list_versions(bundles / "fm") if (bundles / "fm").is_dir() else []
        return Models(bundles, versions[-1], fm_versions[-1] if fm_versions else None, None)
    from service.demo import build

    built = build(workdir.resolve(), progress=False)
    return Models(built.bundles, _newest(built.bundles / variant), built.fm, built.data)


def _newest(path: Path) -> Path:
    from exporters.bundle import list_versions

    return list_versions(path)[-1]


@dataclass(frozen=True)
class Workload:
    """Users with their sequences and FM vectors, and the request bodies sent to every server."""

    users: list[str]
    items: np.ndarray  # [users, events] raw item ids
    timestamps: np.ndarray  # [users, events] seconds, increasing per user
    fm: np.ndarray  # [users, fm_dim] float32
    fm_version: str | None
    now: int
    requests: list[dict]
    bodies: list[bytes]

    def user_index(self, user_id: str) -> int:
        return int(user_id.rsplit("-", 1)[1])

    def events(self) -> pd.DataFrame:
        return events_frame(self.users, self.items, self.timestamps)


def events_frame(users: list[str], items: np.ndarray, timestamps: np.ndarray) -> pd.DataFrame:
    """The users' behaviors as an events table (user_id, item_id, timestamp), a row per behavior."""
    return pd.DataFrame(
        {
            "user_id": np.repeat(np.array(users, dtype=object), items.shape[1]),
            "item_id": items.reshape(-1),
            "timestamp": timestamps.reshape(-1),
        }
    )


def make_workload(
    models: Models, quick: bool = False, events: int = EVENTS, n_users: int = USERS, prefix: str = "load"
) -> Workload:
    """`n_users` users (a quarter when quick) of `events` behaviors each, named `<prefix>-00000`...

    The defaults are the workload of sections c and f; another `prefix` keeps a second set of
    users apart in the same Redis.
    """
    from exporters.bundle import load_bundle

    rng = np.random.default_rng(SEED if events == EVENTS else SEED + events)
    ranker = load_bundle(models.ranker)
    catalog = ranker.item_ids[1:]
    weights = np.ones(len(catalog))
    if models.data is not None:  # draw behaviors like the dataset's users do
        seen = pd.read_parquet(models.data / "events.parquet", columns=["item_id"])
        weights += seen["item_id"].value_counts().reindex(catalog, fill_value=0).to_numpy(np.float64)
    n_users = max(1, n_users // 4) if quick else n_users
    items = rng.choice(catalog, (n_users, events), p=weights / weights.sum())
    start = 1_700_000_000
    gaps = rng.exponential(365 * DAY / events, (n_users, events)).astype(np.int64) + 1
    timestamps = start + np.cumsum(gaps, axis=1)
    now = int(timestamps.max()) + 60
    users = [f"{prefix}-{i:05d}" for i in range(n_users)]
    fm_dim, fm_version = ranker.manifest.dims.fm, ranker.manifest.fm_version
    fm = _fm_vectors(models, users, items, timestamps, now, fm_dim, rng)
    requests = []
    for _ in range(N_BODIES):
        user = users[int(rng.integers(n_users))]
        cands = rng.choice(catalog, CANDIDATES, replace=False)
        requests.append({"user_id": user, "candidates": cands.tolist(), "timestamp": now})
    bodies = [json.dumps(r, separators=(",", ":")).encode() for r in requests]
    return Workload(users, items, timestamps, fm, fm_version, now, requests, bodies)


def _fm_vectors(
    models: Models,
    users: list[str],
    items: np.ndarray,
    timestamps: np.ndarray,
    now: int,
    fm_dim: int,
    rng: np.random.Generator,
) -> np.ndarray:
    if fm_dim == 0:
        return np.zeros((len(users), 0), np.float32)
    if models.fm is None:
        return rng.uniform(-1, 1, (len(users), fm_dim)).astype(np.float32)
    from exporters.bundle import load_bundle
    from exporters.fm_embed import compute_user_embeddings

    events = events_frame(users, items, timestamps)
    emb = compute_user_embeddings(load_bundle(models.fm), events, as_of=now, progress=False)
    order = {u: i for i, u in enumerate(emb.user_ids)}
    return emb.vectors[[order[u] for u in users]]


def fill_redis(url: str, w: Workload, namespace: str = NAMESPACE) -> None:
    """Replace the load users' sequences and FM embeddings in Redis; make the FM version active."""
    from feature_store.fill import fill

    fm = dict(zip(w.users, w.fm, strict=True)) if w.fm_version is not None and w.fm.shape[1] else None
    fill(url, namespace, events=w.events(), fm=fm, fm_version=w.fm_version)


def describe(models: Models, w: Workload) -> str:
    """One sentence for the docs: what the requests were."""
    from exporters.bundle import read_manifest

    m = read_manifest(models.ranker)
    return (
        f"`{m.variant}` ranker v{m.version} (K={m.top_k}, attention d={m.dims.attention}, "
        f"representation d={m.dims.representation}, FM d={m.dims.fm}); {len(w.users):,} users of "
        f"{w.items.shape[1]:,} behaviors each in Redis on loopback; every request: one user, {CANDIDATES} "
        f"candidates; {len(w.bodies):,} fixed request bodies"
    )
