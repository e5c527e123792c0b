"""Seconds per image of the DiT engine in-process, by the thread that loads it and the one that runs it.

PyTorch's CPU kernels run on OpenMP, which keeps one team of worker threads per calling thread. A model
loaded on one thread and run on another leaves two teams contending for the same cores; the services now
load, warm up and run on one thread of their own (`devices.torch_thread`). Three placements:

- main: loaded and run on the main thread (a plain script, and diffusers as people run it);
- split: loaded on the main thread, run on a worker thread (what both services did before);
- one_thread: loaded and run on one worker thread (what the services and Ray replicas do now).

Each placement needs a process of its own (a thread team, once made, stays), so every block of rounds
starts one process per placement, in reverse order every other block, and each process times
`--per-block` images after one warm-up image. Same engine, size, steps, seeds and embedding everywhere.

    python -m benchmarks.bench_threads --rounds 12
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.report import (
    Settings,
    headline_row,
    machine_info,
    model_folder,
    model_info,
    options,
    spread_text,
    standalone,
    summary,
    write_json,
)

PLACEMENTS = ("main", "split", "one_thread")
STEPS = 8
TARGET_RATIO = 1.03  # one_thread / main, seconds per image
DEFAULTS = {"rounds": 12, "per_block": 3, "size": 256}
QUICK = {"per_block": 1, "size": 64}


def time_images(folder: str, placement: str, images: int, side: int) -> list[float]:
    """Loads the engine and times `images` images (after one untimed), placed as `placement` says."""
    import torch

    from zimage_split.dit_service.engine import DiTEngine, GenerationJob, GenerationParams
    from zimage_split.model_source import resolve_model

    def build() -> DiTEngine:
        return DiTEngine(resolve_model(folder), device=torch.device("cpu"), dtype=torch.float32)

    def run(engine: DiTEngine) -> list[float]:
        embedding = torch.randn(48, engine.caption_dim, generator=torch.Generator().manual_seed(0))
        seconds = []
        for index in range(images + 1):
            params = GenerationParams(width=side, height=side, steps=STEPS, seed=index)
            started = time.perf_counter()
            engine.generate([GenerationJob(params=params, prompt_embeds=embedding)])
            if index:  # the first image pays for lazy initialisation
                seconds.append(time.perf_counter() - started)
        return seconds

    if placement == "main":
        return run(build())
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dit")
    try:
        engine = build() if placement == "split" else worker.submit(build).result()
        return worker.submit(run, engine).result()
    finally:
        worker.shutdown()


def one_process(folder: str, placement: str, images: int, side: int) -> list[float]:
    """`time_images` in a new Python process; its last stdout line is the JSON list of seconds."""
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench_threads",
            "--child",
            placement,
            folder,
            str(images),
            str(side),
        ],
        capture_output=True,
        text=True,
        check=False,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    if completed.returncode != 0:
        raise RuntimeError(f"placement {placement} failed:\n{completed.stderr[-3000:]}")
    return [float(s) for s in json.loads(completed.stdout.strip().splitlines()[-1])]


def measure(settings: Settings, **overrides: object) -> dict:
    args = options(settings, DEFAULTS, QUICK, overrides)
    folder = model_folder(settings.model)
    machine = machine_info()
    blocks = max(1, -(-args.rounds // args.per_block))
    seconds: dict[str, list[float]] = {name: [] for name in PLACEMENTS}
    for block in range(blocks):
        order = PLACEMENTS if block % 2 == 0 else tuple(reversed(PLACEMENTS))
        for placement in order:
            seconds[placement] += one_process(folder, placement, args.per_block, args.size)
        print(
            f"block {block + 1}/{blocks}: "
            + ", ".join(f"{name} {seconds[name][-1]:.3f} s" for name in PLACEMENTS),
            flush=True,
        )
    stats = {name: summary(values) for name, values in seconds.items()}
    ratios = {name: stats[name]["median_s"] / stats["main"]["median_s"] for name in PLACEMENTS}
    result = {
        "benchmark": "threads",
        "description": "seconds per image of DiTEngine.generate in-process, by which thread loads the "
        "engine and which runs it (one process per placement and block)",
        "machine": machine | {"load_average_at_end": list(os.getloadavg())},
        "model": model_info(folder, settings.model),
        "settings": {
            "width": args.size,
            "height": args.size,
            "steps": STEPS,
            "dtype": "float32",
            "device": "cpu",
            "rounds": blocks * args.per_block,
            "blocks": blocks,
            "images_per_block": args.per_block,
            "quick": settings.quick,
        },
        "seconds": seconds,
        "placements": stats,
        "ratio_to_main": ratios,
        "target": f"one_thread / main <= {TARGET_RATIO}",
        "target_met": ratios["one_thread"] <= TARGET_RATIO,
    }
    result["headline"] = [
        headline_row(
            "threads",
            f"DiT image, loaded and run on one worker thread, {args.size}x{args.size}, {STEPS} steps, float32",
            unit="s",
            ours=stats["one_thread"]["median_s"],
            baseline=stats["main"]["median_s"],
            baseline_name="the same engine on the main thread",
            ratio=ratios["one_thread"],
            ratio_meaning="one_thread / main (lower is better)",
            target=f"<= {TARGET_RATIO}",
            target_met=result["target_met"],
            note=f"loaded on the main thread and run on a worker (the old services): {ratios['split']:.3f}x; "
            f"{blocks * args.per_block} images per placement",
        )
    ]
    return result


def print_table(result: dict) -> None:
    settings = result["settings"]
    print()
    print(
        f"DiT engine in-process, {settings['width']}x{settings['height']}, {settings['steps']} steps, float32, "
        "seconds per image: median (IQR, 95% CI of the median)"
    )
    for name in PLACEMENTS:
        print(f"  {name:<11} {spread_text(result['placements'][name])}  x{result['ratio_to_main'][name]:.3f}")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        placement, folder, images, side = sys.argv[2:6]
        print(json.dumps(time_images(folder, placement, int(images), int(side))))
        return

    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--per-block", type=int, default=None, help="images per process (3)")
        parser.add_argument("--size", type=int, default=None, help="image width and height (256)")

    settings, overrides, out = standalone(__doc__, "threads", flags)
    result = measure(settings, **overrides)
    print_table(result)
    print(f"wrote {write_json(result, out, 'threads')}")


if __name__ == "__main__":
    main()
