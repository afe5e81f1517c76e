"""h. dare-serve against a plain FastAPI peer serving the same ranker, under the same closed-loop load.

The peer (benchmarks/peer/plain_app.py) is the simplest strong server one would write by hand: a
plain `def` FastAPI endpoint, one redis-py pipeline per request (GETRANGE of the newest
records + HGET of the FM blob, the keys dare-serve writes), `np.searchsorted` for
rows, `faiss.knn` for stage 1, one `InferenceSession.run` for stage 2, no batching; one uvicorn
worker, `OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1`, ORT at one thread. dare-serve runs with its
defaults; both search a user's whole history (the peer reads up to 10,000 records, dare-serve's
`DARE_SEARCH_DEPTH` is the same), so the rows compare at 1,000 and at 10,000 searched behaviors,
not at the bundle's training window; one private redis-server on loopback holds both user sets.
Before any timing, both servers score the same requests and must agree within 1e-5 (but for
near-tied K-th behaviors, see `compare_scores`). Then 1, 8 and 32 closed-loop clients, 200
candidates per request, the two servers alternating in rounds. CPU: each server's own process
(user + system time, what psutil's `cpu_times` reads) per request. Fixed seeds and sizes; not a test.

    .venv/bin/python -m benchmarks.plain_peer [--quick] [--bundles ROOT] [--workdir DIR]
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks._common import (
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
from benchmarks.ray_peer import scores_of
from benchmarks.server_concurrency import (
    DEFAULT_WORKDIR,
    Point,
    Sizes,
    compute_times,
    server_bench_parser,
    sweep,
)
from service.process import HttpProcess, clean_env, free_port

PLAIN_APP = "benchmarks.peer.plain_app"
CONCURRENCY = (1, 8, 32)
CHECK_REQUESTS = 16
TOLERANCE = 1e-5
MAX_TIE_SHARE = 0.002  # scores allowed past TOLERANCE, for near-tied K-th behaviors (see compare_scores)
# (behaviors per user, users): the bundle's whole window, and a ten times longer stored history
LOADS = ((1_000, 1_000), (10_000, 100))
PEER = "plain peer"
DARE = "dare-serve"


def sizes_of(quick: bool) -> Sizes:
    return Sizes(1, 1.5, 0.5, 60) if quick else Sizes(3, 3.0, 0.5, 200)


def plain_server(bundle: Path, redis_url: str, read_depth: int) -> HttpProcess:
    """The plain peer in a subprocess of this interpreter (a context manager: ready on entry)."""
    port = free_port()
    env = clean_env({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    cmd = [sys.executable, "-m", PLAIN_APP, "--bundle", str(bundle.resolve()), "--redis-url", redis_url,
           "--namespace", NAMESPACE, "--port", str(port), "--read-depth", str(read_depth)]  # fmt: skip
    return HttpProcess(cmd, port, env=env)


@dataclass(frozen=True)
class Agreement:
    """How the two servers' scores compare over the same requests."""

    scores: int
    within: int  # scores equal within TOLERANCE
    max_diff: float

    def line(self) -> str:
        return (
            f"{self.within:,} of {self.scores:,} scores equal within {TOLERANCE:g} "
            f"(max abs difference {self.max_diff:.1e})"
        )


def compare_scores(dare: Server, peer: Server, w: Workload, n: int = CHECK_REQUESTS) -> Agreement:
    """Both servers' scores for the first n requests; raises unless they agree.

    A candidate whose K-th and (K+1)-th behaviors tie to float rounding can keep either: dare-serve's
    stage 1 and `faiss.knn` sum the inner products in different orders, so the pick may differ
    (and the score by ~1e-4). That happens to a few candidates in thousands; an error in keys,
    decoding, rows, buckets or feeds moves nearly every score.
    """
    a, b = scores_of(dare, w, n), scores_of(peer, w, n)
    diffs = np.concatenate([np.abs(np.asarray(x) - np.asarray(y)) for x, y in zip(a, b, strict=True)])
    got = Agreement(len(diffs), int((diffs <= TOLERANCE).sum()), float(diffs.max()))
    if got.scores - got.within > MAX_TIE_SHARE * got.scores or got.max_diff > 1e-2:
        raise RuntimeError(f"dare-serve and the plain peer disagree: {got.line()}")
    return got


def peer_compute_ms(models: Models, w: Workload, redis_url: str, n: int) -> float:
    """p50 ms of the peer's scoring alone (decode, rows, `faiss.knn`, ORT) for the first n requests,
    in-process, in a thread with BLAS and OpenMP at one thread as the peer runs them."""
    from concurrent.futures import ThreadPoolExecutor

    import redis

    from benchmarks.peer import plain_app as app
    from service.core.runtime import single_threaded_numerics

    ranker = app.Ranker.load(models.ranker)
    client = redis.Redis.from_url(redis_url)
    reqs = w.requests[:n]
    stored = [app.read_user(client, NAMESPACE, ranker, r["user_id"]) for r in reqs]
    client.close()

    def run() -> list[float]:
        times = []
        for i in range(-5, len(reqs)):  # five untimed first
            r, (seq, fm) = reqs[i % len(reqs)], stored[i % len(reqs)]
            t0 = time.perf_counter()
            app.score_request(ranker, r["candidates"], r["timestamp"], seq, fm)
            if i >= 0:
                times.append((time.perf_counter() - t0) * 1e3)
        return times

    with ThreadPoolExecutor(1, initializer=single_threaded_numerics) as pool:
        return float(np.median(pool.submit(run).result()))


