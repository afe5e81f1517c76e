"""Tracing: a caller's `traceparent` continued, the stages as child spans, OTLP export from OTEL_*."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from typer.testing import CliRunner

from service.app import create_app
from service.cli import app as cli
from service.tracing import TracingConfigError, exporters_from_env
from tests.conftest import ServedData
from tests.service.conftest import SettingsFactory, TestClient

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_ID = 0x00F067AA0BA902B7
STAGES = ("dare.queue", "dare.feature_read", "dare.stage1", "dare.stage2")


def _server_span(spans: tuple[ReadableSpan, ...], trace_id: int) -> ReadableSpan:
    found = [s for s in spans if s.kind == SpanKind.SERVER and s.context.trace_id == trace_id]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def _children(spans: tuple[ReadableSpan, ...], parent: ReadableSpan) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id}


@pytest.mark.parametrize("batched", [True, False])
def test_a_traceparent_is_continued_and_the_stages_are_its_children(
    make_settings: SettingsFactory, served: ServedData, batched: bool
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    body = {"user_id": served.fm_users[0], "candidates": served.items[:7], "timestamp": served.now}
    incoming = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"
    app = create_app(make_settings(batch_enabled=batched), tracer_provider=provider)
    with TestClient(app) as c:
        r = c.post("/v1/score", json=body, headers={"traceparent": incoming})
        assert r.status_code == 200, r.text
        fresh = c.post("/v1/score", json=body)  # no traceparent: a trace of its own
    spans = exporter.get_finished_spans()

    server = _server_span(spans, TRACE_ID)
    assert server.parent is not None and server.parent.span_id == PARENT_ID and server.parent.is_remote
    assert r.headers["traceparent"] == f"00-{TRACE_ID:032x}-{server.context.span_id:016x}-01"
    assert server.name == "POST /v1/score"
    attrs = server.attributes or {}
    assert attrs["http.route"] == "/v1/score" and attrs["http.response.status_code"] == 200
    answer = r.json()
    assert (
        attrs["dare.variant"] == answer["variant"] and attrs["dare.model_version"] == answer["model_version"]
    )
    assert attrs["dare.fm_embedding"] == "hit" and attrs["dare.candidates"] == 7
    assert attrs["dare.sequence_length"] == answer["user"]["sequence_length"]

    stages = _children(spans, server)
    assert set(stages) == set(STAGES)
    for name in STAGES:
        span = stages[name]
        assert span.context.trace_id == TRACE_ID
        assert span.start_time is not None and span.end_time is not None
        assert span.start_time <= span.end_time
        assert (span.attributes or {})["dare.batch_size"] == 1
    assert (stages["dare.stage1"].attributes or {})["dare.behaviors"] == answer["user"]["sequence_length"]
    # in the order they ran, inside the server span (to the clock conversion's microsecond)
    edges = [server.start_time] + [t for n in STAGES for t in (stages[n].start_time, stages[n].end_time)]
    edges.append(server.end_time)
    assert all(
        a is not None and b is not None and a <= b + 10_000 for a, b in zip(edges, edges[1:], strict=False)
    )

    other_trace = int(fresh.headers["traceparent"].split("-")[1], 16)
    assert other_trace not in (0, TRACE_ID)
    root = _server_span(spans, other_trace)
    assert root.parent is None and set(_children(spans, root)) == set(STAGES)


def test_tracing_is_off_by_default(make_settings: SettingsFactory, served: ServedData) -> None:
    app = create_app(make_settings())
    assert not any(m.cls.__name__ == "TraceparentMiddleware" for m in app.user_middleware)
    body = {"user_id": served.users[0], "candidates": served.items[:3]}
    incoming = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"
    with TestClient(app) as c:
        r = c.post("/v1/score", json=body, headers={"traceparent": incoming})
        assert r.status_code == 200 and "traceparent" not in r.headers
        assert c.app_state["dare"].tracer is None


@pytest.mark.parametrize(
    ("env", "exporters"),
    [
        ({}, ()),
        ({"OTEL_TRACES_EXPORTER": "none"}, ()),
        ({"OTEL_TRACES_EXPORTER": "console"}, ("console",)),
        ({"OTEL_TRACES_EXPORTER": "otlp, console"}, ("otlp", "console")),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ("otlp",)),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ("otlp",)),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, ()),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, ("otlp",)),
    ],
)
def test_exporters_from_the_standard_variables(env: dict[str, str], exporters: tuple[str, ...]) -> None:
    assert exporters_from_env(env) == exporters


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"},
    ],
)
def test_exporters_the_service_cannot_serve_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(TracingConfigError):
        exporters_from_env(env)


class _Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP trace receiver: keeps every export request it is sent."""

    received: list[tuple[str, bytes]]

    def do_POST(self) -> None:  # noqa: N802 (the handler's protocol)
        size = int(self.headers["Content-Length"])
        self.received.append((self.path, self.rfile.read(size)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def collector() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    received: list[tuple[str, bytes]] = []
    handler = type("Collector", (_Collector,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def test_otlp_export_is_configured_by_the_otel_variables(
    make_settings: SettingsFactory,
    served: ServedData,
    collector: tuple[str, list[tuple[str, bytes]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint, received = collector
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "ranker-under-test")
    body = {"user_id": served.users[1], "candidates": served.items[:3]}
    with TestClient(create_app(make_settings())) as c:
        r = c.post("/v1/score", json=body, headers={"traceparent": f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"})
        assert r.status_code == 200
    # the lifespan's end flushed the batch processor: everything has been sent
    names, services = set(), set()
    for path, payload in received:
        assert path == "/v1/traces"
        request = ExportTraceServiceRequest.FromString(payload)
        for resource_spans in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            services.add(attrs["service.name"])
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    assert span.trace_id == TRACE_ID.to_bytes(16, "big")
                    names.add(span.name)
    assert services == {"ranker-under-test"}
    assert {"POST /v1/score", *STAGES} <= names


def test_serve_refuses_a_tracing_environment_it_cannot_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    bad = CliRunner().invoke(cli, ["serve", "--bundles", str(tmp_path)])
    assert bad.exit_code == 2 and "invalid tracing settings" in bad.output and "zipkin" in bad.output
