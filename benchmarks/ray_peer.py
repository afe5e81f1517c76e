"""f. dare-serve against a Ray Serve peer serving the same ONNX ranker, under the same closed-loop load.

The peer (benchmarks/peer/ray_app.py, in its own .venv-peer from benchmarks/peer/setup.sh) serves
the same exported bundle: the same Redis keys read per request (one pipeline per batch), FAISS
exact inner-product top-K over the same attention vectors, the same ranker.onnx, `@serve.batch`
with dare-serve's batch settings (32 requests, 2 ms, 2 batches in flight), one worker thread for
the compute, one replica (two cores: the replica, and Ray's HTTP proxy, controller and raylet).
Before any timing, the same requests are scored by both and must agree. Then both run under the
same clients and requests, alternating in rounds. Fixed seeds and sizes; not a test.

    benchmarks/peer/setup.sh   # once
    .venv/bin/python -m benchmarks.ray_peer [--quick] [--replicas 1] [--bundles ROOT] [--workdir DIR]
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from benchmarks._common import (
    ROOT,
    Server,
    dare_server,
    machine_line,
    md_table,
    pct,
    print_lines,
)
from benchmarks._workload import (
    NAMESPACE,
    Models,
    Workload,
    build_models,
    describe,
    fill_redis,
    make_workload,
)
from benchmarks.server_concurrency import (
    CONCURRENCY,
    DEFAULT_WORKDIR,
    HEADERS,
    Point,
    Sizes,
    compute_times,
    server_bench_parser,
    sweep,
)
from service.process import LOOPBACK, free_port, stop_process

PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"
PEER_APP = "benchmarks.peer.ray_app"  # run as a module from the repository root
CHECK_REQUESTS = 32


def peer_versions() -> str:
    out = subprocess.run(
        [str(PEER_PYTHON), "-c", "import ray, onnxruntime, faiss; "
         "print(ray.__version__, onnxruntime.__version__, faiss.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return f"Ray {out[0]} (ONNX Runtime {out[1]}, FAISS {out[2]})"


@dataclass(frozen=True)
class RayServer:
    """The started Ray Serve peer: where it listens, and its driver process."""

    base: str
    host: str
    port: int
    pid: int


@contextmanager
def ray_server(bundle: Path, redis_url: str, replicas: int) -> Iterator[Server]:
    """The Ray Serve peer in a subprocess of .venv-peer; yields it once it has answered READY."""
    if not PEER_PYTHON.exists():
        raise SystemExit(f"{PEER_PYTHON} is missing: run benchmarks/peer/setup.sh first")
    port = free_port()
    cmd = [str(PEER_PYTHON), "-m", PEER_APP, "--bundle", str(bundle.resolve()), "--redis-url", redis_url,
           "--namespace", NAMESPACE, "--port", str(port), "--replicas", str(replicas)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    with tempfile.TemporaryFile() as log:
        # its own session: Ray's processes are its descendants and go with it
        proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("READY"):
                stop_process(proc)
                log.seek(0)
                raise RuntimeError(f"the Ray Serve peer did not start: {log.read().decode()[-3000:]}")
            yield RayServer(f"http://{LOOPBACK}:{port}", LOOPBACK, port, proc.pid)
        finally:
            stop_process(proc, timeout=60)
            # whatever Ray left behind in the session started for it (its own processes only)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def scores_of(server: Server, w: Workload, n: int) -> list[list[float]]:
    with httpx.Client(base_url=server.base, headers=HEADERS, timeout=60) as c:
        out = []
        for req in w.requests[:n]:
            r = c.post("/v1/score", json=req)
            r.raise_for_status()
            out.append(r.json()["scores"])
        return out


def peer_compute_ms(models: Models, w: Workload, redis_url: str, n: int) -> float:
    """p50 ms of the peer's scoring code alone (decode, rows, faiss.knn, ORT) for the first n requests."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(w.requests[:n], f)
        f.flush()
        out = subprocess.run(
            [str(PEER_PYTHON), "-m", PEER_APP, "--bundle", str(models.ranker.resolve()), "--redis-url",
             redis_url, "--namespace", NAMESPACE, "--bench-compute", f.name],
            capture_output=True, text=True, check=True, cwd=ROOT,
        ).stdout  # fmt: skip
    return float(json.loads(out.strip().splitlines()[-1])["p50_ms"])


def check_same_scores(dare: Server, peer: Server, w: Workload) -> float:
    """Max abs difference of the two servers' scores over the first requests (must be ~float32 eps)."""
    a, b = scores_of(dare, w, CHECK_REQUESTS), scores_of(peer, w, CHECK_REQUESTS)
    diff = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(a, b, strict=True))
    if diff > 1e-5:
        raise RuntimeError(f"dare-serve and the Ray Serve peer disagree: max abs score difference {diff:.2e}")
    return diff


def rps_at_p99(points: list[Point], budget_ms: float) -> float:
    """Requests/s a server sustains within a p99 budget, read off its (p99, req/s) curve.

    The curve is the concurrency sweep in order; between two points the rate is interpolated
    linearly in p99. NaN when even its lightest load is above the budget.
    """
    curve = [(pct(p.latencies, 99), p.rps) for p in points]
    within = [r for p99, r in curve if p99 <= budget_ms]
    for (p0, r0), (p1, r1) in itertools.pairwise(curve):
        if p0 <= budget_ms < p1:
            within.append(r0 + (r1 - r0) * (budget_ms - p0) / (p1 - p0))
    return max(within, default=float("nan"))


