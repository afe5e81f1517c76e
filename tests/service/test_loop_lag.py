"""The event-loop lag monitor: what it measures, what it remembers, and its metric in /metrics."""

from __future__ import annotations

import asyncio
import gc
import re
import time

from service.app import create_app
from service.loop_lag import LoopLagMonitor
from service.metrics import Metrics
from tests.service.conftest import SettingsFactory, TestClient


def _sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in the exposition"
    return float(match.group(1))


async def test_a_held_loop_is_measured_as_a_stall() -> None:
    metrics = Metrics()
    monitor = LoopLagMonitor(metrics.loop_lag, interval_s=0.01)
    monitor.start()
    try:
        await asyncio.sleep(0.05)
        before = time.perf_counter()
        time.sleep(0.3)  # holds the loop: the monitor's wake-up, due within 10 ms, waits for it
        held = time.perf_counter()
        # The stall counts before the monitor has woken (it is overdue) and after (it is recorded).
        overdue = monitor.stalled_between(before, held)
        await asyncio.sleep(0.05)
        recorded = monitor.stalled_between(before, held)
    finally:
        await monitor.aclose()
    assert 0.25 <= overdue <= held - before and 0.25 <= recorded <= held - before
    buckets = {
        s.labels["le"]: s.value
        for metric in metrics.registry.collect()
        for s in metric.samples
        if s.name == "dare_event_loop_lag_seconds_bucket"
    }
    assert buckets["+Inf"] - buckets["0.1"] >= 1  # the wake-up that came 0.3 s late


def test_the_lag_is_in_metrics_and_start_up_is_frozen_out_of_collections(
    make_settings: SettingsFactory,
) -> None:
    with TestClient(create_app(make_settings())) as c:
        # what start-up built is out of the collector's walks (a full collection stalled the loop)
        assert gc.get_freeze_count() > 10_000
        deadline = time.monotonic() + 10
        count = 0.0
        while count < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
            count = _sample(c.get("/metrics").text, "dare_event_loop_lag_seconds_count")
        assert count >= 1
        assert "dare_event_loop_lag_seconds_bucket" in c.get("/metrics").text
