"""Locust traffic against dare-serve: zipfian users, catalog candidates, A/B headers, event appends.

Configured by DARE_LT_* environment variables (see loadtest/workload.py and docs/loadtest.md);
`dare-serve loadtest` sets them. Every answer's content is checked, not only its status; score
requests are named `score [<variant>]` after the variant that answered, so locust's statistics
are per A/B arm. At exit, DARE_LT_OUT/dare_stats.json gets the merged score statistics and what
the answers said (FM hits, cold starts, unknown items).

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 -u 8 -r 4 -t 30s
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from locust import FastHttpUser, between, constant, events, task
from locust.env import Environment
from locust.stats import StatsEntry

from loadtest.workload import (
    ScoreCheck,
    TrafficConfig,
    Workload,
    WorkloadError,
    check_events,
    check_score,
    load_workload,
)

log = logging.getLogger("dare-loadtest")

PERCENTILES = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99, "p999": 0.999}
STATS_FILE = "dare_stats.json"


def score_name(variant: str | None) -> str:
    """The locust request name of a score answered by this variant."""
    return f"score [{variant or 'unknown'}]"


@dataclass
class Tally:
    """What the right score and events answers said, for summary.json."""

    scores: int = 0
    forced: int = 0
    candidates: int = 0
    unknown_items: int = 0
    cold_starts: int = 0
    sequence_length: int = 0
    fm_embedding: Counter[str] = field(default_factory=Counter)
    appended: int = 0

    def add_score(self, check: ScoreCheck, candidates: int, forced: bool) -> None:
        """Count one right score answer."""
        user = check.body.get("user", {})
        self.scores += 1
        self.forced += forced
        self.candidates += candidates
        self.unknown_items += int(check.body.get("unknown_items") or 0)
        self.cold_starts += bool(user.get("cold_start"))
        self.sequence_length += int(user.get("sequence_length") or 0)
        self.fm_embedding[str(user.get("fm_embedding"))] += 1

    def summary(self) -> dict[str, Any]:
        """Shares over the right score answers."""
        n = max(self.scores, 1)
        return {
            "scores_checked": self.scores,
            "forced_variant_share": self.forced / n,
            "unknown_item_share": self.unknown_items / max(self.candidates, 1),
            "cold_start_share": self.cold_starts / n,
            "mean_sequence_length": self.sequence_length / n,
            "fm_embedding_share": {k: v / n for k, v in sorted(self.fm_embedding.items())},
            "events_appended": self.appended,
        }


class DareUser(FastHttpUser):
    """One client of the ranker: scores candidate sets, sometimes appends behaviors."""

    # Filled once per process by the init listener, before any user starts.
    config: ClassVar[TrafficConfig] = TrafficConfig()
    workload: ClassVar[Workload | None] = None
    tally: ClassVar[Tally] = Tally()
    wait_time = constant(0)
    _ids: ClassVar[itertools.count[int]] = itertools.count()

    def on_start(self) -> None:
        """A seeded generator per user: a run's traffic depends only on the seed and user count."""
        self.index = next(DareUser._ids)
        self.rng = np.random.default_rng([self.config.seed, self.index])
        self.sent = 0

    @task
    def step(self) -> None:
        """A score request, or an events append with the configured share."""
        if self.rng.random() < self.config.events_share:
            self.append_events()
        else:
            self.score()

    def score(self) -> None:
        """POST /v1/score and check the answer."""
        w = self.workload
        assert w is not None  # the init listener exits the process when it cannot build it
        user = w.draw_user(self.rng)
        candidates = w.draw_candidates(self.rng)
        asked = None
        if self.rng.random() < self.config.experiment_share:
            asked = w.variants[int(self.rng.integers(len(w.variants)))]
        self.sent += 1
        request_id = f"lt-{self.index}-{self.sent}"
        headers = {"X-Request-ID": request_id}
        if asked is not None:
            headers["X-Experiment"] = asked
        with self.client.post(
            "/v1/score",
            json={"user_id": user, "candidates": candidates},
            headers=headers,
            name=score_name(asked),
            catch_response=True,
        ) as resp:
            if resp.status_code == 0:
                resp.failure(f"connection error: {type(resp.error).__name__}")
                return
            got = {k.lower(): v for k, v in (resp.headers or {}).items()}
            check = check_score(
                resp.status_code, got, resp.content or b"", len(candidates), asked, w.variants, request_id
            )
            # Renamed after the answer, so locust keeps statistics per variant that served.
            resp.request_meta["name"] = score_name(check.variant)
            if check.reason is not None:
                resp.failure(check.reason)
            else:
                resp.success()
                self.tally.add_score(check, len(candidates), asked is not None)

    def append_events(self) -> None:
        """POST /v1/events for a zipfian user and check the answer."""
        w = self.workload
        assert w is not None
        user = w.draw_user(self.rng)
        new = w.draw_events(self.rng, int(time.time()))
        headers: dict[str, str] = {}
        if self.config.write_token:
            headers["Authorization"] = f"Bearer {self.config.write_token}"
        with self.client.post(
            "/v1/events", json={"user_id": user, "events": new}, headers=headers, name="events",
            catch_response=True,
        ) as resp:  # fmt: skip
            if resp.status_code == 0:
                resp.failure(f"connection error: {type(resp.error).__name__}")
                return
            reason = check_events(resp.status_code, resp.content or b"", user, len(new))
            if reason is not None:
                resp.failure(reason)
            else:
                resp.success()
                self.tally.appended += len(new)


