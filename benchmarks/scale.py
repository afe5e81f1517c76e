"""Scale: the pipeline on Taobao-shaped files from 1 M rows up to what this machine holds.

    .venv/bin/python -m benchmarks.scale [--rows 1000000 --rows 10000000] [--section convert ...]
        [--results docs/results/scale.jsonl] [--out docs/scale.md] [--work DIR]

Sections (each measured in a fresh process where peak memory matters):
- convert: `data convert --format taobao` on a `data taobao-synth` file: rows/s and peak RSS.
- train: training impressions/s on the CPU with 1 and 2 processes (and on a GPU when present).
- ingest: `dare-serve ingest` of the converted events into a fresh redis-server: events/s and Redis
  memory per event.
- protocol: the DARE paper's protocol (`data convert --protocol dare`: users with >= 210 page views,
  the newest 200 behaviors as history, item-frequency negatives) and its training settings (K = 20,
  batch 2,048, 2 epochs), `dare` (d_a = 16) against `coupled` (d = 64), over `--seeds` seeds: test AUC,
  GAUC, logloss, NE, impressions/s and run time.
- bundle: a ranker bundle with a catalogue of the given size (random weights): export time, bundle
  size, load time (checksums included), service start-up time and RSS with two variants, one
  request's p50 through HTTP.

Every measurement is appended to a JSON-lines file and reused on the next run (a long run can be
resumed; `--fresh` measures again); the markdown is rendered from whatever results exist. Not a test.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._common import ROOT, machine_line, md_table

Row = dict[str, Any]


def peak_rss_mib() -> float:
    """Peak RSS of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def children_peak_rss_mib() -> float:
    """Largest peak RSS of any waited-for child process, in MiB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


# -- sections ------------------------------------------------------------------------------------
# Each takes (args, work folder, rows) and returns result rows; each row names its section and rows.


# Taobao user behavior's catalogue; a bundle holds one more row, the reserved unknown item.
TAOBAO_ITEMS = 4_162_024
BUNDLE_SEED = 20240607


def _in_child(fn: Callable[..., Row], *args: Any) -> Row:
    """Run fn(*args) in a fresh spawned process; its result with that process's peak RSS (MiB)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        row: Row = pool.apply(_measured, (fn, *args))
    return row


def _measured(fn: Callable[..., Row], *args: Any) -> Row:
    return fn(*args) | {"peak_rss_mib": round(peak_rss_mib())}


def _random_ranker(kind: str, n_items: int, representation_dim: int) -> Any:
    """A `TwoStageRanker` of `n_items` rows with random weights spread so scores vary."""
    import numpy as np
    import torch

    from exporters.models import RankerConfig, TwoStageRanker

    torch.manual_seed(BUNDLE_SEED)
    rng = np.random.default_rng(BUNDLE_SEED)
    n_categories = 9_440  # Taobao's categories
    cats = np.r_[0, rng.integers(1, n_categories, n_items - 1)].astype(np.int64)
    cfg = RankerConfig(kind, n_items, n_categories, 16, representation_dim, 64, 0, (128, 64))
    model = TwoStageRanker(cfg, cats)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def _export_bundle(kind: str, n_items: int, representation_dim: int, root: Path) -> Row:
    """Child process: build a random ranker and export it; seconds, the bundle's path and file sizes."""
    import numpy as np

    from exporters.export import export_ranker

    t0 = time.perf_counter()
    model = _random_ranker(kind, n_items, representation_dim)
    built = time.perf_counter()
    item_ids = np.arange(-1, n_items - 1, dtype=np.int64)  # row r holds raw id r - 1; row 0 is -1
    path = export_ranker(
        model, root, kind, item_ids, 1_000, {"auc": 0.5, "gauc": 0.5, "logloss": 0.69}, None, {}
    )
    sizes = {f.name: f.stat().st_size for f in sorted(path.iterdir())}
    return {"path": str(path), "build_s": built - t0, "export_s": time.perf_counter() - built, "bytes": sizes}


def _load_bundle(path: str) -> Row:
    """Child process: `load_bundle` (checksums, arrays, ONNX session, attention table) in seconds."""
    from exporters.bundle import load_bundle

    t0 = time.perf_counter()
    bundle = load_bundle(path)
    took = time.perf_counter() - t0
    return {"load_s": took, "external_data": bundle.manifest.model_extra["onnx"]["external_data"]}


