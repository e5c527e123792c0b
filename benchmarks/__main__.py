"""Runs every benchmark and writes benchmarks/results/<date>-<device>.json plus a markdown summary beside it.

    python -m benchmarks                 # every benchmark on the bench model (32 minutes on 2 cores, 2026-12-05)
    python -m benchmarks --quick         # tiny model, one round each: checks the harness, figures mean nothing
    python -m benchmarks --only encode,transfer
    zsplit bench ...                     # the same command

Each benchmark runs in its own Python process (`python -m benchmarks.bench_<name>`), so one that crashes
or leaves Ray running cannot skew the next; its own output streams through as it runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import RESULTS, machine_info

ROOT = Path(__file__).resolve().parent.parent
# Cheapest first, so a quick look at the first results does not wait for Ray.
BENCHMARKS = (
    "encode",
    "encoder_host",
    "int8",
    "encoder_pool",
    "transfer",
    "generate",
    "threads",
    "features",
    "batch",
    "ray",
    "gpu",
)
# Where --update-readme puts the headline figures, between the markers below (the flag kept its name when the
# figures moved out of README.md).
FIGURES = ROOT / "docs" / "benchmarks.md"
README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"


def device_name(device: str, machine: dict) -> str:
    """What the results file is named after: the GPU's name on CUDA, else the CPU model and core count."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return f"{machine['cpu_count']} x {machine['cpu']}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def resolve_device(device: str) -> str:
    """auto is CUDA when torch sees a GPU, else the CPU; an explicit CUDA device must exist."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device}: this torch ({torch.__version__}) sees no CUDA device. Install a CUDA "
            "build of torch on a GPU host, or use --device cpu (the GPU figures are then not measured)."
        )
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device {device}: use auto, cpu, cuda or cuda:N")
    return device


def run_one(name: str, args: argparse.Namespace, device: str, scratch: Path) -> dict:
    """Runs `benchmarks.bench_<name>` in a child process and returns its JSON, or what went wrong."""
    out = scratch / f"{name}.json"
    command = [sys.executable, "-m", f"benchmarks.bench_{name}", "--out", str(out), "--device", device]
    if args.quick:
        command.append("--quick")
    if args.model:
        command += ["--model", args.model]
    if args.rounds:
        command += ["--rounds", str(args.rounds)]
    environment = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    }
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, env=environment, check=False)
    seconds = time.perf_counter() - started
    if completed.returncode != 0 or not out.exists():
        return {
            "benchmark": name,
            "error": f"`{' '.join(command[1:])}` exited with {completed.returncode}; its output is above",
            "runner_seconds": seconds,
        }
    result = json.loads(out.read_text())
    result["runner_seconds"] = seconds
    return result


def format_number(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def markdown(summary: dict) -> str:
    """The human summary: one table of headline figures, then what was not measured and why."""
    machine = summary["machine"]
    lines = [
        f"# Benchmarks, {summary['date']}, {summary['device']}",
        "",
        f"Machine: {machine['cpu_count']} x {machine['cpu']}"
        + (f", {summary['gpu']}" if summary.get("gpu") else ", no GPU")
        + f"; torch {machine['torch']}, diffusers {machine['diffusers']}; commit {machine['git_commit']}"
        + (" (with uncommitted changes)" if machine["git_dirty"] else "")
        + f". Model preset: {summary['model']}."
        + (" **Quick mode: the figures only show that the harness works.**" if summary["quick"] else ""),
        "",
        "| benchmark | what | ours | baseline | unit | ratio | target | met |",
        "| --- | --- | ---: | ---: | --- | ---: | --- | --- |",
    ]
    for row in summary["headline"]:
        met = {True: "yes", False: "**no**", None: ""}[row["target_met"]]
        baseline = format_number(row["baseline"])
        if row["baseline_name"] and row["baseline"] is not None:
            baseline = f"{baseline} ({row['baseline_name']})"
        ratio = format_number(row["ratio"])
        if row["ratio"] is not None and row["ratio_meaning"]:
            ratio = f"{ratio} ({row['ratio_meaning']})"
        lines.append(
            f"| {row['benchmark']} | {row['metric']} | {format_number(row['ours'])} | {baseline} | "
            f"{row['unit']} | {ratio} | {row['target']} | {met} |"
        )
    notes = [
        f"- {row['benchmark']}, {row['metric']}: {row['note']}" for row in summary["headline"] if row["note"]
    ]
    if notes:
        lines += ["", "Notes:", "", *notes]
    missing = [
        f"- **{name}**: {result.get('error') or result.get('skipped')}"
        for name, result in summary["benchmarks"].items()
        if result.get("error") or result.get("skipped")
    ] + [f"- {line}" for line in summary["not_measured"]]
    if missing:
        lines += ["", "Not measured:", "", *missing]
    lines += ["", f"Full results: `{summary['json_name']}`. Total time {summary['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def update_readme(readme: Path, summary_markdown: str, summary_path: str) -> None:
    """Puts the latest figures between the bench markers of `readme` (the table and its notes only)."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_BEGIN} ... {README_END} block to fill in.")
    body = summary_markdown.split("\n", 2)[2].strip()  # drop the title line
    body += f"\n\nFrom `{summary_path}`; rerun with `python -m benchmarks --update-readme`."
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_BEGIN}\n{body}\n{README_END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, smallest sizes, one round each")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    parser.add_argument("--model", default=None, help="preset or folder for every benchmark (their defaults)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds for every benchmark (their defaults)"
    )
    parser.add_argument(
        "--device", default="auto", help="device of the gpu benchmark: auto, cpu, cuda, cuda:N"
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where results go (benchmarks/results)")
    parser.add_argument(
        "--update-readme", action="store_true", help="also put the headline figures into docs/benchmarks.md"
    )
    args = parser.parse_args(argv)
    chosen = [name for name in (args.only.split(",") if args.only else BENCHMARKS) if name]
    unknown = sorted(set(chosen + [n for n in args.skip.split(",") if n]) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    chosen = [name for name in chosen if name not in args.skip.split(",")]
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.quick and args.update_readme:
        parser.error("--update-readme with --quick would quote figures that mean nothing; drop one")
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    try:
        args.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"cannot create --out-dir {args.out_dir}: {error}")

    started = time.perf_counter()
    date = datetime.date.today().isoformat()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="zsplit-bench-") as scratch:
        for index, name in enumerate(chosen, 1):
            print(f"\n=== [{index}/{len(chosen)}] {name} ===", flush=True)
            results[name] = run_one(name, args, device, Path(scratch))
            print(f"=== {name}: {results[name]['runner_seconds']:.0f} s ===", flush=True)

    machine = machine_info()
    name = device_name(device, machine)
    stem = f"{date}-{slug(name)}" + ("-quick" if args.quick else "")
    summary = {
        "suite": "zimage-split benchmarks",
        "date": date,
        "device": name,
        "gpu": name if device.startswith("cuda") else None,
        "quick": args.quick,
        "model": args.model or ("tiny" if args.quick else "bench (gpu: full)"),
        "machine": machine,
        "seconds": time.perf_counter() - started,
        "json_name": f"{stem}.json",
        "headline": [row for result in results.values() for row in result.get("headline", [])],
        "not_measured": [line for result in results.values() for line in result.get("not_measured", [])],
        "benchmarks": results,
    }
    json_path, md_path = args.out_dir / f"{stem}.json", args.out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    summary_markdown = markdown(summary)
    md_path.write_text(summary_markdown)
    print("\n" + summary_markdown)
    print(f"wrote {json_path} and {md_path}")
    if args.update_readme:
        relative = md_path.resolve().relative_to(ROOT) if md_path.resolve().is_relative_to(ROOT) else md_path
        update_readme(FIGURES, summary_markdown, str(relative))
        print(f"updated the figures in {FIGURES.relative_to(ROOT)}")
    failed = [name for name, result in results.items() if "error" in result]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
