"""The server span of a streaming call may be closed from another task's context (its client went away):
that is quiet, and the span still ends."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from zimage_split.common import tracing


def test_a_stream_closed_from_another_context_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    from opentelemetry import trace

    async def stream() -> AsyncIterator[int]:
        with tracing.server_span("test/Stream", {}, {}):
            yield 1
            yield 2

    async def main() -> None:
        generator = stream()
        # Started in one task, as grpc serves a call...
        first = await asyncio.get_running_loop().create_task(generator.__anext__())  # type: ignore[arg-type]
        assert first == 1
        # ...and closed from another, as when the call is cancelled.
        await asyncio.get_running_loop().create_task(generator.aclose())  # type: ignore[arg-type]

    with caplog.at_level(logging.DEBUG, logger="opentelemetry"):
        asyncio.run(main())
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")], caplog.text
    # The span leaves nothing current behind in this context.
    assert not trace.get_current_span().get_span_context().is_valid


def test_a_failure_passes_through_and_restores_the_context() -> None:
    from opentelemetry import context

    before = context.get_current()
    with pytest.raises(RuntimeError, match="boom"), tracing.server_span("test/Unary", {}, {"k": "v"}):
        assert context.get_current() != before  # the span's context is current inside
        raise RuntimeError("boom")
    assert context.get_current() == before
