"""OpenTelemetry spans, when the `opentelemetry-api` package is installed (the `tracing` extra); else nothing.

The gRPC interceptor opens one server span per call; the pipeline adds a child span per Recommend stage
(profile, retrieval, ranking). Retrieval and ranking run on a compute thread, so their spans are recorded
afterwards from the stage's measured start and end instead of being opened on that thread.

Spans go wherever the process's tracer provider sends them: with only the API installed, or no provider set,
they are no-ops. `hyperrec serve` sets up an SDK provider exporting over OTLP when `otlp_endpoint` is set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

try:
    from opentelemetry import trace
except ImportError:  # the tracing extra is not installed
    trace = None  # type: ignore[assignment]

Attributes = Mapping[str, str | int | float | bool]


def enabled() -> bool:
    return trace is not None


@contextlib.contextmanager
def span(name: str, attributes: Attributes | None = None, server: bool = False) -> Iterator[Any]:
    """A span around the block, the current span's child (or nothing without OpenTelemetry)."""
    if trace is None:
        yield None
        return
    kind = trace.SpanKind.SERVER if server else trace.SpanKind.INTERNAL
    with trace.get_tracer("hyperrec").start_as_current_span(name, kind=kind, attributes=attributes) as current:
        yield current


def record_span(name: str, start_ns: int, end_ns: int, attributes: Attributes | None = None) -> None:
    """A finished child span of the current one, from measured wall-clock instants (time.time_ns())."""
    if trace is None:
        return
    done = trace.get_tracer("hyperrec").start_span(name, start_time=start_ns, attributes=attributes)
    done.end(end_time=end_ns)


def annotate(attributes: Attributes) -> None:
    """Set attributes on the current span (the call's server span in the pipeline)."""
    if trace is not None:
        trace.get_current_span().set_attributes(dict(attributes))


def setup_otlp(endpoint: str, service_name: str = "hyperrec") -> None:
    """Send spans to an OTLP/gRPC collector at `endpoint` (needs opentelemetry-sdk and the OTLP exporter)."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