def section(
    quick: bool, workdir: Path = DEFAULT_WORKDIR, bundles: Path | None = None, replicas: int = 1
) -> list[str]:
    from tests.redis_proc import RedisProcess

    sizes = Sizes.of(quick)
    models = build_models(workdir, bundles)
    w = make_workload(models, quick)
    versions = peer_versions()
    redis = RedisProcess().start()
    try:
        fill_redis(redis.url, w)
        t0 = time.perf_counter()
        with ray_server(models.ranker, redis.url, replicas) as peer:
            ray_start_s = time.perf_counter() - t0
            with dare_server(models.root, redis.url, {"DARE_BATCH_ENABLED": "true"}) as dare:
                diff = check_same_scores(dare, peer, w)
                print(f"  scores agree: max abs difference {diff:.1e}", flush=True)
                assert redis.proc is not None
                servers = {"dare-serve": dare, "Ray Serve": peer}
                points = sweep(servers, w, sizes, [redis.proc.pid], dare={"dare-serve"})
        core = compute_times(models, w, sizes.compute_requests)
        compute = (
            float(np.median(core["prepare"] + core["search+rank"])),
            peer_compute_ms(models, w, redis.url, sizes.compute_requests),
        )
    finally:
        redis.cleanup()
    return render(models, w, sizes, points, diff, versions, replicas, ray_start_s, compute)


def render(
    models: Models,
    w: Workload,
    sizes: Sizes,
    points: dict[tuple[str, int], Point],
    diff: float,
    versions: str,
    replicas: int,
    ray_start_s: float,
    compute: tuple[float, float],
) -> list[str]:
    rows = []
    for n in CONCURRENCY:
        d, r = points[("dare-serve", n)], points[("Ray Serve", n)]
        rows.append(
            [
                str(n),
                f"{d.rps:.0f}",
                f"{pct(d.latencies, 50):.1f} / {pct(d.latencies, 99):.1f}",
                f"{r.rps:.0f}",
                f"{pct(r.latencies, 50):.1f} / {pct(r.latencies, 99):.1f}",
                f"**{d.rps / r.rps:.2f}x**",
                f"{pct(r.latencies, 99) / pct(d.latencies, 99):.2f}x",
                f"{d.cpu_ms:.1f} / {r.cpu_ms:.1f}",
            ]
        )
    dare_curve = [points[("dare-serve", n)] for n in CONCURRENCY]
    equal, ratios = [], []
    for n in CONCURRENCY:
        r = points[("Ray Serve", n)]
        budget = pct(r.latencies, 99)
        got = rps_at_p99(dare_curve, budget)
        if not math.isnan(got):
            ratios.append(got / r.rps)
        shown = "-" if math.isnan(got) else f"**{got / r.rps:.2f}x**"
        equal.append([str(n), f"{budget:.1f}", f"{r.rps:.0f}", f"{got:.0f}", shown])
    ahead = all(points[("dare-serve", n)].rps > points[("Ray Serve", n)].rps for n in CONCURRENCY)
    return [
        "## f. dare-serve against Ray Serve on the same ranker",
        "",
        f"{describe(models, w)}. The peer is {versions} in its own virtualenv, serving the same "
        f"bundle (`benchmarks/peer/ray_app.py`): per batch one Redis pipeline for the same keys, FAISS "
        f"`knn` (exact inner product) per request, one ONNX Runtime call; `@serve.batch(max_batch_size=32, "
        f"batch_wait_timeout_s=0.002, max_concurrent_batches=2)`, compute in one worker thread, ORT at one "
        f"thread, {replicas} replica{'s' if replicas > 1 else ''}, access log off. dare-serve runs with its "
        f"defaults (batching on). Both answered the same {CHECK_REQUESTS} requests with scores equal to "
        f"{diff:.1e}. Same closed-loop clients and request bodies as section c, alternating rounds. "
        f"CPU: the server's whole process tree (Ray: raylet, GCS, controller, proxy, replica) + Redis, per "
        f"request. Ray took {ray_start_s:.0f} s to start.",
        "",
        *md_table(
            [
                "clients",
                "dare-serve req/s",
                "dare-serve p50 / p99",
                "Ray Serve req/s",
                "Ray Serve p50 / p99",
                "req/s dare / Ray",
                "p99 Ray / dare",
                "CPU ms/req dare / Ray",
            ],
            rows,
        ),
        "",
        "At equal p99: dare-serve's requests/s at the p99 the peer had at each load, interpolated on "
        "dare-serve's (p99, req/s) curve from the sweep above.",
        "",
        *md_table(
            ["clients (Ray)", "Ray p99 ms", "Ray req/s", "dare-serve req/s at that p99", "ratio"], equal
        ),
        "",
        f"- Compute alone, in-process, one request at a time (p50): dare-serve's core {compute[0]:.2f} ms "
        f"(rows, stage-1 engine, ORT), the peer's scoring code {compute[1]:.2f} ms (decode, rows, "
        f"`faiss.knn`, ORT): the rest of the gap is the serving stack.",
        f"- dare-serve ahead of the Ray Serve peer on requests/s at every load: "
        f"{'yes' if ahead else 'no'}; at equal p99 by "
        + (f"{min(ratios):.2f}x to {max(ratios):.2f}x" if ratios else "- (no common p99)")
        + f" (goal: ahead: {'met' if ratios and min(ratios) > 1 else 'missed'}).",
    ]


def main() -> None:
    ap = server_bench_parser(__doc__)
    ap.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas")
    args = ap.parse_args()
    print(f"machine: {machine_line()}", flush=True)
    print_lines(section(args.quick, args.workdir, args.bundles, args.replicas))


if __name__ == "__main__":
    main()
