"""Model quality: `dare` against `coupled`, with and without the self-supervised stage, over seeds.

    .venv/bin/python -m benchmarks.model_quality [--seeds 3] [--section ablation --section real ...]
        [--results .dare/model-quality.jsonl] [--out docs/model-quality.md]

Sections:
- ablation: synthetic data whose relatedness is independent of category (`data synth
  --theme-layout independent`, default size: ~38k training impressions). Both arms at equal
  embedding dims (16 and 64), each as before the self-supervised work ("base": random init, L2 on
  every table, no auxiliary loss), with item vectors only ("ssl"), and with item vectors plus the
  auxiliary co-occurrence loss ("full", the `train` default).
- sweep: the attention-dim sweep (8, 16, 32, 64) of both arms, full recipe, against the stage-1
  cost per request at that dim (200 candidates x 10,000 behaviors, one thread).
- real: MovieLens (`../shared/data`), base against full, both served arms: AUC and the DARE paper's
  MI-NDCG retrieval measure.
- long: the ablation's key rows (dare-16 base and full, coupled-16 and coupled-64 full) on the same
  kind of world with long histories (500 to 5,000 behaviors, median ~1,260), where a top-64 is a
  small part of a history and the lift of a perfect stage 1 is not capped near 4.
- calibration: the served pair (dare-16, coupled-64, `train` defaults) on the default synthetic
  world, the independent-relatedness one, a smaller independent one with 3,000 users and histories
  up to 1,000, ml-latest-small and ml-100k: whether the scores are probabilities (normalized
  entropy, calibration ratio, per-decile reliability) before and after the validation-fitted
  calibration, against the popularity baseline. Written with `--out docs/calibration.md` and
  `--results docs/results/calibration.jsonl`, plus a reliability plot (`--plot`).
- recency: dare-16 (`train` defaults otherwise) on ml-latest-small and ml-100k with stage 1 keeping
  the newest 16, 32 or 48 of its top-64 (`recent_k`) against none, and against the direct
  time-bucket bias (`recency_prior` 1.0) alone: AUC, NE, MI-NDCG of the search against newest-first;
  and the short-term branch over the newest 16 (`short_term`) with 16 or 32 kept.
  `recency-synth`: the same settings on the default synthetic world. Written with `--section recency
  --results docs/results/recency.jsonl --out docs/recency.md`.
- attention: dare-16 with stage 2's learned gain starting at 4 or 16 (`stage2_gain`,
  `stage2_gain_init`) against none, on the independent and long synthetic worlds and both MovieLens
  sets: AUC, NE, the effective number of behaviors attended, and (planted truth) the attention mass on
  related behaviors against their share of the retrieved set. Written with `--section attention
  --results docs/results/attention.jsonl --out docs/attention.md`.
- lift: what moves dare-16's planted lift toward a perfect stage 1's on the independent world: the
  auxiliary loss's weight, the item vectors' window, the attention tables' initial norm, a sharper
  stage 2; beside it, the lift of the item vectors alone (no training, no time term) at 16 and 64
  dims, with and without the category part. Written with `--section lift --results
  docs/results/lift.jsonl --out docs/lift.md`.

Every training result is appended to a JSON-lines file and reused on the next run, so a long run
can be resumed; the markdown is rendered from whatever results exist (mean and sample standard
deviation over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import numpy as np
import torch

from exporters.convert import convert_to_folder
from exporters.synth import SynthConfig, write_synth
from exporters.train import TrainConfig, train

RECIPES: dict[str, dict[str, Any]] = {
    "base": {"pretrain": False, "aux_weight": 0.0, "decay_embeddings": True},
    "ssl": {"pretrain": True, "aux_weight": 0.0},
    "full": {},
    "recent-16": {"recent_k": 16},
    "recent-32": {"recent_k": 32},
    "recent-48": {"recent_k": 48},
    "prior-1": {"recency_prior": 1.0},
    "short-16": {"recent_k": 16, "short_term": 16},
    "recent-32-short-16": {"recent_k": 32, "short_term": 16},
    "gain-4": {"stage2_gain": True, "stage2_gain_init": 4.0},
    "gain-16": {"stage2_gain": True, "stage2_gain_init": 16.0},
    "aux-0": {"aux_weight": 0.0},
    "aux-0.3": {"aux_weight": 0.3},
    "window-50": {"pretrain_window": 50},
    "window-100": {"pretrain_window": 100},
    "init-norm-3": {"attention_init_norm": 3.0},
}
RECENCY_RECIPES = ("full", "recent-16", "recent-32", "recent-48", "prior-1", "short-16", "recent-32-short-16")
ATTENTION_RECIPES = ("full", "gain-4", "gain-16")
LIFT_RECIPES = ("full", "aux-0", "aux-0.3", "window-50", "window-100", "init-norm-3", "gain-16")
SECTIONS = (
    "ablation",
    "sweep",
    "real",
    "long",
    "calibration",
    "recency",
    "recency-synth",
    "attention",
    "lift",
)
LONG = "synth-independent-long"
CALIBRATION_DATASETS = (
    "synth",
    "synth-independent",
    LONG,
    "synth-independent-3k",
    "ml-latest-small",
    "ml-100k",
)
TITLES = {
    "synth": "Synthetic, the default world (relatedness nested in categories)",
    "synth-independent": "Synthetic, relatedness independent of category (ablation and sweep)",
    LONG: "Synthetic with long histories (500 to 5,000 behaviors), relatedness independent of category",
    "synth-independent-3k": (
        "Synthetic, relatedness independent of category, 3,000 users, histories up to 1,000"
    ),
    "ml-latest-small": "MovieLens ml-latest-small (real data)",
    "ml-100k": "MovieLens ml-100k (real data)",
}


def runs_for(section: str) -> list[tuple[str, str, int, str]]:
    """(dataset, arm, attention dim, recipe) of a section; coupled's dim is its one table's."""
    if section == "ablation":
        # the served pair and both arms at equal dims; the ssl-only step for the served dare
        return [
            ("synth-independent", "dare", 16, "base"),
            ("synth-independent", "coupled", 64, "base"),
            ("synth-independent", "dare", 16, "full"),
            ("synth-independent", "coupled", 64, "full"),
            ("synth-independent", "dare", 64, "full"),
            ("synth-independent", "coupled", 16, "full"),
            ("synth-independent", "dare", 16, "ssl"),
        ]
    if section == "sweep":
        return [("synth-independent", arm, d, "full") for d in (8, 16, 32, 64) for arm in ("dare", "coupled")]
    if section == "calibration":
        return [
            (d, arm, dim, "full")
            for d in CALIBRATION_DATASETS
            for arm, dim in (("dare", 16), ("coupled", 64))
        ]
    if section in ("recency", "recency-synth"):
        # the settings most likely chosen first, on every dataset, so that a partial run already
        # answers the question
        datasets = ("ml-100k", "ml-latest-small") if section == "recency" else ("synth",)
        order = ("full", "recent-32", "recent-16", "short-16", "recent-32-short-16", "prior-1", "recent-48")
        return [(d, "dare", 16, r) for r in order for d in datasets]
    if section == "attention":
        datasets = ("synth-independent", "ml-100k", "ml-latest-small", LONG)
        return [(d, "dare", 16, r) for d in datasets for r in ATTENTION_RECIPES]
    if section == "lift":
        return [("synth-independent", "dare", 16, r) for r in LIFT_RECIPES]
    if section == "long":
        # the ablation's key rows where histories are long enough that a top-64 is a small part of them
        return [(LONG, "dare", 16, "base"), (LONG, "dare", 16, "full"), (LONG, "coupled", 16, "full"),
                (LONG, "coupled", 64, "full")]  # fmt: skip
    return [
        ("ml-latest-small", arm, d, r) for arm, d in (("dare", 16), ("coupled", 64)) for r in ("base", "full")
    ]


def dataset_folder(name: str, work: Path, shared: Path) -> Path:
    folder = work / "data" / name
    if (folder / "impressions.parquet").exists():
        return folder
    if name == "synth":
        write_synth(folder, SynthConfig())
    elif name == "synth-independent":
        write_synth(folder, SynthConfig(theme_layout="independent"))
    elif name == "synth-independent-3k":
        write_synth(folder, SynthConfig(theme_layout="independent", users=3000, max_seq_len=1000))
    elif name == LONG:
        # median history ~1,260: the default world's median of 126 leaves a perfect stage 1 a lift of
        # only ~3.7, since a top-64 then holds half of a typical history
        write_synth(folder, SynthConfig(theme_layout="independent", min_seq_len=500, max_seq_len=5000))
    else:
        convert_to_folder("movielens", shared / name, folder)
    return folder


def train_one(data: Path, work: Path, arm: str, dim: int, recipe: str, seed: int) -> dict[str, Any]:
    dims = {"attention_dim": dim} if arm == "dare" else {"representation_dim": dim}
    cfg = TrainConfig(
        data=data, model=arm, out=work / "bundles", seed=seed, progress=False, **dims, **RECIPES[recipe]
    )
    t0 = time.time()
    r = train(cfg)
    m = r["metrics"]
    ret = m.get("retrieval") or {}
    planted, mi = ret.get("planted") or {}, ret.get("mi_ndcg") or {}
    raw, pop = m.get("uncalibrated") or m, m["popularity"]
    attention = m.get("attention") or {}
    return {
        "auc": m["auc"],
        "gauc": m["gauc"],
        "logloss": m["logloss"],
        "ne": m["ne"],
        "calibration": m["calibration"],
        "deciles": m["calibration_deciles"],
        "logloss_raw": raw["logloss"],
        "ne_raw": raw["ne"],
        "calibration_raw": raw["calibration"],
        "pop_logloss": pop["logloss"],
        "pop_ne": pop["ne"],
        "pop_calibration": pop["calibration"],
        "pop_deciles": pop["calibration_deciles"],
        "stopped_by": r["stopped_by"],
        "attended": attention.get("effective_behaviors"),
        "retrieved": attention.get("retrieved_behaviors"),
        "related_attention": attention.get("related_attention"),
        "related_retrieved": attention.get("related_retrieved"),
        "lift": planted.get("lift_long"),
        "precision": planted.get("precision_at_k_long"),
        "base_rate": planted.get("base_rate_long"),
        "mi_ndcg": mi.get("ndcg_long"),
        "mi_ndcg_recency": mi.get("ndcg_recency_long"),
        "mi_ndcg_random": mi.get("ndcg_random_long"),
        "mi_scored": mi.get("n_scored_long"),
        "best_epoch": r["best_epoch"],
        "seconds": round(time.time() - t0, 1),
    }


def oracle_lift(data: Path, k: int = 64) -> float | None:
    """Planted lift of the best possible stage 1 (related behaviors first, newest first among them):
    the ceiling the lift column is read against. None without planted truth."""
    from exporters.dataset import read_dataset
    from exporters.retrieval import csr_take, planted_metrics
    from exporters.samples import TEST, ItemVocab, build_samples, related_positions

    ds = read_dataset(data)
    vocab = ItemVocab.from_dataset(ds)
    s = build_samples(ds, vocab, TrainConfig.max_seq_len)
    related = related_positions(ds, s, vocab)
    if related is None:
        return None
    test = s.indices(TEST)
    ip, pos = csr_take(*related, test, offsets=s.hist_start[test])
    hist_len = s.hist_end[test] - s.hist_start[test]
    top = np.full((len(test), k), -1, np.int64)
    for i in range(len(test)):
        mine = np.sort(pos[ip[i] : ip[i + 1]])[::-1][:k]
        top[i, : len(mine)] = mine
    return float(planted_metrics(hist_len, top, ip, pos, k)["lift_long"])


def vector_lifts(data: Path, k: int = 64) -> list[tuple[int, int, bool, float]]:
    """(window, dim, with category, lift) of stage 1 searching with the self-supervised item vectors
    alone (as `train` initialises the dare attention tables, before any training, no time term):
    what the co-occurrence signal holds at each dim, against what training makes of it."""
    from exporters.dataset import read_dataset
    from exporters.models import RankerConfig, TwoStageRanker
    from exporters.samples import TEST, TRAIN, ItemVocab, build_samples, related_positions
    from exporters.train import init_embeddings, retrieval_report, samples_vectors

    ds = read_dataset(data)
    vocab = ItemVocab.from_dataset(ds)
    s = build_samples(ds, vocab, TrainConfig.max_seq_len)
    related = related_positions(ds, s, vocab)
    if related is None:
        return []
    out = []
    for window in (20, 50):
        vectors = samples_vectors(s, vocab, 64, window, 0)
        for dim in (16, 64):
            cfg = TrainConfig(data=data, model="dare", out=Path("unused"), attention_dim=dim)
            rcfg = RankerConfig("dare", vocab.n_rows, vocab.n_categories, dim, 64, k)
            model = TwoStageRanker(rcfg, vocab.row_category)
            init_embeddings(model, vectors, vocab, cfg)
            with torch.no_grad():
                model.target_time.zero_()
            for with_category in (True, False):
                if not with_category:
                    with torch.no_grad():
                        model.attn_cat.weight.zero_()
                report = retrieval_report(model, s, vocab, s.indices(TRAIN), s.indices(TEST), related, 512)
                out.append((window, dim, with_category, float(report["planted"]["lift_long"])))
    return out


def stage1_costs_ms(dims: tuple[int, ...], candidates: int = 200, length: int = 10_000) -> dict[int, float]:
    """Median ms of one request's stage 1 at each attention dim (plus the time-bias dim), one thread;
    the dims alternate in rounds, so machine noise hits them alike."""
    from service.core.search import Stage1Engine

    rng = np.random.default_rng(0)
    shapes = {
        d: (
            rng.standard_normal((candidates, d + 1)).astype(np.float32),
            rng.standard_normal((length, d + 1)).astype(np.float32),
        )
        for d in dims
    }
    engine = Stage1Engine(threads=1)
    times: dict[int, list[float]] = {d: [] for d in dims}
    for _ in range(6):
        for d, pair in shapes.items():
            engine.search([pair], 64)
            for _ in range(8):
                t0 = time.perf_counter()
                engine.search([pair], 64)
                times[d].append(time.perf_counter() - t0)
    return {d: float(np.median(v) * 1e3) for d, v in times.items()}


def load_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stat(rows: list[dict[str, Any]], key: str, spec: str = ".4f") -> str:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return ""
    if len(vals) == 1:
        return format(vals[0], spec)
    return f"{format(mean(vals), spec)} ± {format(stdev(vals), spec)}"


def _group(results: list[dict[str, Any]], dataset: str, arm: str, dim: int, recipe: str) -> list[dict]:
    return [
        r for r in results if (r["dataset"], r["arm"], r["dim"], r["recipe"]) == (dataset, arm, dim, recipe)
    ]


COMPARISONS = (
    # (label, dataset, (arm, dim, recipe) of A, the same of B): A minus B, paired by seed
    (
        "items 1-2 on the served dare (full - base)",
        "synth-independent",
        ("dare", 16, "full"),
        ("dare", 16, "base"),
    ),
    ("item vectors alone (ssl - base)", "synth-independent", ("dare", 16, "ssl"), ("dare", 16, "base")),
    ("auxiliary loss on top (full - ssl)", "synth-independent", ("dare", 16, "full"), ("dare", 16, "ssl")),
    ("dare - coupled at dim 16", "synth-independent", ("dare", 16, "full"), ("coupled", 16, "full")),
    ("dare - coupled at dim 64", "synth-independent", ("dare", 64, "full"), ("coupled", 64, "full")),
    ("served pair: dare-16 - coupled-64", "synth-independent", ("dare", 16, "full"), ("coupled", 64, "full")),
    (
        "served pair before: dare-16 - coupled-64",
        "synth-independent",
        ("dare", 16, "base"),
        ("coupled", 64, "base"),
    ),
    ("long histories: items 1-2 on dare-16 (full - base)", LONG, ("dare", 16, "full"), ("dare", 16, "base")),
    ("long histories: dare - coupled at dim 16", LONG, ("dare", 16, "full"), ("coupled", 16, "full")),
    ("long histories: served pair dare-16 - coupled-64", LONG, ("dare", 16, "full"), ("coupled", 64, "full")),
    ("real data, dare-16 (full - base)", "ml-latest-small", ("dare", 16, "full"), ("dare", 16, "base")),
    (
        "real data, coupled-64 (full - base)",
        "ml-latest-small",
        ("coupled", 64, "full"),
        ("coupled", 64, "base"),
    ),
    ("real data, served pair (full)", "ml-latest-small", ("dare", 16, "full"), ("coupled", 64, "full")),
)


def _paired(results: list[dict[str, Any]], dataset: str, a: tuple, b: tuple, key: str) -> list[float]:
    by_seed = {r["seed"]: r[key] for r in _group(results, dataset, *b) if r.get(key) is not None}
    return [
        r[key] - by_seed[r["seed"]]
        for r in _group(results, dataset, *a)
        if r["seed"] in by_seed and r.get(key) is not None
    ]


def _diff(vals: list[float], spec: str) -> str:
    if not vals:
        return ""
    if len(vals) == 1:
        return f"{format(vals[0], '+' + spec)} (1 seed)"
    return f"{format(mean(vals), '+' + spec)} ± {format(stdev(vals), spec)} ({len(vals)} seeds)"


def comparisons(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Key comparisons (A - B, paired by seed: mean ± sample standard deviation of the differences)",
        "",
        "| comparison | AUC | GAUC | lift | MI-NDCG |",
        "|---|---|---|---|---|",
    ]
    for label, dataset, a, b in COMPARISONS:
        row = [
            _diff(_paired(results, dataset, a, b, k), s)
            for k, s in (("auc", ".4f"), ("gauc", ".4f"), ("lift", ".2f"), ("mi_ndcg", ".3f"))
        ]
        if any(row):
            lines.append(f"| {label} | " + " | ".join(row) + " |")
    return lines + [""]


def probability_table(results: list[dict[str, Any]], dataset: str) -> list[str]:
    """Whether the scores are probabilities: NE and calibration ratio before and after the
    validation-fitted scaling, against the popularity baseline (rows from runs that recorded them)."""
    rows = [r for r in results if r["dataset"] == dataset and r.get("ne") is not None]
    if not rows:
        return []
    lines = [
        "Probabilities (test split): logloss, normalized entropy (NE: logloss over the base rate's "
        "entropy, < 1 beats predicting the average) and calibration ratio (mean predicted over observed "
        "rate), as exported (calibrated on the validation split) and before that step.",
        "",
        "| arm | dim | seeds | logloss | NE | calibration | logloss before | NE before | "
        "calibration before | popularity logloss | popularity NE | stopped by |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, dim, recipe in sorted({(r["arm"], r["dim"], r["recipe"]) for r in rows}):
        g = [r for r in _group(results, dataset, arm, dim, recipe) if r.get("ne") is not None]
        stops = sorted({r["stopped_by"] for r in g})
        lines.append(
            f"| {arm} | {dim} | {len(g)} | {_stat(g, 'logloss')} | {_stat(g, 'ne')} | "
            f"{_stat(g, 'calibration', '.3f')} | {_stat(g, 'logloss_raw')} | {_stat(g, 'ne_raw')} | "
            f"{_stat(g, 'calibration_raw', '.3f')} | {_stat(g, 'pop_logloss')} | {_stat(g, 'pop_ne')} | "
            f"{', '.join(stops)} |"
        )
    return [*lines, ""]


def plot_reliability(results: list[dict[str, Any]], datasets: list[str], out: Path) -> None:
    """Per-decile reliability (mean predicted against observed click rate) of the served pair and the
    popularity baseline, one panel per dataset, every seed drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 4.6), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        rows = [r for r in results if r["dataset"] == dataset and r.get("deciles")]
        top = 0.0
        for arm, color in (("dare", "tab:blue"), ("coupled", "tab:orange")):
            for i, r in enumerate(x for x in rows if x["arm"] == arm):
                pred = [b["predicted"] for b in r["deciles"]]
                obs = [b["observed"] for b in r["deciles"]]
                ax.plot(
                    pred, obs, "o-", color=color, alpha=0.7, label=f"{arm}-{r['dim']}" if i == 0 else None
                )
                top = max(top, *pred, *obs)
        for i, r in enumerate(x for x in rows if x["arm"] == "dare"):
            pred = [b["predicted"] for b in r["pop_deciles"]]
            obs = [b["observed"] for b in r["pop_deciles"]]
            ax.plot(pred, obs, "s--", color="gray", alpha=0.6, label="popularity" if i == 0 else None)
            top = max(top, *pred, *obs)
        ax.plot([0, top], [0, top], ":", color="black", linewidth=1)
        ax.set_title(dataset)
        ax.set_xlabel("mean predicted click probability (decile)")
        ax.set_ylabel("observed click rate")
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


