"""A closed-loop experiment: simulated users of a synthetic dataset ask the service to rank candidates,
click what they are shown by the dataset generator's own click model, and their clicks go back to
the service as events, so traffic -> impressions -> clicks -> `dare-serve ab-report` plays end to end.

The click model is the one `dare-serve data synth` labelled the dataset with (`exporters/synth.py`):
logit = bias + user bias + popularity term + related * log1p(recency-weighted count of the user's
earlier behaviors in the candidate's hidden theme). It is rebuilt from the dataset's seed, and
checked against the `true_logit` the generator wrote. Clicks join the user's history, so an arm that
ranks better earns clicks that make its next rankings easier too, as online.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

DAY = 86_400


class ClosedLoopError(ValueError):
    """The closed loop cannot run: a bad setting or dataset, or the server answered wrongly."""


@dataclass(frozen=True, slots=True, eq=False)
class ClickWorld:
    """The synthetic world's click model and candidate draws, by item index (row of `item_ids`)."""

    item_ids: np.ndarray  # raw id per item index, sorted
    theme: np.ndarray  # hidden theme per item index
    pop_z: np.ndarray  # the generator's popularity feature per item index
    user_bias: np.ndarray  # per user index
    user_index: Mapping[str, int]  # user id -> index
    label_bias: float
    label_popularity: float
    label_related: float
    half_life_s: float
    recency_floor: float
    # the generator's own objects, for drawing candidates the way it drew impression targets
    catalog: Any = field(repr=False)
    users: Any = field(repr=False)
    target_interest_share: float = 0.4
    target_hard_share: float = 0.35
    themes_per_category: int = 4

    def rows(self, raw_ids: np.ndarray) -> np.ndarray:
        """Item indices of raw item ids (all must be in the catalog)."""
        raw = np.asarray(raw_ids, np.int64)
        pos = np.searchsorted(self.item_ids, raw)
        if len(raw) and (
            np.any(pos >= len(self.item_ids))
            or np.any(self.item_ids[np.minimum(pos, len(self.item_ids) - 1)] != raw)
        ):
            raise ClosedLoopError("an item id is not in the synthetic catalog")
        return pos

    def logits(
        self, user: int, items: np.ndarray, at: int, hist_themes: np.ndarray, hist_ts: np.ndarray
    ) -> np.ndarray:
        """The click logit of each item (indices) for `user` at time `at`, given their behaviors."""
        before = hist_ts < at
        themes, ages = hist_themes[before], (at - hist_ts[before]) / self.half_life_s
        recency = self.recency_floor + (1.0 - self.recency_floor) * np.exp2(-ages)
        weighted = np.array([recency[themes == self.theme[i]].sum() for i in items], dtype=np.float64)
        return (
            self.label_bias
            + self.user_bias[user]
            + self.label_popularity * self.pop_z[items]
            + self.label_related * np.log1p(weighted)
        )

    def candidates(self, user: int, n: int, rng: np.random.Generator) -> np.ndarray:
        """`n` distinct item indices drawn as the generator drew impression targets: the user's
        interest themes, other themes of their categories (hard negatives), popular items."""
        cat, k = self.catalog, self.themes_per_category
        seen: dict[int, None] = {}
        for _ in range(50):  # small catalogs repeat items; a few more draws fill the list
            want = n - len(seen)
            kind = rng.random(want)
            items = cat.sample_popular(want, rng)
            guided = np.flatnonzero(kind < self.target_interest_share + self.target_hard_share)
            if len(guided):
                themes = self.users.pick(np.full(len(guided), user), np.ones(len(guided)), rng, target=True)
                hard = kind[guided] >= self.target_interest_share
                offset = rng.integers(1, k, int(hard.sum()))
                themes[hard] = (themes[hard] // k) * k + (themes[hard] % k + offset) % k
                items[guided] = cat.sample_in_theme(themes, rng)
            for item in items.tolist():
                seen.setdefault(item)
            if len(seen) >= n:
                break
        return np.fromiter(seen, dtype=np.int64)[:n]


def examination(k: int) -> np.ndarray:
    """The chance a user looks at each of the first k ranks: 1 / log2(rank + 1), DCG's discount.

    The generator's labels say whether a user would click an item they look at; on a ranked list
    they look at the top more often, so the order inside the top k matters, as online.
    """
    return 1.0 / np.log2(np.arange(2, k + 2))


def load_world(data: Path) -> ClickWorld:
    """The click model of a `dare-serve data synth` folder, rebuilt from its seed and configuration."""
    # The generator's private builders, called in its own order with its own seed: the same catalog,
    # themes and user biases it labelled the dataset with (exporters/synth.py: generate).
    from exporters.synth import SynthConfig, _catalog, _users

    meta_path = Path(data) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise ClosedLoopError(f"{meta_path}: {exc}") from None
    if meta.get("source") != "synth":
        raise ClosedLoopError(f"{data}: not a `dare-serve data synth` dataset (its click model is needed)")
    cfg = SynthConfig(**meta["config"])
    if cfg.theme_layout != "nested":
        raise ClosedLoopError(f"{data}: the closed loop draws candidates of the nested theme layout only")
    rng = np.random.default_rng(cfg.seed)
    cat = _catalog(cfg, rng)
    users = _users(cfg, cat, rng)
    imp_items = pd.read_parquet(Path(data) / "impressions.parquet", columns=["item_id"])["item_id"]
    log_pop = np.log(cat.popularity)
    on_impressions = log_pop[np.searchsorted(cat.item_ids, imp_items.to_numpy(np.int64))]
    pop_z = (log_pop - on_impressions.mean()) / max(float(on_impressions.std()), 1e-9)
    width = len(str(cfg.users))
    return ClickWorld(
        item_ids=cat.item_ids,
        theme=cat.theme,
        pop_z=pop_z,
        user_bias=users.bias,
        user_index={f"u{i + 1:0{width}d}": i for i in range(cfg.users)},
        label_bias=cfg.label_bias,
        label_popularity=cfg.label_popularity,
        label_related=cfg.label_related,
        half_life_s=cfg.half_life_days * DAY,
        recency_floor=cfg.recency_floor,
        catalog=cat,
        users=users,
        target_interest_share=cfg.target_interest_share,
        target_hard_share=cfg.target_hard_share,
        themes_per_category=cfg.themes_per_category,
    )


@dataclass(frozen=True, slots=True)
class ClosedLoopConfig:
    """One closed-loop run."""

    host: str
    data: Path
    users: int = 400  # simulated users, drawn from the dataset's users
    rounds: int = 8  # requests per user, one per round
    candidates: int = 50
    k: int = 10  # items shown per request: the top k by the served score
    position_bias: bool = True  # a user examines rank r with probability 1 / log2(r + 1)
    step_s: int = 3600  # simulated time between two rounds
    click_delay_s: int = 30  # a click's time after its impression
    concurrency: int = 16
    seed: int = 0
    start_ts: int | None = None  # the first round's time; default: a day after the dataset's last event
    write_token: str | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.users >= 1, "users must be >= 1"),
            (self.rounds >= 1, "rounds must be >= 1"),
            (1 <= self.k <= self.candidates <= 1000, "need 1 <= k <= candidates <= 1000"),
            (self.step_s >= 1 and self.click_delay_s >= 0, "step must be >= 1 s and the click delay >= 0"),
            (1 <= self.concurrency <= 256, "concurrency must be 1..256"),
        ]
        for ok, message in checks:
            if not ok:
                raise ClosedLoopError(message)


