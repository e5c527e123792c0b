"""OpenTelemetry spans across client, gateway, generator and encoder: used when `opentelemetry-api` is
installed (the `otel` extra), a no-op otherwise. Spans go wherever the process's tracer provider sends them,
e.g. under `opentelemetry-instrument` with OTEL_* settings."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableSequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

try:
    from opentelemetry import propagate, trace
except ImportError:  # tracing is optional
    trace = None  # type: ignore[assignment]

TRACER_NAME = "zimage_split"


def enabled() -> bool:
    return trace is not None


def server_span(
    name: str, carrier: Mapping[str, str], attributes: dict[str, Any]
) -> AbstractContextManager[Any]:
    """A SERVER span for one incoming call, child of the caller's span when `carrier` (its metadata or
    headers) carries a W3C `traceparent`."""
    if trace is None:
        return nullcontext()
    return _span(name, carrier, attributes)


@contextmanager
def _span(name: str, carrier: Mapping[str, str], attributes: dict[str, Any]) -> Iterator[Any]:
    parent = propagate.extract(carrier)
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        name, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes
    ) as span:
        yield span


def inject(metadata: MutableSequence[tuple[str, str]]) -> None:
    """Adds the current trace context (`traceparent`, `tracestate`) to outgoing call metadata."""
    if trace is None:
        return
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    metadata.extend(carrier.items())
