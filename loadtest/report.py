"""Reports of a locust run: summary.json's content and the latency / throughput plot.

`python -m loadtest.report OUT` prints the summary of a finished run's folder and redraws its plot.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

STATS_FILE = "dare_stats.json"  # written by the locustfile when locust quits
HISTORY_FILE = "locust_stats_history.csv"
SCORE_PREFIX = "score ["


class ReportError(RuntimeError):
    """A run folder lacks what a report needs."""


def summarize(out: Path) -> dict[str, Any]:
    """summary.json's figures from the run's dare_stats.json: totals, score, events, per variant."""
    path = out / STATS_FILE
    try:
        stats = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"no statistics from the locust run ({path}: {e})") from None
    total = stats["total"]
    names: dict[str, Any] = stats["names"]
    return {
        # All requests (score and events); `failures` counts content failures, not only statuses.
        "requests": total["requests"],
        "failures": total["failures"],
        "error_rate": total["failure_rate"],
        "requests_per_s": total["requests_per_s"],
        "latency_ms": total["latency_ms"],
        "score": stats["score"],
        "events": names.get("events"),
        "variants": {
            name[len(SCORE_PREFIX) : -1]: entry
            for name, entry in names.items()
            if name.startswith(SCORE_PREFIX)
        },
        "failure_reasons": stats["errors"],
        "exceptions": stats.get("exceptions", []),
        "client_cpu_warning": stats.get("client_cpu_warning", False),
        "traffic": stats["traffic"],
        "answers": stats["answers"],
    }


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan  # locust writes N/A before the first request of a window


def read_history(path: Path) -> dict[str, dict[str, list[float]]]:
    """Per request name (and `Aggregated`): time (s from the first row), users, rates, percentiles."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise ReportError(f"no stats history ({path}: {e})") from None
    if not rows:
        raise ReportError(f"{path} has no rows")
    t0 = min(int(r["Timestamp"]) for r in rows)
    series: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        s = series.setdefault(r["Name"], {})
        for key, column in (
            ("t", "Timestamp"), ("users", "User Count"), ("rps", "Requests/s"), ("fps", "Failures/s"),
            ("p50", "50%"), ("p95", "95%"), ("p99", "99%"),
        ):  # fmt: skip
            value = float(int(r[column]) - t0) if key == "t" else _number(r[column])
            # Locust writes 0 ms for a window it has no response-time snapshot of yet (the first
            # seconds); no request of this service takes 0 ms, so it is a gap, not a point.
            if key.startswith("p") and value == 0.0:
                value = math.nan
            s.setdefault(key, []).append(value)
    return series


def write_plot(out: Path, png: Path) -> Path:
    """Latency percentiles and throughput over time, from locust's stats history, as a PNG."""
    # The object-oriented API with the Agg canvas: no pyplot state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = read_history(out / HISTORY_FILE)
    agg = series.get("Aggregated")
    if agg is None:
        raise ReportError(f"{out / HISTORY_FILE} has no Aggregated rows")
    variants = sorted(n for n in series if n.startswith(SCORE_PREFIX))
    fig = Figure(figsize=(10, 7), layout="constrained")
    FigureCanvasAgg(fig)
    lat, thr = fig.subplots(2, 1, sharex=True)
    for key, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        lat.plot(agg["t"], agg[key], style, color="black", label=f"all requests {key}")
    for name in variants:
        lat.plot(series[name]["t"], series[name]["p99"], alpha=0.7, label=f"{name} p99")
    lat.set_ylabel("latency (ms, 10 s window)")
    lat.set_title(f"dare-serve load test: latency percentiles and throughput ({out.name})")
    lat.grid(alpha=0.3)
    lat.legend(fontsize=8, loc="upper left")
    thr.plot(agg["t"], agg["rps"], color="black", label="all requests/s")
    for name in variants:
        thr.plot(series[name]["t"], series[name]["rps"], alpha=0.7, label=f"{name} requests/s")
    thr.plot(agg["t"], agg["fps"], color="red", label="failures/s")
    thr.set_xlabel("seconds since start")
    thr.set_ylabel("requests/s")
    thr.grid(alpha=0.3)
    users = thr.twinx()
    users.plot(agg["t"], agg["users"], color="grey", drawstyle="steps-post", alpha=0.5, label="users")
    users.set_ylabel("users")
    users.set_ylim(bottom=0)
    handles = thr.get_legend_handles_labels()
    more = users.get_legend_handles_labels()
    thr.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="upper left")
    fig.savefig(png, dpi=100)
    return png


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".")
    doc = summarize(folder)
    write_plot(folder, folder / "latency_throughput.png")
    print(json.dumps(doc, indent=1))
