"""Service latency benchmark: one /v1/score request, 200 candidates, 1,000 vs 10,000 behaviors.

A real `dare-serve serve` (uvicorn, uvloop, httptools) against a private redis-server, with a
random-weight DARE ranker at serving size (K=64, attention d=16, FM input of 32) exported as a real
bundle. Requests are sent one at a time (latency, not throughput), split by stage from the
`Server-Timing` header, with batching on and off; then the same with 8 concurrent clients to show
what batching is for; and the in-process core alone (no HTTP, no Redis) as the floor. Fixed seeds
and sizes; not a test.

    .venv/bin/python -m benchmarks.service_latency [--requests 300] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

from benchmarks._common import dare_server
from feature_store.fill import fill
from tests.redis_proc import RedisProcess

SEED = 20240607
N_ITEMS, N_CATEGORIES = 50_001, 200
ATTENTION_DIM, REPR_DIM, TOP_K, FM_DIM = 16, 64, 64, 32
LENGTHS = (1_000, 10_000)
CANDIDATES = 200
T0 = 1_700_000_000
FM_VERSION = "fm:bench"
STAGES = ("queue", "feature", "search", "rank", "total")


def build_bundle(root: Path) -> Path:
    """A random-weight DARE ranker exported as a real bundle (ONNX + FAISS + arrays)."""
    import torch

    from exporters.export import export_ranker
    from exporters.models import RankerConfig, TwoStageRanker

    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    cats = np.r_[0, rng.integers(1, N_CATEGORIES, N_ITEMS - 1)].astype(np.int64)
    cfg = RankerConfig("dare", N_ITEMS, N_CATEGORIES, ATTENTION_DIM, REPR_DIM, TOP_K, FM_DIM, (128, 64))
    model = TwoStageRanker(cfg, cats)
    with torch.no_grad():  # spread the untrained weights so scores and attention vary
        for p in model.parameters():
            p.normal_(0, 0.2)
    item_ids = np.r_[-1, np.arange(1, N_ITEMS)].astype(np.int64)
    metrics = {"auc": 0.5, "gauc": 0.5, "logloss": 0.69}
    return export_ranker(model.eval(), root, "dare", item_ids, max(LENGTHS), metrics, FM_VERSION, {})


def user_history(length: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED + length)
    items = rng.integers(1, N_ITEMS, length).astype(np.int64)
    times = T0 + np.cumsum(rng.integers(1, 3_600, length)).astype(np.int64)
    return items, times


def candidates() -> list[int]:
    return np.random.default_rng(SEED).integers(1, N_ITEMS, CANDIDATES).tolist()


def store_data() -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The events of the users `user-<length>` (one per length) and their FM vectors (random)."""
    users = [f"user-{n}" for n in LENGTHS]
    frames = []
    for user, length in zip(users, LENGTHS, strict=True):
        items, times = user_history(length)
        frames.append(pd.DataFrame({"user_id": user, "item_id": items, "timestamp": times}))
    vectors = np.random.default_rng(SEED).standard_normal((len(users), FM_DIM)).astype(np.float32)
    return pd.concat(frames, ignore_index=True), dict(zip(users, vectors, strict=True))


def parse_timing(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";dur=")
        out[name] = float(rest.partition(";")[0])  # `search` carries a desc after its duration
    return out


def run_sequential(base: str, length: int, n: int, warmup: int) -> dict[str, np.ndarray]:
    """n requests one after another over one keep-alive connection; ms per stage and client-side."""
    body = {"user_id": f"user-{length}", "candidates": candidates()}
    rows: dict[str, list[float]] = {s: [] for s in (*STAGES, "client")}
    with httpx.Client(base_url=base, headers={"X-Experiment": "dare"}, timeout=10) as c:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            r = c.post("/v1/score", json=body)
            took = (time.perf_counter() - t0) * 1e3
            if r.status_code != 200:
                raise RuntimeError(r.text)
            if i < warmup:
                continue
            assert r.json()["user"]["sequence_length"] == length and r.json()["user"]["fm_embedding"] == "hit"
            for k, v in parse_timing(r.headers["server-timing"]).items():
                rows[k].append(v)
            rows["client"].append(took)
    return {k: np.asarray(v) for k, v in rows.items()}


