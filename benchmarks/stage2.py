"""Stage-2 benchmark: the per-pair graph of bundle format 1 against the current graph, side by side.

    .venv/bin/python -m benchmarks.stage2 [--reps 30] [--rounds 5] [--batch 8]

The same random-weight DARE ranker at serving size (K=64, attention d=16, representation d=64,
FM d=32, as in benchmarks/service_latency.py) exported twice:

- `per-pair` (format 1): per (candidate, behavior) pair, the graph gathers the behavior's
  attention and representation rows and recomputes the attention logit stage 1 already had;
- `current` (`exporters/stage2_graph.py`): it takes stage 1's scores, and each distinct retrieved
  behavior of a request once with an index per slot.

Workload: one request of 200 candidates for a user of L = 1,000 and 10,000 behaviors, its top-64
per candidate from the real stage 1; then a batch of `--batch` such requests (different users).
ONNX Runtime on the CPU at 1 and 2 intra-op threads, with the service's session options.
`graph` times `session.run` alone on ready feeds; `stage 2` times what `score_jobs` spends after
stage 1: building the feeds (per-slot gathers, or the distinct positions) plus `session.run` plus
splitting. The two graphs run in alternating rounds; their probabilities are checked to agree.

`--pooling` instead compares ways of writing the current graph's weighted sum over each
candidate's slots (`Stage2Graph.pool`), graph alone, one request: a gathered row per slot times
its weight summed over K, the same rows through a [1, K] x [K, d] product (the one in use), and a
dense [C, U] weight matrix scattered from the slots' weights times the [U, d] representations.
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from benchmarks._common import machine_line, md_table, print_lines, samples_ms
from benchmarks.service_latency import (
    ATTENTION_DIM,
    CANDIDATES,
    FM_DIM,
    N_CATEGORIES,
    N_ITEMS,
    REPR_DIM,
    SEED,
    TOP_K,
    candidates,
    user_history,
)
from exporters.bundle import search_table_of
from exporters.export import onnx_bytes, ranker_onnx
from exporters.features import time_buckets
from exporters.models import RankerConfig, TwoStageRanker
from exporters.stage2_graph import Stage2Graph
from service.core.ranking import (
    FeedPool,
    RankInput,
    distinct_positions,
    rank_batch,
    rank_input,
)
from service.core.runtime import session_options
from service.core.search import Stage1Engine, search_keys, search_queries

LENGTHS = (1_000, 10_000)
THREADS = (1, 2)


class SumPooling(Stage2Graph):
    """Gathered slot rows times their weights, summed over K."""

    def pool(self, weights: torch.Tensor, r_b: torch.Tensor, retrieved: torch.Tensor) -> torch.Tensor:
        b, u, d = r_b.shape
        r_slots = r_b.reshape(b * u, d)[retrieved + (torch.arange(b) * u).reshape(b, 1, 1)]
        return (weights.unsqueeze(-1) * r_slots).sum(2)


class DensePooling(Stage2Graph):
    """A dense [C, U] weight matrix per request, scattered from the slots' weights, times [U, d]."""

    def pool(self, weights: torch.Tensor, r_b: torch.Tensor, retrieved: torch.Tensor) -> torch.Tensor:
        b, c, _ = weights.shape
        dense = torch.zeros(b, c, r_b.shape[1]).scatter_add(2, retrieved, weights)
        return dense @ r_b


