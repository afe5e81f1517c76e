"""The offline quality table: popularity, dare, coupled, fm and dare+FM on several datasets.

    .venv/bin/python -m benchmarks.offline_table --out docs/offline-results.md \
        [--dataset synth] [--dataset ml-latest-small=../shared/data/ml-latest-small] [...]

Each dataset is built (synthetic default, or converted from MovieLens) into a temporary folder,
every model is trained with the `dare-serve train` defaults and a fixed seed, and one markdown
table row per model is written: test AUC / GAUC / logloss / normalized entropy / calibration ratio,
training time, bundle size, and the share of stage-1 retrieved behaviors that are truly related
(synthetic data only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from exporters.convert import convert_to_folder
from exporters.synth import SynthConfig, write_synth
from exporters.train import TrainConfig, train


def _row(name: str, dataset: str, r: dict, pop: bool = False) -> dict:
    m = r["metrics"]["popularity"] if pop else r["metrics"]
    ret = (r["metrics"].get("retrieval") or {}).get("planted") or {}
    return {
        "dataset": dataset,
        "model": name,
        "auc": m["auc"],
        "gauc": m["gauc"],
        "logloss": m["logloss"],
        "ne": m.get("ne"),
        "calibration": m.get("calibration"),
        "train_s": None if pop else r["train_seconds"],
        "bundle_mb": None if pop else r["bundle_bytes"] / 1e6,
        "precision": None if pop else ret.get("precision_at_k_long"),
        "base_rate": None if pop else ret.get("base_rate_long"),
        "best_epoch": None if pop else r["best_epoch"],
    }


def run_dataset(name: str, data: Path, work: Path, seed: int, epochs: int) -> list[dict]:
    rows = []
    common = {"data": data, "seed": seed, "epochs": epochs, "progress": False}
    fm = train(TrainConfig(model="fm", out=work / "fm", **common))
    rows.append(_row("fm", name, fm))
    for model in ("dare", "coupled"):
        r = train(TrainConfig(model=model, out=work / "plain", **common))
        if model == "dare":
            rows.insert(0, _row("popularity", name, r, pop=True))
        rows.append(_row(model, name, r))
    for model in ("dare", "coupled"):
        r = train(TrainConfig(model=model, out=work / "with_fm", fm_bundle=Path(fm["bundle"]), **common))
        rows.append(_row(f"{model} + FM", name, r))
        missing = dict(r)
        missing["metrics"] = {**r["metrics"], **r["metrics"]["fm_missing"]}
        rows.append(
            {**_row(f"{model} + FM (FM missing at test)", name, missing), "train_s": None, "bundle_mb": None}
        )
    return rows


def fmt(v: object, spec: str) -> str:
    return "" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--dataset",
        action="append",
        default=None,
        help="'synth' or NAME=PATH of a MovieLens folder (repeatable)",
    )
    ap.add_argument("--out", type=Path, default=Path("docs/offline-results.md"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(2)
    datasets = args.dataset or [
        "synth",
        "ml-latest-small=../shared/data/ml-latest-small",
        "ml-100k=../shared/data/ml-100k",
    ]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="dare-offline-") as tmp:
        for spec in datasets:
            name, _, path = spec.partition("=")
            data = Path(tmp) / name / "data"
            if name == "synth":
                write_synth(data, SynthConfig())
            else:
                convert_to_folder("movielens", Path(path), data)
            t0 = time.time()
            rows += run_dataset(name, data, Path(tmp) / name, args.seed, args.epochs)
            print(f"{name}: {time.time() - t0:.0f}s", flush=True)
            for r in rows:
                if r["dataset"] == name:
                    print(json.dumps(r), flush=True)
    lines = [
        f"Measured on {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"seed {args.seed}, "
        f"`dare-serve train` defaults (max {args.epochs} epochs, early stopping on validation AUC and "
        "logloss, Platt scaling fitted on the validation split). NE: logloss over the entropy of the "
        "test click rate; calibration: mean predicted over observed rate.",
        "",
        "| dataset | model | test AUC | GAUC | logloss | NE | calibration | train s | bundle MB "
        "| top-K related share | base rate |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['model']} | {fmt(r['auc'], '.4f')} | {fmt(r['gauc'], '.4f')} | "
            f"{fmt(r['logloss'], '.4f')} | {fmt(r['ne'], '.4f')} | {fmt(r['calibration'], '.3f')} | "
            f"{fmt(r['train_s'], '.0f')} | {fmt(r['bundle_mb'], '.1f')} | "
            f"{fmt(r['precision'], '.3f')} | {fmt(r['base_rate'], '.3f')} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
