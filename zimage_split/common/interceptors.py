"""The one server interceptor that turns exceptions into precise gRPC status codes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from zimage_split.common.errors import ZSplitError

logger = logging.getLogger(__name__)

RETRY_AFTER_KEY = "retry-after-ms"
# Marks a status our own code chose, so clients can tell it from a transport failure.
ORIGIN_KEY = "zsplit-error"


async def _abort(error: Exception, context: aio.ServicerContext, method: str) -> None:
    if isinstance(error, ZSplitError):
        metadata = [(ORIGIN_KEY, error.code)]
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
        if handler.response_streaming:
            behavior = handler.unary_stream or handler.stream_stream

            async def streaming(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async for response in behavior(request, context):
                        yield response
                except Exception as error:
                    if _is_abort(error):
                        raise
                    await _abort(error, context, method)

            factory = (
                grpc.unary_stream_rpc_method_handler
                if handler.unary_stream
                else grpc.stream_stream_rpc_method_handler
            )
            return factory(streaming, handler.request_deserializer, handler.response_serializer)

        behavior = handler.unary_unary or handler.stream_unary

        async def unary(request: Any, context: aio.ServicerContext) -> Any:
            try:
                return await behavior(request, context)
            except Exception as error:
                if _is_abort(error):
                    raise
                await _abort(error, context, method)

        factory = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary
            else grpc.stream_unary_rpc_method_handler
        )
        return factory(unary, handler.request_deserializer, handler.response_serializer)
