"""Helpers shared by the benchmark scripts: the machine line, markdown tables, server processes.

The scripts run as modules from the repository root (`python -m benchmarks.<name>`), so the
repository's packages, and no script of this folder, are what they import.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from service.process import ServeProcess

ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def machine_line() -> str:
    """One line naming the machine a run was measured on."""
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {memory_gib():.0f} GiB, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def pct(values: Sequence[float] | np.ndarray, q: float) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.percentile(arr, q)) if arr.size else float("nan")


def samples_ms(fn: Callable[[], object], reps: int, warmup: int = 1) -> np.ndarray:
    """Wall time of each of `reps` calls in ms, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return np.asarray(times) * 1e3


def median_ms(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of `reps` calls in ms, after one untimed call."""
    return float(np.median(samples_ms(fn, reps)))


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table as lines."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def print_lines(lines: Sequence[str]) -> None:
    print("\n".join(lines), flush=True)


# -- processes ----------------------------------------------------------------------------------


def _stat_fields(pid: int, tid: int | None = None) -> list[str] | None:
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        raw = Path(path).read_text()
    except OSError:
        return None
    # the command name is in parentheses and may hold spaces: split after its closing one
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds used so far by these processes (those still alive)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def main_thread_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process's main thread alone (for a uvicorn server: its event loop)."""
    fields = _stat_fields(pid, pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server(Protocol):
    """A started HTTP server that the load benchmarks drive: where it listens, and its process."""

    @property
    def base(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def pid(self) -> int: ...


def dare_server(
    bundles: Path,
    redis_url: str | None,
    env: Mapping[str, str] | None = None,
    namespace: str = "bench",
    extra_args: Sequence[str] = (),
) -> ServeProcess:
    """`dare-serve serve` as the benchmarks run it (a context manager: started on entry, stopped on exit).

    Only `env` configures it, over the benchmarks' namespace and a 2 s feature timeout. Without
    `redis_url` it serves from the in-memory store (fill it with `extra_args`: --data, ...).
    """
    settings = {"DARE_REDIS_NAMESPACE": namespace, "DARE_FEATURE_TIMEOUT_MS": "2000", **(env or {})}
    args = ["--log-level", "warning", *extra_args]
    return ServeProcess(bundles, redis_url=redis_url, env=settings, args=args)


def elapsed(t0: float) -> str:
    return f"{time.perf_counter() - t0:.0f}s"
