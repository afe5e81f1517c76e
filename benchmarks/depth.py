"""Serving search depth: a model trained on a 2,000-behavior window, served over deeper histories.

A synthetic world where some interests are dormant (`SynthConfig.dormant_share`: in a user's events
only early in the timeline, in the impression targets to the end), so late in a long history the
related behaviors of those targets lie older than the training window. A `dare` model is trained
once per training window (`--train-windows`, default 2,000 only), then the test split is scored
through the serving core (`service.core.pipeline`: stage-1 engine, ONNX Runtime stage 2) at each
serving depth: the newest `depth` behaviors before each impression. Per (window, depth):

- AUC and GAUC on the whole test split, AUC on impressions with more history than the first
  window, and the paired difference to the first window's model served at that window (today's
  setup), with a bootstrap interval;
- planted-truth retrieval of stage 1 (`exporters.retrieval.planted_metrics`), against the related
  behaviors of the *whole* history, so a shallow read shows the ones it never saw as misses;
- per-stage latency of one request (100 candidates) for the longest users: feature read from the
  in-memory store at that depth, stage 1, stage 2 (CPU, one thread each).

    .venv/bin/python -m benchmarks.depth [--users 300] [--impressions-per-user 80]
                                         [--depths 1000,2000,10000,full]
                                         [--train-windows 2000[,10000]] [--seed 0 | --seeds 0,1,2]

With several seeds, one world and one model per seed, then the mean and standard deviation over
seeds of each AUC and of its gain over the first window served at that window. Not a test; small
scale (2 shared cores). docs/benchmarks.md has a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks._common import machine_line, md_table, pct, print_lines
from service.process import dare_serve_command

if TYPE_CHECKING:
    from exporters.samples import ItemVocab, Samples
    from feature_store.base import FeatureStore, UserFeatures
    from service.core.pipeline import ScoringModel

CANDIDATES = 100
BOOTSTRAP = 500
LATENCY_USERS = 20
LATENCY_REPS = 5


@dataclass(frozen=True)
class DepthResult:
    window: int
    depth: str
    mean_read: float
    auc: float
    auc_long: float
    gauc: float  # per-user AUC, impression-weighted: blind to a shift of a whole user's scores
    delta_long: tuple[float, float, float]  # AUC - baseline's, long histories: 2.5 %, value, 97.5 %
    planted: dict[str, float]
    planted_long: dict[str, float]
    feature_ms: float
    search_ms: float
    rank_ms: float


def parse_depths(raw: str) -> list[int | None]:
    """`1000,2000,full` -> [1000, 2000, None]; None reads the whole history."""
    return [None if d.strip() == "full" else int(d) for d in raw.split(",")]


def score_test_split(
    model: ScoringModel,
    s: Samples,
    vocab: ItemVocab,
    test_idx: np.ndarray,
    depth: int | None,
    batch: int = 64,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities, behaviors read and stage-1 top-K (history indices, -1: none) of the test split
    at one serving depth."""
    from service.core.pipeline import prepare_job, score_jobs

    k = model.top_k
    probs = np.zeros(len(test_idx))
    read = np.zeros(len(test_idx), np.int64)
    top = np.full((len(test_idx), k), -1, np.int64)
    raw_items = vocab.item_ids[s.event_rows]
    target_raw = vocab.item_ids[s.target_row]
    for a in range(0, len(test_idx), batch):
        idx = test_idx[a : a + batch]
        jobs, offsets = [], []
        for i in idx:
            start, end = int(s.hist_start[i]), int(s.hist_end[i])
            first = start if depth is None else max(start, end - depth)
            jobs.append(
                prepare_job(
                    model,
                    target_raw[i : i + 1],
                    raw_items[first:end],
                    s.event_ts[first:end],
                    int(s.target_ts[i]),
                    None,
                )
            )
            offsets.append(first - start)
        for j, (job, scored, offset) in enumerate(zip(jobs, score_jobs(model, jobs), offsets, strict=True)):
            probs[a + j] = scored.probabilities[0]
            read[a + j] = len(job.beh_rows)
            found = scored.positions[0]
            top[a + j, : len(found)] = found + offset  # positions in the read tail -> history indices
    return probs, read, top


def paired_delta(
    labels: np.ndarray, probs: np.ndarray, base: np.ndarray, seed: int
) -> tuple[float, float, float]:
    """AUC(probs) - AUC(base) on the same impressions: bootstrap 2.5 % quantile, point value, 97.5 %."""
    from exporters.metrics import auc

    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(labels), len(labels)) for _ in range(BOOTSTRAP)]
    deltas = np.array([auc(labels[d], probs[d]) - auc(labels[d], base[d]) for d in draws])
    lo, hi = np.nanquantile(deltas, [0.025, 0.975])
    return float(lo), auc(labels, probs) - auc(labels, base), float(hi)