class PerPairGraph(nn.Module):
    """The stage-2 graph of bundle format 1: `TwoStageRanker.stage2` over every (candidate, slot)."""

    def __init__(self, ranker: TwoStageRanker) -> None:
        super().__init__()
        self.ranker = ranker

    def forward(
        self,
        candidates: torch.Tensor,
        behaviors: torch.Tensor,
        buckets: torch.Tensor,
        mask: torch.Tensor,
        fm: torch.Tensor,
        fm_present: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, c = candidates.shape
        k = behaviors.shape[2]
        logit, weights = self.ranker.stage2(
            candidates.reshape(b * c),
            behaviors.reshape(b * c, k),
            buckets.reshape(b * c, k),
            mask.reshape(b * c, k),
            fm.unsqueeze(1).expand(b, c, fm.shape[1]).reshape(b * c, fm.shape[1]),
            fm_present.unsqueeze(1).expand(b, c).reshape(b * c),
        )
        return torch.sigmoid(logit).reshape(b, c), weights.reshape(b, c, k)


def per_pair_onnx(ranker: TwoStageRanker) -> bytes:
    b, c, k = 2, 3, ranker.cfg.top_k
    args = (
        torch.randint(0, ranker.cfg.n_items, (b, c)),
        torch.randint(0, ranker.cfg.n_items, (b, c, k)),
        torch.randint(0, ranker.cfg.n_time_buckets, (b, c, k)),
        torch.ones(b, c, k),
        torch.randn(b, ranker.cfg.fm_dim),
        torch.ones(b),
    )
    names = ["candidates", "behaviors", "buckets", "mask", "fm", "fm_present"]
    axes = {
        n: {0: "B", 1: "C"}
        for n in ("candidates", "behaviors", "buckets", "mask", "probability", "attention")
    }
    axes |= {"fm": {0: "B"}, "fm_present": {0: "B"}}
    return onnx_bytes(PerPairGraph(ranker), args, names, ["probability", "attention"], axes)


def ranker() -> TwoStageRanker:
    """The random-weight ranker of benchmarks/service_latency.py."""
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    cats = np.r_[0, rng.integers(1, N_CATEGORIES, N_ITEMS - 1)].astype(np.int64)
    cfg = RankerConfig("dare", N_ITEMS, N_CATEGORIES, ATTENTION_DIM, REPR_DIM, TOP_K, FM_DIM, (128, 64))
    model = TwoStageRanker(cfg, cats)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


class Request:
    """One request after stage 1: rows, buckets, the retrieved positions and their scores."""

    def __init__(self, model: TwoStageRanker, length: int, user: int) -> None:
        items, times = user_history(length + user)  # a different history per user
        items, times = items[:length], times[:length]
        self.cand = np.asarray(candidates(), np.int64)  # item ids are rows here (row i = id i)
        self.rows = items
        self.buckets = time_buckets(int(times[-1]) + 60 - times)
        with torch.no_grad():
            attention = model.item_attention_table()
            bias = model.time_bias().numpy().astype(np.float32)
        table = search_table_of(attention)
        pair = (search_queries(table, self.cand), search_keys(table, bias, self.rows, self.buckets))
        res = Stage1Engine(threads=1).search([pair], TOP_K)[0]
        self.positions, self.scores = res.positions, res.scores
        self.fm = np.random.default_rng(SEED + user).standard_normal(FM_DIM).astype(np.float32)


def per_pair_feeds(reqs: list[Request]) -> dict[str, np.ndarray]:
    """Format-1 feeds: every slot's behavior row and bucket ([B, C, K] each), as its FeedPool built them."""
    b, c = len(reqs), max(len(r.cand) for r in reqs)
    feeds = {
        "candidates": np.zeros((b, c), np.int64),
        "behaviors": np.zeros((b, c, TOP_K), np.int64),
        "buckets": np.zeros((b, c, TOP_K), np.int64),
        "mask": np.zeros((b, c, TOP_K), np.float32),
        "fm": np.zeros((b, FM_DIM), np.float32),
        "fm_present": np.ones(b, np.float32),
    }
    for i, r in enumerate(reqs):
        ci, ki = r.positions.shape
        feeds["candidates"][i, :ci] = r.cand
        feeds["behaviors"][i, :ci, :ki] = r.rows[r.positions]
        feeds["buckets"][i, :ci, :ki] = r.buckets[r.positions]
        feeds["mask"][i, :ci, :ki] = 1.0
        feeds["fm"][i] = r.fm
    return feeds


def current_inputs(reqs: list[Request]) -> list[RankInput]:
    return [rank_input(r.cand, r.rows, r.buckets, r.positions, r.scores, r.fm) for r in reqs]


def alternate(fns: dict[str, Callable[[], object]], rounds: int, reps: int) -> dict[str, float]:
    """Median ms of each function, timed in alternating rounds so machine noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].extend(samples_ms(fn, reps, 0))
    return {name: float(np.median(t)) for name, t in times.items()}


def measure(graphs: dict[str, bytes], reqs: list[Request], threads: int, rounds: int, reps: int) -> dict:
    """Both graphs on the same requests at one ORT thread count: ms of each path, probability diff."""
    cpu = ["CPUExecutionProvider"]
    old = ort.InferenceSession(graphs["per-pair"], session_options(threads), providers=cpu)
    new = ort.InferenceSession(graphs["current"], session_options(threads), providers=cpu)
    pool = FeedPool(TOP_K, FM_DIM)
    old_feeds = per_pair_feeds(reqs)
    new_feeds, _ = pool.feeds(current_inputs(reqs))  # kept by this measurement, not given back
    old_p, new_p = old.run(None, old_feeds)[0], new.run(None, new_feeds)[0]
    # the pool pads the candidate axis (CANDIDATE_ALIGN); padded rows are not scores
    diff = float(np.abs(old_p - new_p[:, : old_p.shape[1]]).max())
    assert diff < 1e-5, f"the graphs disagree by {diff}"
    res = alternate(
        {
            "old graph": lambda: old.run(None, old_feeds),
            "new graph": lambda: new.run(None, new_feeds),
            "old stage 2": lambda: old.run(["probability", "attention"], per_pair_feeds(reqs)),
            "new stage 2": lambda: rank_batch(new, pool, current_inputs(reqs)),
        },
        rounds,
        reps,
    )
    return res | {"diff": diff}


def pooling(model: TwoStageRanker, rounds: int, reps: int) -> None:
    """The current graph with each way of pooling the slots, one request, graph alone."""
    variants = {
        "multiply + sum": SumPooling,
        "gather + matmul (in use)": Stage2Graph,
        "dense [C, U]": DensePooling,
    }
    graphs = {name: ranker_onnx(model, cls) for name, cls in variants.items()}
    rows = []
    for length in LENGTHS:
        req = Request(model, length, 0)
        pool = FeedPool(TOP_K, FM_DIM)
        feeds, _ = pool.feeds(current_inputs([req]))
        for threads in THREADS:
            cpu = ["CPUExecutionProvider"]
            sess = {
                n: ort.InferenceSession(g, session_options(threads), providers=cpu) for n, g in graphs.items()
            }
            ref = sess["gather + matmul (in use)"].run(None, feeds)[0]
            for name, s in sess.items():
                diff = float(np.abs(s.run(None, feeds)[0] - ref).max())
                assert diff < 1e-5, f"{name} disagrees by {diff}"
            res = alternate({n: lambda s=s, f=feeds: s.run(None, f) for n, s in sess.items()}, rounds, reps)
            base = res["gather + matmul (in use)"]
            cells = [f"{res[n]:.2f} ({res[n] / base:.2f}x)" for n in variants]
            rows.append([f"{length:,}", f"{feeds['behaviors'].shape[1]:,}", str(threads), *cells])
    print_lines(
        [
            f"Pooling in the stage-2 graph, one request = {CANDIDATES} candidates x K={TOP_K}; "
            f"{machine_line()}; onnxruntime {ort.__version__}. ms of `session.run` (and relative to the one "
            "in use).",
            "",
            *md_table(["behaviors L", "distinct U", "ORT threads", *variants], rows),
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8, help="requests in the batched row (0: skip it)")
    ap.add_argument("--pooling", action="store_true", help="compare ways of pooling the slots instead")
    args = ap.parse_args()

    model = ranker()
    if args.pooling:
        pooling(model, args.rounds, args.reps)
        return
    graphs = {"per-pair": per_pair_onnx(model), "current": ranker_onnx(model)}
    rows, dedupe_rows = [], []
    for length in LENGTHS:
        one = [Request(model, length, 0)]
        batch = [Request(model, length, u) for u in range(args.batch)]
        for reqs in (one, batch) if args.batch else (one,):
            distinct = np.mean([len(x.beh_rows) for x in current_inputs(reqs)])
            reps = args.reps if len(reqs) == 1 else max(3, args.reps // 4)
            for threads in THREADS:
                res = measure(graphs, reqs, threads, args.rounds, reps)
                rows.append(
                    [
                        f"{length:,}",
                        str(len(reqs)),
                        f"{distinct:,.0f}",
                        str(threads),
                        f"{res['old graph']:.2f}",
                        f"{res['new graph']:.2f}",
                        f"**{res['old graph'] / res['new graph']:.1f}x**",
                        f"{res['old stage 2']:.2f}",
                        f"{res['new stage 2']:.2f}",
                        f"**{res['old stage 2'] / res['new stage 2']:.1f}x**",
                        f"{res['diff']:.1e}",
                    ]
                )
        r = one[0]
        dd = alternate(
            {
                "np.unique": lambda r=r: np.unique(r.positions, return_inverse=True),
                "marks": lambda r=r: distinct_positions(r.positions, len(r.rows)),
            },
            args.rounds,
            args.reps,
        )
        ratio = dd["np.unique"] / dd["marks"]
        dedupe_rows.append([f"{length:,}", f"{dd['np.unique']:.3f}", f"{dd['marks']:.3f}", f"{ratio:.1f}x"])

    sizes = ", ".join(f"{name} {len(g) / 2**20:.1f} MiB" for name, g in graphs.items())
    print_lines(
        [
            f"Stage 2, one request = {CANDIDATES} candidates x K={TOP_K}; {machine_line()}; "
            f"onnxruntime {ort.__version__}, {platform.machine()}. Graph files: {sizes}.",
            "",
            *md_table(
                [
                    "behaviors L",
                    "requests",
                    "distinct U per request",
                    "ORT threads",
                    "old graph ms",
                    "new graph ms",
                    "old / new",
                    "old stage 2 ms",
                    "new stage 2 ms",
                    "old / new",
                    "max prob diff",
                ],
                rows,
            ),
            "",
            "Distinct positions of one request's [C, K] stage-1 result (`rank_input`'s deduplication):",
            "",
            *md_table(["behaviors L", "np.unique ms", "marks ms", "np.unique / marks"], dedupe_rows),
        ]
    )


if __name__ == "__main__":
    main()
