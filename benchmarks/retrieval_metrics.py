"""Stage-1 retrieval metrics on synthetic data: what the MI ground truth and the planted truth say about
reference rankings, in both theme layouts, and how long the metrics take at scale.

    .venv/bin/python -m benchmarks.retrieval_metrics [--users 2000] [--k 64] [--scale-impressions 100000]

Rankings compared (no model needed): the planted oracle (related behaviors first, then newest), same
category as the target first (then newest), newest first, and a seeded random order.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from exporters.dataset import Dataset
from exporters.retrieval import MiTable, csr_take, mi_ndcg, planted_metrics
from exporters.samples import TEST, TRAIN, build_samples, build_vocab, related_positions
from exporters.synth import SynthConfig, generate, signal_report


def _rank(score: np.ndarray, start: np.ndarray, end: np.ndarray, k: int) -> np.ndarray:
    """Top-k history indices per impression by score over the flat event array (ties: newest first)."""
    out = np.full((len(start), k), -1, np.int64)
    for i, (a, b) in enumerate(zip(start, end, strict=True)):
        n = int(b - a)
        if n == 0:
            continue
        s = score[i][:n] if score.ndim == 2 else score[a:b]
        # lexsort: last key is primary; newer index wins ties
        order = np.lexsort((-np.arange(n), -s))[:k]
        out[i, : len(order)] = order
    return out


def layout_section(cfg: SynthConfig, k: int) -> None:
    events, impressions, related = generate(cfg)
    report = signal_report(events, impressions)
    ds = Dataset(events=events, impressions=impressions, meta={}, related=related)
    vocab = build_vocab(ds)
    s = build_samples(ds, vocab, max_seq_len=cfg.max_seq_len)
    ev_cat = vocab.row_category[s.event_rows]
    train, test = s.indices(TRAIN), s.indices(TEST)

    t0 = time.perf_counter()
    table = MiTable.fit(
        s.target_category[train], s.label[train], ev_cat, s.hist_start[train], s.hist_end[train]
    )
    fit_s = time.perf_counter() - t0

    rel = related_positions(ds, s, vocab)
    assert rel is not None
    ip, pos = csr_take(rel[0], rel[1], test, offsets=s.hist_start[test])
    start, end = s.hist_start[test], s.hist_end[test]
    n = end - start
    rng = np.random.default_rng(0)
    is_rel = np.zeros((len(test), int(n.max())), bool)
    rows = np.repeat(np.arange(len(test)), np.diff(ip))
    is_rel[rows, pos] = True
    same_cat = np.zeros_like(is_rel)
    for i in range(len(test)):
        same_cat[i, : n[i]] = ev_cat[start[i] : end[i]] == s.target_category[test[i]]
    rankings = {
        "planted oracle": _rank(is_rel.astype(float), start, end, k),
        "same category": _rank(same_cat.astype(float), start, end, k),
        "newest first": _rank(np.zeros(is_rel.shape), start, end, k),
        "random": _rank(rng.random(is_rel.shape), start, end, k),
    }
    print(
        f"\n## theme_layout={cfg.theme_layout}: AUC related count {report['auc_related_count']:.3f}, "
        f"same-category count {report['auc_same_category_count']:.3f}, "
        f"true logit {report['auc_true_logit']:.3f}"
    )
    summary = table.summary()
    print(
        f"MI table: {summary['n_train_impressions']} train impressions, {summary['n_train_behaviors']} "
        f"behaviors, {summary['n_cells_kept']} of {summary['n_cells_counted']} cells kept, fit {fit_s:.2f} s"
    )
    print(f"{len(test)} test impressions, k = {k}")
    print("| ranking | MI NDCG@k | MI NDCG@k, long | planted precision, long | planted lift, long |")
    print("|---|---|---|---|---|")
    for name, top in rankings.items():
        m = mi_ndcg(table, s.target_category[test], ev_cat, start, end, top, k)
        p = planted_metrics(n, top, ip, pos, k)
        print(
            f"| {name} | {m['ndcg']:.3f} | {m['ndcg_long']:.3f} | {p['precision_at_k_long']:.3f} "
            f"| {p['lift_long']:.2f} |"
        )
    m = mi_ndcg(table, s.target_category[test], ev_cat, start, end, rankings["newest first"], k)
    print(
        f"mi_ndcg's own references on the same impressions: random (expected) {m['ndcg_random']:.3f}, "
        f"recency {m['ndcg_recency']:.3f}; scored {m['n_scored']} of {m['n_impressions']}"
    )


def scale_section(n_imp: int, length: int, k: int) -> None:
    """Timing: n_imp impressions, every history `length` long, 100 categories."""
    rng = np.random.default_rng(1)
    n_users = max(1, n_imp // 100)
    ev_cat = rng.integers(1, 101, n_users * length)
    user = np.arange(n_imp) % n_users
    start = user * length
    end = start + length
    target = rng.integers(1, 101, n_imp)
    label = (rng.random(n_imp) < np.where(ev_cat[end - 1] == target, 0.6, 0.3)).astype(int)
    t0 = time.perf_counter()
    table = MiTable.fit(target, label, ev_cat, start, end)
    fit_s = time.perf_counter() - t0
    top = np.tile(np.arange(length - 1, length - 1 - k, -1), (n_imp, 1))
    t0 = time.perf_counter()
    m = mi_ndcg(table, target, ev_cat, start, end, top, k)
    ndcg_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    planted_metrics(end - start, top, np.zeros(n_imp + 1, np.int64), np.zeros(0, np.int64), k)
    planted_s = time.perf_counter() - t0
    print(
        f"\n## scale: {n_imp} impressions x {length} behaviors ({n_imp * length / 1e6:.0f} M), k = {k}\n"
        f"MiTable.fit: {fit_s:.1f} s on {table.n_behaviors / 1e6:.0f} M sampled behaviors "
        f"({table.n_impressions} of {table.n_impressions_available} impressions)\n"
        f"mi_ndcg: {ndcg_s:.1f} s over all {m['n_impressions']} impressions\n"
        f"planted_metrics: {planted_s:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--scale-impressions", type=int, default=100_000)
    parser.add_argument("--scale-length", type=int, default=2000)
    args = parser.parse_args()
    for layout in ("nested", "independent"):
        layout_section(replace(SynthConfig(users=args.users), theme_layout=layout), args.k)
    if args.scale_impressions > 0:
        scale_section(args.scale_impressions, args.scale_length, args.k)


if __name__ == "__main__":
    main()