def _second_variant(path: Path, variant: str) -> Path:
    """The bundle as a second variant: hard links to its files, a manifest naming the variant."""
    import os

    dest = path.parent.parent / variant / "1"
    dest.mkdir(parents=True)
    for f in path.iterdir():
        if f.name != "manifest.json":
            os.link(f, dest / f.name)
    manifest = json.loads((path / "manifest.json").read_text()) | {"variant": variant, "version": "1"}
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def _proc_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bundle_section(args: argparse.Namespace, work: Path, rows: int) -> list[Row]:
    """A `dare` ranker bundle of `--items` items (default Taobao's 4,162,024; `rows` is not used):
    attention d=16, representation d=64, K=64, random weights, no FM.

    Export (seconds, bytes per file, peak RSS) and `load_bundle` (seconds, checksums included) each
    in a fresh process; then `dare-serve serve` on a root with that bundle as two variants (`dare`
    and `dare-b`, hard links to the same files) and the in-memory store holding one user of 300
    behaviors: seconds from start to ready, server RSS, p50/p99 of 100 requests of 50 candidates
    (after 10 warm-up), and the largest difference of the served scores from the offline PyTorch
    model's (`score_offline`). With `--bundle-large`, a `coupled` ranker at d=128 instead, whose
    graph (2.1 GB at Taobao's size) is over protobuf's 2 GB: export and load only (measure it with
    `--fresh` when the results file already holds the `dare` row).
    """
    import shutil

    import httpx
    import numpy as np
    import pandas as pd

    from benchmarks._common import dare_server, pct

    n_items = args.items + 1
    root = work / "bundles"
    shutil.rmtree(root, ignore_errors=True)
    out: list[Row] = []
    specs = [("coupled", 128, False)] if args.bundle_large else [("dare", 64, True)]
    for kind, dim, serve in specs:
        print(f"bundle: exporting {kind} d_r={dim} of {args.items:,} items", flush=True)
        exported = _in_child(_export_bundle, kind, n_items, dim, root)
        path = Path(exported["path"])
        loaded = _in_child(_load_bundle, str(path))
        sizes: dict[str, int] = exported["bytes"]
        row: Row = {
            "items": args.items,
            "model": f"{kind} d_a={16 if kind == 'dare' else dim} d_r={dim}",
            "build_s": round(exported["build_s"], 1),
            "export_s": round(exported["export_s"], 1),
            "export_peak_rss_mib": exported["peak_rss_mib"],
            "bundle_mib": round(sum(sizes.values()) / 2**20),
            "ranker_onnx_mib": round(sizes["ranker.onnx"] / 2**20, 2),
            "ranker_onnx_data_mib": round(sizes.get("ranker.onnx.data", 0) / 2**20),
            "attention_faiss_mib": round(sizes["attention.faiss"] / 2**20),
            "weights_npz_mib": round(sizes["weights.npz"] / 2**20),
            "load_s": round(loaded["load_s"], 1),
            "load_peak_rss_mib": loaded["peak_rss_mib"],
        }
        if not serve:
            out.append(row)
            shutil.rmtree(path.parent)
            continue

        _second_variant(path, "dare-b")
        rng = np.random.default_rng(BUNDLE_SEED)
        history = rng.integers(1, n_items - 1, 300).astype(np.int64)  # raw id = row - 1 here
        times = 1_700_000_000 + np.cumsum(rng.integers(60, 7_200, 300)).astype(np.int64)
        candidates = rng.integers(1, n_items - 1, 50).astype(np.int64)
        now = int(times[-1]) + 600
        data = work / "data"
        data.mkdir(exist_ok=True)
        pd.DataFrame({"user_id": "u1", "item_id": history, "timestamp": times}).to_parquet(
            data / "events.parquet"
        )
        body = {"user_id": "u1", "candidates": candidates.tolist(), "timestamp": now}
        server = dare_server(
            root, None, {"DARE_VARIANT_WEIGHTS": "dare=0.5,dare-b=0.5"}, extra_args=["--data", str(data)]
        )
        server.ready_timeout = 900.0
        t0 = time.perf_counter()
        with server:
            row["startup_s"] = round(time.perf_counter() - t0, 1)
            row["server_rss_mib"] = round(_proc_mib(server.pid, "VmRSS"))
            times_ms: dict[str, list[float]] = {"dare": [], "dare-b": []}
            scores: dict[str, list[float]] = {}
            with httpx.Client(base_url=server.base, timeout=60) as client:
                for variant, samples in times_ms.items():
                    for i in range(110):
                        t1 = time.perf_counter()
                        r = client.post("/v1/score", json=body, headers={"X-Experiment": variant})
                        took = (time.perf_counter() - t1) * 1e3
                        r.raise_for_status()
                        if i >= 10:
                            samples.append(took)
                    scores[variant] = r.json()["scores"]
            row["server_rss_after_mib"] = round(_proc_mib(server.pid, "VmRSS"))
            row["server_peak_rss_mib"] = round(_proc_mib(server.pid, "VmHWM"))
        row["p50_ms"] = round(pct(times_ms["dare"], 50), 2)
        row["p99_ms"] = round(pct(times_ms["dare"], 99), 2)
        row["p50_ms_dare_b"] = round(pct(times_ms["dare-b"], 50), 2)
        parity = _in_child(_parity, str(path), history, times, candidates, now, scores["dare"])
        row["parity_max_abs"] = parity["parity_max_abs"]
        row["variants_agree"] = "yes" if scores["dare"] == scores["dare-b"] else "no"
        out.append(row)
    return out


