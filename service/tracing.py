"""OpenTelemetry tracing: W3C `traceparent` in and out, a span per stage of a score request.

Off unless the standard variables ask for it (`OTEL_TRACES_EXPORTER`, or an OTLP endpoint), and
then without cost: no middleware is installed and no span is built. When on:

- FastAPI's own telemetry (`FastAPI(telemetry=...)`, given this app's provider, never a global one)
  starts the server span of every HTTP request, as a child of the caller's `traceparent`;
- `TraceparentMiddleware` answers with the `traceparent` of that server span;
- a score request gets child spans for its batching wait, the feature read, stage 1 and stage 2
  (`record_score_spans`), plus its variant, version and FM status on the server span.

The exporter, sampler, resource and batching are the SDK's, read from `OTEL_*` variables
(docs/observability.md lists them).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from fastapi.telemetry import TelemetryConfig
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.scoring import ScoreJob, ScoreOutcome

EXPORTERS = ("otlp", "console")
_TRACEPARENT = TraceContextTextMapPropagator()


class TracingConfigError(ValueError):
    """An `OTEL_*` variable asks for something this service cannot do."""


def exporters_from_env(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The span exporters the environment asks for; empty: tracing off.

    `OTEL_TRACES_EXPORTER` (comma-separated: `otlp`, `console`, `none`) decides. Unset, an OTLP
    endpoint (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`) means `otlp`,
    the specification's default; with neither, tracing stays off (the specification would export
    to localhost:4318, which a service should not do unasked). `OTEL_SDK_DISABLED=true` turns it off.
    """
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ()
    raw = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not raw:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ("otlp",) if endpoint else ()
    names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    if "none" in names:
        return ()
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER={raw!r}: {unknown} unknown; use otlp, console or none"
        )
    if "otlp" in names:
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        if protocol not in (None, "", "http/protobuf"):
            raise TracingConfigError(f"OTLP protocol {protocol!r}: only http/protobuf is installed")
    return names


def span_exporter(name: str) -> SpanExporter:
    """The SDK exporter called `name`; the OTLP one reads its endpoint, headers, timeout and
    compression from the `OTEL_EXPORTER_OTLP_*` variables itself."""
    if name == "console":
        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def service_resource(version: str) -> Resource:
    """`OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES`, with `dare-serve` where they name no service."""
    resource = Resource.create({SERVICE_VERSION: version})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "dare-serve"}))
    return resource


@dataclass(frozen=True, slots=True)
class Tracing:
    """The app's tracer provider and the exporters its lifespan attaches.

    Built from the environment (`from_env`), the app owns the provider: the lifespan attaches the
    exporters and shuts the provider down, flushing what is buffered. A provider handed to
    `create_app` (tests: an in-memory exporter) is the caller's, exported and closed by the caller.
    """

    provider: TracerProvider
    exporters: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, version: str, environ: Mapping[str, str] | None = None) -> Tracing | None:
        names = exporters_from_env(environ)
        if not names:
            return None
        # The sampler comes from OTEL_TRACES_SAMPLER (parent-based, always on, by default).
        return cls(TracerProvider(resource=service_resource(version)), names)

    def telemetry(self) -> TelemetryConfig:
        """FastAPI's telemetry settings: server spans on this provider, nothing else of its own."""
        return {
            "tracer_provider": self.provider,
            "tracing": True,
            "metrics": False,
            "logs": False,
            "operation_spans": False,
            "auto_configure": False,
        }

    @contextlib.contextmanager
    def exporting(self) -> Iterator[Tracer]:
        """The service's tracer while the app runs; the exporters flushed and closed on exit."""
        for name in self.exporters:
            self.provider.add_span_processor(BatchSpanProcessor(span_exporter(name)))
        try:
            yield self.provider.get_tracer("dare-serve")
        finally:
            if self.exporters:
                self.provider.shutdown()


def telemetry_off() -> TelemetryConfig:
    """FastAPI's telemetry settings with tracing off: FastAPI does nothing per request."""
    return {"tracing": False, "metrics": False, "logs": False, "auto_configure": False}


class TraceparentMiddleware:
    """Answers every HTTP request with the W3C `traceparent` of its server span (pure ASGI).

    Runs inside FastAPI's telemetry wrapper, where that span is the current one.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        carrier: dict[str, str] = {}
        if scope["type"] == "http":
            _TRACEPARENT.inject(carrier)
        if not carrier:
            await self.app(scope, receive, send)
            return
        extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in carrier.items()]

        async def send_with_traceparent(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_traceparent)


def record_score_spans(
    tracer: Tracer, variant: str, version: str, job: ScoreJob, outcome: ScoreOutcome
) -> None:
    """Spans of one scored request's stages, children of the current (server) span.

    A batch's feature read and both stages run once for all its requests, in the batcher's task and
    a compute thread, outside any request's context. Spans opened around that work would belong to
    no request, or to the first one, and would need links to reach the others. Each request
    instead gets its own child spans, placed at the times the scorer measured (`Server-Timing`'s
    figures), with the batch's size as an attribute: every trace then shows its request's whole
    path under its own server span, and requests that shared a batch show the same feature and
    stage intervals.
    """
    server: Span = trace.get_current_span()
    s = outcome.scored
    server.set_attributes(
        {
            "dare.variant": variant,
            "dare.model_version": version,
            "dare.fm_embedding": outcome.fm.value,
            "dare.sequence_length": outcome.sequence_length,
            "dare.candidates": len(job.candidates),
        }
    )
    # perf_counter() seconds to the epoch nanoseconds spans carry
    offset_ns = time.time_ns() - time.perf_counter_ns()

    def at(t: float) -> int:
        return offset_ns + int(t * 1e9)

    batch_at = job.submitted + outcome.queue_s
    stage2_at = outcome.stages_at + s.search_s
    batch = {"dare.batch_size": outcome.batch_size}
    for name, start, end, attributes in (
        ("dare.queue", job.submitted, batch_at, batch),
        ("dare.feature_read", batch_at, batch_at + outcome.feature_s, batch),
        ("dare.stage1", outcome.stages_at, stage2_at, {**batch, "dare.behaviors": outcome.sequence_length}),
        ("dare.stage2", stage2_at, stage2_at + s.rank_s, batch),
    ):
        tracer.start_span(name, start_time=at(start), attributes=attributes).end(end_time=at(end))
