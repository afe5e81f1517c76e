"""Stage-1 search benchmark: plain `faiss.knn` against dare-serve's stage 1, side by side in one run.

    .venv/bin/python benchmarks/stage1.py [--candidates 200] [--length 10000] [--k 64] [--dim 16]

Workload: one user, `--length` behaviors, `--candidates` candidates, exact inner-product top-K
over attention vectors of `--dim` dimensions plus the folded time-bias dimension. The two are timed
in alternating rounds so that machine noise hits both alike; results are checked to be identical.
Each runs in its own best thread setting: `faiss.knn` with FAISS's OpenMP threads, dare-serve's
engine with its own thread pool (OpenMP and BLAS at one thread each, as the service sets them).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file, this folder would shadow the repository's packages; put the root first.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import os
import platform

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks._common import samples_ms
from service.core.search import Stage1Engine, knn_plain, knn_threshold


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--length", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    d = args.dim + 1  # attention dims + the folded time bias
    keys = rng.standard_normal((args.length, d)).astype(np.float32)
    queries = rng.standard_normal((args.candidates, d)).astype(np.float32)
    queries[:, -1] = 1.0
    k = args.k
    omp_default = faiss.omp_get_max_threads()
    engine = Stage1Engine(threads=os.cpu_count() or 1)

    ref = knn_plain(queries, keys, k)
    mine = engine.search([(queries, keys)], k)[0]
    single = knn_threshold(queries, keys, k)
    for name, res in (("engine", mine), ("single-thread", single)):
        same_scores = np.array_equal(res.scores, ref.scores)
        same_ids = np.array_equal(res.positions, ref.positions)
        assert np.allclose(res.scores, ref.scores, rtol=0, atol=1e-5), f"{name}: scores differ"
        # positions may differ only where scores tie exactly
        ties = (np.diff(ref.scores, axis=1) == 0).any(axis=1)
        assert (res.positions == ref.positions).all(axis=1)[~ties].all(), f"{name}: different behaviors"
        print(f"{name}: identical positions {same_ids}, identical scores {same_scores}")

    reps = args.reps
    times: dict[str, list[float]] = {"faiss.knn": [], "threshold, 1 thread": [], "engine": []}
    with threadpool_limits(limits=1, user_api="blas"):
        for _ in range(args.rounds):
            faiss.omp_set_num_threads(omp_default)
            times["faiss.knn"].extend(samples_ms(lambda: knn_plain(queries, keys, k), reps, 0))
            faiss.omp_set_num_threads(1)
            times["threshold, 1 thread"].extend(samples_ms(lambda: knn_threshold(queries, keys, k), reps, 0))
            times["engine"].extend(samples_ms(lambda: engine.search([(queries, keys)], k), reps, 0))
    faiss.omp_set_num_threads(omp_default)
    engine.close()

    base = np.median(times["faiss.knn"])
    print(
        f"\nstage 1: {args.candidates} candidates x {args.length} behaviors, K={k}, d={args.dim}+1; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, faiss {faiss.__version__}"
    )
    print(f"{'method':<22}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'speed-up (p50)':>16}")
    for name, ts in times.items():
        p50, p90, p99 = np.percentile(ts, [50, 90, 99])
        print(f"{name:<22}{p50:>9.2f}{p90:>9.2f}{p99:>9.2f}{base / p50:>15.2f}x")


if __name__ == "__main__":
    main()
