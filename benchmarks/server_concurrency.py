"""c. The whole server under concurrency: requests/s and p50/p99 at 1, 8, 32, 128 clients, batching on/off.

A real `dare-serve serve` (uvicorn, uvloop, httptools) on trained bundles (see benchmarks/_workload.py)
against a private redis-server on loopback, driven by closed-loop clients (benchmarks/_load.py) in
this process. Two servers run side by side, one with `DARE_BATCH_ENABLED=false` and one with the
default batching, and the runs alternate between them in rounds so that noise from other work on
the machine hits both alike. Server overhead: client-measured latency at one client divided by the
in-process compute time of stage 1 + stage 2 (`score_jobs`) for the same requests. Fixed seeds and
sizes; not a test.

    .venv/bin/python -m benchmarks.server_concurrency [--quick] [--bundles ROOT] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable, Collection
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np

from benchmarks._common import (
    Server,
    dare_server,
    machine_line,
    md_table,
    pct,
    print_lines,
    process_tree,
)
from benchmarks._load import LoadResult, closed_loop
from benchmarks._workload import Models, Workload, build_models, describe, fill_redis, make_workload

if TYPE_CHECKING:
    from service.core.pipeline import PreparedJob

CONCURRENCY = (1, 8, 32, 128)
HEADERS = {"X-Experiment": "dare"}
DEFAULT_WORKDIR = Path(".dare/bench")


@dataclass(frozen=True)
class Sizes:
    rounds: int
    seconds: float  # measured seconds per round
    warmup_s: float
    compute_requests: int

    @classmethod
    def of(cls, quick: bool) -> Sizes:
        return cls(1, 2.0, 0.5, 60) if quick else cls(4, 5.0, 1.0, 400)


def batch_stats(base: str) -> tuple[float, float]:
    """(batches, requests) so far, from the server's `dare_batch_size` histogram."""
    text = httpx.get(base + "/metrics", timeout=10).text
    count = sum(float(v) for v in re.findall(r"^dare_batch_size_count\{[^}]*\} (\S+)$", text, re.M))
    total = sum(float(v) for v in re.findall(r"^dare_batch_size_sum\{[^}]*\} (\S+)$", text, re.M))
    return count, total


def check_server(server: Server, w: Workload) -> None:
    """One request answered as expected: the user's whole sequence and the FM embedding were used."""
    r = httpx.post(server.base + "/v1/score", json=w.requests[0], headers=HEADERS, timeout=30)
    r.raise_for_status()
    got = r.json()
    assert len(got["scores"]) == len(w.requests[0]["candidates"]), got
    assert got["user"]["sequence_length"] == w.items.shape[1], got["user"]
    assert w.fm_version is None or got["user"]["fm_embedding"] == "hit", got["user"]


@dataclass
class Point:
    """Merged rounds of one (server, clients) point."""

    results: list[LoadResult]
    batches: float = 0.0
    batched_requests: float = 0.0

    @property
    def rps(self) -> float:
        return sum(r.completed for r in self.results) / sum(r.seconds for r in self.results)

    @property
    def latencies(self) -> np.ndarray:
        return np.concatenate([r.latencies_ms for r in self.results])

    @property
    def cpu_ms(self) -> float:
        return 1e3 * sum(r.server_cpu_s for r in self.results) / sum(r.completed for r in self.results)

    @property
    def loop_cpu_ms(self) -> float:
        return 1e3 * sum(r.loop_cpu_s for r in self.results) / sum(r.completed for r in self.results)

    @property
    def client_cpu_share(self) -> float:
        return sum(r.client_cpu_s for r in self.results) / sum(r.seconds for r in self.results)

    @property
    def mean_batch(self) -> float:
        return self.batched_requests / self.batches if self.batches else float("nan")


