"""The load test's traffic without locust: configuration, users and catalog, request bodies, checks.

Kept free of locust imports (locust monkey-patches the standard library with gevent at import), so
`dare-serve loadtest` can validate its configuration and tests can call the checks directly.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

# The environment variables the locustfile reads (locust passes its environment through).
ENV_DATA = "DARE_LT_DATA"
ENV_CANDIDATES = "DARE_LT_CANDIDATES"
ENV_EXPERIMENT_SHARE = "DARE_LT_EXPERIMENT_SHARE"
ENV_EVENTS_SHARE = "DARE_LT_EVENTS_SHARE"
ENV_ZIPF = "DARE_LT_ZIPF"
ENV_SEED = "DARE_LT_SEED"
ENV_WAIT_MS = "DARE_LT_WAIT_MS"
ENV_WRITE_TOKEN = "DARE_LT_WRITE_TOKEN"
ENV_OUT = "DARE_LT_OUT"

SYNTHETIC_USERS = 1000  # size of the user pool when no dataset is given
MAX_CANDIDATES = 1000  # the service's default DARE_MAX_CANDIDATES
EVENTS_PER_APPEND = (1, 3)  # behaviors per /v1/events request, inclusive


class WorkloadError(ValueError):
    """The load test cannot be configured: a bad setting, dataset or server answer."""


@dataclass(frozen=True, slots=True)
class TrafficConfig:
    """What the locust users send; every field has a DARE_LT_* environment variable."""

    data: Path | None = None
    candidates: int = 100
    experiment_share: float = 0.2
    events_share: float = 0.05
    zipf: float = 1.1
    seed: int = 0
    wait_ms: float = 0.0
    write_token: str | None = None
    out: Path | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.candidates <= MAX_CANDIDATES:
            raise WorkloadError(f"candidates must be 1..{MAX_CANDIDATES}, not {self.candidates}")
        for name in ("experiment_share", "events_share"):
            share = getattr(self, name)
            if not 0.0 <= share <= 1.0:
                raise WorkloadError(f"{name.replace('_', '-')} must be in [0, 1], not {share}")
        if not (0.0 <= self.zipf <= 5.0):
            raise WorkloadError(f"zipf exponent must be in [0, 5], not {self.zipf}")
        if not (0.0 <= self.wait_ms <= 60_000.0):
            raise WorkloadError(f"wait must be 0..60000 ms, not {self.wait_ms}")
        if self.data is not None and not (self.data / "events.parquet").is_file():
            raise WorkloadError(f"dataset {self.data}: no events.parquet there")

    def to_env(self) -> dict[str, str]:
        """The environment variables that make `from_env` rebuild this configuration."""
        env = {
            ENV_CANDIDATES: str(self.candidates),
            ENV_EXPERIMENT_SHARE: repr(self.experiment_share),
            ENV_EVENTS_SHARE: repr(self.events_share),
            ENV_ZIPF: repr(self.zipf),
            ENV_SEED: str(self.seed),
            ENV_WAIT_MS: repr(self.wait_ms),
        }
        if self.data is not None:
            env[ENV_DATA] = str(self.data)
        if self.write_token:
            env[ENV_WRITE_TOKEN] = self.write_token
        if self.out is not None:
            env[ENV_OUT] = str(self.out)
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TrafficConfig:
        """Read the DARE_LT_* variables (defaults for those unset); WorkloadError names a bad one."""
        env = os.environ if env is None else env
        d = cls()  # the defaults (slots: the class attributes are descriptors, not values)

        def number(name: str, kind: type[int] | type[float], default: float) -> Any:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise WorkloadError(f"{name}={raw!r} is not a {kind.__name__}") from None
            if isinstance(value, float) and not math.isfinite(value):
                raise WorkloadError(f"{name}={raw!r} is not finite")
            return value

        data = env.get(ENV_DATA, "").strip()
        out = env.get(ENV_OUT, "").strip()
        return cls(
            data=Path(data) if data else None,
            candidates=number(ENV_CANDIDATES, int, d.candidates),
            experiment_share=number(ENV_EXPERIMENT_SHARE, float, d.experiment_share),
            events_share=number(ENV_EVENTS_SHARE, float, d.events_share),
            zipf=number(ENV_ZIPF, float, d.zipf),
            seed=number(ENV_SEED, int, d.seed),
            wait_ms=number(ENV_WAIT_MS, float, d.wait_ms),
            write_token=env.get(ENV_WRITE_TOKEN) or None,
            out=Path(out) if out else None,
        )


def zipf_cdf(n: int, exponent: float) -> np.ndarray:
    """Cumulative probabilities of ranks 1..n with P(rank r) proportional to r**-exponent."""
    if n < 1:
        raise WorkloadError("no users to draw from")
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


@dataclass(frozen=True, slots=True)
class Workload:
    """Users (hottest first), catalog and variants the locust users draw from."""

    source: Literal["dataset", "synthetic"]
    users: np.ndarray  # user ids (str), rank order: users[0] is the hottest
    user_cdf: np.ndarray  # zipf cdf over the ranks
    items: np.ndarray  # int64 catalog
    item_p: np.ndarray | None  # draw probabilities (popularity), None: uniform
    variants: tuple[str, ...]  # loaded variants, as /v1/models listed them
    candidates: int
    note: str = ""

    def draw_user(self, rng: np.random.Generator) -> str:
        """A user by zipf rank: the hottest users come back again and again."""
        rank = int(np.searchsorted(self.user_cdf, rng.random(), side="right"))
        return str(self.users[min(rank, len(self.users) - 1)])

    def draw_candidates(self, rng: np.random.Generator) -> list[int]:
        """A candidate set from the catalog, distinct unless the catalog is smaller than the set."""
        replace = self.candidates > len(self.items)
        picked = rng.choice(self.items, size=self.candidates, replace=replace, p=self.item_p)
        return [int(i) for i in picked]

    def draw_events(self, rng: np.random.Generator, now: int) -> list[dict[str, int]]:
        """A few new behaviors on catalog items, stamped now."""
        n = int(rng.integers(EVENTS_PER_APPEND[0], EVENTS_PER_APPEND[1] + 1))
        picked = rng.choice(self.items, size=n, p=self.item_p)
        return [{"item_id": int(i), "timestamp": now} for i in picked]

    def describe(self) -> dict[str, Any]:
        """What summary.json says about the traffic's source."""
        return {
            "source": self.source,
            "users": len(self.users),
            "items": len(self.items),
            "variants": list(self.variants),
            "note": self.note,
        }


