"""End-to-end check of lifelong histories: synth, train (default window), ingest into Redis, serve.

1. `dare-serve data synth` with users of 3,000 to 10,000 events (at least one of exactly 10,000);
2. `dare-serve train` of `dare` with its default training window (2,000);
3. a private `redis-server` on a free loopback port; `dare-serve ingest --max-events 100000`;
4. `dare-serve serve` with `DARE_STORE_MAX_EVENTS=100000` (search depth: everything stored);
5. checks: a user with 10,000 stored events is scored over all 10,000 (`user.sequence_length` and
   the `desc` of `Server-Timing`'s `search`); a user of 100,000 events, written through
   `POST /v1/events` in ten appends, is read back whole and scored; then the per-stage latency of
   both users (p50 of the server's `Server-Timing` over `--requests` requests of 100 candidates).

    .venv/bin/python -m benchmarks.lifelong [--users 40] [--requests 30]

Prints the checks and a latency table, and exits 1 if a check failed. Not a test (it trains a model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd

from benchmarks._common import dare_server, machine_line, md_table, print_lines
from service.process import dare_serve_command

LONG = 100_000
APPEND = 10_000  # events per POST /v1/events (its largest)
CANDIDATES = 100
NAMESPACE = "lifelong"
STAGES = ("feature", "search", "rank", "total")


class Checks:
    """PASS/FAIL lines as they happen, and the verdict at the end."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def __call__(self, ok: bool, what: str) -> None:
        print(("PASS " if ok else "FAIL ") + what, flush=True)
        if not ok:
            self.failed.append(what)


def cli(*args: str) -> dict[str, Any]:
    """Run a `dare-serve` command; its last stdout line is JSON."""
    done = subprocess.run([*dare_serve_command(), *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"dare-serve {args[0]} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_timing(header: str) -> tuple[dict[str, float], str]:
    """Stage durations (ms) and the `search` entry's description of a Server-Timing value."""
    stages, desc = {}, ""
    for part in header.split(","):
        name, *params = part.strip().split(";")
        for param in params:
            key, _, value = param.partition("=")
            if key == "dur":
                stages[name] = float(value)
            elif key == "desc" and name == "search":
                desc = value.strip('"')
    return stages, desc


def append_long_user(c: httpx.Client, user: str, items: np.ndarray, times: np.ndarray) -> list[int]:
    """Write the user's events through the API, APPEND at a time; the stored lengths it reported."""
    lengths = []
    for a in range(0, len(items), APPEND):
        pairs = zip(items[a : a + APPEND].tolist(), times[a : a + APPEND].tolist(), strict=True)
        body = {"user_id": user, "events": [{"item_id": i, "timestamp": t} for i, t in pairs]}
        lengths.append(c.post("/v1/events", json=body).json()["sequence_length"])
    return lengths


def score_user(
    c: httpx.Client, user: str, n: int, known: np.ndarray, now: int, requests: int, rng: np.random.Generator
) -> tuple[bool, dict[str, float]]:
    """`requests` score requests; whether each read all `n` behaviors, and the p50 ms per stage."""
    ok = True
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    for r in range(requests):
        cands = rng.choice(known, CANDIDATES, replace=False).tolist()
        resp = c.post("/v1/score", json={"user_id": user, "candidates": cands, "timestamp": now})
        body = resp.json()
        timing, desc = parse_timing(resp.headers["server-timing"])
        scores = np.asarray(body["scores"])
        ok &= resp.status_code == 200 and body["user"]["sequence_length"] == n
        ok &= desc == f"{n} behaviors" and bool(((scores > 0) & (scores < 1)).all())
        if r == 0:
            print(f"  {user}: user {body['user']}; Server-Timing: {resp.headers['server-timing']}")
        for s in STAGES:
            stages[s].append(timing[s])
    return ok, {s: float(np.median(v)) for s, v in stages.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=40)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from tests.redis_proc import RedisProcess

    check = Checks()
    rng = np.random.default_rng(args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dare-lifelong-") as tmp:
        work = Path(tmp)
        data, bundles = work / "data", work / "bundles"
        t0 = time.perf_counter()
        cli("data", "synth", "--out", str(data), "--users", str(args.users), "--min-seq-len", "3000",
            "--max-seq-len", "10000", "--seed", str(args.seed))  # fmt: skip
        events = pd.read_parquet(data / "events.parquet", columns=["user_id", "item_id", "timestamp"])
        counts = events["user_id"].value_counts()
        user_10k = str(counts.index[0])
        check(int(counts.iloc[0]) == 10_000, f"the dataset has a user of 10,000 events ({user_10k})")
        trained = cli("train", "--data", str(data), "--model", "dare", "--out", str(bundles),
                      "--epochs", "2", "--seed", str(args.seed), "--no-progress")  # fmt: skip
        print(
            f"dare trained on a 2,000 window (test AUC {trained['auc']:.4f}); {time.perf_counter() - t0:.0f}s"
        )

        redis = RedisProcess().start()
        try:
            ingested = cli("ingest", "--data", str(data), "--redis-url", redis.url, "--namespace", NAMESPACE,
                           "--max-events", str(LONG), "--no-progress")  # fmt: skip
            check(ingested["events"] == len(events), f"ingested {ingested['events']:,} events into Redis")
            env = {"DARE_STORE_MAX_EVENTS": str(LONG)}
            with (
                dare_server(bundles, redis.url, env=env, namespace=NAMESPACE) as server,
                httpx.Client(base_url=server.base, timeout=60, headers={"X-Experiment": "dare"}) as c,
            ):
                models = c.get("/v1/models").json()
                depth = models["variants"][0]["search_depth"]
                check(depth == LONG == models["store_max_events"], f"search depth and store cap {depth:,}")

                known = events["item_id"].unique()
                items = rng.choice(known, LONG)
                span = 400 * 86_400
                times = int(events["timestamp"].max()) - span + np.sort(rng.integers(0, span, LONG))
                user_100k = "lifelong-100k"
                lengths = append_long_user(c, user_100k, items, times)
                check(lengths[-1] == LONG, f"{LONG:,} events appended through the API: lengths {lengths}")
                back = c.get(f"/v1/users/{user_100k}/sequence", params={"limit": LONG}).json()
                same = [e["item_id"] for e in back["events"]] == items.tolist()
                check(back["sequence_length"] == LONG and same, f"{LONG:,} events read back, in order")

                now = int(times[-1]) + 60
                for user, n in ((user_10k, 10_000), (user_100k, LONG)):
                    ok, p50 = score_user(c, user, n, known, now, args.requests, rng)
                    check(
                        ok, f"{user}: {args.requests} scores over all {n:,} behaviors (body, Server-Timing)"
                    )
                    rows.append([f"{n:,}", *(f"{p50[s]:.2f}" for s in STAGES)])
        finally:
            redis.cleanup()
    print_lines(
        [
            "",
            machine_line(),
            f"One request: 1 user, {CANDIDATES} candidates, `dare` (K=64, attention d=16), Redis on "
            f"loopback; p50 ms of {args.requests} sequential requests, from the server's Server-Timing.",
            "",
            *md_table(["behaviors searched", "feature read", "stage 1", "stage 2", "total (server)"], rows),
        ]
    )
    print("PASS all checks" if not check.failed else f"FAIL {len(check.failed)} checks: {check.failed}")
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
