"""GPU check: ONNX Runtime's CUDA execution provider and FAISS's GPU search against the CPU paths.

    python -m benchmarks.gpu_check [--quick] [--json OUT]

Needs the `gpu` extra (onnxruntime-gpu, faiss-gpu) and a CUDA GPU; exits 2 without them. Side by
side in one run, with fixed seeds and the serving-size ranker of benchmarks/service_latency.py:

1. stage 1: plain `faiss.knn` on the CPU, the CPU engine, and the GPU engine (`knn_gpu`, FAISS
   brute-force search over raw arrays): same top-K, time per request and per batch of requests;
2. stage 2: the same bundle on the CUDA and CPU execution providers: same probabilities, time;
3. the whole service (`dare-serve serve` with DARE_DEVICE=cuda, in-memory feature store): one
   request at a time split by stage, batching on and off, then 32 concurrent clients.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import faiss
import numpy as np

from benchmarks._common import dare_server, samples_ms
from benchmarks.service_latency import (
    CANDIDATES,
    FM_DIM,
    FM_VERSION,
    LENGTHS,
    SEED,
    build_bundle,
    candidates,
    run_concurrent,
    run_sequential,
    store_data,
    user_history,
)
from service.core.runtime import single_threaded_numerics
from service.core.search import Stage1Engine, gpu_available, knn_plain

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
T = TypeVar("T")


def in_compute_thread(fn: Callable[[], T]) -> T:
    """Run fn as the CPU service runs its compute: in a worker with BLAS and OpenMP at one thread."""
    with ThreadPoolExecutor(1, initializer=single_threaded_numerics) as pool:
        return pool.submit(fn).result()


def p(a: np.ndarray, q: float) -> float:
    return round(float(np.percentile(a, q)), 3)


def same_topk(a_pos: np.ndarray, a_val: np.ndarray, b_pos: np.ndarray, b_val: np.ndarray) -> dict:
    """Agreement of two top-K results: scores, and positions as sets per row (ties may order freely)."""
    same_sets = sum(set(x.tolist()) == set(y.tolist()) for x, y in zip(a_pos, b_pos, strict=True))
    return {
        "max_score_diff": float(np.abs(a_val - b_val).max()),
        "rows_same_set": f"{same_sets}/{len(a_pos)}",
    }


def stage1(reps: int) -> list[dict]:
    rng = np.random.default_rng(SEED)
    cpu = Stage1Engine(threads=os.cpu_count() or 1)
    gpu = Stage1Engine(device="cuda")
    rows = []
    for length in LENGTHS:
        keys = rng.standard_normal((length, 17)).astype(np.float32)
        queries = rng.standard_normal((CANDIDATES, 17)).astype(np.float32)
        queries[:, -1] = 1.0
        ref = knn_plain(queries, keys, 64)
        on_gpu = gpu.search([(queries, keys)], 64)[0]
        t_plain = samples_ms(lambda q=queries, k=keys: knn_plain(q, k, 64), reps, 5)
        t_cpu = in_compute_thread(
            lambda q=queries, k=keys: samples_ms(lambda: cpu.search([(q, k)], 64), reps, 5)
        )
        t_gpu = samples_ms(lambda q=queries, k=keys: gpu.search([(q, k)], 64), reps, 5)
        pairs = [(queries, keys)] * 32
        b_cpu = in_compute_thread(
            lambda pr=pairs: samples_ms(lambda: cpu.search(pr, 64), max(3, reps // 10), 1)
        )
        b_gpu = samples_ms(lambda pr=pairs: gpu.search(pr, 64), max(3, reps // 10), 1)
        rows.append(
            {
                "length": length,
                "candidates": CANDIDATES,
                "faiss_knn_cpu_ms_p50": p(t_plain, 50),
                "engine_cpu_ms_p50": p(t_cpu, 50),
                "engine_gpu_ms_p50": p(t_gpu, 50),
                "gpu_speedup_vs_faiss_knn_cpu": round(p(t_plain, 50) / p(t_gpu, 50), 2),
                "batch32_cpu_ms_p50": p(b_cpu, 50),
                "batch32_gpu_ms_p50": p(b_gpu, 50),
                "gpu_vs_cpu_topk": same_topk(ref.positions, ref.scores, on_gpu.positions, on_gpu.scores),
            }
        )
    gpu.close()
    cpu.close()
    return rows


def load_model(bundle: Path, providers: list[str]):  # -> ScoringModel
    from exporters.bundle import load_bundle
    from service.core.pipeline import ScoringModel
    from service.core.runtime import session_options

    return ScoringModel.from_bundle(load_bundle(bundle, providers, session_options(1)))


def stage2(bundle: Path, reps: int) -> list[dict]:
    from service.core.pipeline import prepare_job, score_jobs

    on_cpu, on_gpu = load_model(bundle, [CPU]), load_model(bundle, [CUDA, CPU])
    assert on_gpu.providers[0] == CUDA, f"CUDA EP not in use: {on_gpu.providers}"
    gpu_engine = Stage1Engine(device="cuda")
    cands = np.asarray(candidates(), np.int64)
    fm = np.random.default_rng(SEED).standard_normal(FM_DIM).astype(np.float32)
    rows = []
    for length in LENGTHS:
        items, times = user_history(length)
        job = prepare_job(on_cpu, cands, items, times, int(times[-1]) + 60, fm)
        a = score_jobs(on_cpu, [job])[0]
        b = score_jobs(on_gpu, [job], gpu_engine)[0]
        one_cpu = in_compute_thread(lambda j=job: samples_ms(lambda: score_jobs(on_cpu, [j]), reps, 5))
        one_gpu = samples_ms(lambda j=job: score_jobs(on_gpu, [j], gpu_engine), reps, 5)
        batch = [job] * 32
        many_cpu = in_compute_thread(
            lambda bt=batch: samples_ms(lambda: score_jobs(on_cpu, bt), max(3, reps // 10), 1)
        )
        many_gpu = samples_ms(lambda bt=batch: score_jobs(on_gpu, bt, gpu_engine), max(3, reps // 10), 1)
        rank_gpu = [score_jobs(on_gpu, [job], gpu_engine)[0].rank_s * 1e3 for _ in range(reps)]
        rows.append(
            {
                "length": length,
                "max_prob_diff_cuda_vs_cpu": float(np.abs(a.probabilities - b.probabilities).max()),
                "same_positions": bool(np.array_equal(np.sort(a.positions, 1), np.sort(b.positions, 1))),
                "core_cpu_ms_p50": p(one_cpu, 50),
                "core_gpu_ms_p50": p(one_gpu, 50),
                "rank_gpu_ms_p50": p(np.asarray(rank_gpu), 50),
                "batch32_core_cpu_ms_p50": p(many_cpu, 50),
                "batch32_core_gpu_ms_p50": p(many_gpu, 50),
            }
        )
    gpu_engine.close()
    return rows


def write_store_files(work: Path) -> tuple[Path, Path]:
    """events.parquet and an FM embeddings file for the in-memory feature store of `serve`."""
    from exporters.fm_embed import UserEmbeddings, write_embeddings_file

    events, fm = store_data()
    data = work / "data"
    data.mkdir()
    events.to_parquet(data / "events.parquet")
    fm_file = work / "fm.parquet"
    vectors = np.stack(list(fm.values()))
    write_embeddings_file(UserEmbeddings(list(fm), vectors, FM_VERSION, time.time()), fm_file)
    return data, fm_file


def service(root: Path, work: Path, n: int) -> dict:
    import httpx

    data, fm_file = write_store_files(work)
    out: dict = {"sequential": [], "concurrent": []}
    env = {"DARE_DEVICE": "cuda"}
    store = ["--data", str(data), "--fm-embeddings", str(fm_file)]  # the in-memory feature store
    for batching in (True, False):
        with dare_server(
            root, None, env | {"DARE_BATCH_ENABLED": str(batching).lower()}, extra_args=store
        ) as srv:
            base = srv.base
            device = httpx.get(f"{base}/v1/models").json()["device"]
            out["device"] = device
            assert device["execution_providers"][0] == CUDA and device["faiss_device"] == "cuda", device
            for length in LENGTHS:
                t = run_sequential(base, length, n, warmup=20)
                row = {"batching": batching, "length": length}
                row |= {f"{k}_p50": p(v, 50) for k, v in t.items() if len(v)}
                row |= {f"{k}_p99": p(v, 99) for k, v in t.items() if len(v)}
                out["sequential"].append(row)
            times, rps = run_concurrent(base, 10_000, 32 * max(10, n // 10), 32)
            out["concurrent"].append(
                {
                    "batching": batching,
                    "clients": 32,
                    "length": 10_000,
                    "rps": round(rps, 1),
                    "p50_ms": p(times, 50),
                    "p99_ms": p(times, 99),
                }  # fmt: skip
            )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--skip-service", action="store_true")
    args = ap.parse_args()
    import onnxruntime as ort

    env = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "faiss": faiss.__version__,
        "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
    }
    print(json.dumps(env))
    if CUDA not in env["providers"] or not gpu_available():
        print("no CUDA execution provider or no FAISS GPU: install the gpu extra on a GPU machine")
        return 2
    reps = 30 if args.quick else 200
    results: dict = {"env": env}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = build_bundle(work / "bundles")
        results["stage1"] = stage1(reps)
        print(json.dumps({"stage1": results["stage1"]}, indent=1))
        results["stage2"] = stage2(bundle, reps)
        print(json.dumps({"stage2": results["stage2"]}, indent=1))
        if not args.skip_service:
            results["service"] = service(work / "bundles", work, 60 if args.quick else 300)
            print(json.dumps({"service": results["service"]}, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