CALIBRATION_TITLE = "# Probabilities: the served pair's scores against the click rates they predict"
CALIBRATION_INTRO = (
    "Whether `scores[i]` deserves the name click probability. The served pair (dare-16, coupled-64) is "
    "trained with the `dare-serve train` defaults: early stopping on validation AUC and logloss, the "
    "best-AUC epoch kept, and a Platt scaling fitted on the validation split folded into the exported "
    "head. The reliability plot (`docs/results/calibration.png`) draws, per decile of prediction, the "
    "mean predicted probability against the observed click rate for every seed."
)


def render(
    results: list[dict[str, Any]],
    costs: dict[int, float],
    oracles: dict[str, float],
    title: str = "# Model quality: dare against coupled, and what the self-supervised stage adds",
    intro: str | None = None,
) -> str:
    seeds = sorted({r["seed"] for r in results})
    lines = [
        title,
        "",
        "Generated by `python -m benchmarks.model_quality` on "
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; seeds {seeds}. "
        "Values are mean ± sample standard deviation over the seeds (a single value: one seed).",
        "",
        *([intro, ""] if intro else []),
        "Recipes: **base** = random init, L2 on every table, no auxiliary loss (the trainer before the "
        "self-supervised stage); **ssl** = embedding tables initialised from item vectors learned from "
        "the event stream, embeddings excluded from L2; **full** = ssl plus the auxiliary co-occurrence "
        "loss on the attention table (the `dare-serve train` default). `dim` is the attention dim "
        "(for coupled, its one shared table). Lift is the planted-truth share of the stage-1 top-64 "
        "that is related, over the base rate, on test impressions whose history exceeds 64. MI-NDCG is "
        "the DARE paper's retrieval measure (docs/retrieval.md).",
        "",
        "Other sections write their own pages: whether the scores are probabilities "
        "([calibration.md](calibration.md), `--section calibration`), recency in stage 1 and the "
        "short-term branch ([recency.md](recency.md), `--section recency`), and how peaked stage 2's "
        "attention is and where it goes ([attention.md](attention.md), `--section attention`).",
        "",
    ]
    lines += comparisons(results)
    header = (
        "| arm | dim | recipe | seeds | test AUC | GAUC | lift | top-64 related | MI-NDCG | epochs |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    present = {r["dataset"] for r in results}
    for dataset, title in TITLES.items():
        rows = [r for r in results if r["dataset"] == dataset]
        if dataset not in present:
            continue
        lines += [f"## {title}", "", header]
        keys = sorted(
            {(r["arm"], r["dim"], r["recipe"]) for r in rows},
            key=lambda k: (k[1], k[0], list(RECIPES).index(k[2])),
        )
        for arm, dim, recipe in keys:
            g = _group(results, dataset, arm, dim, recipe)
            lines.append(
                f"| {arm} | {dim} | {recipe} | {len(g)} | {_stat(g, 'auc')} | {_stat(g, 'gauc')} | "
                f"{_stat(g, 'lift', '.2f')} | {_stat(g, 'precision', '.3f')} | "
                f"{_stat(g, 'mi_ndcg', '.3f')} | "
                f"{_stat(g, 'best_epoch', '.1f')} |"
            )
        base = [r["base_rate"] for r in rows if r.get("base_rate") is not None]
        rec = [r["mi_ndcg_recency"] for r in rows if r.get("mi_ndcg_recency") is not None]
        rnd = [r["mi_ndcg_random"] for r in rows if r.get("mi_ndcg_random") is not None]
        notes = []
        if dataset in oracles:
            notes.append(f"lift of a perfect stage 1 (related first) {oracles[dataset]:.2f}")
        if base:
            notes.append(f"base rate of related behaviors {mean(base):.3f}")
        if rec and rnd:
            notes.append(
                f"MI-NDCG of a newest-first ranking {mean(rec):.3f}, of a random one {mean(rnd):.3f}"
            )
        if notes:
            lines += ["", "Reference points: " + "; ".join(notes) + "."]
        lines.append("")
        lines += probability_table(results, dataset)
    if costs:
        lines += [
            "## Attention dim against stage-1 cost (the paper's Figure 11)",
            "",
            "Stage-1 cost: median ms of one request, 200 candidates x 10,000 behaviors, top-64, one "
            "thread, the dims alternating in rounds. AUC and lift: full recipe on the synthetic data "
            "above (dims 8 and 32 with fewer seeds where the seed count differs).",
            "",
            "| dim | stage-1 ms | dare AUC | coupled AUC | dare lift | coupled lift |",
            "|---|---|---|---|---|---|",
        ]
        for dim in sorted(costs):
            d = _group(results, "synth-independent", "dare", dim, "full")
            c = _group(results, "synth-independent", "coupled", dim, "full")
            lines.append(
                f"| {dim} | {costs[dim]:.2f} | {_stat(d, 'auc')} | {_stat(c, 'auc')} | "
                f"{_stat(d, 'lift', '.2f')} | {_stat(c, 'lift', '.2f')} |"
            )
        lines.append("")
    return "\n".join(lines)


RECENCY_TITLE = "# Recency in stage 1: the newest behaviors always kept, against the search alone"
RECENCY_METRICS = (("auc", ".4f"), ("ne", ".4f"), ("mi_ndcg", ".3f"))


def _setting_rows(
    results: list[dict[str, Any]],
    dataset: str,
    recipes: tuple[str, ...],
    metrics: tuple[tuple[str, str], ...],
    extra: tuple[tuple[str, str], ...],
) -> list[str]:
    """One row per recipe of dare-16 on a dataset: each metric with its change from `full` paired by
    seed, then the `extra` columns (key, format) as they are."""
    lines = []
    for recipe in recipes:
        g = _group(results, dataset, "dare", 16, recipe)
        if not g:
            continue
        cells = [recipe, str(len(g))]
        for key, spec in metrics:
            paired = _paired(results, dataset, ("dare", 16, recipe), ("dare", 16, "full"), key)
            delta = "" if recipe == "full" else _diff(paired, spec).replace(f" ({len(g)} seeds)", "")
            cells += [_stat(g, key, spec), delta]
        cells += [_stat(g, key, spec) for key, spec in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_recency(results: list[dict[str, Any]]) -> str:
    """Per dataset and setting: AUC, NE and MI-NDCG (long test impressions) against the newest-first
    ranking, with each metric's change from the search alone paired by seed."""
    seeds = sorted({r["seed"] for r in results})
    lines = [
        RECENCY_TITLE,
        "",
        "Generated by `python -m benchmarks.model_quality --section recency --seeds 3 "
        "--results docs/results/recency.jsonl --out docs/recency.md` on "
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; seeds {seeds}. "
        "Values are mean ± sample standard deviation over the seeds (a single value: one seed); "
        "changes are paired by seed against `full`.",
        "",
        "dare, attention dim 16, top-64, `dare-serve train` defaults (`full`) but for: `recent-R`: "
        "stage 1 always keeps the newest R behaviors and searches the other 64 - R (`--recent-k R`); "
        "`prior-1`: the direct time-bucket bias with `recency_prior` 1.0, no kept behaviors; `short-16`: "
        "16 kept and a short-term branch attending them with a softmax of their own beside the long-term "
        "attention over all 64 (`--recent-k 16 --short-term 16`); `recent-32-short-16`: 32 kept, the "
        "branch over the newest 16 of them. MI-NDCG is "
        "the DARE paper's retrieval measure on test impressions whose history exceeds 64 "
        "(docs/retrieval.md); newest-first is the same measure of the ranking that takes the newest 64.",
        "",
    ]
    for dataset, title in TITLES.items():
        rows = [r for r in results if r["dataset"] == dataset and r["recipe"] in RECENCY_RECIPES]
        if not rows:
            continue
        lines += [
            f"## {title}",
            "",
            "| setting | seeds | test AUC | ΔAUC | NE | ΔNE | MI-NDCG | ΔMI-NDCG | newest-first MI-NDCG "
            "| epochs |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        extra = (("mi_ndcg_recency", ".3f"), ("best_epoch", ".1f"))
        lines += _setting_rows(results, dataset, RECENCY_RECIPES, RECENCY_METRICS, extra)
        lines.append("")
    return "\n".join(lines)


ATTENTION_TITLE = "# Stage 2's attention: how many behaviors it attends, and which"


def render_attention(results: list[dict[str, Any]], oracles: dict[str, float]) -> str:
    """Per dataset and gain: AUC, NE, effective behaviors attended against retrieved, and with the
    planted truth the attention mass on related behaviors against their share of the retrieved set."""
    seeds = sorted({r["seed"] for r in results})
    lines = [
        ATTENTION_TITLE,
        "",
        "Generated by `python -m benchmarks.model_quality --section attention --seeds 3 "
        "--results docs/results/attention.jsonl --out docs/attention.md` on "
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; seeds {seeds}. "
        "Values are mean ± sample standard deviation over the seeds (a single value: one seed); "
        "changes are paired by seed against `full`.",
        "",
        "dare, attention dim 16, top-64, `dare-serve train` defaults (`full`: stage 2's logits are the "
        "stage-1 inner products over sqrt(16)) but for `gain-G`: a learned gain on stage 2's logits "
        "starting at G (`stage2_gain`, `stage2_gain_init` G); stage 1's ranking does not depend on it. "
        "Attended: the effective number of behaviors, exp(entropy of the weights), per test impression; "
        "retrieved: the number of slots holding a behavior. Related mass: the attention weight on "
        "planted-related behaviors; related share: their share of the retrieved slots (mass = share: "
        "the attention tells them apart no better than mean pooling).",
        "",
    ]
    metrics = (("auc", ".4f"), ("ne", ".4f"), ("attended", ".1f"))
    extra = (
        ("retrieved", ".1f"),
        ("related_attention", ".3f"),
        ("related_retrieved", ".3f"),
        ("lift", ".2f"),
        ("best_epoch", ".1f"),
    )
    for dataset, title in TITLES.items():
        rows = [r for r in results if r["dataset"] == dataset and r["recipe"] in ATTENTION_RECIPES]
        if not rows:
            continue
        lines += [
            f"## {title}",
            "",
            "| setting | seeds | test AUC | ΔAUC | NE | ΔNE | attended | Δattended | retrieved "
            "| related mass | related share | lift | epochs |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += _setting_rows(results, dataset, ATTENTION_RECIPES, metrics, extra)
        if dataset in oracles:
            lines += ["", f"Lift of a perfect stage 1 (related first): {oracles[dataset]:.2f}."]
        lines.append("")
    return "\n".join(lines)


LIFT_TITLE = "# Stage-1 lift at attention dim 16 against a perfect stage 1"


def render_lift(
    results: list[dict[str, Any]], oracles: dict[str, float], vectors: list[tuple[int, int, bool, float]]
) -> str:
    """The lift probes on the independent world, and the item vectors' own lift by dim."""
    seeds = sorted({r["seed"] for r in results})
    dataset = "synth-independent"
    ceiling = oracles.get(dataset)
    lines = [
        LIFT_TITLE,
        "",
        "Generated by `python -m benchmarks.model_quality --section lift --seeds 1 "
        "--results docs/results/lift.jsonl --out docs/lift.md` on "
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; seeds {seeds}. "
        "Changes are paired by seed against `full`.",
        "",
        f"Synthetic world with relatedness independent of category (400 hidden themes), dare-16, top-64. "
        f"Lift: related share of the top-64 over the base rate, test impressions whose history exceeds 64; "
        f"a perfect stage 1 reaches {ceiling:.2f}, 80% of it is {0.8 * ceiling:.2f}."
        if ceiling
        else "",
        "",
        "Settings (`train` defaults but for): `aux-W` the auxiliary co-occurrence loss's weight W (0.1 by "
        "default); `window-N` item vectors learned with an N-event window (20); `init-norm-3` attention "
        "tables initialised at norm 3 (1); `gain-16` stage 2's learned gain starting at 16 (none).",
        "",
        "| setting | seeds | test AUC | ΔAUC | lift | Δlift | share of the perfect lift | epochs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for recipe in LIFT_RECIPES:
        g = _group(results, dataset, "dare", 16, recipe)
        if not g:
            continue
        cells = [recipe, str(len(g))]
        for key, spec in (("auc", ".4f"), ("lift", ".2f")):
            paired = _paired(results, dataset, ("dare", 16, recipe), ("dare", 16, "full"), key)
            delta = "" if recipe == "full" else _diff(paired, spec).replace(f" ({len(g)} seeds)", "")
            cells += [_stat(g, key, spec), delta]
        lifts = [r["lift"] for r in g if r.get("lift") is not None]
        cells += [f"{mean(lifts) / ceiling:.0%}" if ceiling and lifts else "", _stat(g, "best_epoch", ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    if vectors:
        lines += [
            "",
            "The item vectors alone (PPMI factors of event co-occurrence, unit rows, as `train` "
            "initialises the attention tables; no training, no time term), searched at each dim:",
            "",
            "| window | dim | with the category part | without | share of the perfect lift (with) |",
            "|---|---|---|---|---|",
        ]
        for window, dim in sorted({(w, d) for w, d, _, _ in vectors}):
            got = {c: lift for w, d, c, lift in vectors if (w, d) == (window, dim)}
            share = f"{got[True] / ceiling:.0%}" if ceiling else ""
            lines.append(f"| {window} | {dim} | {got[True]:.2f} | {got[False]:.2f} | {share} |")
    return "\n".join([*lines, ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--section", action="append", choices=SECTIONS, default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--recipe", action="append", choices=list(RECIPES), default=None, help="only these recipes (repeated)"
    )
    ap.add_argument("--dataset", action="append", default=None, help="only these datasets (repeated)")
    ap.add_argument("--work", type=Path, default=Path(".dare/model-quality"))
    ap.add_argument("--results", type=Path, default=None, help="JSON lines (default: WORK/results.jsonl)")
    ap.add_argument("--shared", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("docs/model-quality.md"))
    ap.add_argument("--render-only", action="store_true", help="write the markdown from saved results")
    ap.add_argument(
        "--plot", type=Path, default=None, help="a PNG of per-decile reliability (one synthetic, one real)"
    )
    args = ap.parse_args()
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    results_path = args.results or args.work / "results.jsonl"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results = load_results(results_path)
    sections = args.section or list(SECTIONS)
    if not args.render_only:
        done = {(r["dataset"], r["arm"], r["dim"], r["recipe"], r["seed"]) for r in results}
        # seed-major, so that an interrupted run still has every configuration at its first seeds
        todo = [
            (*run, seed)
            for seed in range(args.seeds)
            for section in sections
            for run in runs_for(section)
            if (*run, seed) not in done
            and (args.recipe is None or run[3] in args.recipe)
            and (args.dataset is None or run[0] in args.dataset)
        ]
        todo = list(dict.fromkeys(todo))
        for i, (dataset, arm, dim, recipe, seed) in enumerate(todo, 1):
            data = dataset_folder(dataset, args.work, args.shared)
            row = {"dataset": dataset, "arm": arm, "dim": dim, "recipe": recipe, "seed": seed}
            row |= train_one(data, args.work, arm, dim, recipe, seed)
            results.append(row)
            with results_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"[{i}/{len(todo)}] {json.dumps(row)}", flush=True)
    costs = stage1_costs_ms((8, 16, 32, 64)) if "sweep" in sections else {}
    oracles = {}
    for name in sorted({r["dataset"] for r in results}):
        lift = oracle_lift(dataset_folder(name, args.work, args.shared))
        if lift is not None:
            oracles[name] = lift
    if set(sections) <= {"recency", "recency-synth"}:
        args.out.write_text(render_recency(results))
    elif sections == ["attention"]:
        args.out.write_text(render_attention(results, oracles))
    elif sections == ["lift"]:
        data = dataset_folder("synth-independent", args.work, args.shared)
        args.out.write_text(render_lift(results, oracles, vector_lifts(data)))
    elif sections == ["calibration"]:
        args.out.write_text(render(results, costs, oracles, CALIBRATION_TITLE, CALIBRATION_INTRO))
    else:
        args.out.write_text(render(results, costs, oracles))
    if args.plot is not None:
        have = [
            d for d in ("synth-independent-3k", "ml-latest-small") if any(r["dataset"] == d for r in results)
        ]
        plot_reliability(results, have, args.plot)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
