"""What the reliability tests share: a real `dare-serve serve` process, a threaded HTTP load that
records every answer, checks of problem+json answers, exact reads of stored events, and the JSON
artifacts that `benchmarks/reliability_report.py` turns into a table.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis

from feature_store import codec
from feature_store.keys import KeySpace
from service.process import ServeProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("DARE_RELIABILITY_ARTIFACTS", ROOT / "artifacts" / "reliability"))
ADMIN_TOKEN = "reliability-admin-0123456789"
WRITE_TOKEN = "reliability-write-0123456789"
# Markers of a leaked stack trace or of internals in a body.
LEAKS = ("Traceback", 'File "', "site-packages", "redis.exceptions", "onnxruntime.capi")


# -- the server process ------------------------------------------------------------------------


def server_process(workdir: Path, bundles: Path, redis_url: str, **settings: object) -> ServeProcess:
    """`dare-serve serve` on a free loopback port (not started); settings are DARE_* variables by
    their setting name (`redis_namespace=...`); the log is workdir/serve-<port>.log."""
    port = free_port()
    env = {f"DARE_{k.upper()}": str(v) for k, v in settings.items()}
    log = workdir / f"serve-{port}.log"
    return ServeProcess(bundles, redis_url=redis_url, env=env, log=log, port=port, ready_timeout=90.0)


# -- load --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    """One HTTP request of a load; `tag` groups answers, `meta` is what the test needs later."""

    method: str
    path: str
    tag: str
    json: Any = None
    content: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    meta: Any = None


@dataclass(slots=True)
class Record:
    """The answer to one call: status 0 means no HTTP answer (client timeout, reset)."""

    call: Call
    status: int
    started: float  # time.monotonic()
    seconds: float
    headers: dict[str, str]
    body: bytes
    error: str | None = None

    @property
    def ended(self) -> float:
        return self.started + self.seconds

    def json(self) -> Any:
        return json.loads(self.body)


CallFactory = Callable[[int, int], Call | None]


class Load:
    """`workers` threads, each with its own HTTP connection, sending `calls(worker, i)` in turn.

    Bounded: a worker stops at `max_per_worker` calls, when `calls` returns None, or on `stop()`.
    Every answer is recorded with its status, latency, headers and body.
    """

    def __init__(
        self,
        base: str,
        calls: CallFactory,
        *,
        workers: int = 8,
        max_per_worker: int = 2000,
        pause_s: float = 0.0,
        timeout: float = 10,
    ) -> None:
        self.base, self.calls, self.timeout = base, calls, timeout
        self.max_per_worker, self.pause_s = max_per_worker, pause_s
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, args=(w,), daemon=True) for w in range(workers)]

    def _work(self, worker: int) -> None:
        with httpx.Client(base_url=self.base, timeout=self.timeout) as client:
            for i in range(self.max_per_worker):
                if self._stop.is_set():
                    return
                call = self.calls(worker, i)
                if call is None:
                    return
                self._add(send(client, call))
                if self.pause_s:
                    # Paced, so a fast-failing outage does not turn into a flood of requests.
                    self._stop.wait(self.pause_s)

    def _add(self, record: Record) -> None:
        with self._lock:
            self.records.append(record)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 30)

    def join(self, timeout: float = 120) -> None:
        """Wait for every worker to run out of calls."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), "load did not finish in time"

    def count(self, predicate: Callable[[Record], bool] | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.records if predicate is None or predicate(r))

    def wait_for(
        self, n: int, predicate: Callable[[Record], bool] | None = None, timeout: float = 30
    ) -> None:
        """Wait until `n` more answers (matching `predicate`) have come back."""
        target = self.count(predicate) + n
        deadline = time.monotonic() + timeout
        while self.count(predicate) < target:
            assert time.monotonic() < deadline, f"fewer than {n} answers within {timeout}s"
            assert any(t.is_alive() for t in self._threads), "the load stopped early"
            time.sleep(0.01)

    def snapshot(self) -> list[Record]:
        with self._lock:
            return list(self.records)


def send(client: httpx.Client, call: Call) -> Record:
    """Send one call and record its answer (or the transport error)."""
    started = time.monotonic()
    try:
        r = client.request(call.method, call.path, json=call.json, content=call.content, headers=call.headers)
    except httpx.HTTPError as e:
        return Record(call, 0, started, time.monotonic() - started, {}, b"", f"{type(e).__name__}: {e}")
    headers = {k.lower(): v for k, v in r.headers.items()}
    return Record(call, r.status_code, started, time.monotonic() - started, headers, r.content)


# -- checks ------------------------------------------------------------------------------------


