"""`dare-serve loadtest`: one bounded, headless locust run against a loopback server, with reports."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loadtest.report import STATS_FILE, ReportError, summarize, write_plot
from loadtest.workload import TrafficConfig, WorkloadError
from service.process import stop_process

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
CSV_PREFIX = "locust"  # locust writes locust_stats.csv, locust_stats_history.csv, locust_failures.csv ...
HTML_FILE = "report.html"
LOG_FILE = "locust.log"
PLOT_FILE = "latency_throughput.png"
SUMMARY_FILE = "summary.json"
DEMO_DATA = Path(".dare/demo/data")  # `dare-serve demo`'s default workdir
MAX_USERS = 1000
MAX_DURATION_S = 3600
STOP_TIMEOUT_S = 10  # users finish their in-flight request at the end instead of being cut off
GRACE_S = 90  # locust start-up, report writing; past duration + this, the run is killed


class LoadTestError(RuntimeError):
    """Locust could not run, or its run produced no statistics."""


def parse_duration(text: str) -> int:
    """Seconds in `90`, `60s`, `2m`, `1m30s` or `1h` (locust's spelling)."""
    m = re.fullmatch(r"\s*(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s?)?\s*", text)
    if not text.strip() or m is None or not any(m.groups()):
        raise WorkloadError(f"duration {text!r}: use e.g. 60s, 2m or 1m30s")
    h, mi, s = (int(g) if g else 0 for g in m.groups())
    return h * 3600 + mi * 60 + s


def is_loopback(host: str) -> bool:
    """The host is `localhost` or a loopback address literal (no name resolution)."""
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(url: str, allow_remote: bool) -> str:
    """The base URL without a trailing slash; refuses non-http(s) and, unless allowed, remote hosts."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WorkloadError(f"--host {url!r}: give a base URL such as http://127.0.0.1:8000")
    if not allow_remote and not is_loopback(parts.hostname):
        raise WorkloadError(
            f"--host {parts.hostname} is not a loopback address; load tests target this machine "
            "unless --allow-remote is given (and the target is yours to load)"
        )
    return url.rstrip("/")


def default_data(data: Path | None) -> Path | None:
    """The dataset to draw traffic from: the given one, else the demo's default, else none."""
    if data is not None:
        return data
    return DEMO_DATA.resolve() if (DEMO_DATA / "events.parquet").is_file() else None


@dataclass(frozen=True, slots=True)
class LoadTest:
    """One run: where, how many users, how long, where the reports go, what traffic."""

    host: str
    users: int
    spawn_rate: float
    duration_s: int
    out: Path
    traffic: TrafficConfig

    def __post_init__(self) -> None:
        if not 1 <= self.users <= MAX_USERS:
            raise WorkloadError(f"--users must be 1..{MAX_USERS}, not {self.users}")
        if not 0 < self.spawn_rate <= MAX_USERS:
            raise WorkloadError(f"--spawn-rate must be in (0, {MAX_USERS}], not {self.spawn_rate}")
        if not 1 <= self.duration_s <= MAX_DURATION_S:
            raise WorkloadError(f"--duration must be 1s..{MAX_DURATION_S}s, not {self.duration_s}s")

    def command(self) -> list[str]:
        """The locust command line (absolute paths: it runs in the output folder)."""
        prefix = self.out / CSV_PREFIX
        return [
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "--host", self.host, "--users", str(self.users), "--spawn-rate", f"{self.spawn_rate:g}",
            "--run-time", f"{self.duration_s}s", "--stop-timeout", str(STOP_TIMEOUT_S),
            "--csv", str(prefix), "--csv-full-history", "--html", str(self.out / HTML_FILE),
            # Failed requests are reported in summary.json; a non-zero exit means locust itself failed.
            "--exit-code-on-error", "0", "--only-summary", "--loglevel", "INFO",
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        """This environment without LOCUST_* / DARE_LT_* leftovers, plus the traffic settings."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUST_", "DARE_LT_"))}
        return base | self.traffic.to_env()


def preflight(host: str, timeout: float = 10.0) -> dict[str, Any]:
    """GET /v1/models, so an unreachable or empty server fails before locust starts."""
    try:
        with urllib.request.urlopen(host + "/v1/models", timeout=timeout) as r:
            body: dict[str, Any] = json.loads(r.read())
    except (OSError, ValueError) as e:
        raise LoadTestError(f"cannot reach {host}/v1/models: {e}") from None
    if not body.get("variants"):
        raise LoadTestError(f"{host}/v1/models lists no serving variant")
    return body


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def run_loadtest(lt: LoadTest, progress: bool = True) -> dict[str, Any]:
    """Run locust headless, then write summary.json and the plot; returns the summary."""
    models = preflight(lt.host)
    lt.out.mkdir(parents=True, exist_ok=True)
    # A previous run's files in the same folder must not pass for this run's.
    for stale in (
        STATS_FILE,
        SUMMARY_FILE,
        PLOT_FILE,
        HTML_FILE,
        *(p.name for p in lt.out.glob(f"{CSV_PREFIX}_*.csv")),
    ):
        (lt.out / stale).unlink(missing_ok=True)
    log_path = lt.out / LOG_FILE
    started = datetime.now(UTC)
    limit = lt.duration_s + STOP_TIMEOUT_S + GRACE_S
    if progress:
        print(
            f"locust: {lt.users} users at {lt.spawn_rate:g}/s for {lt.duration_s}s against {lt.host} "
            f"(log: {log_path})",
            file=sys.stderr,
            flush=True,
        )
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(lt.command(), stdout=log, stderr=subprocess.STDOUT, env=lt.env(), cwd=lt.out)
        try:
            code = proc.wait(limit)
        except subprocess.TimeoutExpired:
            # SIGTERM makes locust shut down cleanly (reports written); killed if it does not.
            stop_process(proc)
            raise LoadTestError(f"locust ran past {limit}s and was stopped; log: {log_path}") from None
        except BaseException:
            stop_process(proc)
            raise
    if code != 0:
        raise LoadTestError(f"locust exited {code}; log {log_path}:\n{_tail(log_path)}")
    try:
        summary = summarize(lt.out)
    except ReportError as e:
        raise LoadTestError(f"{e}; log {log_path}:\n{_tail(log_path)}") from None
    summary["run"] = {
        "host": lt.host,
        "users": lt.users,
        "spawn_rate": lt.spawn_rate,
        "duration_s": lt.duration_s,
        "wall_s": round(time.monotonic() - t0, 1),
        "started_at": started.isoformat(timespec="seconds"),
        "models": {m["variant"]: m.get("version") for m in models["variants"]},
        "command": " ".join(lt.command()),
    }
    try:
        plot = write_plot(lt.out, lt.out / PLOT_FILE)
    except ReportError as e:
        raise LoadTestError(str(e)) from None
    summary["files"] = {
        "html": HTML_FILE,
        "plot": plot.name,
        "stats_csv": f"{CSV_PREFIX}_stats.csv",
        "history_csv": f"{CSV_PREFIX}_stats_history.csv",
        "failures_csv": f"{CSV_PREFIX}_failures.csv",
        "log": LOG_FILE,
    }
    (lt.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    return summary


def one_line(summary: dict[str, Any], out: Path) -> str:
    """The summary's headline as one JSON line."""
    lat = summary["latency_ms"]
    return json.dumps(
        {
            "requests": summary["requests"],
            "failures": summary["failures"],
            "error_rate": summary["error_rate"],
            "requests_per_s": round(summary["requests_per_s"], 1),
            "p50_ms": lat["p50"],
            "p95_ms": lat["p95"],
            "p99_ms": lat["p99"],
            "variants": {
                v: {"requests": s["requests"], "p99_ms": s["latency_ms"]["p99"]}
                for v, s in summary["variants"].items()
            },
            "traffic": summary["traffic"]["source"],
            "out": str(out),
        }
    )
