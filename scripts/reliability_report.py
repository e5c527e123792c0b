"""Runs the reliability suite (tests/reliability) and rewrites the figures in docs/RELIABILITY.md.

    python scripts/reliability_report.py              # run the suite, then rewrite the figures
    python scripts/reliability_report.py --render-only  # rewrite them from benchmarks/results/reliability.json

The suite records what it measures through its `figures` fixture; this script collects that into
benchmarks/results/reliability.json and renders it between the markers of docs/RELIABILITY.md. Figures are
written only after a green run: a failing suite leaves the document as it was.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = ROOT / "docs" / "RELIABILITY.md"
RESULTS = ROOT / "benchmarks" / "results" / "reliability.json"
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"
# The order sections appear in; any other section follows, alphabetically.
SECTION_ORDER = ("Bad input", "Fuzzing", "Load", "Faults", "Limits")
FIGURES_ENV = "ZSPLIT_RELIABILITY_FIGURES"


def run_suite(pytest_args: list[str]) -> dict[str, Any]:
    """Runs tests/reliability with the figures going to a fresh file; exits if a test fails."""
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "figures.json"
        command = [
            sys.executable,
            "-m",
            "pytest",
            "tests/reliability",
            "-q",
            "-p",
            "no:cacheprovider",
            *pytest_args,
        ]
        print("running:", " ".join(command), flush=True)
        started = datetime.datetime.now(datetime.timezone.utc)
        result = subprocess.run(command, cwd=ROOT, env={**os.environ, FIGURES_ENV: str(target)})
        if result.returncode != 0:
            sys.exit(
                f"the reliability suite failed (exit {result.returncode}); {DOCUMENT.name} was left as it was"
            )
        seconds = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
        figures = json.loads(target.read_text()) if target.exists() else {}
    return {
        "measured_at": started.strftime("%Y-%m-%d %H:%M UTC"),
        "suite_seconds": round(seconds),
        "machine": machine(),
        "figures": figures,
    }


def machine() -> str:
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), {platform.system()} {platform.release()}, Python {platform.python_version()}"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render(report: dict[str, Any]) -> str:
    """The markdown that goes between the markers: one table per section."""
    figures: dict[str, dict[str, dict[str, Any]]] = report["figures"]
    ordered = [name for name in SECTION_ORDER if name in figures]
    ordered += sorted(name for name in figures if name not in SECTION_ORDER)
    lines = [
        f"Measured {report['measured_at']} on {report['machine']}; the suite took {report['suite_seconds']} s. "
        "Regenerate with `python scripts/reliability_report.py`.",
    ]
    for section in ordered:
        lines += ["", f"### {section}", "", "| measurement | value |", "| --- | --- |"]
        for name, row in sorted(figures[section].items()):
            value = f"{row['value']} {row['unit']}".strip()
            if row.get("note"):
                value += f" ({row['note']})"
            lines.append(f"| {_cell(name)} | {_cell(value)} |")
    return "\n".join(lines)


def rewrite(document: str, rendered: str) -> str:
    """Replaces what lies between the markers; everything else stays as written."""
    if BEGIN not in document or END not in document:
        raise SystemExit(f"{DOCUMENT} has no {BEGIN} ... {END} markers to put the figures between")
    head, rest = document.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{rendered}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--render-only", action="store_true", help=f"re-render from {RESULTS.name}")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments, after --")
    args = parser.parse_args(argv)
    if args.render_only:
        report = json.loads(RESULTS.read_text())
    else:
        report = run_suite(args.pytest_args)
        RESULTS.write_text(json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        print(f"wrote {RESULTS.relative_to(ROOT)}")
    DOCUMENT.write_text(rewrite(DOCUMENT.read_text(), render(report)))
    print(f"rewrote the figures in {DOCUMENT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
