"""Prometheus metrics of one app, on its own CollectorRegistry (no process-global state).

Score metrics carry a `variant` label, so an A/B readout (traffic, latency, FM coverage, cold
starts, unknown items per arm) comes straight from `/metrics`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from feature_store.base import StoreStats

# Seconds; dense between 0.5 ms and 50 ms where a score request lives.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
CANDIDATE_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 300, 500, 750, 1000, 2000, 5000)
# Seconds the event loop woke a periodic sleep late: sub-millisecond when healthy, up to stalls
# longer than the feature budget (250 ms by default).
LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _StoreStatsCollector(Collector):
    """Exports the feature store's own monotonic counters (every call, pings included)."""

    def __init__(self, stats: StoreStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        s = self._stats
        yield CounterMetricFamily(
            "dare_feature_store_client_errors", "Feature-store calls that failed (any caller)", s.errors
        )
        yield CounterMetricFamily(
            "dare_feature_store_client_timeouts", "Feature-store calls that ran out of time", s.timeouts
        )
        yield CounterMetricFamily(
            "dare_feature_store_corrupt_reads", "User values that did not decode", s.corrupt_reads
        )


class Metrics:
    """Every metric the service exports."""

    def __init__(self) -> None:
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "dare_http_requests", "HTTP requests by endpoint, method and status",
            ["endpoint", "method", "status"], registry=r,
        )  # fmt: skip
        self.http_latency = Histogram(
            "dare_http_request_duration_seconds", "HTTP request latency by endpoint",
            ["endpoint", "method"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.score_requests = Counter(
            "dare_score_requests", "Score requests by variant and outcome (ok, unavailable, corrupt, error)",
            ["variant", "outcome"], registry=r,
        )  # fmt: skip
        self.score_latency = Histogram(
            "dare_score_duration_seconds", "Score latency inside the service (queue to result) by variant",
            ["variant"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.stage_latency = Histogram(
            "dare_stage_duration_seconds", "Per-request stage latency: queue, feature, search, rank",
            ["variant", "stage"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.fm_embeddings = Counter(
            "dare_fm_embeddings", "FM embedding lookups by variant and status (hit, miss, stale)",
            ["variant", "status"], registry=r,
        )  # fmt: skip
        self.cold_starts = Counter(
            "dare_cold_starts", "Requests for users with no history and no usable FM embedding",
            ["variant"], registry=r,
        )  # fmt: skip
        self.unknown_items = Counter(
            "dare_unknown_items", "Candidates not in the bundle's vocabulary (scored as the unknown row)",
            ["variant"], registry=r,
        )  # fmt: skip
        self.candidates = Histogram(
            "dare_score_candidates", "Candidates per score request", ["variant"],
            buckets=CANDIDATE_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "dare_batch_size", "Requests per batch (one feature read, one ORT call)", ["variant"],
            buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.feature_store_errors = Counter(
            "dare_feature_store_errors",
            "Feature-store failures seen by requests: unavailable, corrupt, error",
            ["kind"], registry=r,
        )  # fmt: skip
        self.events_appended = Counter(
            "dare_events_appended", "Behaviors appended through POST /v1/events", registry=r
        )
        self.reloads = Counter(
            "dare_model_reloads", "Bundle versions loaded or refused by variant", ["variant", "outcome"],
            registry=r,
        )  # fmt: skip
        self.model_info = Gauge(
            "dare_model_info", "1 for the version serving each variant", ["variant", "version", "model"],
            registry=r,
        )  # fmt: skip
        self.variant_weight = Gauge(
            "dare_variant_weight", "Share of hash-assigned traffic per variant", ["variant"], registry=r
        )
        self.log_written = Counter(
            "dare_impression_log_written", "Log records written, by stream (impressions, events)",
            ["stream"], registry=r,
        )  # fmt: skip
        self.log_dropped = Counter(
            "dare_impression_log_dropped",
            "Log records dropped, by stream and reason (queue_full, write_failed, shutdown, error)",
            ["stream", "reason"], registry=r,
        )  # fmt: skip
        self.log_queue = Gauge("dare_impression_log_queue", "Log records waiting to be written", registry=r)
        self.loop_lag = Histogram(
            "dare_event_loop_lag_seconds", "How late the event loop woke a periodic sleep",
            buckets=LAG_BUCKETS, registry=r,
        )  # fmt: skip
        self.feature_retries = Counter(
            "dare_feature_read_retries",
            "Feature reads tried again because the event loop, not the store, used up their budget",
            registry=r,
        )  # fmt: skip

    def child(self, metric: Counter | Histogram, *values: str) -> Any:
        """`metric.labels(*values)`, kept: `labels` takes a lock and builds its key on every call,
        and a score request records a dozen values. Series still appear on first use only."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def watch_store(self, stats: StoreStats) -> None:
        """Export a feature store's counters from now on."""
        self.registry.register(_StoreStatsCollector(stats))
