"""`zsplit bench`: the benchmarks of a source checkout (`python -m benchmarks`), with all their flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zimage_split.common.errors import NotFound


def add_command(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench",
        help="run the benchmarks against diffusers (python -m benchmarks; needs a source checkout)",
        add_help=False,  # --help goes to the benchmark runner with the rest
    )
    bench.set_defaults(handler=bench)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)


def bench(args: argparse.Namespace) -> int:
    return run_benchmarks(args.bench_args)


def run_benchmarks(arguments: list[str]) -> int:
    """`zsplit bench` is `python -m benchmarks`: the benchmarks live beside the package in a checkout."""
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / "benchmarks" / "__main__.py").is_file():
        raise NotFound(
            "zsplit bench runs the benchmarks of a source checkout, and this zimage-split was installed "
            "without one. Clone the repository, `pip install -e .` from it, and run `zsplit bench` again."
        )
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    from benchmarks.__main__ import main as run

    result: int = run(arguments)
    return result
