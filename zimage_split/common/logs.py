"""Request ids in every log line, and the log formats (`--log-format text|json`)."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

# gRPC metadata key and HTTP header that carry a request's id from service to service.
REQUEST_ID_KEY = "x-request-id"
# Ids come from callers; anything longer, or with other characters, is replaced rather than logged.
MAX_REQUEST_ID_LENGTH = 128
_ALLOWED = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:#/")

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("zsplit_request_id", default="")
LOG_FORMATS = ("text", "json")
# torchao (the [int8] extra) is imported by transformers and diffusers whenever it is installed, and warns at
# import for each CUDA kernel library a CPU-only torch cannot load, for a missing Triton, and (through torch's
# pytree) for each enum it registers; diffusers warns that torchao lacks tensor types it never uses here.
# Nothing a user can act on; these records show at --log-level debug.
NOISY_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao")


def new_request_id() -> str:
    return uuid.uuid4().hex


def current_request_id() -> str:
    """The id of the request this code runs for ("" outside any request)."""
    return _request_id.get()


def usable_request_id(value: str | bytes | None) -> str:
    """`value` if it is a sane id to log and pass on; otherwise a new one."""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if value and len(value) <= MAX_REQUEST_ID_LENGTH and set(value) <= _ALLOWED:
        return value
    return new_request_id()


@contextmanager
def request_scope(request_id: str) -> Iterator[str]:
    """Within the block (and tasks and threads started from it), logs and outgoing calls carry `request_id`."""
    token = _request_id.set(request_id)
    try:
        yield request_id
    finally:
        # Fails only for an abandoned async generator closed from another task's context.
        with contextlib.suppress(ValueError):
            _request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Gives every record a `request_id` attribute ("" outside a request) and `request_tag`, the id as the
    text format shows it (" [id]", or nothing)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = getattr(record, "request_id", "") or _request_id.get()
        record.request_id = request_id
        record.request_tag = f" [{request_id}]" if request_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC), level, logger, message, request_id (null outside a
    request), and the traceback as `exception` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "") or None,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted, not the one at set-up (tests swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def configure_logging(level: str, log_format: str = "text") -> None:
    """Logs to stderr in `log_format`, replacing the handler an earlier call installed (and only that one:
    an application embedding zimage-split keeps its own)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS} (got {log_format!r})")
    handler = _StderrHandler()
    handler.addFilter(RequestIdFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s")
        )
    root = logging.getLogger()
    for old in [old for old in root.handlers if isinstance(old, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in NOISY_IMPORT_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if level.upper() == "DEBUG" else logging.ERROR)
    # Library warnings become log records too, so a JSON log stays all JSON.
    logging.captureWarnings(True)


def route_library_logs() -> None:
    """transformers and diffusers write their own log lines and progress bars to stderr; this sends their
    records through the root logger instead and turns their bars off, so a JSON log stays all JSON."""
    import importlib
    import importlib.util

    # Each role installs only its libraries (an encoder has no diffusers, a client none of them), and a
    # missing one must leave the command to say which extra to install.
    for name in ("transformers", "diffusers"):
        if importlib.util.find_spec(name) is not None:
            library = importlib.import_module(f"{name}.utils.logging")
            library.disable_default_handler()
            library.enable_propagation()
            library.disable_progress_bar()
    if importlib.util.find_spec("huggingface_hub") is None:
        return
    import huggingface_hub.utils

    huggingface_hub.utils.disable_progress_bars()
    # huggingface_hub gives its logger a stderr handler of its own and lets records propagate too, so each
    # line ("Retrying in 1s [Retry 1/5].") would show twice, once unformatted.
    hub_logger = logging.getLogger("huggingface_hub")
    for handler in [handler for handler in hub_logger.handlers if type(handler) is logging.StreamHandler]:
        hub_logger.removeHandler(handler)
