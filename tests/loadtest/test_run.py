"""`dare-serve loadtest`: bounded headless locust runs against a real server, and against a wrong one."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from loadtest.run import check_host, is_loopback, parse_duration
from loadtest.workload import WorkloadError
from service.process import ServeProcess, clean_env, dare_serve_command, free_port
from tests.conftest import TinyModels


def loadtest(*args: str, cwd: Path, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    """Run `dare-serve loadtest ARGS` (in cwd, so no .dare/demo dataset is found by accident)."""
    return subprocess.run(
        [*dare_serve_command(), "loadtest", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=clean_env(),
        timeout=timeout,
    )


def test_bounded_run_against_serve(server: ServeProcess, tiny_models: TinyModels, tmp_path: Path) -> None:
    out = tmp_path / "lt"
    p = loadtest("--host", server.base, "--users", "8", "--spawn-rate", "8", "--duration", "8s",
                 "--out", str(out), "--data", str(tiny_models.data), "--candidates", "50",
                 "--experiment-share", "0.3", "--events-share", "0.1", cwd=tmp_path)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    line = json.loads(p.stdout.strip().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert line["requests"] == summary["requests"] > 0 and line["failures"] == 0
    assert summary["failures"] == 0 and summary["error_rate"] == 0.0, summary["failure_reasons"]
    assert summary["exceptions"] == [] and summary["failure_reasons"] == []
    assert set(summary["variants"]) == {"dare", "coupled"}
    for entry in [summary, summary["score"], *summary["variants"].values()]:
        lat = entry["latency_ms"]
        assert entry["requests"] > 0 and lat["p99"] >= lat["p95"] >= lat["p50"] > 0, entry
    assert summary["score"]["requests"] == sum(v["requests"] for v in summary["variants"].values())
    assert summary["events"]["requests"] > 0 and summary["events"]["failures"] == 0
    assert summary["requests"] == summary["score"]["requests"] + summary["events"]["requests"]
    assert summary["requests_per_s"] > 0
    answers, traffic = summary["answers"], summary["traffic"]
    assert traffic["source"] == "dataset" and traffic["config"]["candidates"] == 50
    assert answers["scores_checked"] == summary["score"]["requests"]
    assert answers["unknown_item_share"] == 0.0 and answers["fm_embedding_share"]["hit"] > 0.5
    assert 0.1 < answers["forced_variant_share"] < 0.5 and answers["events_appended"] > 0
    files = summary["files"]
    assert (out / files["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<html" in (out / files["html"]).read_text().lower()
    for name in ("stats_csv", "history_csv", "failures_csv"):
        assert (out / files[name]).is_file()


class WrongRanker(BaseHTTPRequestHandler):
    """A server that answers 200 with one score too few: only a content check can catch it."""

    def _send(self, body: dict[str, Any], headers: dict[str, str]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(200)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(raw)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._send({"variants": [{"variant": "dare", "version": "1", "n_items": 100}]}, {})

    def do_POST(self) -> None:  # noqa: N802
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        scores = [0.5] * (len(request["candidates"]) - 1)
        self._send(
            {"request_id": "x", "variant": "dare", "model_version": "1", "scores": scores,
             "user": {"sequence_length": 0, "fm_embedding": "miss", "cold_start": True}},
            {"X-Model-Variant": "dare", "X-Model-Version": "1",
             "X-Request-ID": self.headers.get("X-Request-ID", "")},
        )  # fmt: skip

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture()
def wrong_server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), WrongRanker)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_wrong_content_is_counted_as_failures(wrong_server: str, tmp_path: Path) -> None:
    out = tmp_path / "lt"
    p = loadtest("--host", wrong_server, "--users", "2", "--spawn-rate", "2", "--duration", "3s",
                 "--out", str(out), "--events-share", "0", "--candidates", "5", cwd=tmp_path)  # fmt: skip
    # Locust ran fine, so the command succeeds; the failures are in the summary.
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] > 0 and summary["failures"] == summary["requests"]
    assert summary["error_rate"] == 1.0 and summary["traffic"]["source"] == "synthetic"
    reasons = {r["error"] for r in summary["failure_reasons"]}
    assert any("scores count differs from candidates count" in r for r in reasons), reasons
    assert set(summary["variants"]) == {"dare"}


def test_unreachable_server_is_an_error(tmp_path: Path) -> None:
    host = f"http://127.0.0.1:{free_port()}"
    p = loadtest("--host", host, "--duration", "2s", "--out", str(tmp_path / "o"), cwd=tmp_path, timeout=60)
    assert p.returncode == 1 and "cannot reach" in p.stderr, p.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--host", "http://10.1.2.3:8000"], "not a loopback address"),
        (["--host", "http://example.com"], "not a loopback address"),
        (["--host", "127.0.0.1:8000"], "base URL"),
        (["--host", "http://127.0.0.1:1", "--duration", "2h"], "--duration"),
        (["--host", "http://127.0.0.1:1", "--users", "0"], "--users"),
        (["--host", "http://127.0.0.1:1", "--events-share", "2"], "events-share"),
        (["--host", "http://127.0.0.1:1", "--data", "/no/such/dir"], "no events.parquet"),
    ],
)
def test_refused_before_anything_runs(args: list[str], message: str, tmp_path: Path) -> None:
    p = loadtest(*args, "--out", str(tmp_path / "o"), cwd=tmp_path, timeout=60)
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert not (tmp_path / "o").exists()


def test_host_and_duration_parsing() -> None:
    assert [parse_duration(t) for t in ("90", "60s", "2m", "1m30s", "1h")] == [90, 60, 120, 90, 3600]
    for bad in ("", "soon", "5x", "-3s"):
        with pytest.raises(WorkloadError):
            parse_duration(bad)
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.2", "example.com", "localhost.example"))
    assert check_host("http://[::1]:8000/", False) == "http://[::1]:8000"
    assert check_host("https://example.com", True) == "https://example.com"
