"""Benchmark suite: side-by-side measurements in one run, written to docs/benchmarks.md.

    .venv/bin/python benchmarks/suite.py [--out docs/benchmarks.md] [--quick]

Sections (fixed seeds and sizes; every row is a ratio against its baseline measured in the same run):
  a. stage-1 search: DARE attention d=16 against coupled d=64 on the same engine, at 1,000 and
     10,000 behaviors and 100 and 1,000 candidates, K=64; and the engine against plain faiss.knn.
  b. stage 2: ONNX Runtime against PyTorch eager for the same ranker.
Not yet here: the server under concurrency, two-stage against full attention, the feature store
(see benchmarks/feature_store.py) and the Ray Serve peer.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from service.core.search import Stage1Engine, knn_plain

K = 64


def _median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def _alternate(
    fns: dict[str, Callable[[], object]],
    reps: int,
    rounds: int = 3,
    setup: dict[str, Callable[[], None]] | None = None,
) -> dict[str, float]:
    """Median ms of each function, timed in alternating rounds so noise hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if setup and name in setup:
                setup[name]()
            samples[name].append(_median_ms(fn, reps))
    return {name: float(np.median(v)) for name, v in samples.items()}


def stage1_section(quick: bool) -> list[str]:
    rng = np.random.default_rng(0)
    engine = Stage1Engine(threads=os.cpu_count() or 1)
    omp = faiss.omp_get_max_threads()
    reps = 5 if quick else 20
    lines = [
        "## a. Stage-1 search",
        "",
        "Exact inner-product top-64 per candidate over one user's behaviors; keys carry the folded "
        "time bias (d+1 dims). `engine` is dare-serve's stage 1; `faiss.knn` runs with FAISS's "
        "default OpenMP threads.",
        "",
        "| behaviors | candidates | d=16 engine ms | d=64 engine ms | d=64 / d=16 | d=16 faiss.knn ms "
        "| faiss.knn / engine |",
        "|---|---|---|---|---|---|---|",
    ]
    with threadpool_limits(limits=1, user_api="blas"):
        for length in (1_000, 10_000):
            for cands in (100, 1_000):
                data = {}
                for d in (16, 64):
                    keys = rng.standard_normal((length, d + 1)).astype(np.float32)
                    queries = rng.standard_normal((cands, d + 1)).astype(np.float32)
                    data[d] = (queries, keys)
                got = engine.search([data[16]], K)[0]
                ref = knn_plain(*data[16], K)
                assert np.allclose(got.scores, ref.scores, atol=1e-5), "engine and faiss.knn disagree"
                res = _alternate(
                    {
                        "d16": partial(engine.search, [data[16]], K),
                        "d64": partial(engine.search, [data[64]], K),
                        "knn": partial(knn_plain, *data[16], K),
                    },
                    reps,
                    setup={
                        "d16": lambda: faiss.omp_set_num_threads(1),
                        "knn": lambda: faiss.omp_set_num_threads(omp),
                    },
                )
                faiss.omp_set_num_threads(omp)
                lines.append(
                    f"| {length:,} | {cands:,} | {res['d16']:.2f} | {res['d64']:.2f} | "
                    f"{res['d64'] / res['d16']:.2f}x | {res['knn']:.2f} | {res['knn'] / res['d16']:.2f}x |"
                )
    engine.close()
    return lines


def _eager(graph: object, tensors: list) -> np.ndarray:
    import torch

    with torch.no_grad():
        return graph(*tensors)[0].numpy()  # type: ignore[operator]


def stage2_section(quick: bool) -> list[str]:
    import onnxruntime as ort
    import torch

    from exporters.bundle import load_bundle
    from exporters.export import export_ranker
    from exporters.models import RankerConfig, Stage2Graph, TwoStageRanker

    torch.manual_seed(0)
    n_items = 50_000
    cats = np.r_[0, np.arange(1, n_items) % 200 + 1].astype(np.int64)
    model = TwoStageRanker(RankerConfig("dare", n_items, 201, 16, 64, K, 32), cats).eval()
    lines = [
        "## b. Stage 2: ONNX Runtime against PyTorch eager",
        "",
        "The same dare ranker (d=16/64, FM d=32, K=64); one call scores B requests of C candidates. "
        "Both on CPU with the same thread count.",
        "",
        "| batch x candidates | PyTorch eager ms | ONNX Runtime ms | eager / ORT | max abs diff |",
        "|---|---|---|---|---|",
    ]
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_ranker(
            model,
            Path(tmp),
            "dare",
            np.r_[-1, np.arange(1, n_items)],
            10_000,
            {"auc": 0.5, "gauc": 0.5, "logloss": 0.7},
            "fm:1",
            {},
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        session = load_bundle(path, session_options=opts).session
        graph = Stage2Graph(model).eval()
        rng = np.random.default_rng(0)
        for b, c in ((1, 200), (8, 200), (32, 100)):
            feeds = {
                "candidates": rng.integers(1, n_items, (b, c)),
                "behaviors": rng.integers(1, n_items, (b, c, K)),
                "buckets": rng.integers(0, 64, (b, c, K)),
                "mask": np.ones((b, c, K), np.float32),
                "fm": rng.standard_normal((b, 32)).astype(np.float32),
                "fm_present": np.ones(b, np.float32),
            }
            tensors = [
                torch.from_numpy(feeds[n])
                for n in ("candidates", "behaviors", "buckets", "mask", "fm", "fm_present")
            ]

            eager = partial(_eager, graph, tensors)
            onnx = partial(session.run, ["probability"], feeds)

            diff = float(np.abs(eager() - onnx()[0]).max())
            res = _alternate({"eager": eager, "ort": onnx}, 5 if quick else 20)
            lines.append(
                f"| {b} x {c} | {res['eager']:.2f} | {res['ort']:.2f} | {res['eager'] / res['ort']:.2f}x | "
                f"{diff:.1e} |"
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    args = ap.parse_args()
    header = [
        "# Benchmarks",
        "",
        f"Written by `benchmarks/suite.py` on {time.strftime('%Y-%m-%d')}: {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, FAISS {faiss.__version__}. "
        "Medians of alternating rounds; ratios are measured side by side in this one run.",
        "",
    ]
    body = stage1_section(args.quick) + [""] + stage2_section(args.quick)
    text = "\n".join(header + body) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
