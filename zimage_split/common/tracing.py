"""OpenTelemetry spans across client, gateway, generator and encoder: used when `opentelemetry-api` is
installed (the `otel` extra), a no-op otherwise. Spans go wherever the process's tracer provider sends them,
e.g. under `opentelemetry-instrument` with OTEL_* settings."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Mapping, MutableSequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from typing import Any

try:
    from opentelemetry import context as otel_context
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
    """start_as_current_span, except that leaving it from another context is quiet.

    A streaming call's handler is an async generator: when its client goes away, grpc or the event loop may
    close it from another task, whose context never held the span. OpenTelemetry's own detach then logs
    "Failed to detach context" with a traceback; there is nothing to undo in that context.
    """
    parent = propagate.extract(carrier)
    span = trace.get_tracer(TRACER_NAME).start_span(
        name, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes
    )
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    try:
        yield span
    except Exception as error:
        span.record_exception(error)
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        raise
    finally:
        span.end()
        _detach(token)


def _detach(token: Any) -> None:
    if not isinstance(token, contextvars.Token):  # a runtime context other than contextvars': its own rules
        otel_context.detach(token)
        return
    # ValueError: made in another context (see _span), which is gone with its task.
    with suppress(ValueError):
        token.var.reset(token)


def inject(metadata: MutableSequence[tuple[str, str]]) -> None:
    """Adds the current trace context (`traceparent`, `tracestate`) to outgoing call metadata."""
    if trace is None:
        return
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    metadata.extend(carrier.items())
