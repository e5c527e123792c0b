"""Request ids on log records, and the JSON log format."""

from __future__ import annotations

import io
import json
import logging

import pytest

from zimage_split.common.logs import (
    MAX_REQUEST_ID_LENGTH,
    configure_logging,
    current_request_id,
    request_scope,
    usable_request_id,
)


@pytest.fixture
def captured_json() -> io.StringIO:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    configure_logging("INFO", "json")
    stream = io.StringIO()
    root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
    yield stream
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)
    logging.captureWarnings(False)


def test_json_lines_carry_the_request_id_and_the_traceback(captured_json: io.StringIO) -> None:
    log = logging.getLogger("zimage_split.test")
    log.info("outside")
    with request_scope("job-7#2"):
        log.warning("inside %s", "a request")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    lines = [json.loads(line) for line in captured_json.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == ["-", "job-7#2", "job-7#2"]
    assert lines[1]["message"] == "inside a request" and lines[1]["level"] == "WARNING"
    assert lines[1]["logger"] == "zimage_split.test" and lines[1]["time"].endswith("Z")
    assert "ValueError: boom" in lines[2]["exception"]
    assert current_request_id() == ""


def test_python_warnings_are_logged_as_json_too(captured_json: io.StringIO) -> None:
    import warnings

    warnings.warn("an old flag", UserWarning, stacklevel=1)
    (line,) = [json.loads(line) for line in captured_json.getvalue().splitlines()]
    assert "an old flag" in line["message"] and line["level"] == "WARNING"


@pytest.mark.parametrize(
    "given", ["", "has space", "new\nline", "x" * (MAX_REQUEST_ID_LENGTH + 1), "ünicode", b"\xff\xfe"]
)
def test_unusable_request_ids_are_replaced(given: str | bytes) -> None:
    replacement = usable_request_id(given)
    assert replacement != given and len(replacement) == 32


@pytest.mark.parametrize("given", ["abc", "3f2a-11:job#4", "a/b.c_d", b"from-bytes"])
def test_sane_request_ids_are_kept(given: str | bytes) -> None:
    expected = given.decode() if isinstance(given, bytes) else given
    assert usable_request_id(given) == expected


def test_an_unknown_log_format_is_refused() -> None:
    with pytest.raises(ValueError, match="text"):
        configure_logging("INFO", "yaml")