def sweep(
    servers: dict[str, Server],
    w: Workload,
    sizes: Sizes,
    extra_pids: list[int],
    concurrency: tuple[int, ...] = CONCURRENCY,
    dare: Collection[str] | None = None,
    between: Callable[[int], object] | None = None,
) -> dict[tuple[str, int], Point]:
    """Every server at every concurrency, alternating servers within each round.

    `dare` names the servers that are dare-serve (default: all): their batch sizes are read from
    /metrics and their event loop's CPU time is measured apart. `between(n)` runs after each round.
    """
    dare = set(servers) if dare is None else set(dare)
    points: dict[tuple[str, int], Point] = {}
    for n in concurrency:
        for _ in range(sizes.rounds):
            for name, s in servers.items():
                pids = process_tree(s.pid) + extra_pids
                before = batch_stats(s.base) if name in dare else (0.0, 0.0)
                res = closed_loop(
                    s.host, s.port, "/v1/score", w.bodies, n,
                    warmup_s=sizes.warmup_s, duration_s=sizes.seconds, headers=HEADERS,
                    server_pids=pids, loop_pid=s.pid if name in dare else None,
                )  # fmt: skip
                after = batch_stats(s.base) if name in dare else (0.0, 0.0)
                p = points.setdefault((name, n), Point([]))
                p.results.append(res)
                # batches of the warm-up count too: the mean is over the whole run
                p.batches += after[0] - before[0]
                p.batched_requests += after[1] - before[1]
            if between is not None:
                between(n)
            done = [(name, points[(name, n)]) for name in servers]
            summary = ", ".join(f"{k} {p.rps:.0f} req/s p99 {pct(p.latencies, 99):.1f} ms" for k, p in done)
            print(f"  {n:>3} clients: {summary}", flush=True)
    return points


