"""A private redis-server process on a free loopback port, for tests and benchmarks.

Besides start and stop, fault tests need a Redis that crashes (SIGKILL), freezes (SIGSTOP), blocks
in `DEBUG SLEEP`, or runs a long Lua script; and, to check what survives a restart, the same port
and data directory with append-only-file persistence.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Literal

from service.process import free_port

AppendFsync = Literal["always", "everysec", "no"]

# A read-only Lua busy loop: Redis runs a script to its end while every other client waits (or,
# past busy-reply-threshold, gets BUSY errors). TIME advances inside a script on Redis 7.
_BUSY_SCRIPT = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local stop = now_ms() + tonumber(ARGV[1])
local spins = 0
while now_ms() < stop do spins = spins + 1 end
return spins
"""


def _command(port: int, *args: str | int | float, timeout: float) -> bytes:
    """Send one RESP command on a fresh connection and return the raw first reply line."""
    parts = [str(a).encode() for a in args]
    payload = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection(("127.0.0.1", port), timeout) as s:
        s.sendall(payload)
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply


class BackgroundCommand:
    """One command sent from a daemon thread; the reply (or the socket error) is kept, never raised there."""

    def __init__(self, port: int, args: tuple[str | int | float, ...], timeout: float) -> None:
        self.reply: bytes | None = None
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, args=(port, args, timeout), daemon=True)
        self._thread.start()

    def _run(self, port: int, args: tuple[str | int | float, ...], timeout: float) -> None:
        try:
            self.reply = _command(port, *args, timeout=timeout)
        except OSError as e:
            self.error = e

    def join(self, timeout: float | None = None) -> bytes:
        """Wait for the reply; raises the socket error the command met, if any."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the background command is still waiting for its reply")
        if self.error is not None:
            raise self.error
        return self.reply or b""


class RedisProcess:
    """Starts and stops one `redis-server` bound to 127.0.0.1; data lives in a temp dir.

    `appendfsync` turns on append-only-file persistence with that fsync policy (the data dir and
    port survive `stop()`/`kill()` + `start()`, so a restart reloads what was written); `debug`
    allows `DEBUG` commands from loopback clients (for `debug_sleep`).
    """

    def __init__(
        self,
        port: int | None = None,
        extra_args: list[str] | None = None,
        *,
        appendfsync: AppendFsync | None = None,
        debug: bool = False,
    ) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not on PATH")
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.appendfsync = appendfsync
        self.debug = debug
        self.dir = Path(tempfile.mkdtemp(prefix=f"dare-redis-{self.port}-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def _args(self) -> list[str]:
        persistence = ["--appendonly", "no"]
        if self.appendfsync is not None:
            persistence = ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        debug = ["--enable-debug-command", "local"] if self.debug else []
        return [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            *persistence,
            *debug,
            "--dir",
            str(self.dir),
            *self.extra_args,
        ]

    def start(self, timeout: float = 10.0) -> RedisProcess:
        self.proc = subprocess.Popen(self._args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._paused = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(b"PING\r\n")
                # +PONG once the data set is loaded (-LOADING before, with a persisted AOF)
                if s.recv(16).startswith(b"+PONG"):
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM): with persistence on, Redis flushes its AOF first."""
        if self.proc is not None and self.proc.poll() is None:
            self.resume()  # a stopped process would leave SIGTERM pending
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """Crash (SIGKILL): no shutdown work, what was not yet fsynced is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None
        self._paused = False

    def restart(self, timeout: float = 10.0) -> RedisProcess:
        """Graceful stop, then start on the same port with the same data dir."""
        self.stop()
        return self.start(timeout)

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections are accepted by the kernel, nothing answers."""
        if self.proc is not None and self.proc.poll() is None and not self._paused:
            self.proc.send_signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        """Undo `pause()` (SIGCONT)."""
        if self.proc is not None and self.proc.poll() is None and self._paused:
            self.proc.send_signal(signal.SIGCONT)
            self._paused = False

    def command(self, *args: str | int | float, timeout: float = 10.0) -> bytes:
        """One command on a fresh loopback connection; the raw first line of the reply."""
        return _command(self.port, *args, timeout=timeout)

    def in_background(self, *args: str | int | float, timeout: float = 30.0) -> BackgroundCommand:
        """Send a blocking command from a thread; `.join()` waits for and returns its reply."""
        return BackgroundCommand(self.port, args, timeout)

    def debug_sleep(self, seconds: float) -> BackgroundCommand:
        """`DEBUG SLEEP`: the server blocks for `seconds` (needs `debug=True`)."""
        if not self.debug:
            raise RuntimeError("DEBUG commands are off: create the RedisProcess with debug=True")
        return self.in_background("DEBUG", "SLEEP", f"{seconds:g}", timeout=seconds + 10)

    def busy_script(self, seconds: float) -> BackgroundCommand:
        """A read-only Lua script that keeps the server busy for `seconds`."""
        return self.in_background("EVAL", _BUSY_SCRIPT, 0, int(seconds * 1000), timeout=seconds + 10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