def fetch_models(host: str, timeout: float = 10.0) -> dict[str, Any]:
    """GET /v1/models once, outside locust's statistics."""
    try:
        with urllib.request.urlopen(host.rstrip("/") + "/v1/models", timeout=timeout) as r:
            body: dict[str, Any] = json.loads(r.read())
    except (OSError, ValueError) as e:
        raise WorkloadError(f"GET {host}/v1/models failed: {e}") from None
    return body


@events.init.add_listener
def _build_workload(environment: Environment, **_: Any) -> None:
    try:
        if not environment.host:
            raise WorkloadError("no --host given")
        cfg = TrafficConfig.from_env()
        DareUser.config = cfg
        DareUser.workload = load_workload(cfg, fetch_models(environment.host))
    except WorkloadError as e:
        log.error("dare-serve load test: %s", e)
        # SystemExit passes through locust's event hooks: no run without a workload.
        sys.exit(2)
    DareUser.wait_time = between(0, cfg.wait_ms / 1000.0) if cfg.wait_ms > 0 else constant(0)
    log.info("dare-serve load test: %s", json.dumps(DareUser.workload.describe()))


def entry_stats(e: StatsEntry) -> dict[str, Any]:
    """Counts, rate and latency percentiles (ms) of one statistics entry."""
    return {
        "requests": e.num_requests,
        "failures": e.num_failures,
        "requests_per_s": e.total_rps,
        "failure_rate": e.fail_ratio,
        "latency_ms": {
            "avg": e.avg_response_time,
            "min": e.min_response_time or 0,
            "max": e.max_response_time,
            **{k: e.get_response_time_percentile(q) for k, q in PERCENTILES.items()},
        },
    }


@events.quitting.add_listener
def _write_stats(environment: Environment, **_: Any) -> None:
    out = DareUser.config.out
    if out is None or DareUser.workload is None:
        return
    stats = environment.stats
    config = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in asdict(DareUser.config).items()
        if k not in ("write_token", "out")
    }
    # One entry over every variant's scores: percentiles merge only from the histograms, here.
    score = StatsEntry(stats, "score", "POST")
    names: dict[str, dict[str, Any]] = {}
    for (name, _method), e in sorted(stats.entries.items()):
        names[name] = entry_stats(e)
        if name.startswith("score ["):
            score.extend(e)
    doc = {
        "total": entry_stats(stats.total),
        "score": entry_stats(score),
        "names": names,
        "errors": [
            {"name": err.name, "error": str(err.error), "occurrences": err.occurrences}
            for err in stats.errors.values()
        ],
        # Exceptions raised in the task code itself: a broken load test, not a failing server.
        "exceptions": [
            {"count": ex["count"], "msg": str(ex["msg"])}
            for ex in (environment.runner.exceptions.values() if environment.runner else [])
        ],
        # Locust warns when its own process passes 90% CPU: then latencies include client queueing.
        "client_cpu_warning": bool(environment.runner and environment.runner.cpu_warning_emitted),
        "traffic": {**DareUser.workload.describe(), "config": config},
        "answers": DareUser.tally.summary(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / STATS_FILE).write_text(json.dumps(doc, indent=1))