@dataclass(slots=True)
class _Tally:
    requests: dict[str, int] = field(default_factory=dict)
    clicks: dict[str, int] = field(default_factory=dict)
    expected_clicks: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, variant: str, clicks: int, expected: float) -> None:
        self.requests[variant] = self.requests.get(variant, 0) + 1
        self.clicks[variant] = self.clicks.get(variant, 0) + clicks
        self.expected_clicks[variant] = self.expected_clicks.get(variant, 0.0) + expected


async def run_closed_loop(cfg: ClosedLoopConfig, world: ClickWorld | None = None) -> dict[str, Any]:
    """Play the rounds against the server; a summary of what was sent and clicked per arm."""
    import httpx

    world = world if world is not None else load_world(cfg.data)
    events = pd.read_parquet(cfg.data / "events.parquet", columns=["user_id", "item_id", "timestamp"])
    ids = sorted(world.user_index)
    rng = np.random.default_rng(cfg.seed)
    chosen = sorted(rng.choice(len(ids), min(cfg.users, len(ids)), replace=False).tolist())
    users = [ids[i] for i in chosen]
    own = events[events["user_id"].isin(users)]
    history: dict[str, tuple[list[int], list[int]]] = {u: ([], []) for u in users}
    for user, part in own.groupby("user_id", sort=False):
        themes = world.theme[world.rows(part["item_id"].to_numpy())]
        history[str(user)] = (themes.tolist(), part["timestamp"].astype(np.int64).tolist())
    start = cfg.start_ts if cfg.start_ts is not None else int(events["timestamp"].max()) + DAY
    tally = _Tally()
    headers = {"Authorization": f"Bearer {cfg.write_token}"} if cfg.write_token else {}
    gate = asyncio.Semaphore(cfg.concurrency)
    t0 = time.perf_counter()

    async def visit(client: httpx.AsyncClient, user: str, round_: int) -> None:
        u = world.user_index[user]
        r = np.random.default_rng([cfg.seed, u, round_])
        at = start + round_ * cfg.step_s
        cands = world.candidates(u, cfg.candidates, r)
        async with gate:
            try:
                await exchange(client, user, u, at, cands, r)
            except httpx.TransportError as exc:
                tally.errors.append(f"{type(exc).__name__}: {exc}")

    async def exchange(
        client: httpx.AsyncClient, user: str, u: int, at: int, cands: np.ndarray, r: np.random.Generator
    ) -> None:
        """One request of `user` at `at`: score, look at the top k, click, send the clicks back."""
        body = {"user_id": user, "candidates": world.item_ids[cands].tolist(), "timestamp": at}
        resp = await client.post("/v1/score", json=body)
        if resp.status_code != 200:
            tally.errors.append(f"score {resp.status_code}: {resp.text[:200]}")
            return
        answer = resp.json()
        shown = cands[np.argsort(-np.asarray(answer["scores"]), kind="stable")[: cfg.k]]
        themes, times = history[user]
        p = 1.0 / (1.0 + np.exp(-world.logits(u, shown, at, np.asarray(themes), np.asarray(times))))
        if cfg.position_bias:
            p = p * examination(len(shown))
        clicked = shown[r.random(len(shown)) < p]
        if len(clicked):
            when = at + cfg.click_delay_s
            evs = [{"item_id": int(world.item_ids[i]), "timestamp": when} for i in clicked]
            ev = await client.post(
                "/v1/events", json={"user_id": user, "type": "click", "events": evs}, headers=headers
            )
            if ev.status_code != 200:
                tally.errors.append(f"events {ev.status_code}: {ev.text[:200]}")
                return
            themes.extend(world.theme[clicked].tolist())
            times.extend([when] * len(clicked))
        tally.add(answer["variant"], len(clicked), float(p.sum()))

    # Idle connections expire before the server's keep-alive (uvicorn: 5 s) would close them under
    # a request in flight.
    limits = httpx.Limits(max_connections=cfg.concurrency, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=cfg.host, timeout=30.0, limits=limits) as client:
        for round_ in range(cfg.rounds):
            # Rounds in order: a round's clicks are history by the next one.
            await asyncio.gather(*(visit(client, user, round_) for user in users))
    arms = {
        v: {
            "requests": n,
            "clicks": tally.clicks[v],
            "ctr_at_k": tally.clicks[v] / (n * cfg.k),
            "expected_ctr_at_k": tally.expected_clicks[v] / (n * cfg.k),
        }
        for v, n in sorted(tally.requests.items())
    }
    return {
        "users": len(users),
        "rounds": cfg.rounds,
        "k": cfg.k,
        "start_ts": start,
        "end_ts": start + cfg.rounds * cfg.step_s,
        "requests": sum(tally.requests.values()),
        "clicks": sum(tally.clicks.values()),
        "arms": arms,
        "errors": len(tally.errors),
        "first_errors": tally.errors[:3],
        "seconds": round(time.perf_counter() - t0, 2),
        "requests_per_s": round(sum(tally.requests.values()) / max(time.perf_counter() - t0, 1e-9), 1),
    }


def expected_logit_error(world: ClickWorld, data: Path, sample: int = 2000, seed: int = 0) -> float:
    """Largest |rebuilt logit - the generator's `true_logit`| over a sample of the dataset's impressions."""
    imps = pd.read_parquet(
        data / "impressions.parquet", columns=["user_id", "item_id", "timestamp", "true_logit"]
    )
    events = pd.read_parquet(data / "events.parquet", columns=["user_id", "item_id", "timestamp"])
    rows = imps.sample(min(sample, len(imps)), random_state=seed)
    by_user = {str(u): part for u, part in events.groupby("user_id", sort=False)}
    worst = 0.0
    for user, item, ts, logit in rows.itertuples(index=False):
        hist = by_user.get(str(user))
        themes = (
            world.theme[world.rows(hist["item_id"].to_numpy())] if hist is not None else np.empty(0, np.int64)
        )
        times = hist["timestamp"].to_numpy(np.int64) if hist is not None else np.empty(0, np.int64)
        got = world.logits(world.user_index[str(user)], world.rows(np.array([item])), int(ts), themes, times)[
            0
        ]
        worst = max(worst, abs(float(got) - float(logit)))
    return worst if math.isfinite(worst) else math.inf