def _parity(path: str, history: Any, times: Any, candidates: Any, now: int, served: list[float]) -> Row:
    """Child process: the largest |served - offline| over one request's candidates."""
    import numpy as np

    from exporters.offline import load_torch_model, score_offline

    model = load_torch_model(path)
    item_ids = np.load(Path(path) / "item_ids.npy", allow_pickle=False)
    want = score_offline(model, item_ids, history, times, candidates, now)  # type: ignore[arg-type]
    return {"parity_max_abs": float(np.abs(np.asarray(served) - want).max())}


# Taobao's mean rows per user (taobao-synth draws users with this mean)
TAOBAO_ROWS_PER_USER = 101.4


def _run_measured(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(seconds, peak RSS MiB, stdout) of one child process: wait4 gives that child's own peak."""
    import os
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})}
    )
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} exited with {proc.returncode}")
    return seconds, usage.ru_maxrss / 1024, out


def _cli() -> str:
    import sys

    return str(Path(sys.executable).with_name("dare-serve"))


def _taobao_csv(work: Path, rows: int) -> Path:
    """A `data taobao-synth` file of about `rows` rows (full catalogue), made once per work folder."""
    src = work / "taobao"
    csv = src / "UserBehavior.csv"
    if not csv.is_file():
        users = max(1, round(rows / TAOBAO_ROWS_PER_USER))
        _run_measured([_cli(), "data", "taobao-synth", "--out", str(src), "--users", str(users)])
    return csv


def _pageviews_folder(work: Path, rows: int) -> Path:
    """The file converted with the page-view protocol, made once per work folder."""
    data = work / "train-pageviews"
    if not (data / "meta.json").is_file():
        csv = str(_taobao_csv(work, rows))
        _run_measured([_cli(), "data", "convert", "--format", "taobao", "--path", csv, "--out", str(data)])
    return data


def convert_section(args: argparse.Namespace, work: Path, rows: int) -> list[Row]:
    """`data convert --format taobao` on a `data taobao-synth` file of about `rows` rows (full catalogue,
    generated once per work folder), each protocol in a fresh process."""
    import shutil

    exe = _cli()
    csv = _taobao_csv(work, rows)
    lines = json.loads((csv.parent / "meta.json").read_text())["rows"]
    results: list[Row] = []
    for protocol in ("pageviews", "dare"):
        out = work / f"converted-{protocol}"
        shutil.rmtree(out, ignore_errors=True)
        argv = [exe, "data", "convert", "--format", "taobao", "--path", str(csv), "--out", str(out)]
        seconds, peak, stdout = _run_measured([*argv, "--protocol", protocol])
        summary = json.loads(stdout.strip().splitlines()[-1])
        results.append(
            {
                "protocol": protocol,
                "input_rows": lines,
                "input_mb": round(csv.stat().st_size / 1e6, 1),
                "seconds": round(seconds, 2),
                "rows_per_s": round(lines / seconds),
                "peak_rss_mib": round(peak),
                "events": summary["events"],
                "impressions": summary["impressions"],
                "events_mb": round((out / "events.parquet").stat().st_size / 1e6, 1),
                "impressions_mb": round((out / "impressions.parquet").stat().st_size / 1e6, 1),
            }
        )
        shutil.rmtree(out)
    return results


