"""`zsplit --help` and the commands that need no model leave torch, diffusers and transformers unimported.

Each command runs in a fresh interpreter, so nothing another test imported counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "diffusers", "transformers")
PROBE = """
import json, sys
from zimage_split.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print(json.dumps([name for name in {heavy!r} if name in sys.modules]))
"""


def heavy_modules_imported(argv: list[str], cwd: Path = ROOT) -> list[str]:
    """The heavy packages in sys.modules after `zsplit ARGV` ran in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(argv=argv, heavy=HEAVY)],
        cwd=cwd,
        # The checkout under test, and no ZSPLIT_* settings from whoever runs the tests.
        env={k: v for k, v in os.environ.items() if not k.startswith("ZSPLIT_")} | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    imported: list[str] = json.loads(result.stdout.strip().splitlines()[-1])
    return imported


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["generate", "--help"],
        ["serve", "generator", "--help"],
        ["config", "show", "generator"],
        ["config", "show", "client"],
    ],
)
def test_the_command_imports_no_model_library(argv: list[str]) -> None:
    assert heavy_modules_imported(argv) == []


def test_templates_imports_no_model_library() -> None:
    assert heavy_modules_imported(["templates"]) == []
