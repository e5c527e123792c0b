"""Server interceptors: the one that turns exceptions into precise gRPC status codes, the serving gate
that refuses new calls while the server drains, the observer that gives calls request ids, spans and
metrics, and the one that lets tensor chunk messages bypass protobuf."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

from zimage_split.common import tracing, wire
from zimage_split.common.errors import LOADING, InvalidArgument, Unavailable, ZSplitError
from zimage_split.common.logs import REQUEST_ID_KEY, request_scope, usable_request_id
from zimage_split.common.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

RETRY_AFTER_KEY = "retry-after-ms"
# Marks a status our own code chose, so clients can tell it from a transport failure.
ORIGIN_KEY = "zsplit-error"
# The error's machine-readable reason (common.errors), sent beside the origin when the error has one.
REASON_KEY = "zsplit-reason"
HEALTH_PREFIX = "/grpc.health.v1.Health/"

UnaryBehavior = Callable[[Any, aio.ServicerContext], Awaitable[Any]]
StreamingBehavior = Callable[[Any, aio.ServicerContext], AsyncIterator[Any]]


_KEEP = object()


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    unary: Callable[[UnaryBehavior], UnaryBehavior],
    streaming: Callable[[StreamingBehavior], StreamingBehavior],
    request_deserializer: Any = _KEEP,
    response_serializer: Any = _KEEP,
) -> grpc.RpcMethodHandler:
    """The same kind of handler as `handler`, its behavior wrapped by `unary` or `streaming` (and its
    request deserializer or response serializer replaced, when one is given; a None deserializer means the
    behavior gets the raw bytes)."""
    deserializer = handler.request_deserializer if request_deserializer is _KEEP else request_deserializer
    serializer = handler.response_serializer if response_serializer is _KEEP else response_serializer
    if handler.response_streaming:
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                streaming(handler.unary_stream), deserializer, serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            streaming(handler.stream_stream), deserializer, serializer
        )
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), deserializer, serializer)
    return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), deserializer, serializer)


def _undecodable(method: str, error: DecodeError) -> InvalidArgument:
    return InvalidArgument(
        f"The request to {method} is not a valid protobuf message of its type ({error}). Build it from the "
        ".proto files in proto/zimage/ (or use the zimage_split SDK)."
    )


async def _abort(error: Exception, context: aio.ServicerContext, method: str) -> None:
    if isinstance(error, DecodeError):  # a streamed request message that does not parse
        error = _undecodable(method, error)
    if isinstance(error, ZSplitError):
        metadata = [(ORIGIN_KEY, error.code)]
        if error.reason:
            metadata.append((REASON_KEY, error.reason))
        if error.retry_after_seconds is not None:
            metadata.append((RETRY_AFTER_KEY, str(int(error.retry_after_seconds * 1000))))
        context.set_trailing_metadata(tuple(metadata))
        await context.abort(grpc.StatusCode[error.code], error.message)
    logger.exception("Unexpected error in %s", method)
    await context.abort(
        grpc.StatusCode.INTERNAL, f"Internal error in {method}: {type(error).__name__}. See the server log."
    )


def _is_abort(error: BaseException) -> bool:
    # context.abort() raises this to unwind the handler; it must pass through untouched.
    return isinstance(error, aio.AbortError)


class ErrorMappingInterceptor(aio.ServerInterceptor):
    """Maps ZSplitError subclasses to their status code; anything else becomes a logged INTERNAL."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        # gRPC parses a single request message before any handler runs and answers UNKNOWN when it does not
        # parse; parsing it here instead turns that into INVALID_ARGUMENT.
        parse = None if handler.request_streaming else handler.request_deserializer

        def parsed(request: Any) -> Any:
            if parse is None:
                return request
            try:
                return parse(request)
            except DecodeError as error:
                raise _undecodable(method, error) from None

        def streaming(behavior: StreamingBehavior) -> StreamingBehavior:
            async def mapped(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async for response in behavior(parsed(request), context):
                        yield response
                except Exception as error:
                    if _is_abort(error):
                        raise
                    await _abort(error, context, method)

            return mapped

        def unary(behavior: UnaryBehavior) -> UnaryBehavior:
            async def mapped(request: Any, context: aio.ServicerContext) -> Any:
                try:
                    return await behavior(parsed(request), context)
                except Exception as error:
                    if _is_abort(error):
                        raise
                    await _abort(error, context, method)

            return mapped

        if parse is None:
            return wrap_handler(handler, unary, streaming)
        return wrap_handler(handler, unary, streaming, request_deserializer=None)


class ServingGate(aio.ServerInterceptor):
    """Counts the calls in flight, and refuses new ones with UNAVAILABLE (health is exempt) while the
    service is still loading its model (reason `loading`) and once closed for a drain.

    It sits inside ErrorMappingInterceptor, which turns the refusal into its status code.
    """

    def __init__(self, service: str = "service", *, loaded: bool = True) -> None:
        self.service = service
        self.is_open = True
        # False from the moment the port opens until the model has loaded and warmed up (`mark_loaded`).
        self.loaded = loaded
        self.started = time.monotonic()
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._given_up = asyncio.Event()

    def close(self) -> None:
        self.is_open = False

    def mark_loaded(self) -> None:
        self.loaded = True

    def give_up(self) -> None:
        """Ends a `wait_idle` early (a second shutdown signal)."""
        self._given_up.set()

    @property
    def given_up(self) -> bool:
        return self._given_up.is_set()

    async def wait_idle(self, timeout: float | None) -> bool:
        """True once no call is in flight; False if `timeout` seconds pass, or `give_up()`, first."""
        waits = {asyncio.ensure_future(self._idle.wait()), asyncio.ensure_future(self._given_up.wait())}
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        return self._idle.is_set()

    def _enter(self, method: str) -> None:
        if not self.is_open:
            raise Unavailable(
                f"The server is shutting down and takes no new calls ({method}); retry against another "
                "replica, or once it has restarted.",
                retry_after_seconds=1.0,
            )
        if not self.loaded:
            raise Unavailable(
                f"The {self.service} is still loading its model (started {time.monotonic() - self.started:.0f} "
                f"s ago); retry shortly. Its health check says SERVING once it is ready.",
                retry_after_seconds=2.0,
                reason=LOADING,
            )
        self.in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler

        def streaming(behavior: StreamingBehavior) -> StreamingBehavior:
            async def gated(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                self._enter(method)
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    self._leave()

            return gated

        def unary(behavior: UnaryBehavior) -> UnaryBehavior:
            async def gated(request: Any, context: aio.ServicerContext) -> Any:
                self._enter(method)
                try:
                    return await behavior(request, context)
                finally:
                    self._leave()

            return gated

        return wrap_handler(handler, unary, streaming)


def _final_code(context: aio.ServicerContext, error: BaseException | None) -> str:
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "OK" if error is None else "UNKNOWN"


class CallObserver(aio.ServerInterceptor):
    """The outermost interceptor: runs each call under its request id (the caller's `x-request-id`, or a
    new one) so logs and onward calls carry it, inside a trace span when OpenTelemetry is installed, and
    counts it in `metrics` with its final status code. Health checks are left out."""

    def __init__(self, metrics: ServiceMetrics | None = None) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        carrier = {
            key: value
            for key, value in handler_call_details.invocation_metadata or ()
            if isinstance(value, str)
        }
        request_id = usable_request_id(carrier.get(REQUEST_ID_KEY))
        name = method.rsplit("/", 1)[-1]
        attributes = {"rpc.system": "grpc", "rpc.method": name, "zsplit.request_id": request_id}

        span_name = method.lstrip("/")

        def begin() -> float:
            if self.metrics is not None:
                self.metrics.in_flight.labels(self.metrics.service).inc()
            return time.perf_counter()

        def finish(context: aio.ServicerContext, started: float, error: BaseException | None) -> None:
            seconds, code = time.perf_counter() - started, _final_code(context, error)
            # The access log: one line per call, carrying its request id like every line logged during it.
            logger.info("%s %s %.3f s", name, code, seconds)
            if self.metrics is not None:
                self.metrics.in_flight.labels(self.metrics.service).dec()
                self.metrics.count_request(name, code, seconds)

        def streaming(behavior: StreamingBehavior) -> StreamingBehavior:
            async def observed(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                with request_scope(request_id):
                    started, error = begin(), None
                    try:
                        with tracing.server_span(span_name, carrier, attributes):
                            async for response in behavior(request, context):
                                yield response
                    except BaseException as failure:
                        error = failure
                        raise
                    finally:
                        finish(context, started, error)

            return observed

        def unary(behavior: UnaryBehavior) -> UnaryBehavior:
            async def observed(request: Any, context: aio.ServicerContext) -> Any:
                with request_scope(request_id):
                    started, error = begin(), None
                    try:
                        with tracing.server_span(span_name, carrier, attributes):
                            return await behavior(request, context)
                    except BaseException as failure:
                        error = failure
                        raise
                    finally:
                        finish(context, started, error)

            return observed

        return wrap_handler(handler, unary, streaming)


class ChunkMessages(aio.ServerInterceptor):
    """For the calls that stream tensor chunks (wire.CHUNK_MESSAGE_METHODS): a chunk request reaches the
    servicer as a memoryview (wire.read_chunk_or), and a servicer may yield a chunk response already written
    by wire.encode_chunk_message, which goes out as it is. Protobuf would copy each chunk twice on each side;
    every other message is parsed and written by protobuf as usual."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method not in wire.CHUNK_MESSAGE_METHODS:
            return handler
        return wrap_handler(
            handler,
            lambda behavior: behavior,
            lambda behavior: behavior,
            request_deserializer=wire.read_chunk_or(handler.request_deserializer)
            if handler.request_streaming
            else _KEEP,
            response_serializer=wire.write_message if handler.response_streaming else _KEEP,
        )