def train_section(args: argparse.Namespace, work: Path, rows: int) -> list[Row]:
    """`dare-serve train` of `dare` on the file's page-view impressions: impressions/s of the training
    steps (validation excluded) with 1 process and with 2 under torchrun (one thread each), and on a
    GPU when torch sees one. One epoch over `--train-samples` impressions; test AUC beside it."""
    import shutil
    import socket
    import sys

    import torch

    data = _pageviews_folder(work, rows)
    common = ["train", "--data", str(data), "--model", "dare", "--epochs", "1", "--no-progress"]
    common += ["--max-train-samples", str(args.train_samples)]
    runs: list[tuple[str, list[str], dict[str, str]]] = [
        ("cpu, 1 process, 1 thread", [_cli()], {"DARE_TRAIN_THREADS": "1"}),
        ("cpu, 1 process, 2 threads", [_cli()], {"DARE_TRAIN_THREADS": "2"}),
    ]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    torchrun += ["--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "service.cli"]
    runs.append(("cpu, 2 processes (torchrun), 1 thread each", torchrun, {"DARE_TRAIN_THREADS": "1"}))
    if torch.cuda.is_available():
        runs.append(("cuda, 1 process", [_cli()], {}))
    results: list[Row] = []
    for name, launcher, env in runs:
        out = work / "train-bundles"
        shutil.rmtree(out, ignore_errors=True)
        device = ["--device", "cuda" if name.startswith("cuda") else "cpu"]
        seconds, peak, stdout = _run_measured([*launcher, *common, *device, "--out", str(out)], env)
        line = json.loads([x for x in stdout.splitlines() if x.startswith("{")][-1])
        results.append(
            {
                "run": name,
                "train_impressions": args.train_samples,
                "item_rows": int(json.loads((Path(line["bundle"]) / "manifest.json").read_text())["n_items"]),
                "impressions_per_s": round(line["impressions_per_s"]),
                "test_auc": round(line["auc"], 4),
                "train_seconds": line["train_seconds"],
                "peak_rss_mib": round(peak),
            }
        )
        shutil.rmtree(out, ignore_errors=True)
    return results


def _protocol_folder(work: Path, rows: int) -> Path:
    """The file converted with the DARE paper's protocol, made once per work folder."""
    data = work / "train-dare-protocol"
    if not (data / "meta.json").is_file():
        csv = str(_taobao_csv(work, rows))
        argv = [_cli(), "data", "convert", "--format", "taobao", "--path", csv, "--out", str(data)]
        _run_measured([*argv, "--protocol", "dare"])
    return data


# The reference training settings of the paper's Taobao runs: K = 20 retrieved, batch 2,048, 2 epochs.
PROTOCOL_TRAIN = ["--top-k", "20", "--batch-size", "2048", "--epochs", "2"]
PROTOCOL_ARMS = (("dare", ["--attention-dim", "16"]), ("coupled", ["--representation-dim", "64"]))


def protocol_section(args: argparse.Namespace, work: Path, rows: int) -> list[Row]:
    """`dare` and `coupled` trained on the DARE protocol's impressions with the paper's settings, one
    process with 2 threads per run, `--seeds` seeds each: quality and time at this size."""
    import shutil

    data = _protocol_folder(work, rows)
    meta = json.loads((data / "meta.json").read_text())
    results: list[Row] = []
    for seed in range(args.seeds):
        for arm, dims in PROTOCOL_ARMS:
            out = work / "protocol-bundles"
            shutil.rmtree(out, ignore_errors=True)
            argv = [_cli(), "train", "--data", str(data), "--model", arm, *dims, *PROTOCOL_TRAIN]
            argv += ["--seed", str(seed), "--no-progress", "--device", "cpu", "--out", str(out)]
            seconds, peak, stdout = _run_measured(argv, {"DARE_TRAIN_THREADS": "2"})
            line = json.loads([x for x in stdout.splitlines() if x.startswith("{")][-1])
            m = line["metrics"]
            results.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "impressions": meta["counts"]["impressions"],
                    "test_auc": round(line["auc"], 4),
                    "test_gauc": round(line["gauc"], 4),
                    "logloss": round(line["logloss"], 4),
                    "ne": round(m["ne"], 4),
                    "popularity_logloss": round(m["popularity"]["logloss"], 4),
                    "impressions_per_s": round(line["impressions_per_s"]),
                    "best_epoch": line["best_epoch"],
                    "train_seconds": line["train_seconds"],
                    "run_seconds": round(seconds, 1),
                    "peak_rss_mib": round(peak),
                }
            )
            shutil.rmtree(out, ignore_errors=True)
    return results


