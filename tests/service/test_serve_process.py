"""The real `dare-serve serve` process (uvicorn, uvloop, httptools) against the session Redis."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from service.process import ServeProcess, clean_env, dare_serve_command
from tests.conftest import ServedData, TinyModels


def test_serve_process_end_to_end(tiny_models: TinyModels, served: ServedData, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    env = {"DARE_REDIS_NAMESPACE": served.namespace}
    server = ServeProcess(tiny_models.root, redis_url=served.redis_url, env=env, log=log, ready_timeout=60)
    base = server.start().base
    try:
        user = served.fm_users[0]
        r = httpx.post(
            base + "/v1/score",
            json={"user_id": user, "candidates": served.items[:20], "explain": True},
            headers={"X-Experiment": "dare", "X-Request-ID": "proc-1"},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["user"]["fm_embedding"] == "hit" and body["user"]["sequence_length"] > 0
        assert r.headers["x-request-id"] == "proc-1" and "rank;dur=" in r.headers["server-timing"]
        bad = httpx.post(base + "/v1/score", content=b"{oops", headers={"Content-Type": "application/json"})
        assert bad.status_code == 400 and bad.headers["content-type"] == "application/problem+json"
        models = httpx.get(base + "/v1/models").json()
        assert models["device"]["execution_providers"][-1] == "CPUExecutionProvider"
    finally:
        code = server.stop()
    text = log.read_text()
    # uvicorn re-raises the signal after a graceful shutdown, so SIGTERM is the exit status
    assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in text, text[-2000:]
    assert "CPUExecutionProvider" in text and "loaded dare/1" in text and "Traceback" not in text


@pytest.mark.parametrize(
    "args,env,message",
    [
        (["--bundles", "/no/such/root"], {}, "not a directory"),
        (["--bundles", "."], {"DARE_MAX_CANDIDATES": "0"}, "max_candidates"),
        (["--bundles", "."], {"DARE_REDIS_CLUSTER": "true"}, "DARE_REDIS_URL"),
    ],
)
def test_serve_refuses_bad_settings(args: list[str], env: dict[str, str], message: str) -> None:
    p = subprocess.run(
        [*dare_serve_command(), "serve", *args],
        capture_output=True,
        text=True,
        env=clean_env(env),
        timeout=60,
    )
    assert p.returncode == 2 and message in p.stderr, p.stderr