class CoreTimer:
    """The pure core in-process: prepare, search, rank of the workload's requests, timed in ms.

    Runs in a worker thread set up like the service's compute threads (BLAS / OpenMP at one
    thread), with the service's ORT options. Stage 1 on one thread: a lone request of this size
    runs inline on the service's engine too, and a batch's searches then cost what they cost, not
    what two threads hide. `run` can be called between load rounds, so that the compute and the
    end-to-end latency it is compared with see the same state of a shared machine.
    """

    def __init__(self, models: Models, w: Workload) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from exporters.bundle import load_bundle
        from service.core.pipeline import ScoringModel
        from service.core.runtime import session_options, single_threaded_numerics
        from service.core.search import Stage1Engine

        self.w = w
        self.model = ScoringModel.from_bundle(load_bundle(models.ranker, session_options=session_options(1)))
        self.engine = Stage1Engine(threads=1)
        self.pool = ThreadPoolExecutor(1, initializer=single_threaded_numerics)
        self.samples: dict[str, list[float]] = {
            k: [] for k in ("prepare", "search", "rank", "search+rank", "batch of 8")
        }

    def _job(self, i: int) -> PreparedJob:
        from service.core.pipeline import prepare_job

        w = self.w
        req = w.requests[i % len(w.requests)]
        u = w.user_index(req["user_id"])
        fm = w.fm[u] if w.fm.shape[1] else None
        return prepare_job(self.model, np.asarray(req["candidates"]), w.items[u], w.timestamps[u], w.now, fm)

    def _run(self, first: int, n: int, warmup: int = 5) -> None:
        from service.core.pipeline import score_jobs

        rows = self.samples
        for i in range(first - warmup, first + n):
            t0 = time.perf_counter()
            prepared = self._job(i)
            t1 = time.perf_counter()
            out = score_jobs(self.model, [prepared], self.engine)[0]
            t2 = time.perf_counter()
            if i >= first:
                rows["prepare"].append((t1 - t0) * 1e3)
                rows["search"].append(out.search_s * 1e3)
                rows["rank"].append(out.rank_s * 1e3)
                rows["search+rank"].append((t2 - t1) * 1e3)
        # the same requests scored 8 at a time, as a batch of the service: ms per request
        for b in range(n // 8):
            jobs = [self._job(first + 8 * b + j) for j in range(8)]
            t0 = time.perf_counter()
            score_jobs(self.model, jobs, self.engine)
            rows["batch of 8"].append((time.perf_counter() - t0) * 1e3 / 8)

    def run(self, first: int, n: int) -> None:
        """Time requests first .. first + n - 1 (after a few untimed ones)."""
        self.pool.submit(self._run, first, n).result()

    def result(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self.samples.items()}

    def close(self) -> None:
        self.pool.shutdown()
        self.engine.close()


def compute_times(models: Models, w: Workload, n: int) -> dict[str, np.ndarray]:
    """ms per request of the pure core for the first n request bodies (see `CoreTimer`)."""
    timer = CoreTimer(models, w)
    try:
        timer.run(0, n)
        return timer.result()
    finally:
        timer.close()


def section(quick: bool, workdir: Path = DEFAULT_WORKDIR, bundles: Path | None = None) -> list[str]:
    from tests.redis_proc import RedisProcess

    sizes = Sizes.of(quick)
    models = build_models(workdir, bundles)
    w = make_workload(models, quick)
    redis = RedisProcess().start()
    try:
        fill_redis(redis.url, w)
        with ExitStack() as stack:
            servers = {
                mode: stack.enter_context(dare_server(models.root, redis.url, {"DARE_BATCH_ENABLED": flag}))
                for mode, flag in (("off", "false"), ("on", "true"))
            }
            for s in servers.values():
                check_server(s, w)
            assert redis.proc is not None
            timer = CoreTimer(models, w)
            try:
                # the core's time is taken between the one-client rounds, on the requests they sent
                per_round = sizes.compute_requests // sizes.rounds
                points = sweep(
                    servers,
                    w,
                    sizes,
                    [redis.proc.pid],
                    between=lambda n: timer.run(0, per_round) if n == 1 else None,
                )
                compute = timer.result()
            finally:
                timer.close()
    finally:
        redis.cleanup()
    return render(models, w, sizes, points, compute)


def render(
    models: Models,
    w: Workload,
    sizes: Sizes,
    points: dict[tuple[str, int], Point],
    compute: dict[str, np.ndarray],
) -> list[str]:
    rows = []
    for n in CONCURRENCY:
        off, on = points[("off", n)], points[("on", n)]
        rows.append(
            [
                str(n),
                f"{off.rps:.0f}",
                f"{pct(off.latencies, 50):.1f} / {pct(off.latencies, 99):.1f}",
                f"{on.rps:.0f}",
                f"{pct(on.latencies, 50):.1f} / {pct(on.latencies, 99):.1f}",
                f"**{on.rps / off.rps:.2f}x**",
                f"{off.cpu_ms:.1f} ({off.loop_cpu_ms:.1f}) / {on.cpu_ms:.1f} ({on.loop_cpu_ms:.1f})",
                f"{on.mean_batch:.1f}",
                f"{100 * max(off.client_cpu_share, on.client_cpu_share):.0f}%",
            ]
        )
    one_off, one_on = points[("off", 1)].latencies, points[("on", 1)].latencies
    core = float(np.median(compute["search+rank"]))
    off32, on32 = points[("off", 32)], points[("on", 32)]
    ratio32 = on32.rps / off32.rps
    floor = float(np.median(compute["prepare"] + compute["search+rank"]))
    overhead = [
        [
            mode,
            f"{pct(lat, 50):.2f}",
            f"{core:.2f} ({np.median(compute['search']):.2f} + {np.median(compute['rank']):.2f})",
            f"{np.median(compute['prepare']):.2f}",
            f"**{pct(lat, 50) / core:.2f}x**",
        ]
        for mode, lat in (("off", one_off), ("on", one_on))
    ]
    worst = max(pct(one_off, 50), pct(one_on, 50)) / core
    rounds = (
        f"{sizes.rounds} alternating rounds of {sizes.seconds:g} s"
        if sizes.rounds > 1
        else (f"one run of {sizes.seconds:g} s")
    )
    return [
        "## c. The whole server under concurrency",
        "",
        f"{describe(models, w)}. Closed loop: each client sends its next request when the previous "
        f"answer arrives, over one keep-alive connection; {rounds} per point after {sizes.warmup_s:g} s "
        "of warm-up, the two servers alternating. Both servers run with the defaults except "
        "`DARE_BATCH_ENABLED` (batching on: at most 32 requests per batch, 2 ms wait while another batch "
        "runs, one batch in flight and one compute thread per core, ORT at one thread). Latency in ms as "
        "the client sees it. CPU: server + Redis CPU time per request, and in parentheses the part of the "
        "server's event-loop thread (HTTP, JSON, Redis client); the rest is the compute threads. The "
        "load generator runs on the same cores (its share of one core is in the last column).",
        "",
        *md_table(
            [
                "clients",
                "off req/s",
                "off p50 / p99",
                "on req/s",
                "on p50 / p99",
                "on / off req/s",
                "CPU ms/req (event loop) off / on",
                "mean batch (on)",
                "client CPU",
            ],
            rows,
        ),
        "",
        "Server overhead at one client: end-to-end p50 over the in-process p50 of `score_jobs` (stage-1 "
        "search + stage-2 ONNX call) for the same requests, in a thread set up like the service's "
        "compute thread. The server also maps ids to rows and ages to buckets (`prepare`), reads Redis, "
        "parses and writes JSON.",
        "",
        *md_table(
            ["batching", "end-to-end p50 ms", "search + rank p50 ms", "prepare p50 ms", "overhead"],
            overhead,
        ),
        "",
        f"- Batching at 32 clients: **{ratio32:.2f}x** the requests/s of unbatched (goal >= 1.5x: "
        f"{'met' if ratio32 >= 1.5 else 'missed'}).",
        f"- Where the gain comes from, at 32 clients: per request, the event loop (HTTP, JSON, the Redis "
        f"read, the hand-off to the compute thread) takes {off32.loop_cpu_ms:.1f} ms unbatched and "
        f"{on32.loop_cpu_ms:.1f} ms batched; the compute threads and Redis "
        f"{off32.cpu_ms - off32.loop_cpu_ms:.1f} and {on32.cpu_ms - on32.loop_cpu_ms:.1f} ms. CPU per "
        f"request: {off32.cpu_ms / on32.cpu_ms:.2f}x less batched. Stage 1 and stage 2 do not get "
        f"cheaper per request in a batch (their work is per candidate): `score_jobs` took "
        f"{np.median(compute['search+rank']):.2f} ms per request alone and "
        f"{np.median(compute['batch of 8']):.2f} ms per request in batches of 8 (same engine, one "
        f"thread). Batching removes only the overhead around them: even with none left, CPU per request "
        f"could fall at most {off32.cpu_ms / floor:.2f}x ({off32.cpu_ms:.1f} ms unbatched / {floor:.1f} ms "
        f"of prepare + search + rank alone).",
        f"- Server overhead: **{worst:.2f}x** at most (goal <= 2x: {'met' if worst <= 2 else 'missed'}).",
    ]


def server_bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options of every benchmark that serves the trained ranker: --quick, --workdir, --bundles."""
    ap = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs, fewer users (a smoke run)")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where trained bundles are kept")
    ap.add_argument("--bundles", type=Path, help="serve this bundle root (its newest `dare`) instead")
    return ap


def main() -> None:
    ap = server_bench_parser(__doc__)
    args = ap.parse_args()
    print(f"machine: {machine_line()}", flush=True)
    print_lines(section(args.quick, args.workdir, args.bundles))


if __name__ == "__main__":
    main()