def section(quick: bool, workdir: Path = DEFAULT_WORKDIR, bundles: Path | None = None) -> list[str]:
    from tests.redis_proc import RedisProcess

    sizes = sizes_of(quick)
    models = build_models(workdir, bundles)
    loads = {
        events: make_workload(models, quick, events=events, n_users=users, prefix=f"u{events}")
        for events, users in LOADS
    }
    points: dict[tuple[int, str, int], Point] = {}
    redis = RedisProcess().start()
    try:
        for w in loads.values():
            fill_redis(redis.url, w)
        # Both search every behavior a user has (up to the largest load): the comparison is at the
        # history lengths in the table, not at the bundle's training window.
        depth = max(loads)
        with (
            dare_server(models.root, redis.url, {"DARE_SEARCH_DEPTH": str(depth)}) as dare,
            plain_server(models.ranker, redis.url, depth) as peer,
        ):
            agree = [compare_scores(dare, peer, w) for w in loads.values()]
            for events, a in zip(loads, agree, strict=True):
                print(f"  users of {events:,} behaviors: {a.line()}", flush=True)
            for events, w in loads.items():
                print(f"  users of {events:,} behaviors", flush=True)
                got = sweep({DARE: dare, PEER: peer}, w, sizes, [], CONCURRENCY, dare={DARE})
                points |= {(events, name, n): p for (name, n), p in got.items()}
        first = loads[LOADS[0][0]]
        core = compute_times(models, first, sizes.compute_requests)
        compute = (
            float(np.median(core["prepare"] + core["search+rank"])),
            peer_compute_ms(models, first, redis.url, sizes.compute_requests),
        )
    finally:
        redis.cleanup()
    return render(models, loads, sizes, points, agree, compute)


def render(
    models: Models,
    loads: dict[int, Workload],
    sizes: Sizes,
    points: dict[tuple[int, str, int], Point],
    agree: list[Agreement],
    compute: tuple[float, float],
) -> list[str]:
    rows = []
    for events in loads:
        for n in CONCURRENCY:
            d, p = points[(events, DARE, n)], points[(events, PEER, n)]
            rows.append(
                [
                    f"{events:,}",
                    str(n),
                    f"{d.rps:.0f}",
                    f"{p.rps:.0f}",
                    f"**{d.rps / p.rps:.2f}x**",
                    f"{pct(d.latencies, 50):.1f} / {pct(d.latencies, 99):.1f}",
                    f"{pct(p.latencies, 50):.1f} / {pct(p.latencies, 99):.1f}",
                    f"{d.cpu_ms:.2f} ({d.loop_cpu_ms:.2f}) / {p.cpu_ms:.2f}",
                ]
            )
    first = next(iter(loads.values()))
    rounds = (
        f"{sizes.rounds} alternating rounds of {sizes.seconds:g} s"
        if sizes.rounds > 1
        else (f"one run of {sizes.seconds:g} s")
    )
    ties = (
        " (the rest: candidates whose K-th and next behaviors tie to float rounding, kept differently by "
        "the two stage-1 searches)"
        if any(a.within < a.scores for a in agree)
        else ""
    )
    agreement = "; ".join(f"{events:,} behaviors: {a.line()}" for events, a in zip(loads, agree, strict=True))
    return [
        "## h. dare-serve against a plain FastAPI peer on the same ranker",
        "",
        f"{describe(models, first)}; plus {len(loads[LOADS[1][0]].users):,} users of {LOADS[1][0]:,} "
        f"behaviors in the same Redis. The peer (`benchmarks/peer/plain_app.py`) is a plain `def` FastAPI "
        "endpoint: per request one redis-py pipeline (GETRANGE of the newest records, HGET "
        "of the FM blob), `np.searchsorted` for rows, `faiss.knn`, one ONNX Runtime call; no batching, "
        "one uvicorn worker, OMP/OpenBLAS/ORT at one thread. dare-serve runs with its defaults. Both "
        "search each user's whole history (up to 10,000 behaviors; the bundle's training window does not "
        "limit either). Both "
        f"answered the same {CHECK_REQUESTS} requests per user set: {agreement}{ties}. "
        f"Closed loop, {rounds} per point after {sizes.warmup_s:g} s of warm-up, the servers alternating. "
        "CPU: each server process's user + system time per request (Redis and the load generator "
        "not counted); in parentheses dare-serve's event-loop thread.",
        "",
        *md_table(
            [
                "behaviors/user",
                "clients",
                "dare-serve req/s",
                "plain req/s",
                "dare / plain",
                "dare-serve p50 / p99 ms",
                "plain p50 / p99 ms",
                "CPU ms/req dare (loop) / plain",
            ],
            rows,
        ),
        "",
        f"- Compute alone, in-process, one request at a time, p50 over {sizes.compute_requests} requests of "
        f"{LOADS[0][0]:,}-behavior users: dare-serve's core {compute[0]:.2f} ms (rows, stage-1 engine, ORT), "
        f"the peer's scoring code {compute[1]:.2f} ms (decode, rows, `faiss.knn`, ORT); the rest of each "
        "server's time per request is its serving stack.",
    ]


def main() -> None:
    ap = server_bench_parser(__doc__)
    args = ap.parse_args()
    print(f"machine: {machine_line()}", flush=True)
    t0 = time.perf_counter()
    lines = section(args.quick, args.workdir, args.bundles)
    print_lines(lines)
    print(f"({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