def problem_issue(record: Record, status: int | None = None) -> str | None:
    """Why `record` is not a clean RFC 9457 problem (of `status`), or None when it is."""
    if status is not None and record.status != status:
        return f"status {record.status}, expected {status}"
    if not record.headers.get("content-type", "").startswith("application/problem+json"):
        return f"content-type {record.headers.get('content-type')!r}"
    try:
        body = record.json()
    except ValueError:
        return "body is not JSON"
    if body.get("status") != record.status or not isinstance(body.get("type"), str):
        return f"problem body {body!r} does not match status {record.status}"
    if not isinstance(body.get("title"), str):
        return "problem without a title"
    leaked = [marker for marker in LEAKS if marker in record.body.decode("utf-8", "replace")]
    if leaked:
        return f"body leaks {leaked}"
    if record.status == 503 and not record.headers.get("retry-after", "").isdigit():
        return "503 without a Retry-After in seconds"
    return None


def bad_answers(records: Iterable[Record], allowed: set[int]) -> list[str]:
    """What is wrong with answers of a status outside `allowed`, or non-200 answers not clean problems."""
    out = []
    for r in records:
        if r.status not in allowed:
            out.append(f"{r.call.tag} {r.call.path}: status {r.status} {r.error or r.body[:200]!r}")
        elif r.status != 200 and (issue := problem_issue(r)) is not None:
            out.append(f"{r.call.tag} {r.call.path}: {issue}")
    return out


def statuses(records: Iterable[Record]) -> dict[str, int]:
    """Count of answers per status ('0' for no answer), sorted by status."""
    counts = Counter(r.status for r in records)
    return {str(k): counts[k] for k in sorted(counts)}


def latency_ms(records: list[Record]) -> dict[str, float]:
    if not records:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0}
    seconds = np.array([r.seconds for r in records])
    return {
        "p50": round(float(np.percentile(seconds, 50)) * 1000, 1),
        "p99": round(float(np.percentile(seconds, 99)) * 1000, 1),
        "max": round(float(seconds.max()) * 1000, 1),
    }


# -- exact reads of stored events --------------------------------------------------------------


def stored_events(redis_url: str, namespace: str, user: str) -> list[tuple[int, int]]:
    """A user's stored (item, timestamp) records in arrival order, read raw from Redis."""
    with redis.Redis.from_url(redis_url, socket_timeout=10) as r:
        raw = r.get(KeySpace(namespace).sequence(user)) or b""
    assert len(raw) % codec.EVENT_BYTES == 0, f"{user}: {len(raw)} bytes is not whole records"
    records = np.frombuffer(raw, dtype=codec.EVENT_DTYPE)
    return list(zip(records["item"].tolist(), records["ts"].tolist(), strict=True))


@dataclass
class EventLedger:
    """Events sent to /v1/events, by outcome: acknowledged (200) or unknown (503, no answer)."""

    acked: Counter[tuple[str, int, int]] = field(default_factory=Counter)
    unknown: Counter[tuple[str, int, int]] = field(default_factory=Counter)
    refused: int = 0  # answered 4xx: certainly not applied

    def add(self, record: Record) -> None:
        user = record.call.json["user_id"]
        events = [(user, e["item_id"], e["timestamp"]) for e in record.call.json["events"]]
        if record.status == 200:
            self.acked.update(events)
        elif record.status in (0, 503):
            self.unknown.update(events)
        else:
            self.refused += len(events)

    @property
    def users(self) -> set[str]:
        return {u for u, _, _ in self.acked} | {u for u, _, _ in self.unknown}

    def check(self, redis_url: str, namespace: str) -> dict[str, int]:
        """Compare with what Redis holds: counts of lost, duplicated and unexpected events."""
        stored: Counter[tuple[str, int, int]] = Counter()
        for user in sorted(self.users):
            stored.update((user, item, ts) for item, ts in stored_events(redis_url, namespace, user))
        lost = sum((self.acked - stored).values())
        # An event whose append timed out was applied once or not at all, never twice.
        duplicated = sum(max(0, n - 1) for n in stored.values())
        unexpected = sum((stored - self.acked - self.unknown).values())
        return {
            "acked_events": sum(self.acked.values()),
            "unknown_outcome_events": sum(self.unknown.values()),
            "unknown_outcome_applied": sum((stored & self.unknown).values()),
            "stored_events": sum(stored.values()),
            "lost": lost,
            "duplicated": duplicated,
            "unexpected": unexpected,
        }


# -- artifacts ---------------------------------------------------------------------------------


def write_artifact(name: str, **fields: Any) -> Path:
    """artifacts/reliability/<name>.json: one row of the reliability report."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.json"
    doc = {"name": name, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
    path.write_text(json.dumps(doc, indent=1, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
