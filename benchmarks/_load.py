"""A closed-loop HTTP load generator: N clients, each with one keep-alive connection, back to back.

The server and this client share the machine (2 cores here), so every cycle the client spends is
taken from the server. httpx's AsyncClient took 1.6-1.9 ms of CPU per request of this workload
here (and cost the server ~20% of its requests/s); this client writes pre-encoded requests on raw
asyncio streams and parses only the status line, the length and the body: ~0.13 ms. Its own CPU
time is measured and reported with the results.

Each client i walks the same fixed list of request bodies from offset i * len / N, so every
server under test gets the same requests in the same order for the same N.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class HttpError(RuntimeError):
    """A non-200 answer or a malformed response."""


@dataclass(frozen=True)
class LoadResult:
    """What one closed-loop run measured inside its window (warm-up excluded)."""

    clients: int
    completed: int
    seconds: float
    latencies_ms: np.ndarray
    client_cpu_s: float
    server_cpu_s: float
    loop_cpu_s: float = float("nan")  # the server's main thread (event loop), when asked for

    @property
    def rps(self) -> float:
        return self.completed / self.seconds

    def p(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms.size else float("nan")

    @property
    def server_cpu_ms_per_request(self) -> float:
        return 1e3 * self.server_cpu_s / max(self.completed, 1)


def request_bytes(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode("latin-1") + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Status and body of one HTTP/1.1 response (Content-Length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, chunked = -1, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return status, b"".join(parts)
            parts.append(await reader.readexactly(size + 2))
            parts[-1] = parts[-1][:-2]
    if length < 0:
        raise HttpError("response without Content-Length")
    return status, await reader.readexactly(length)


async def _client(
    host: str,
    port: int,
    requests: Sequence[bytes],
    start: int,
    window: tuple[float, float],
    latencies: list[float],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    begin, end = window
    i = start
    try:
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                return
            writer.write(requests[i % len(requests)])
            i += 1
            status, body = await read_response(reader)
            t1 = time.perf_counter()
            if status != 200:
                raise HttpError(f"HTTP {status}: {body[:300]!r}")
            if begin <= t1 <= end:
                latencies.append((t1 - t0) * 1e3)
    finally:
        writer.close()


async def _cpu_in_window(
    window: tuple[float, float], server_pids: Sequence[int], loop_pid: int | None
) -> tuple[float, float, float]:
    """(client, server, server main thread) CPU seconds used between the window's start and end."""
    from benchmarks._common import cpu_seconds, main_thread_cpu_seconds

    def read() -> tuple[float, float, float]:
        loop = main_thread_cpu_seconds(loop_pid) if loop_pid is not None else float("nan")
        return time.process_time(), cpu_seconds(server_pids), loop

    await asyncio.sleep(max(0.0, window[0] - time.perf_counter()))
    before = read()
    await asyncio.sleep(max(0.0, window[1] - time.perf_counter()))
    after = read()
    return after[0] - before[0], after[1] - before[1], after[2] - before[2]


async def _run(
    host: str,
    port: int,
    requests: Sequence[bytes],
    clients: int,
    warmup_s: float,
    duration_s: float,
    server_pids: Sequence[int],
    loop_pid: int | None,
) -> tuple[list[float], tuple[float, float, float]]:
    latencies: list[float] = []
    now = time.perf_counter()
    window = (now + warmup_s, now + warmup_s + duration_s)
    step = max(1, len(requests) // clients)
    cpu = asyncio.create_task(_cpu_in_window(window, server_pids, loop_pid))
    await asyncio.gather(
        *(_client(host, port, requests, c * step, window, latencies) for c in range(clients))
    )
    return latencies, await cpu


def closed_loop(
    host: str,
    port: int,
    path: str,
    bodies: Sequence[bytes],
    clients: int,
    *,
    warmup_s: float,
    duration_s: float,
    headers: dict[str, str] | None = None,
    server_pids: Sequence[int] = (),
    loop_pid: int | None = None,
) -> LoadResult:
    """Run `clients` closed-loop clients for warmup + duration seconds; measure the duration part.

    Throughput and latencies count the requests that finished inside the window; CPU time of this
    process, of `server_pids` (e.g. the server's process tree) and of `loop_pid`'s main thread is
    read at the window's edges.
    """
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # plain asyncio works too, with a little more client CPU
        runner = asyncio.run  # type: ignore[assignment]
    requests = [request_bytes(host, port, path, b, headers or {}) for b in bodies]
    latencies, (client_cpu, server_cpu, loop_cpu) = runner(
        _run(host, port, requests, clients, warmup_s, duration_s, server_pids, loop_pid)
    )
    return LoadResult(
        clients, len(latencies), duration_s, np.asarray(latencies), client_cpu, server_cpu, loop_cpu
    )
