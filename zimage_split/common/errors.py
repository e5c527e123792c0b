"""Typed errors shared by the engines, the servicers and the SDK; one class per gRPC status code."""

from __future__ import annotations

# Machine-readable reasons. The error interceptor sends an error's reason beside its status, and clients
# branch on it, never on the message text, which is advice for people and may be reworded.
# NOT_FOUND: an embedding_key the generator does not hold (never uploaded, or evicted); upload it again.
EMBEDDING_UNKNOWN = "embedding-unknown"
# NOT_FOUND: an init or mask image key the generator does not hold; upload the image again.
IMAGE_UNKNOWN = "image-unknown"
# RESOURCE_EXHAUSTED: the generator's queue is full; retry later.
BUSY = "busy"
# RESOURCE_EXHAUSTED: the GPU ran out of memory for this request; a retry as it is would fail again (ask for a
# smaller size or fewer images, or change the server's settings).
OUT_OF_MEMORY = "out-of-memory"
# FAILED_PRECONDITION: this install lacks an optional part (an extra such as [generator]) the command needs;
# the message names the `pip install` that adds it. The CLI exits with MISSING_EXTRA_EXIT_STATUS for it.
MISSING_EXTRA = "missing-extra"
MISSING_EXTRA_EXIT_STATUS = 3
# UNAVAILABLE: the service has opened its port but is still loading (or warming up) its model; retry shortly.
LOADING = "loading"


class ZSplitError(Exception):
    """Base class of every error zimage-split raises on purpose.

    `code` names the gRPC status the error travels as; the message says how to fix the problem; `reason`,
    one of the constants above or "", tells a program what happened without parsing the message.
    """

    code = "UNKNOWN"

    def __init__(self, message: str, *, retry_after_seconds: float | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_seconds = retry_after_seconds
        self.reason = reason


class InvalidArgument(ZSplitError):
    code = "INVALID_ARGUMENT"


class NotFound(ZSplitError):
    code = "NOT_FOUND"


class ResourceExhausted(ZSplitError):
    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(ZSplitError):
    """The system is not in a state the call needs (a folder that is read-only, missing or a file, a
    failing disk): retrying the same call fails again until someone fixes that."""

    code = "FAILED_PRECONDITION"


class PermissionDenied(ZSplitError):
    """This process may not do it (a file or folder it has no permission to write)."""

    code = "PERMISSION_DENIED"


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
        FailedPrecondition,
        PermissionDenied,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        DataLoss,
        Internal,
        Unauthenticated,
    )
}


def error_for_code(
    code_name: str, message: str, retry_after_seconds: float | None = None, reason: str = ""
) -> ZSplitError:
    """Builds the typed error for a gRPC status code name (unknown codes map to the base class)."""
    cls = ERRORS_BY_CODE.get(code_name, ZSplitError)
    error = cls(message, retry_after_seconds=retry_after_seconds, reason=reason)
    if cls is ZSplitError:
        error.code = code_name
    return error