def stage_latency(
    model: ScoringModel, store: FeatureStore, users: list[str], depth: int | None, rng: np.random.Generator
) -> list[float]:
    """p50 ms of the feature read, stage 1 and stage 2 of one request per user, `LATENCY_REPS` rounds."""
    from service.core.pipeline import prepare_job, score_jobs

    known = model.bundle.item_ids[1:]
    feature: list[float] = []
    search: list[float] = []
    rank: list[float] = []

    async def read(user: str) -> tuple[UserFeatures, float]:
        t0 = time.perf_counter()
        (features,) = await store.read_users([user], max_len=depth)
        return features, time.perf_counter() - t0

    for _ in range(LATENCY_REPS):
        for user in users:
            features, took = asyncio.run(read(user))
            seq = features.sequence
            cands = rng.choice(known, CANDIDATES, replace=False)
            job = prepare_job(model, cands, seq.items, seq.timestamps, int(seq.timestamps[-1]) + 60, None)
            (scored,) = score_jobs(model, [job])
            feature.append(took)
            search.append(scored.search_s)
            rank.append(scored.rank_s)
    return [pct(np.asarray(v) * 1e3, 50) for v in (feature, search, rank)]


def train_once(data: Path, out: Path, window: int, epochs: int, seed: int) -> dict[str, Any]:
    """`dare-serve train` in a subprocess on one thread: torch's OpenMP pool, once started in this
    process, would slow the serving core's stage 1 here several-fold (it is never loaded in serving)."""
    cmd = [*dare_serve_command(), "train", "--data", str(data), "--model", "dare", "--out", str(out)]
    cmd += ["--variant", f"dare-w{window}", "--max-seq-len", str(window), "--epochs", str(epochs)]
    cmd += ["--seed", str(seed), "--no-progress"]
    env = {**os.environ, "DARE_TRAIN_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace, work: Path) -> tuple[list[str], list[DepthResult]]:
    from exporters.bundle import load_bundle
    from exporters.dataset import read_dataset
    from exporters.metrics import auc, gauc
    from exporters.retrieval import csr_take, planted_metrics
    from exporters.samples import TEST, ItemVocab, build_samples, related_positions
    from exporters.synth import SynthConfig, write_synth
    from feature_store.base import MAX_LEN_LIMIT, UserSequence
    from feature_store.memory_store import InMemoryFeatureStore
    from service.core.pipeline import ScoringModel
    from service.core.runtime import session_options, single_threaded_numerics

    single_threaded_numerics()  # as in the service's compute threads: BLAS and FAISS on one thread
    windows = [int(w) for w in args.train_windows.split(",")]
    cfg = SynthConfig(
        users=args.users,
        items=args.items,
        categories=args.categories,
        min_seq_len=args.min_seq_len,
        max_seq_len=args.max_seq_len,
        seed=args.seed,
        dormant_share=args.dormant_share,
        impressions_per_user=args.impressions_per_user,
    )
    counts = write_synth(work / "data", cfg)["counts"]
    print(f"data: {counts['events']:,} events, {counts['impressions']:,} impressions", file=sys.stderr)
    ds = read_dataset(work / "data")
    vocab = ItemVocab.from_dataset(ds)
    s = build_samples(ds, vocab, max_seq_len=MAX_LEN_LIMIT)  # whole histories; depths cut them
    related = related_positions(ds, s, vocab)
    assert related is not None
    test_idx = s.indices(TEST)
    start = s.hist_start[test_idx]
    hist_len = s.hist_end[test_idx] - start
    long = hist_len > windows[0]
    labels = s.label[test_idx]
    test_users = s.user_index[test_idx]

    # the longest users, their whole sequences in the in-memory store (cap: the longest)
    lengths = np.bincount(s.event_user, minlength=len(s.users))
    longest = np.argsort(-lengths, kind="stable")[:LATENCY_USERS]
    starts = np.searchsorted(s.event_user, np.arange(len(s.users)))
    store = InMemoryFeatureStore(max_len=int(lengths.max()))
    sequences = {
        str(s.users[u]): UserSequence(
            vocab.item_ids[s.event_rows[starts[u] : starts[u] + lengths[u]]],
            s.event_ts[starts[u] : starts[u] + lengths[u]],
        )
        for u in longest
    }
    asyncio.run(store.replace_sequences(sequences))
    rng = np.random.default_rng(args.seed)

    results: list[DepthResult] = []
    trained: list[str] = []
    base: np.ndarray | None = None  # the first window's model served at that window: today's setup
    for window in windows:
        t0 = time.perf_counter()
        result = train_once(work / "data", work / "bundles", window, args.epochs, args.seed)
        took = time.perf_counter() - t0
        trained.append(
            f"window {window:,}: best epoch {result['best_epoch']} of at most {args.epochs}, "
            f"offline test AUC {result['auc']:.4f}, {took:.0f} s"
        )
        print(
            f"trained window {window:,} in {took:.0f}s: offline test AUC {result['auc']:.4f}", file=sys.stderr
        )
        bundle = load_bundle(Path(result["bundle"]), session_options=session_options(1))
        model = ScoringModel.from_bundle(bundle)
        if base is None:
            base = score_test_split(model, s, vocab, test_idx, window)[0]
        for depth in parse_depths(args.depths):
            name = "full" if depth is None else f"{depth:,}"
            probs, read, top = score_test_split(model, s, vocab, test_idx, depth)
            # against the related behaviors of the whole history: those a shallow read never saw are misses
            planted_all, planted_long = (
                planted_metrics(
                    hist_len[sel], top[sel], *csr_take(*related, test_idx[sel], start[sel]), model.top_k
                )
                for sel in (np.ones(len(test_idx), bool), long)
            )
            feature_ms, search_ms, rank_ms = stage_latency(model, store, list(sequences), depth, rng)
            results.append(
                DepthResult(
                    window,
                    name,
                    float(read.mean()),
                    auc(labels, probs),
                    auc(labels[long], probs[long]),
                    gauc(test_users, labels, probs),
                    paired_delta(labels[long], probs[long], base[long], args.seed),
                    planted_all,
                    planted_long,
                    feature_ms,
                    search_ms,
                    rank_ms,
                )
            )
    notes = [
        f"Data: `SynthConfig(users={cfg.users}, items={cfg.items}, categories={cfg.categories}, "
        f"min_seq_len={cfg.min_seq_len}, max_seq_len={cfg.max_seq_len}, dormant_share={cfg.dormant_share}, "
        f"impressions_per_user={cfg.impressions_per_user:g}, seed={cfg.seed})`: "
        f"{counts['events']:,} events, {counts['impressions']:,} impressions; "
        f"{len(test_idx):,} test impressions, {int(long.sum()):,} of them with more than {windows[0]:,} "
        f'behaviors of history ("long"; mean history {hist_len.mean():,.0f}, max {hist_len.max():,}).',
        f"`dare` models (K=64, attention d=16, `train` defaults, seed {args.seed}), one per training window: "
        + "; ".join(trained)
        + ".",
        f"AUC - baseline: on the long test impressions, minus the {windows[0]:,}-window model served at "
        f"depth {windows[0]:,} (today's setup) on the same impressions; 95% interval from a paired "
        f"bootstrap of {BOOTSTRAP} resamples.",
        f"Latency: one request of {CANDIDATES} candidates for each of the {LATENCY_USERS} longest users "
        f"(histories {lengths[longest].min():,} to {lengths.max():,}), {LATENCY_REPS} rounds, p50; "
        "training, ONNX Runtime and stage 1 on one thread.",
    ]
    return notes, results


def table(results: list[DepthResult]) -> list[str]:
    header = [
        "training window", "serving depth", "behaviors read (mean)", "AUC", "AUC, long", "GAUC",
        "AUC - baseline, long (95% CI)", "planted recall@K", "planted precision@K", "planted recall@K, long",
        "feature ms", "stage 1 ms", "stage 2 ms",
    ]  # fmt: skip
    rows = [
        [
            f"{r.window:,}",
            r.depth,
            f"{r.mean_read:,.0f}",
            f"{r.auc:.4f}",
            f"{r.auc_long:.4f}",
            f"{r.gauc:.4f}",
            f"{r.delta_long[1]:+.4f} ({r.delta_long[0]:+.4f}, {r.delta_long[2]:+.4f})",
            f"{r.planted['recall_at_k']:.3f}",
            f"{r.planted['precision_at_k']:.3f}",
            f"{r.planted_long['recall_at_k']:.3f}",
            f"{r.feature_ms:.2f}",
            f"{r.search_ms:.2f}",
            f"{r.rank_ms:.2f}",
        ]
        for r in results
    ]
    return md_table(header, rows)


def summary(results: list[DepthResult]) -> list[str]:
    """What the table says, per training window: the deepest read against a read of the window."""
    lines = []
    for window in dict.fromkeys(r.window for r in results):
        rows = {r.depth: r for r in results if r.window == window}
        at, deep = rows.get(f"{window:,}"), list(rows.values())[-1]
        if at is None or deep is at:
            continue
        lo, delta, hi = deep.delta_long
        versus = (
            f" (vs the baseline {delta:+.4f}, 95% CI {lo:+.4f} to {hi:+.4f})"
            if window == results[0].window
            else ""
        )
        lines.append(
            f"- Trained on {window:,}, served at depth {deep.depth} instead of {window:,}: planted "
            f"recall@K on long histories {at.planted_long['recall_at_k']:.3f} -> "
            f"{deep.planted_long['recall_at_k']:.3f}; AUC on them {at.auc_long:.4f} -> {deep.auc_long:.4f}"
            f"{versus}; stage 1 {at.search_ms:.2f} -> {deep.search_ms:.2f} ms per request (longest users)."
        )
    return lines


def options(quick: bool) -> argparse.Namespace:
    """The defaults (three seeds), or the smaller sizes of a smoke run."""
    args = parser().parse_args([])
    args.seeds, args.train_windows = "0,1,2", "2000,10000"
    if quick:
        args.users, args.min_seq_len, args.max_seq_len, args.epochs = 60, 500, 4_000, 1
        args.seeds, args.impressions_per_user = "0", 24.0
        args.depths, args.train_windows = "1000,2000,full", "2000,4000"
    return args


def section(quick: bool) -> list[str]:
    """Section g of benchmarks/suite.py."""
    intro = (
        "`dare` models trained on the default 2,000-behavior window and on 10,000, each served over the "
        "newest `depth` behaviors before each test impression (`benchmarks/depth.py`; the serving core "
        "in process: stage-1 engine, ONNX Runtime). The data has dormant lifelong interests "
        "(`dormant_share`, docs/datasets.md): their related behaviors lie early in long histories, older "
        "than the training window. Planted recall counts the related behaviors of the whole history, so a "
        "shallow read misses those it never saw. One world and one model per seed; the last table "
        "gives the spread over seeds."
    )
    return ["## g. Serving search depth", "", intro, *run_seeds(options(quick))]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--categories", type=int, default=100)
    ap.add_argument("--min-seq-len", type=int, default=1_000)
    ap.add_argument("--max-seq-len", type=int, default=16_000)
    ap.add_argument("--dormant-share", type=float, default=0.5)
    # enough labels that the model trains past its first epoch (24 a user left it at one)
    ap.add_argument("--impressions-per-user", type=float, default=80.0)
    ap.add_argument("--train-windows", default="2000", help="one model per window; the first is the baseline")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--depths", default="1000,2000,10000,full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default="", help="e.g. 0,1,2: one world and model per seed, and their spread")
    return ap


