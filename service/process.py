"""`dare-serve serve` (or another HTTP server) as a child process on a loopback port.

Tests, benchmarks and the soak run start real servers one way: a free port, the `dare-serve` of
this interpreter's environment, only the DARE_* settings they name (never those of the shell that
runs them), the output in a log file, ready once `/readyz` answers 200, SIGTERM then SIGKILL to stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from service.readiness import wait_ready

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on at the moment (the kernel picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def dare_serve_command() -> list[str]:
    """The `dare-serve` console script of this interpreter's environment; the module where it is absent."""
    script = Path(sys.executable).parent / "dare-serve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]


def clean_env(extra: Mapping[str, str] | None = None, drop: tuple[str, ...] = ("DARE_",)) -> dict[str, str]:
    """This process's environment less the variables that start with `drop`, plus `extra`.

    A child started with it is configured by what its caller names alone: a DARE_* variable left
    in the developer's shell would otherwise change what a test or a benchmark measures.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return env | dict(extra or {})


def stop_process(proc: subprocess.Popen[Any], timeout: float = 20.0) -> int:
    """SIGTERM (a graceful shutdown), SIGKILL when it has not exited after `timeout` s; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    code: int = proc.returncode
    return code


class HttpProcess:
    """A server process that listens on `host:port` and is ready once its `/readyz` answers 200.

    Its output goes to `log`: emptied by the first start (a reused folder keeps no earlier run's
    lines), appended to by a restart; without `log`, to a temp file that `stop()` reads back (for
    `log_text()`) and removes. A context manager: started on entry unless it already runs, stopped
    on exit.
    """

    def __init__(
        self,
        command: Sequence[str],
        port: int,
        *,
        env: Mapping[str, str],
        log: Path | None = None,
        host: str = LOOPBACK,
        ready_timeout: float = 120.0,
        stop_timeout: float = 20.0,
    ) -> None:
        self.command = list(command)
        self.host, self.port = host, port
        self.base = f"http://{host}:{port}"
        self.env = dict(env)
        self.log = log
        self.ready_timeout, self.stop_timeout = ready_timeout, stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._temp_log: Path | None = None
        self._earlier_output = ""  # what temp logs of earlier runs held

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.command[0]} has not been started")
        return self.proc.pid

    def start(self, timeout: float | None = None) -> Self:
        """Start the process and wait until it is ready; raises RuntimeError with its log's end if not."""
        if self.alive():
            raise RuntimeError(f"{self.command[0]} already runs (pid {self.pid})")
        path = self.log
        if path is None:
            fd, name = tempfile.mkstemp(prefix="dare-server-", suffix=".log")
            os.close(fd)
            path = self._temp_log = Path(name)
        mode = "ab" if self.proc is not None else "wb"
        with open(path, mode) as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        limit = self.ready_timeout if timeout is None else timeout
        if not wait_ready(self.base, limit, alive=self.alive):
            exited = self.proc.poll()
            self.stop()
            why = f"exited with {exited}" if exited is not None else f"not ready within {limit:g}s"
            raise RuntimeError(f"{self.command[0]} for {self.base} {why}: {self.log_text()[-3000:]}")
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        """Everything the process wrote so far (stdout and stderr)."""
        path = self._temp_log or self.log
        current = path.read_text(errors="replace") if path is not None and path.exists() else ""
        return self._earlier_output + current

    def stop(self) -> int | None:
        """Stop it (see `stop_process`); its exit status, None when it was never started."""
        if self.proc is None:
            return None
        code = stop_process(self.proc, self.stop_timeout)
        if self._temp_log is not None:
            self._earlier_output = self.log_text()
            with contextlib.suppress(OSError):
                self._temp_log.unlink()
            self._temp_log = None
        return code

    def __enter__(self) -> Self:
        return self if self.alive() else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ServeProcess(HttpProcess):
    """`dare-serve serve` over the bundle root `bundles`, configured by `env` alone.

    The caller's DARE_* variables are dropped, so only `env` (DARE_* settings and anything else the
    server should see) configures it. Without `redis_url` it serves from the in-memory store;
    `args` adds options of `serve` (`--data`, `--fm-embeddings`, `--log-level`, ...).
    """

    def __init__(
        self,
        bundles: Path,
        *,
        redis_url: str | None = None,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        log: Path | None = None,
        host: str = LOOPBACK,
        port: int | None = None,
        ready_timeout: float = 120.0,
    ) -> None:
        port = free_port(host) if port is None else port
        store = ["--redis-url", redis_url] if redis_url is not None else []
        command = [*dare_serve_command(), "serve", "--bundles", str(bundles), *store,
                   "--host", host, "--port", str(port), *args]  # fmt: skip
        super().__init__(command, port, env=clean_env(env), log=log, host=host, ready_timeout=ready_timeout)