def run_concurrent(base: str, length: int, n: int, clients: int) -> tuple[np.ndarray, float]:
    """`clients` threads each sending n/clients requests back to back; client ms and requests/s."""
    body = {"user_id": f"user-{length}", "candidates": candidates()}
    times: list[float] = []
    lock = threading.Lock()

    def worker(count: int) -> None:
        with httpx.Client(base_url=base, headers={"X-Experiment": "dare"}, timeout=30) as c:
            c.post("/v1/score", json=body)
            for _ in range(count):
                t0 = time.perf_counter()
                r = c.post("/v1/score", json=body)
                took = (time.perf_counter() - t0) * 1e3
                if r.status_code != 200:
                    raise RuntimeError(r.text)
                with lock:
                    times.append(took)

    threads = [threading.Thread(target=worker, args=(n // clients,)) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return np.asarray(times), len(times) / (time.perf_counter() - t0)


def core_only(bundle_path: Path, length: int, n: int) -> dict[str, np.ndarray]:
    """The pure core (rows, buckets, both stages) in this process: no HTTP, no Redis."""
    from exporters.bundle import load_bundle
    from service.core.pipeline import ScoringModel, prepare_job, score_jobs
    from service.core.runtime import session_options

    model = ScoringModel.from_bundle(load_bundle(bundle_path, session_options=session_options(1)))
    items, times = user_history(length)
    cands = np.asarray(candidates(), np.int64)
    fm = np.random.default_rng(SEED).standard_normal(FM_DIM).astype(np.float32)
    rows: dict[str, list[float]] = {"search": [], "rank": [], "total": []}
    for i in range(n + 20):
        t0 = time.perf_counter()
        job = prepare_job(model, cands, items, times, int(times[-1]) + 60, fm)
        out = score_jobs(model, [job])[0]
        total = (time.perf_counter() - t0) * 1e3
        if i >= 20:
            rows["search"].append(out.search_s * 1e3)
            rows["rank"].append(out.rank_s * 1e3)
            rows["total"].append(total)
    return {k: np.asarray(v) for k, v in rows.items()}


def pct(a: np.ndarray, q: float) -> str:
    return f"{np.percentile(a, q):.2f}" if len(a) else "-"


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for r in [header, ["-" * w for w in widths], *rows]:
        print(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300, help="timed requests per row")
    ap.add_argument("--quick", action="store_true", help="60 requests per row")
    args = ap.parse_args()
    n = 60 if args.quick else args.requests
    warmup = 30

    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(
        f"workload: {CANDIDATES} candidates, K={TOP_K}, attention d={ATTENTION_DIM}, repr d={REPR_DIM}, "
        f"FM d={FM_DIM}, {N_ITEMS - 1} items; {n} timed requests per row after {warmup} warm-up"
    )
    work = Path(tempfile.mkdtemp(prefix="dare-bench-"))
    redis = RedisProcess().start()
    try:
        bundle = build_bundle(work / "bundles")
        events, fm = store_data()
        fill(redis.url, "bench", events=events, fm=fm, fm_version=FM_VERSION)
        seq: dict[tuple[int, bool], dict[str, np.ndarray]] = {}
        conc: dict[tuple[int, bool], tuple[np.ndarray, float]] = {}
        for batching in (False, True):
            env = {"DARE_BATCH_ENABLED": str(batching).lower()}
            with dare_server(work / "bundles", redis.url, env) as srv:
                base = srv.base
                for length in LENGTHS:
                    seq[(length, batching)] = run_sequential(base, length, n, warmup)
                for length in LENGTHS:
                    conc[(length, batching)] = run_concurrent(base, length, max(n, 160), clients=8)
        # in a worker set up like the service's compute threads (BLAS / OpenMP at one thread)
        from concurrent.futures import ThreadPoolExecutor

        from service.core.runtime import single_threaded_numerics

        with ThreadPoolExecutor(1, initializer=single_threaded_numerics) as pool:
            core = {length: pool.submit(core_only, bundle, length, n).result() for length in LENGTHS}
    finally:
        redis.cleanup()

    header = ["events", "batching", "client p50/p99", "server total", "queue", "feature", "search", "rank"]
    rows = []
    for (length, batching), r in sorted(seq.items()):
        rows.append(
            [f"{length:,}", "on" if batching else "off"]
            + [
                f"{pct(r[k], 50)} / {pct(r[k], 99)}"
                for k in ("client", "total", "queue", "feature", "search", "rank")
            ]
        )
    print_table("One request at a time (ms, p50 / p99; stages from Server-Timing)", header, rows)

    rows = []
    for length in LENGTHS:
        r = core[length]
        rows.append(
            [f"{length:,}", *(f"{pct(r[k], 50)} / {pct(r[k], 99)}" for k in ("total", "search", "rank"))]
        )
    print_table(
        "In-process core, no HTTP or Redis (ms, p50 / p99)",
        ["events", "prepare+search+rank", "search", "rank"],
        rows,
    )

    rows = []
    for (length, batching), (times, rps) in sorted(conc.items()):
        rows.append(
            [f"{length:,}", "on" if batching else "off", f"{pct(times, 50)} / {pct(times, 99)}", f"{rps:.0f}"]
        )
    print_table(
        "8 concurrent clients (ms, p50 / p99)", ["events", "batching", "client latency", "requests/s"], rows
    )
    for length in LENGTHS:
        ratio = conc[(length, True)][1] / conc[(length, False)][1]
        print(f"batching on/off throughput at {length:,} events: {ratio:.2f}x")


if __name__ == "__main__":
    main()
