"""Request ids on log records, and the JSON log format."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from zimage_split.common.logs import (
    MAX_REQUEST_ID_LENGTH,
    configure_logging,
    current_request_id,
    request_scope,
    usable_request_id,
)


@pytest.fixture
def json_lines(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[], list[dict[str, str]]]]:
    """Logging set up as `--log-format json` does; call the fixture's value for the lines so far."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    configure_logging("INFO", "json")
    configure_logging("INFO", "json")  # a second call replaces the first handler, never doubles lines
    yield lambda: [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)
    logging.captureWarnings(False)


def test_json_lines_carry_the_request_id_and_the_traceback(json_lines) -> None:  # type: ignore[no-untyped-def]
    log = logging.getLogger("zimage_split.test")
    log.info("outside")
    with request_scope("job-7#2"):
        log.warning("inside %s", "a request")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    lines = json_lines()
    assert [line["request_id"] for line in lines] == [None, "job-7#2", "job-7#2"]
    assert lines[1]["message"] == "inside a request" and lines[1]["level"] == "WARNING"
    assert lines[1]["logger"] == "zimage_split.test" and lines[1]["time"].endswith("Z")
    assert "ValueError: boom" in lines[2]["exception"]
    assert current_request_id() == ""


def test_python_warnings_are_logged_as_json_too(json_lines) -> None:  # type: ignore[no-untyped-def]
    import warnings

    warnings.warn("an old flag", UserWarning, stacklevel=1)
    (line,) = json_lines()
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


def test_torchaos_import_noise_is_kept_out_of_the_log_unless_debugging(json_lines) -> None:  # type: ignore[no-untyped-def]
    logging.getLogger("torchao").warning("Failed to load _C_mxfp8.so")
    logging.getLogger("zimage_split.test").warning("kept")
    assert [line["message"] for line in json_lines()] == ["kept"]
    configure_logging("DEBUG", "json")
    logging.getLogger("torchao").warning("Failed to load _C_mxfp8.so")
    assert [line["message"] for line in json_lines()] == ["Failed to load _C_mxfp8.so"]
    configure_logging("INFO", "json")


def test_huggingface_hub_lines_show_once() -> None:
    """huggingface_hub's logger has a stderr handler of its own; its records go through ours alone."""
    script = (
        "import logging\n"
        "from zimage_split.common.logs import configure_logging, route_library_logs\n"
        "configure_logging('INFO')\n"
        "route_library_logs()\n"
        "logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "Retrying in 1s" in line]
    assert len(lines) == 1 and "WARNING huggingface_hub.utils._http" in lines[0], result.stderr
