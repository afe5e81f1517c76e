"""Benchmark suite: side-by-side measurements in one run, written to docs/benchmarks.md.

    .venv/bin/python -m benchmarks.suite [--sections a,b,c,d,e,f,g,h] [--quick] [--out docs/benchmarks.md]
                                         [--workdir .dare/bench] [--bundles ROOT] [--replicas 1]

Sections (fixed seeds and sizes; every row is a ratio against its baseline measured in the same run):
  a. stage-1 search: DARE attention d=16 against coupled d=64 on the same engine, at 1,000 and
     10,000 behaviors and 100 and 1,000 candidates, K=64; and the engine against plain faiss.knn.
  b. stage 2: ONNX Runtime against PyTorch eager for the same ranker.
  c. the whole server under 1, 8, 32 and 128 concurrent clients, batching on and off, and the
     server's overhead over its compute (benchmarks/server_concurrency.py).
  d. two-stage against full attention over the whole sequence: cost and AUC (benchmarks/full_attention.py).
  e. the feature store: sequence reads, batched reads, ingest, lifelong histories of 10,000 and
     100,000 events (benchmarks/feature_store.py).
  f. dare-serve against a Ray Serve peer serving the same ranker (benchmarks/ray_peer.py; needs
     benchmarks/peer/setup.sh once).
  g. serving search depth: models trained on 2,000- and 10,000-behavior windows scored over the
     newest 1,000, 2,000, 10,000 and all behaviors, three seeds: AUC, GAUC, planted retrieval,
     stage latency (benchmarks/depth.py).
  h. dare-serve against a plain FastAPI peer serving the same ranker, at 1, 8 and 32 clients, for
     users of 1,000 and 10,000 behaviors (benchmarks/plain_peer.py).
c, d, f and h train the demo's bundles at fixed seeds into --workdir on first use and reuse them. A run
of some sections replaces only those sections in --out and keeps the others.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks._common import machine_line, median_ms
from service.core.search import Stage1Engine, knn_plain

K = 64


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
            samples[name].append(median_ms(fn, reps))
    return {name: float(np.median(v)) for name, v in samples.items()}


def stage1_section(quick: bool) -> list[str]:
    rng = np.random.default_rng(0)
    engine = Stage1Engine(threads=os.cpu_count() or 1)
    omp = faiss.omp_get_max_threads()
    reps = 5 if quick else 20
    ratios: dict[tuple[int, int], float] = {}
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
            for cands in (100, 200, 1_000):  # 200: the service benchmarks' request size
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
                ratios[(length, cands)] = res["d64"] / res["d16"]
                lines.append(
                    f"| {length:,} | {cands:,} | {res['d16']:.2f} | {res['d64']:.2f} | "
                    f"{res['d64'] / res['d16']:.2f}x | {res['knn']:.2f} | {res['knn'] / res['d16']:.2f}x |"
                )
    engine.close()
    met = [f"{length:,} x {c:,}" for (length, c), r in ratios.items() if r >= 1.5]
    missed = [f"{length:,} x {c:,}" for (length, c), r in ratios.items() if r < 1.5]
    verdict = (
        "met at every size"
        if not missed
        else f"missed at {', '.join(missed)}" + (f"; met at {', '.join(met)}" if met else "")
    )
    lines += [
        "",
        f"- d=16 at least 1.5x faster than d=64 on the same engine: {verdict} (behaviors x candidates). "
        "The inner products shrink 4x with d; the top-64 selection does not depend on d, and it is most "
        "of the time on short sequences.",
    ]
    return lines


def _eager(graph: object, tensors: list) -> np.ndarray:
    import torch

    with torch.no_grad():
        return graph(*tensors)[0].numpy()  # type: ignore[operator]


# distinct retrieved behaviors per request in section b (a user of 1,000 behaviors keeps about 900)
DISTINCT = 900


def stage2_section(quick: bool) -> list[str]:
    import onnxruntime as ort
    import torch

    from exporters.bundle import load_bundle
    from exporters.export import export_ranker, ranker_inputs
    from exporters.models import RankerConfig, TwoStageRanker
    from exporters.stage2_graph import Stage2Graph

    torch.manual_seed(0)
    n_items = 50_000
    cats = np.r_[0, np.arange(1, n_items) % 200 + 1].astype(np.int64)
    model = TwoStageRanker(RankerConfig("dare", n_items, 201, 16, 64, K, 32), cats).eval()
    lines = [
        "## b. Stage 2: ONNX Runtime against PyTorch eager",
        "",
        "The same dare ranker (d=16/64, FM d=32, K=64); one call scores B requests of C candidates, "
        f"each request with {DISTINCT} distinct retrieved behaviors. Both on CPU with the same thread count.",
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
                "behaviors": rng.integers(1, n_items, (b, DISTINCT)),
                "buckets": rng.integers(0, 64, (b, DISTINCT)),
                "retrieved": rng.integers(0, DISTINCT, (b, c, K)),
                "scores": rng.standard_normal((b, c, K)).astype(np.float32),
                "mask": np.ones((b, c, K), np.float32),
                "fm": rng.standard_normal((b, 32)).astype(np.float32),
                "fm_present": np.ones(b, np.float32),
            }
            tensors = [torch.from_numpy(feeds[n]) for n in ranker_inputs(model)]

            eager = partial(_eager, graph, tensors)
            onnx = partial(session.run, ["probability"], feeds)

            diff = float(np.abs(eager() - onnx()[0]).max())
            res = _alternate({"eager": eager, "ort": onnx}, 5 if quick else 20)
            lines.append(
                f"| {b} x {c} | {res['eager']:.2f} | {res['ort']:.2f} | {res['eager'] / res['ort']:.2f}x | "
                f"{diff:.1e} |"
            )
    return lines


SECTIONS = "abcdefgh"
TITLE = re.compile(r"^## ([a-z])\. ", re.M)


def run_section(key: str, args: argparse.Namespace) -> list[str]:
    if key == "a":
        return stage1_section(args.quick)
    if key == "b":
        return stage2_section(args.quick)
    if key == "c":
        from benchmarks import server_concurrency

        return server_concurrency.section(args.quick, args.workdir, args.bundles)
    if key == "d":
        from benchmarks import full_attention

        return full_attention.section(args.quick, args.workdir)
    if key == "e":
        from benchmarks import feature_store

        return feature_store.section(args.quick)
    if key == "g":
        from benchmarks import depth

        return depth.section(args.quick)
    if key == "h":
        from benchmarks import plain_peer

        return plain_peer.section(args.quick, args.workdir, args.bundles)
    from benchmarks import ray_peer

    return ray_peer.section(args.quick, args.workdir, args.bundles, args.replicas)


def split_sections(text: str) -> dict[str, str]:
    """The `## x.` sections of an existing benchmarks.md, by letter."""
    starts = [(m.start(), m.group(1)) for m in TITLE.finditer(text)]
    ends = [pos for pos, _ in starts[1:]] + [len(text)] * bool(starts)
    return {key: text[pos:end].rstrip() + "\n" for (pos, key), end in zip(starts, ends, strict=True)}


def header() -> list[str]:
    return [
        "# Benchmarks",
        "",
        "Written by `benchmarks/suite.py` (`.venv/bin/python -m benchmarks.suite`; one section: "
        "`--sections c`; a smoke run: `--quick`). Every table compares alternatives measured side by side "
        "in the same run, with fixed seeds and sizes; the ratios are the result, the absolute times "
        "depend on the machine. Each section names the machine and date it was measured on. The "
        "machine here is shared with other work, so absolute numbers move between runs.",
        "",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    ap.add_argument("--quick", action="store_true", help="smaller sizes and shorter runs (a smoke run)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="sections to run, e.g. c,f (default: all)")
    ap.add_argument("--workdir", type=Path, default=Path(".dare/bench"), help="trained bundles (c, d, f, h)")
    ap.add_argument("--bundles", type=Path, help="c, f, h: serve this bundle root's newest `dare` instead")
    ap.add_argument("--replicas", type=int, default=1, help="f: Ray Serve replicas")
    args = ap.parse_args()
    keys = sorted({k for k in args.sections.replace(",", " ").replace(" ", "")})
    unknown = [k for k in keys if k not in SECTIONS]
    if unknown or not keys:
        ap.error(f"--sections takes letters among {','.join(SECTIONS)}, got {args.sections!r}")

    machine = machine_line()
    done = split_sections(args.out.read_text()) if args.out.is_file() else {}
    for key in keys:
        t0 = time.perf_counter()
        print(f"[suite] section {key} ...", file=sys.stderr, flush=True)
        lines = run_section(key, args)
        took = time.perf_counter() - t0
        stamp = (
            f"_Measured {time.strftime('%Y-%m-%d')} on {machine}; FAISS {faiss.__version__}; "
            f"{'--quick sizes' if args.quick else 'full sizes'}; {took:.0f} s._"
        )
        done[key] = "\n".join([lines[0], "", stamp, *lines[1:]]) + "\n"
        print(done[key], flush=True)
        print(f"[suite] section {key}: {took:.0f} s", file=sys.stderr, flush=True)
        # written after every section, so an interrupted run keeps what it measured
        text = "\n".join(header()) + "\n" + "\n".join(done[k] for k in SECTIONS if k in done)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