def variants_of(models: Mapping[str, Any]) -> tuple[str, ...]:
    """The loaded variants in a GET /v1/models body (WorkloadError when there are none)."""
    try:
        names = tuple(str(m["variant"]) for m in models["variants"])
    except (KeyError, TypeError) as e:
        raise WorkloadError(f"GET /v1/models: unexpected body ({e!r})") from None
    if not names:
        raise WorkloadError("GET /v1/models lists no variant: nothing serves")
    return names


def load_workload(cfg: TrafficConfig, models: Mapping[str, Any]) -> Workload:
    """Users and catalog from the dataset, or a synthetic pool when there is none (see docs)."""
    variants = variants_of(models)
    rng = np.random.default_rng(cfg.seed)
    if cfg.data is not None:
        import pandas as pd

        path = cfg.data / "events.parquet"
        try:
            events = pd.read_parquet(path, columns=["user_id", "item_id"])
        except (OSError, ValueError, KeyError) as e:
            raise WorkloadError(f"cannot read {path}: {e}") from None
        if events.empty:
            raise WorkloadError(f"{path} holds no events")
        # Hot users are a random sample of users (long and short histories alike), fixed by the seed.
        users = np.sort(events["user_id"].astype(str).unique())
        users = users[rng.permutation(len(users))]
        counts = events["item_id"].value_counts().sort_index()
        items = counts.index.to_numpy(np.int64)
        # Candidates drawn by popularity, as a retrieval stage in front of the ranker would return.
        item_p = counts.to_numpy(np.float64) / float(counts.sum())
        return Workload(
            "dataset", users, zipf_cdf(len(users), cfg.zipf), items, item_p, variants, cfg.candidates,
            note=f"users and items of {path}",
        )  # fmt: skip
    # No dataset: the service exposes no ids, so users are cold-start ids of this run (they gain a
    # history from the /v1/events share) and candidates are ids 1..n_items, some unknown to the
    # bundles (scored as the unknown row). Honest about the path it exercises, not about the data.
    n_items = max(int(m.get("n_items", 0)) for m in models["variants"])
    if n_items < 1:
        raise WorkloadError("GET /v1/models: no variant reports n_items")
    users = np.array([f"lt{cfg.seed}-u{k:05d}" for k in range(SYNTHETIC_USERS)])
    return Workload(
        "synthetic",
        users,
        zipf_cdf(len(users), cfg.zipf),
        np.arange(1, n_items + 1, dtype=np.int64),
        None,
        variants,
        cfg.candidates,
        note=(
            f"no dataset: {SYNTHETIC_USERS} cold-start user ids of this run and item ids 1..{n_items}; "
            "pass --data for the served dataset's users and catalog"
        ),
    )


