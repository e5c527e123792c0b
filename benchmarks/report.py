"""What both benchmarks record besides their timings: the machine, summary statistics, the JSON file."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Settings:
    """What the runner (`python -m benchmarks`) passes to every benchmark's `measure(settings)`.

    `quick` is the test suite's mode: the tiny model, the smallest sizes and one round, to show the
    harness works and writes well-formed JSON; its figures mean nothing.
    """

    model: str = "bench"  # a preset (tiny, bench, full) or a diffusers folder
    quick: bool = False
    rounds: int | None = None  # None: the benchmark's own default (1 when quick)
    device: str = "cpu"  # cpu, cuda or cuda:N

    def rounds_or(self, default: int) -> int:
        return self.rounds if self.rounds is not None else (1 if self.quick else default)


def headline_row(
    benchmark: str,
    metric: str,
    *,
    unit: str,
    ours: float | None,
    baseline: float | None = None,
    baseline_name: str = "",
    ratio: float | None = None,
    ratio_meaning: str = "",
    target: str = "",
    target_met: bool | None = None,
    note: str = "",
) -> dict:
    """One line of the markdown summary. `ratio_meaning` says which way is better ("ours / diffusers")."""
    return {
        "benchmark": benchmark,
        "metric": metric,
        "unit": unit,
        "ours": ours,
        "baseline": baseline,
        "baseline_name": baseline_name,
        "ratio": ratio,
        "ratio_meaning": ratio_meaning,
        "target": target,
        "target_met": target_met,
        "note": note,
    }


def machine_info() -> dict:
    """Enough to tell two runs apart: CPU, load at the start, library versions, torch threads."""
    import diffusers
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=RESULTS.parent, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        # Other processes on the host skew both sides alike (the rounds interleave), but say so.
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def model_info(folder: str, name: str) -> dict:
    """The sizes actually loaded, read from the folder's configs (a spec edit may not have rebuilt it)."""

    def config(component: str) -> dict:
        return json.loads((Path(folder) / component / "config.json").read_text())

    text, dit, vae = config("text_encoder"), config("transformer"), config("vae")
    return {
        "name": name,
        "folder": folder,
        "text_encoder": {
            key: text[key] for key in ("hidden_size", "num_hidden_layers", "num_attention_heads")
        },
        "transformer": {
            key: dit[key] for key in ("dim", "n_layers", "n_refiner_layers", "n_heads", "cap_feat_dim")
        },
        "vae_block_out_channels": vae["block_out_channels"],
        "vae_scale_factor": 2 ** (len(vae["block_out_channels"]) - 1),
    }


def _host_cpu_seconds() -> float:
    """CPU seconds every process on the host has used since boot (0 where /proc/stat is missing)."""
    try:
        with open("/proc/stat") as handle:
            user, nice, system, _idle, _iowait, irq, softirq = map(int, handle.readline().split()[1:8])
    except (OSError, ValueError):
        return 0.0
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def clock() -> tuple[float, float, float]:
    """Now: wall seconds, this process's CPU seconds, the whole host's CPU seconds."""
    return time.perf_counter(), time.process_time(), _host_cpu_seconds()


def since(start: tuple[float, float, float]) -> dict:
    """Wall and CPU seconds since `start`, and the share of the host's CPUs other processes used meanwhile.

    The hosts are shared: a busy neighbour slows a 2-thread torch badly, so each timing says how busy
    the rest of the host was (0 = idle, 1 = every core busy with other work).
    """
    wall, cpu, host = (now - then for now, then in zip(clock(), start, strict=True))
    others = min(1.0, max(0.0, host - cpu) / (wall * (os.cpu_count() or 1))) if host else None
    return {"wall_s": wall, "cpu_s": cpu, "others_cpu_share": others}


def summary(seconds: list[float]) -> dict:
    """Centre and spread of one timing (or ratio) over the rounds: `iqr_s` is the middle half's width and
    `median_ci95_s` a 95% bootstrap interval of the median (both collapse to the value for one round)."""
    first, third = quartiles(seconds)
    return {
        "median_s": statistics.median(seconds),
        "mean_s": statistics.fmean(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "stdev_s": statistics.stdev(seconds) if len(seconds) > 1 else 0.0,
        "q1_s": first,
        "q3_s": third,
        "iqr_s": third - first,
        "median_ci95_s": median_interval(seconds),
        "rounds": len(seconds),
    }


def quartiles(values: list[float]) -> list[float]:
    """The first and third quartiles (both equal to the value when there is only one)."""
    if len(values) < 2:
        return [values[0], values[0]]
    first, _, third = statistics.quantiles(values, n=4)
    return [first, third]


def median_interval(values: list[float], resamples: int = 2000, seed: int = 0) -> list[float]:
    """A 95% percentile-bootstrap interval of the median: resample the rounds with replacement, take the
    2.5th and 97.5th percentiles of the resampled medians. Seeded, so a results file can be recomputed."""
    if len(values) < 2:
        return [values[0], values[0]]
    draw = random.Random(seed)
    medians = sorted(statistics.median(draw.choices(values, k=len(values))) for _ in range(resamples))
    return [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]]


def spread_text(stats: dict, scale: float = 1.0, digits: int = 3) -> str:
    """'median (IQR q1-q3, 95% CI lo-hi, n rounds)' of a `summary`, for printed tables."""
    low, high = stats["median_ci95_s"]
    return (
        f"{stats['median_s'] * scale:.{digits}f} (IQR {stats['q1_s'] * scale:.{digits}f}-"
        f"{stats['q3_s'] * scale:.{digits}f}, 95% CI {low * scale:.{digits}f}-{high * scale:.{digits}f}, "
        f"{stats['rounds']} rounds)"
    )


def write_json(result: dict, out: str | None, name: str) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def model_folder(model: str) -> str:
    """The folder a preset (tiny, bench, full) or path resolves to; never reaches for the hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from zimage_split.model_source import resolve_model

    return resolve_model(model).location


def options(
    settings: Settings, defaults: dict, quick: dict, overrides: dict | None = None
) -> argparse.Namespace:
    """A benchmark's knobs: its defaults, then its quick-mode values, then what the caller set."""
    values = dict(defaults)
    if settings.quick:
        values |= quick
    values["rounds"] = settings.rounds_or(defaults["rounds"])
    values |= {key: value for key, value in (overrides or {}).items() if value is not None}
    if values["rounds"] < 1 or values.get("warmup", 0) < 0:
        raise ValueError("rounds must be >= 1 and warmup >= 0")
    return argparse.Namespace(model=settings.model, quick=settings.quick, **values)


def standalone(
    doc: str | None, name: str, add_flags: Callable[[argparse.ArgumentParser], None]
) -> tuple[Settings, dict, str | None]:
    """The command line of one benchmark run alone: `python -m benchmarks.bench_<name> [flags]`.

    Returns the settings, the flags the user set (None where not given) and the --out path.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (the benchmark's default)")
    parser.add_argument("--model", default=None, help="bench (default), tiny, full, or a diffusers folder")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N where it applies")
    parser.add_argument(
        "--quick", action="store_true", help="tiny model, smallest sizes, one round: checks the harness only"
    )
    parser.add_argument("--out", default=None, help=f"JSON file (benchmarks/results/{name}.json)")
    add_flags(parser)
    args = parser.parse_args()
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    settings = Settings(
        model=args.model or ("tiny" if args.quick else "bench"),
        quick=args.quick,
        rounds=args.rounds,
        device=args.device,
    )
    common = {"rounds", "model", "device", "quick", "out"}
    overrides = {key: value for key, value in vars(args).items() if key not in common}
    return settings, overrides, args.out
