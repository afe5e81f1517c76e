"""Soak run: a long locust load at moderate rate, watching the server's memory, fds and connections.

Starts a private redis-server (loopback, AOF as docs/feature-store.md recommends) and a real
`dare-serve serve` on tiny bundles it trains once into the work folder (or on `--bundles`), loads
the dataset's events and FM embeddings at start-up, then runs `dare-serve loadtest` headless for
`--duration` (default 10 minutes). Every `--interval` seconds it samples the server process with
psutil: resident memory, open file descriptors, TCP connections (clients, Redis) and threads.

It writes OUT/soak.json (settings, every sample, the load test's summary and the verdict) and
prints start / warm / end / max figures. Exit status 1 when a request failed, or resident memory,
fds or connections grew past the limits between the end of the warm-up and the end of the run, or
did not come back to the pre-load baseline once the load stopped. Not a test; e.g.

    .venv/bin/python -m benchmarks.soak                      # 10 minutes, 8 users
    .venv/bin/python -m benchmarks.soak --duration 60s       # a quick try
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from loadtest.run import parse_duration
from service.process import ServeProcess, clean_env, dare_serve_command
from tests.redis_proc import RedisProcess

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
# The load test is configured by its flags alone, not by DARE_* or LOCUST_* variables of this shell.
LOADTEST_ENV = ("DARE_", "LOCUST_")
# Small enough to train in about ten seconds on two cores, big enough for real FAISS and ORT work.
TINY_DATA = {"users": 300, "items": 2000, "categories": 20, "max_seq_len": 500, "seed": 7}
TINY_TRAIN = {
    "epochs": 2, "seed": 0, "max_seq_len": 500, "attention_dim": 8, "representation_dim": 16,
    "top_k": 16, "fm_dim": 8, "fm_hidden": 16,
}  # fmt: skip


@dataclass(frozen=True)
class Sample:
    """One look at the server process (and its children, if any)."""

    t_s: float  # seconds since the load started (negative: before)
    phase: str  # idle-before | load | idle-after
    rss_mib: float
    fds: int
    threads: int
    tcp_clients: int  # established connections to the server's port
    tcp_redis: int  # connections from the server to Redis
    tcp_total: int
    cpu_s: float  # user + system CPU seconds so far


def sample(proc: psutil.Process, port: int, redis_port: int, t_s: float, phase: str) -> Sample:
    procs = [proc, *proc.children(recursive=True)]
    rss = fds = threads = clients = to_redis = total = 0
    cpu = 0.0
    for p in procs:
        try:
            with p.oneshot():
                rss += p.memory_info().rss
                fds += p.num_fds()
                threads += p.num_threads()
                times = p.cpu_times()
                cpu += times.user + times.system
                for c in p.net_connections(kind="tcp"):
                    total += 1
                    if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port:
                        clients += 1
                    elif c.raddr and c.raddr.port == redis_port:
                        to_redis += 1
        except psutil.NoSuchProcess:
            continue
    return Sample(
        round(t_s, 1), phase, round(rss / MIB, 1), fds, threads, clients, to_redis, total, round(cpu, 1)
    )


class Sampler:
    """Samples the server every `interval` seconds in a thread until stopped."""

    def __init__(self, pid: int, port: int, redis_port: int, interval: float, t0: float) -> None:
        self.proc = psutil.Process(pid)
        self.port, self.redis_port, self.interval, self.t0 = port, redis_port, interval, t0
        self.samples: list[Sample] = []
        self.phase = "idle-before"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def take(self) -> Sample:
        s = sample(self.proc, self.port, self.redis_port, time.monotonic() - self.t0, self.phase)
        self.samples.append(s)
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.take()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.interval + 5)


# -- set-up ------------------------------------------------------------------------------------


def tiny_build(workdir: Path) -> tuple[Path, Path, Path]:
    """(bundle root, dataset, FM embeddings file), trained once into `workdir` and reused."""
    import torch

    from exporters.bundle import list_versions, load_bundle
    from exporters.fm_embed import compute_user_embeddings, write_embeddings_file
    from exporters.synth import SynthConfig, write_synth
    from exporters.train import TrainConfig, train

    data, root, fm_root = workdir / "data", workdir / "bundles", workdir / "fm"
    emb_file = workdir / "fm_embeddings.parquet"
    if not (data / "events.parquet").is_file():
        print(f"soak: generating a tiny dataset in {data}", flush=True)
        write_synth(data, SynthConfig(**TINY_DATA))
    torch.set_num_threads(2)

    def trained(out: Path, model: str, **kw: Any) -> Path:
        found = list_versions(out / model)
        if found:
            return found[-1]
        print(f"soak: training a tiny {model} model", flush=True)
        cfg = TrainConfig(data=data, model=model, out=out, progress=False, **TINY_TRAIN, **kw)  # type: ignore[arg-type]
        return Path(train(cfg)["bundle"])

    fm = trained(fm_root, "fm")
    for model in ("dare", "coupled"):
        trained(root, model, fm_bundle=fm)
    if not emb_file.is_file():
        import pandas as pd

        events = pd.read_parquet(data / "events.parquet", columns=["user_id", "item_id", "timestamp"])
        write_embeddings_file(compute_user_embeddings(load_bundle(fm), events, progress=False), emb_file)
    return root, data, emb_file


# -- verdict -----------------------------------------------------------------------------------


def figures(samples: list[Sample], field: str) -> dict[str, float]:
    values = [getattr(s, field) for s in samples]
    return {"first": values[0], "last": values[-1], "max": max(values), "min": min(values)}


def verdict(args: argparse.Namespace, samples: list[Sample], summary: dict[str, Any]) -> dict[str, Any]:
    before = [s for s in samples if s.phase == "idle-before"]
    load = [s for s in samples if s.phase == "load"]
    after = [s for s in samples if s.phase == "idle-after"]
    warm = [s for s in load if s.t_s >= args.warmup_s] or load[-1:]
    t = np.array([s.t_s for s in warm])
    rss = np.array([s.rss_mib for s in warm])
    slope = float(np.polyfit(t / 60, rss, 1)[0]) if len(warm) >= 3 else 0.0
    out = {
        "requests": summary.get("requests", 0),
        "failures": summary.get("failures", 0),
        "rss_mib": {
            "before_load": before[-1].rss_mib,
            "after_warmup": warm[0].rss_mib,
            "end_of_load": load[-1].rss_mib,
            "max": max(s.rss_mib for s in samples),
            "after_load": after[-1].rss_mib,
            "growth_after_warmup": round(load[-1].rss_mib - warm[0].rss_mib, 1),
            "slope_mib_per_min_after_warmup": round(slope, 2),
        },
        "fds": {
            "before_load": before[-1].fds,
            "after_warmup": warm[0].fds,
            "end_of_load": load[-1].fds,
            "max": max(s.fds for s in samples),
            "after_load": after[-1].fds,
        },
        "tcp": {
            "before_load": before[-1].tcp_total,
            "max_during_load": max(s.tcp_total for s in load),
            "end_of_load": load[-1].tcp_total,
            "after_load": after[-1].tcp_total,
            "max_clients": max(s.tcp_clients for s in load),
            "max_to_redis": max(s.tcp_redis for s in samples),
        },
    }
    problems = []
    if out["failures"] or not out["requests"]:
        problems.append(f"{out['failures']} failed of {out['requests']} requests")
    if out["rss_mib"]["growth_after_warmup"] > args.max_rss_growth_mib:
        problems.append(f"RSS grew {out['rss_mib']['growth_after_warmup']} MiB after the warm-up")
    # Once the clients are gone, descriptors and connections must be back where they started
    # (Redis connections stay pooled, so a few more than before the first request are expected).
    slack = args.max_fd_growth
    if out["fds"]["after_load"] > out["fds"]["after_warmup"] + slack:
        problems.append(
            f"fds after the load {out['fds']['after_load']} > {out['fds']['after_warmup']} + {slack}"
        )
    if out["tcp"]["after_load"] > out["tcp"]["before_load"] + out["tcp"]["max_to_redis"] + slack:
        problems.append(f"{out['tcp']['after_load']} TCP connections left after the load")
    out["problems"] = problems
    out["ok"] = not problems
    return out


def print_report(result: dict[str, Any]) -> None:
    v, lt = result["verdict"], result["loadtest"]
    r, f, t = v["rss_mib"], v["fds"], v["tcp"]
    lat = lt.get("latency_ms") or {}
    rate = lt.get("requests_per_s") or 0.0
    lines = [
        f"soak: {v['requests']} requests, {v['failures']} failures, {rate:.1f} req/s, "
        f"p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms",
        f"  RSS MiB: before load {r['before_load']}, after warm-up {r['after_warmup']}, "
        f"end {r['end_of_load']}, max {r['max']}, after load {r['after_load']}",
        f"    growth after warm-up {r['growth_after_warmup']} MiB, "
        f"slope {r['slope_mib_per_min_after_warmup']} MiB/min",
        f"  fds: before load {f['before_load']}, after warm-up {f['after_warmup']}, "
        f"end {f['end_of_load']}, max {f['max']}, after load {f['after_load']}",
        f"  TCP: before load {t['before_load']}, max during load {t['max_during_load']} "
        f"(clients {t['max_clients']}, redis {t['max_to_redis']}), end {t['end_of_load']}, "
        f"after load {t['after_load']}",
        "  verdict: " + ("ok" if v["ok"] else "; ".join(v["problems"])),
    ]
    print("\n".join(lines), flush=True)


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", default="10m", help="load duration, e.g. 60s, 10m (default 10m)")
    ap.add_argument("--users", type=int, default=8, help="concurrent locust users (default 8)")
    ap.add_argument("--spawn-rate", type=float, default=4.0)
    ap.add_argument("--wait-ms", type=float, default=50.0, help="think time per user, uniform 0..W ms")
    ap.add_argument("--events-share", type=float, default=0.05, help="share of /v1/events appends")
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    ap.add_argument(
        "--warmup", default="", help="samples before this are the warm-up (default: 10%%, >= 10s)"
    )
    ap.add_argument("--max-rss-growth-mib", type=float, default=32.0)
    ap.add_argument("--max-fd-growth", type=int, default=8)
    ap.add_argument("--bundles", type=Path, help="serve this bundle root instead of the tiny trained one")
    ap.add_argument("--data", type=Path, help="dataset loaded at start-up and drawn from by the traffic")
    ap.add_argument("--fm-embeddings", type=Path, help="FM embeddings parquet loaded at start-up")
    ap.add_argument("--workdir", type=Path, default=ROOT / ".dare" / "soak", help="tiny build cache")
    ap.add_argument("--out", type=Path, help="output folder (default runs/soak/<time>)")
    args = ap.parse_args(argv)
    duration_s = parse_duration(args.duration)
    args.warmup_s = parse_duration(args.warmup) if args.warmup else max(10, duration_s // 10)
    out = (args.out or ROOT / "runs" / "soak" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")).resolve()
    out.mkdir(parents=True, exist_ok=True)

    if args.bundles is None:
        bundles, data, fm_file = tiny_build(args.workdir.resolve())
    else:
        bundles, data, fm_file = args.bundles.resolve(), args.data, args.fm_embeddings
    redis = RedisProcess(appendfsync="everysec").start()
    serve_args = []
    if data is not None:
        serve_args += ["--data", str(data)]
    if fm_file is not None:
        serve_args += ["--fm-embeddings", str(fm_file)]
    log = out / "serve.log"
    env = {"DARE_REDIS_NAMESPACE": "soak"}
    server = ServeProcess(bundles, redis_url=redis.url, env=env, args=serve_args, log=log, ready_timeout=180)
    try:
        try:
            server.start()
        except RuntimeError:
            print(f"soak: the server did not get ready; see {log}", file=sys.stderr)
            return 2
        base, port = server.base, server.port
        # Two idle samples, one interval apart; times count from the start of the load.
        sampler = Sampler(server.pid, port, redis.port, args.interval, time.monotonic() + args.interval)
        sampler.take()
        time.sleep(args.interval)
        sampler.take()
        sampler.t0, sampler.phase = time.monotonic(), "load"
        sampler.start()
        lt_out = out / "loadtest"
        cmd = [*dare_serve_command(), "loadtest", "--host", base, "--users", str(args.users),
               "--spawn-rate", f"{args.spawn_rate:g}", "--duration", f"{duration_s}s", "--out", str(lt_out),
               "--wait-ms", f"{args.wait_ms:g}", "--events-share", f"{args.events_share:g}",
               "--candidates", str(args.candidates)]  # fmt: skip
        if data is not None:
            cmd += ["--data", str(data)]
        print(f"soak: {args.users} users for {duration_s}s against {base}; samples every {args.interval:g}s "
              f"into {out}", flush=True)  # fmt: skip
        lt = subprocess.run(cmd, capture_output=True, text=True, cwd=out, env=clean_env(drop=LOADTEST_ENV))
        sampler.stop()
        sampler.phase = "idle-after"
        for _ in range(2):
            time.sleep(args.interval)  # the clients are gone: their connections must close
            sampler.take()
        (out / "loadtest.stderr.txt").write_text(lt.stderr)
        summary_path = lt_out / "summary.json"
        if lt.returncode != 0 or not summary_path.is_file():
            print(f"soak: the load test failed ({lt.returncode}): {lt.stderr[-2000:]}", file=sys.stderr)
            return 2
        summary = json.loads(summary_path.read_text())
    finally:
        server.stop()
        redis.cleanup()
    samples = sampler.samples
    result = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "duration_s": duration_s,
        "bundles": str(bundles),
        "loadtest": {
            k: summary.get(k)
            for k in (
                "requests",
                "failures",
                "error_rate",
                "requests_per_s",
                "latency_ms",
                "failure_reasons",
                "variants",
            )
        },  # fmt: skip
        "rss_mib": figures(samples, "rss_mib"),
        "fds": figures(samples, "fds"),
        "tcp_total": figures(samples, "tcp_total"),
        "verdict": verdict(args, samples, summary),
        "samples": [asdict(s) for s in samples],
        "server_log_tracebacks": log.read_text(errors="replace").count("Traceback"),
    }
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    print_report(result)
    print(f"soak: wrote {out / 'soak.json'}")
    return 0 if result["verdict"]["ok"] and not result["server_log_tracebacks"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