# -- checks ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScoreCheck:
    """What a /v1/score answer said; `reason` is None when it is right."""

    variant: str | None
    reason: str | None
    body: dict[str, Any] = field(default_factory=dict)


def _problem(status: int, body: bytes) -> str:
    """A short, groupable failure reason for a non-200 answer."""
    try:
        kind = json.loads(body).get("type", "")
    except (ValueError, AttributeError):
        kind = ""
    return f"status {status}" + (f" {kind}" if kind else "")


def check_score(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    candidates: int,
    asked: str | None,
    variants: tuple[str, ...],
    request_id: str | None = None,
) -> ScoreCheck:
    """Check a /v1/score answer's content; headers with lower-case names. Reasons carry no values."""
    served = headers.get("x-model-variant")
    if status != 200:
        return ScoreCheck(served or asked, _problem(status, body))
    if not served:
        return ScoreCheck(asked, "no X-Model-Variant header")
    if asked is not None and served != asked:
        return ScoreCheck(served, "X-Model-Variant differs from X-Experiment")
    if served not in variants:
        return ScoreCheck(served, "X-Model-Variant names no loaded variant")
    if not headers.get("x-model-version"):
        return ScoreCheck(served, "no X-Model-Version header")
    if request_id is not None and headers.get("x-request-id") != request_id:
        return ScoreCheck(served, "X-Request-ID not echoed")
    try:
        doc = json.loads(body)
    except ValueError:
        return ScoreCheck(served, "body is not JSON")
    if not isinstance(doc, dict):
        return ScoreCheck(served, "body is not a JSON object")
    if doc.get("variant") != served:
        return ScoreCheck(served, "body variant differs from X-Model-Variant")
    scores = doc.get("scores")
    if not isinstance(scores, list):
        return ScoreCheck(served, "no scores list")
    if len(scores) != candidates:
        return ScoreCheck(served, "scores count differs from candidates count")
    # bool is an int subclass: a `true` score is a wrong answer, not 1.
    if not all(isinstance(s, float | int) and not isinstance(s, bool) for s in scores):
        return ScoreCheck(served, "a score is not a number")
    if not all(0.0 < s < 1.0 for s in scores):
        return ScoreCheck(served, "a score is outside (0, 1)")
    user = doc.get("user")
    if (
        not isinstance(user, dict)
        or user.get("fm_embedding") not in ("hit", "miss", "stale")
        or not isinstance(user.get("sequence_length"), int)
        or not isinstance(doc.get("model_version"), str)
        or not isinstance(doc.get("request_id"), str)
    ):
        return ScoreCheck(served, "body lacks user / model_version / request_id fields")
    return ScoreCheck(served, None, doc)


def check_events(status: int, body: bytes, user_id: str, appended: int) -> str | None:
    """Check a /v1/events answer; the failure reason, or None when it is right."""
    if status != 200:
        return _problem(status, body)
    try:
        doc = json.loads(body)
    except ValueError:
        return "body is not JSON"
    if not isinstance(doc, dict) or doc.get("user_id") != user_id or doc.get("appended") != appended:
        return "events answer does not match the request"
    length = doc.get("sequence_length")
    if not isinstance(length, int) or length < 1:
        return "events answer has no sequence_length"
    return None
