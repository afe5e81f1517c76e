"""Stage-1 search benchmark: plain `faiss.knn`, the previous threshold search and dare-serve's stage 1.

    .venv/bin/python -m benchmarks.stage1 [--candidates 200] [--length 10000] [--k 64] [--dim 16]
                                          [--coupled-dim 64] [--rounds 5] [--reps 40] [--seed 0]

Workload: one user, `--length` behaviors, `--candidates` candidates, exact inner-product top-K over
attention vectors of `--dim` (DARE) and `--coupled-dim` (coupled) dimensions, each plus the folded
time-bias dimension. All methods at both sizes are timed in alternating rounds in one run, so that
machine noise hits them alike; results are first checked against `faiss.knn`.

Methods, each in its own best thread setting:
- `faiss.knn`: FAISS's OpenMP threads at their default;
- `threshold (previous)`: the search stage 1 ran before (BLAS scores, a group-maximum lower bound,
  FAISS's heap), kept here as a private copy, one thread;
- `top-k kernel`: `knn_exact`, BLAS scores per block of queries and the compiled selection, one thread;
- `engine`: `Stage1Engine.search` with a thread pool of one thread per core (BLAS at one thread each,
  as the service sets it).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import faiss
import numpy as np
from faiss import swig_ptr
from threadpoolctl import threadpool_limits

from benchmarks._common import machine_line, samples_ms
from service.core.search import SearchResult, Stage1Engine, knn_exact, knn_plain

# --- the previous stage 1, kept for the comparison ---

_MIN_LEN_FACTOR = 4
_FILTER_MIN_LEN = 4096


def _groups(length: int, k: int) -> int:
    return max(k, min(4 * k, length // 2))


def _lower_bound(scores: np.ndarray, k: int) -> np.ndarray:
    n_q, length = scores.shape
    g = _groups(length, k)
    m = length // g
    group_max = scores[:, : g * m].reshape(n_q, m, g).max(axis=1)
    return np.partition(group_max, g - k, axis=1)[:, g - k]


def _survivors(scores: np.ndarray, bound: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n_q, length = scores.shape
    flat = np.flatnonzero(scores >= bound[:, None])
    rows = flat // length
    counts = np.bincount(rows, minlength=n_q)
    slot = np.arange(len(flat)) - (np.cumsum(counts) - counts)[rows]
    width = int(counts.max())
    values = np.full((n_q, width), -np.inf, dtype=np.float32)
    values[rows, slot] = scores.reshape(-1)[flat]
    columns = np.full((n_q, width), -1, dtype=np.int64)
    columns[rows, slot] = flat - rows * length
    return values, columns


def knn_threshold(queries: np.ndarray, keys: np.ndarray, k: int) -> SearchResult:
    """The previous stage 1: BLAS scores, a group-maximum lower bound, FAISS heap selection."""
    n_q, length = len(queries), len(keys)
    k = min(k, length)
    if k == 0 or n_q == 0:
        return knn_plain(queries, keys, k)
    scores = np.ascontiguousarray(queries @ keys.T, dtype=np.float32)
    values = np.full((n_q, k), -np.inf, dtype=np.float32)
    ids = np.full((n_q, k), -1, dtype=np.int64)
    heap = faiss.float_minheap_array_t()
    heap.nh, heap.k = n_q, k
    heap.val, heap.ids = swig_ptr(values), swig_ptr(ids)
    if length < _MIN_LEN_FACTOR * k:
        heap.addn(length, swig_ptr(scores))
    elif length < _FILTER_MIN_LEN:
        values[:] = np.nextafter(_lower_bound(scores, k), np.float32(-np.inf))[:, None]
        heap.addn(length, swig_ptr(scores))
    else:
        cand, cols = _survivors(scores, _lower_bound(scores, k))
        heap.addn_with_ids(cand.shape[1], swig_ptr(cand), swig_ptr(cols), cand.shape[1])
    heap.reorder()
    return SearchResult(ids, values)


# --- the benchmark ---


def check(name: str, res: SearchResult, ref: SearchResult, queries: np.ndarray, keys: np.ndarray) -> str:
    """Same top-K as faiss.knn up to float32 rounding: equal scores slot by slot, each the score of
    its own position, no position twice. So a position can differ only where two scores are that close.
    """
    tol = 1e-5 + 1e-6 * float(np.abs(ref.scores).max(initial=0.0))
    assert res.positions.shape == ref.positions.shape, f"{name}: shape"
    assert np.allclose(res.scores, ref.scores, rtol=0, atol=tol), f"{name}: scores differ"
    own = np.einsum("cd,ckd->ck", queries.astype(np.float64), keys.astype(np.float64)[res.positions])
    assert np.allclose(res.scores, own, rtol=0, atol=tol), f"{name}: scores are not their positions'"
    assert all(len(set(row)) == len(row) for row in res.positions.tolist()), f"{name}: repeated position"
    differ = int((res.positions != ref.positions).sum())
    diff = float(np.abs(res.scores - ref.scores).max(initial=0.0))
    return f"{name}: positions differing from faiss.knn {differ}, max |score diff| {diff:.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--length", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--dim", type=int, default=16, help="DARE attention dims")
    ap.add_argument("--coupled-dim", type=int, default=64, help="coupled (TWIN-style) attention dims")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    k = args.k
    dims = (args.dim, args.coupled_dim)
    data: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for dim in dims:
        d = dim + 1  # attention dims + the folded time bias
        keys = rng.standard_normal((args.length, d)).astype(np.float32)
        queries = rng.standard_normal((args.candidates, d)).astype(np.float32)
        queries[:, -1] = 1.0
        data[dim] = (queries, keys)
    omp_default = faiss.omp_get_max_threads()
    engine = Stage1Engine(threads=os.cpu_count() or 1)

    methods: dict[str, tuple[Callable[[np.ndarray, np.ndarray, int], object], int]] = {
        "faiss.knn": (knn_plain, omp_default),
        "threshold (previous)": (knn_threshold, 1),
        "top-k kernel": (knn_exact, 1),
        "engine": (lambda q, keys, kk: engine.search([(q, keys)], kk)[0], 1),
    }

    for dim in dims:
        ref = knn_plain(*data[dim], k)
        faiss.omp_set_num_threads(1)
        for name in ("threshold (previous)", "top-k kernel", "engine"):
            res = methods[name][0](*data[dim], k)
            assert isinstance(res, SearchResult)
            print(f"d={dim}+1 {check(name, res, ref, *data[dim])}")
        faiss.omp_set_num_threads(omp_default)

    times: dict[tuple[str, int], list[float]] = {(name, dim): [] for name in methods for dim in dims}
    with threadpool_limits(limits=1, user_api="blas"):
        for fn, omp in methods.values():  # warm-up, untimed
            faiss.omp_set_num_threads(omp)
            for dim in dims:
                fn(*data[dim], k)
        for _ in range(args.rounds):
            for name, (fn, omp) in methods.items():
                faiss.omp_set_num_threads(omp)
                for dim in dims:
                    q, keys = data[dim]
                    times[(name, dim)].extend(
                        samples_ms(lambda f=fn, q=q, keys=keys: f(q, keys, k), args.reps, 0)
                    )
    faiss.omp_set_num_threads(omp_default)
    engine.close()

    small, big = dims
    p50 = {key: float(np.percentile(ts, 50)) for key, ts in times.items()}
    print(
        f"\nstage 1: {args.candidates} candidates x {args.length} behaviors, K={k}, d={small}+1 and {big}+1; "
        f"{args.rounds} alternating rounds of {args.reps}; faiss {faiss.__version__}, "
        f"{omp_default} OpenMP threads by default\n{machine_line()}\n"
    )
    header = "".join(f"{f'd={dim} p50':>11}{f'd={dim} p90':>11}" for dim in dims)
    print(f"{'method (ms)':<22}{header}{f'd={big} / d={small}':>13}{'faiss.knn / it':>16}")
    for name in methods:
        cells = "".join(
            f"{p50[(name, dim)]:>11.3f}{float(np.percentile(times[(name, dim)], 90)):>11.3f}" for dim in dims
        )
        ratio = p50[(name, big)] / p50[(name, small)]
        speedup = p50[("faiss.knn", small)] / p50[(name, small)]
        print(f"{name:<22}{cells}{ratio:>12.2f}x{speedup:>15.2f}x")
    print("\nratios of p50 (the goal at 10,000 behaviors x 200 candidates: >= 1.5x and >= 3x):")
    for name in ("top-k kernel", "engine"):
        ratio = p50[(name, big)] / p50[(name, small)]
        speedup = p50[("faiss.knn", small)] / p50[(name, small)]
        old = p50[("threshold (previous)", small)] / p50[(name, small)]
        print(
            f"  {name}: d={big} / d={small} {ratio:.2f}x, faiss.knn / {name} at d={small} {speedup:.2f}x, "
            f"previous threshold / {name} at d={small} {old:.2f}x"
        )


if __name__ == "__main__":
    main()
