"""The server-process helper: a server that never gets ready is stopped, its error says why; a
child sees the settings its caller names, not the DARE_* variables of the shell."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from service.process import HttpProcess, clean_env, free_port


def python(code: str, log: Path | None = None, ready_timeout: float = 30) -> HttpProcess:
    return HttpProcess(
        [sys.executable, "-c", code], free_port(), env=clean_env(), log=log, ready_timeout=ready_timeout
    )


def test_a_server_that_exits_is_reported_with_its_output() -> None:
    proc = python("print('no bundles here', flush=True); raise SystemExit(3)")
    with pytest.raises(RuntimeError, match="exited with 3: no bundles here"):
        proc.start()
    assert not proc.alive() and proc.stop() == 3
    assert proc.log_text() == "no bundles here\n"  # kept after its temp file is gone


def test_a_server_that_never_answers_is_stopped(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("an earlier run\n")
    proc = python("import time; print('up', flush=True); time.sleep(60)", log=log, ready_timeout=1)
    with pytest.raises(RuntimeError, match="not ready within 1s"):
        proc.start()
    assert not proc.alive() and proc.stop() == -signal.SIGTERM
    assert log.read_text() == "up\n"  # the first start empties the log


def test_settings_come_from_the_caller_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DARE_REDIS_URL", "redis://elsewhere:6379/0")
    env = clean_env({"DARE_REDIS_NAMESPACE": "mine"})
    assert "DARE_REDIS_URL" not in env and env["DARE_REDIS_NAMESPACE"] == "mine" and "PATH" in env
