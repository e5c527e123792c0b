"""Maps gRPC failures to the typed errors of zimage_split.common.errors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
from grpc import aio

from zimage_split.common.errors import ZSplitError, error_for_code
from zimage_split.common.interceptors import ORIGIN_KEY, REASON_KEY, RETRY_AFTER_KEY


def from_rpc_error(error: aio.AioRpcError, target: str) -> ZSplitError:
    code = error.code()
    details = error.details() or ""
    metadata = dict(error.trailing_metadata() or ())
    retry_after = int(metadata[RETRY_AFTER_KEY]) / 1000 if RETRY_AFTER_KEY in metadata else None
    if ORIGIN_KEY in metadata:  # the service chose this status and wrote its own advice
        return error_for_code(code.name, details, retry_after, reason=str(metadata.get(REASON_KEY, "")))
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"{target} is unavailable ({details}). Is the service running and reachable?"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        details = (
            f"{target} did not answer in time ({details}). Raise the timeout or check the server's load."
        )
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        # gRPC's own message-size check, before any of our code ran.
        details = (
            f"{target} refused a message over its size limit ({details}). Send less in one call (a shorter "
            "prompt, fewer prompts), or raise the server's --max-message-mb."
        )
    return error_for_code(code.name, details, retry_after)


@contextlib.contextmanager
def typed_errors(target: str) -> Iterator[None]:
    """Raises a failed call in the block as its typed error; `target` ("generator HOST:PORT") names the
    service in the advice for failures no service chose (unreachable, out of time)."""
    try:
        yield
    except aio.AioRpcError as error:
        raise from_rpc_error(error, target) from None