def over_seeds(runs: list[list[DepthResult]]) -> list[str]:
    """Mean and standard deviation over seeds, per (window, depth), of each AUC and of its gain over
    the baseline: the first window's model served at that window (the same seed's world)."""
    header = ["training window", "serving depth", "AUC", "AUC, long", "GAUC", "AUC - baseline",
              "AUC, long - baseline", "planted recall@K, long"]  # fmt: skip
    first = runs[0][0].window

    def at_window(results: list[DepthResult]) -> DepthResult:
        return next(r for r in results if r.window == first and r.depth == f"{first:,}")

    def stat(values: list[float], digits: int = 4) -> str:
        return f"{np.mean(values):+.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"

    rows = []
    for i, r0 in enumerate(runs[0]):
        rs = [results[i] for results in runs]
        base = [at_window(results) for results in runs]
        rows.append(
            [
                f"{r0.window:,}",
                r0.depth,
                stat([r.auc for r in rs]).lstrip("+"),
                stat([r.auc_long for r in rs]).lstrip("+"),
                stat([r.gauc for r in rs]).lstrip("+"),
                stat([r.auc - b.auc for r, b in zip(rs, base, strict=True)]),
                stat([r.auc_long - b.auc_long for r, b in zip(rs, base, strict=True)]),
                stat([r.planted_long["recall_at_k"] for r in rs], 3).lstrip("+"),
            ]
        )
    return md_table(header, rows)


def run_seeds(args: argparse.Namespace) -> list[str]:
    """`run` for each of `--seeds` (else `--seed`): each seed's tables, then the spread over seeds."""
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    runs, lines = [], []
    for seed in seeds:
        args.seed = seed
        with tempfile.TemporaryDirectory(prefix="dare-depth-") as work:
            notes, results = run(args, Path(work))
        runs.append(results)
        lines += ["", f"### seed {seed}", "", *notes, "", *table(results), "", *summary(results)]
    if len(runs) > 1:
        lines += ["", f"### Mean ± standard deviation over seeds {args.seeds}", "", *over_seeds(runs)]
    return lines


def main() -> None:
    print_lines([machine_line(), *run_seeds(parser().parse_args())])


if __name__ == "__main__":
    main()