def ingest_section(args: argparse.Namespace, work: Path, rows: int) -> list[Row]:
    """`dare-serve ingest` of the file's events (page-view protocol folder) into a fresh
    redis-server on a loopback port: events/s and Redis memory per event, in a child process."""
    import redis

    from tests.redis_proc import RedisProcess

    data = _pageviews_folder(work, rows)
    events = int(json.loads((data / "meta.json").read_text())["counts"]["events"])
    server = RedisProcess().start()
    try:
        client = redis.Redis.from_url(server.url)
        before = int(client.info("memory")["used_memory"])
        argv = [_cli(), "ingest", "--data", str(data), "--redis-url", server.url, "--no-progress"]
        seconds, peak, _ = _run_measured(argv)
        info = client.info("memory")
        users = int(client.dbsize())
        client.close()
    finally:
        server.stop()
    used = int(info["used_memory"]) - before
    return [
        {
            "events": events,
            "keys": users,
            "seconds": round(seconds, 1),
            "events_per_s": round(events / seconds),
            "redis_used_mib": round(used / 2**20),
            "redis_bytes_per_event": round(used / events, 1),
            "redis_rss_mib": round(int(info["used_memory_rss"]) / 2**20),
            "ingest_peak_rss_mib": round(peak),
        }
    ]


SECTIONS: dict[str, Callable[[argparse.Namespace, Path, int], list[Row]]] = {
    "convert": convert_section,
    "train": train_section,
    "ingest": ingest_section,
    "bundle": bundle_section,
    "protocol": protocol_section,
}


# -- results ------------------------------------------------------------------------------------


def load_results(path: Path) -> list[Row]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_result(path: Path, row: Row) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")


def render(results: list[Row]) -> list[str]:
    """docs/scale.md's measured tables, one per section, from the results file."""
    lines = ["# Scale", "", f"Measured on: {machine_line()}.", ""]
    for section in SECTIONS:
        rows = [r for r in results if r.get("section") == section]
        if not rows:
            continue
        keys = [k for k in rows[0] if k not in ("section", "when")]
        lines += [f"## {section}", ""]
        lines += md_table(keys, [[_fmt(r.get(k)) for k in keys] for r in rows])
        lines.append("")
    return lines


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, action="append", help="input rows (repeatable; default 1 M)")
    ap.add_argument("--section", action="append", choices=sorted(SECTIONS), help="default: all")
    ap.add_argument("--results", type=Path, default=ROOT / "docs/results/scale.jsonl")
    ap.add_argument("--out", type=Path, default=None, help="write the rendered markdown tables here")
    ap.add_argument("--work", type=Path, default=ROOT / ".dare/scale")
    ap.add_argument("--fresh", action="store_true", help="measure again what the results file holds")
    ap.add_argument("--train-samples", type=int, default=300_000, help="train: impressions of the one epoch")
    ap.add_argument("--seeds", type=int, default=3, help="protocol: seeds per arm")
    ap.add_argument(
        "--items", type=int, default=TAOBAO_ITEMS, help="bundle: catalogue size (default Taobao's)"
    )
    ap.add_argument(
        "--bundle-large", action="store_true", help="bundle: a coupled d=128 (>2 GB) graph instead"
    )
    args = ap.parse_args()
    done = {(r["section"], r["rows"]) for r in load_results(args.results)}
    for rows in args.rows or [1_000_000]:
        for section in args.section or list(SECTIONS):
            if (section, rows) in done and not args.fresh:
                print(f"{section} at {rows:,} rows: in {args.results}, skipped", flush=True)
                continue
            work = args.work / f"{rows}"
            work.mkdir(parents=True, exist_ok=True)
            for row in SECTIONS[section](args, work, rows):
                row = {"section": section, "rows": rows, "when": time.strftime("%Y-%m-%d"), **row}
                append_result(args.results, row)
                print(json.dumps(row), flush=True)
    lines = render(load_results(args.results))
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
