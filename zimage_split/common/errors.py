"""Typed errors shared by the engines, the servicers and the SDK; one class per gRPC status code."""

from __future__ import annotations


class ZSplitError(Exception):
    """Base class of every error zimage-split raises on purpose.

    `code` names the gRPC status the error travels as; the message says how to fix the problem.
    """

    code = "UNKNOWN"

    def __init__(self, message: str, *, retry_after_seconds: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_seconds = retry_after_seconds


class InvalidArgument(ZSplitError):
    code = "INVALID_ARGUMENT"


class NotFound(ZSplitError):
    code = "NOT_FOUND"


class ResourceExhausted(ZSplitError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(ZSplitError):
    code = "UNAVAILABLE"


class DeadlineExceeded(ZSplitError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(ZSplitError):
    code = "CANCELLED"


class DataLoss(ZSplitError):
    code = "DATA_LOSS"


class Internal(ZSplitError):
    code = "INTERNAL"


class Unauthenticated(ZSplitError):
    code = "UNAUTHENTICATED"


ERRORS_BY_CODE: dict[str, type[ZSplitError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        DataLoss,
        Internal,
        Unauthenticated,
    )
}


def error_for_code(code_name: str, message: str, retry_after_seconds: float | None = None) -> ZSplitError:
    """Builds the typed error for a gRPC status code name (unknown codes map to the base class)."""
    cls = ERRORS_BY_CODE.get(code_name, ZSplitError)
    error = cls(message, retry_after_seconds=retry_after_seconds)
    if cls is ZSplitError:
        error.code = code_name
    return error
