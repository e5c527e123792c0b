"""Seconds per image: `generate` through both gRPC services against diffusers' ZImagePipeline in-process.

Both sides run in this process on the same CPU threads, in float32, from the same model folder. Rounds
interleave the two (the order flips each round) and every round uses a new prompt, so no embedding cache
helps either side; the services also run with their caches off.

    python -m benchmarks.bench_generate --rounds 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics

import numpy as np
import torch

from benchmarks.report import (
    Settings,
    clock,
    headline_row,
    machine_info,
    model_folder,
    model_info,
    options,
    since,
    standalone,
    summary,
    write_json,
)

TARGET_RATIO = 1.03  # ours / diffusers, per-image median
STEPS = 8
SUBJECTS = [
    "a red fox in fresh snow",
    "a lighthouse on a rocky coast at dusk",
    "a bowl of ramen with a soft egg",
    "an old tram in a narrow street",
    "a hummingbird near a hibiscus flower",
    "a glass teapot on a wooden table",
    "a desert canyon under a starry sky",
    "a paper boat on a rainy puddle",
    "a knight's helmet on a stone wall",
    "a field of sunflowers at noon",
    "a cat asleep on a pile of books",
    "a mountain lake with a red canoe",
]


def prompt_for(round_index: int) -> str:
    """A prompt no earlier round used, so neither side can reuse an embedding."""
    subject = SUBJECTS[round_index % len(SUBJECTS)]
    return f"{subject}, photograph {round_index}, soft light, detailed"


async def time_ours(client, prompt: str, seed: int, side: int) -> tuple[dict, np.ndarray]:  # type: ignore[no-untyped-def]
    """Timing (the services run in this process, so its CPU time is theirs) and the image's pixels."""
    start = clock()
    image = await client.generate(prompt, seed=seed, width=side, height=side, steps=STEPS)
    timing = since(start)
    return timing | {"server_timings_s": image.info["timings"]}, np.asarray(image.convert("RGB"))


def time_diffusers(pipe, prompt: str, seed: int, side: int) -> tuple[dict, np.ndarray]:  # type: ignore[no-untyped-def]
    start = clock()
    image = pipe(
        prompt,
        width=side,
        height=side,
        num_inference_steps=STEPS,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    timing = since(start)
    return timing, np.asarray(image.convert("RGB"))


async def run(args: argparse.Namespace, folder: str) -> tuple[int, int, list[dict]]:
    from diffusers import ZImagePipeline

    from zimage_split.client import AsyncClient
    from zimage_split.dit_service.config import GeneratorConfig
    from zimage_split.dit_service.server import start_generator_server
    from zimage_split.encoder_service.config import EncoderConfig
    from zimage_split.encoder_service.server import start_encoder_server

    # The encoder defaults to bfloat16; float32 on both sides keeps the comparison like for like.
    encoder = await start_encoder_server(
        EncoderConfig(model=folder, port=0, device="cpu", dtype="float32", cache_bytes=0)
    )
    generator = await start_generator_server(
        GeneratorConfig(
            model=folder,
            encoder=f"127.0.0.1:{encoder.port}",
            port=0,
            device="cpu",
            dtype="float32",
            cache_bytes=0,
        )
    )
    pipe = ZImagePipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    side = args.size
    image_tokens = (side // (2 * pipe.vae_scale_factor)) ** 2
    print(f"{side}x{side} images, {image_tokens} image tokens in the DiT", flush=True)

    rounds = []
    try:
        async with AsyncClient(generator=f"127.0.0.1:{generator.port}", timeout=600) as client:
            for index in range(-args.warmup, args.rounds):  # negative indices are warm-up
                prompt, seed = prompt_for(index + args.warmup), 1000 + index
                if index % 2 == 0:
                    ours, ours_pixels = await time_ours(client, prompt, seed, side)
                    theirs, their_pixels = time_diffusers(pipe, prompt, seed, side)
                else:
                    theirs, their_pixels = time_diffusers(pipe, prompt, seed, side)
                    ours, ours_pixels = await time_ours(client, prompt, seed, side)
                diff = int(np.abs(ours_pixels.astype(np.int16) - their_pixels.astype(np.int16)).max())
                label = "warm-up" if index < 0 else f"round {index + 1}/{args.rounds}"
                print(
                    f"{label:>12}: ours {ours['wall_s']:7.3f} s  diffusers {theirs['wall_s']:7.3f} s  "
                    f"ratio {ours['wall_s'] / theirs['wall_s']:5.3f}  max pixel diff {diff}  "
                    f"(other processes: {ours['others_cpu_share'] or 0:.0%} / {theirs['others_cpu_share'] or 0:.0%} "
                    "of the CPUs)",
                    flush=True,
                )
                if index >= 0:
                    rounds.append(
                        {
                            "prompt": prompt,
                            "seed": seed,
                            "ours_first": index % 2 == 0,
                            "ours": ours,
                            "diffusers": theirs,
                            "ratio": ours["wall_s"] / theirs["wall_s"],
                            "max_pixel_diff": diff,
                        }
                    )
    finally:
        await generator.stop(grace=1)
        await encoder.stop(grace=1)
    return side, image_tokens, rounds


def quartiles(values: list[float]) -> list[float]:
    """The first and third quartiles (both equal to the value when there is only one)."""
    if len(values) < 2:
        return [values[0], values[0]]
    first, _, third = statistics.quantiles(values, n=4)
    return [first, third]


def side_summary(rounds: list[dict], side: str) -> dict:
    timings = [r[side] for r in rounds]
    result = summary([t["wall_s"] for t in timings])
    result["cpu_median_s"] = summary([t["cpu_s"] for t in timings])["median_s"]
    if side == "ours":
        result["server_median_s"] = {
            stage: summary([t["server_timings_s"][stage] for t in timings])["median_s"]
            for stage in ("encode", "denoise", "decode", "total")
        }
    return result


def print_table(result: dict) -> None:
    ours, theirs = result["ours"], result["diffusers"]
    settings, machine = result["settings"], result["machine"]
    print()
    print(
        f"generate {settings['width']}x{settings['height']}, {settings['steps']} steps, float32 on "
        f"{machine['cpu_count']} CPUs ({machine['torch_threads']} torch threads), {settings['rounds']} rounds"
    )
    print(f"{'':<22}{'median s':>10}{'mean s':>10}{'min s':>10}{'max s':>10}")
    for name, stats in (("ours (gRPC services)", ours), ("diffusers in-process", theirs)):
        print(
            f"{name:<22}{stats['median_s']:>10.3f}{stats['mean_s']:>10.3f}"
            f"{stats['min_s']:>10.3f}{stats['max_s']:>10.3f}"
        )
    server = ours["server_median_s"]
    print(
        f"ours inside the generator (medians): encode {server['encode']:.3f} s, denoise "
        f"{server['denoise']:.3f} s, decode+PNG {server['decode']:.3f} s, total {server['total']:.3f} s"
    )
    verdict = "met" if result["target_met"] else "NOT met"
    print(
        f"ratio ours/diffusers: of medians {result['ratio_median']:.3f}, of means {result['ratio_mean']:.3f}, "
        f"median per round {result['ratio_per_round_median']:.3f} (target {result['target']}: {verdict})"
    )
    low, high = result["ratio_per_round_quartiles"]
    print(
        f"per-round ratios: middle half between {low:.3f} and {high:.3f}; time spent outside the "
        f"generator (RPCs, streaming, PNG decode): median {result['ours_outside_generator_median_s'] * 1000:.1f} ms"
    )
    print(f"largest pixel difference between the two sides' images: {result['max_pixel_diff']}/255")
    print(f"other processes used a median {result['others_cpu_share_median']:.0%} of the CPUs meanwhile")
    if not result["diffusers_at_least_1s"]:
        print("warning: the median diffusers image took under 1 s; pass a larger --size")


DEFAULTS = {"rounds": 20, "warmup": 1, "size": 256}
QUICK = {"warmup": 0, "size": 64}


def measure(settings: Settings, **overrides: object) -> dict:
    args = options(settings, DEFAULTS, QUICK, overrides)
    folder = model_folder(settings.model)
    machine = machine_info()
    side, image_tokens, rounds = asyncio.run(run(args, folder))

    ours, theirs = side_summary(rounds, "ours"), side_summary(rounds, "diffusers")
    ratio = ours["median_s"] / theirs["median_s"]
    result = {
        "benchmark": "generate",
        "description": "seconds per image, prompt text to PIL image: AsyncClient.generate through the "
        "generator and encoder gRPC services on loopback, against ZImagePipeline.__call__ in-process",
        "machine": machine | {"load_average_at_end": list(os.getloadavg())},
        "model": model_info(folder, settings.model),
        "settings": {
            "width": side,
            "height": side,
            "dit_image_tokens": image_tokens,
            "steps": STEPS,
            "guidance_scale": 0.0,
            "dtype": "float32",
            "device": "cpu",
            "rounds": args.rounds,
            "warmup_rounds": args.warmup,
            "quick": settings.quick,
            "service_caches": "off (cache_bytes=0), and a new prompt every round",
        },
        "rounds": rounds,
        "ours": ours,
        "diffusers": theirs,
        "ratio_median": ratio,
        "ratio_mean": ours["mean_s"] / theirs["mean_s"],
        # Each round's two images ran back to back, so their ratio shrugs off slow drifts in host load.
        "ratio_per_round_median": summary([r["ratio"] for r in rounds])["median_s"],
        "ratio_per_round_quartiles": quartiles([r["ratio"] for r in rounds]),
        # What the services add around the generator's own work: the RPCs, streaming and PNG decoding.
        "ours_outside_generator_median_s": summary(
            [r["ours"]["wall_s"] - r["ours"]["server_timings_s"]["total"] for r in rounds]
        )["median_s"],
        "max_pixel_diff": max(r["max_pixel_diff"] for r in rounds),
        "others_cpu_share_median": summary(
            [r[side]["others_cpu_share"] or 0.0 for r in rounds for side in ("ours", "diffusers")]
        )["median_s"],
        "target": f"ratio_median <= {TARGET_RATIO}",
        "target_met": ratio <= TARGET_RATIO,
        "diffusers_at_least_1s": theirs["median_s"] >= 1.0,
    }
    result["headline"] = headline(result)
    return result


def headline(result: dict) -> list[dict]:
    settings = result["settings"]
    return [
        headline_row(
            "generate",
            f"prompt to image, {settings['width']}x{settings['height']}, {settings['steps']} steps, "
            f"{settings['dtype']} on {settings['device']}",
            unit="s",
            ours=result["ours"]["median_s"],
            baseline=result["diffusers"]["median_s"],
            baseline_name="diffusers ZImagePipeline in-process",
            ratio=result["ratio_median"],
            ratio_meaning="ours / diffusers (lower is better)",
            target=f"<= {TARGET_RATIO}",
            target_met=result["target_met"],
            note=f"median per-round ratio {result['ratio_per_round_median']:.3f}; largest pixel difference "
            f"{result['max_pixel_diff']}/255",
        )
    ]


def main() -> None:
    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (1)")
        parser.add_argument(
            "--size",
            type=int,
            default=None,
            help="image width and height in pixels (256: about 1 s per image on the bench model, 2 CPU cores)",
        )

    settings, overrides, out = standalone(__doc__, "generate", flags)
    result = measure(settings, **overrides)
    print_table(result)
    print(f"wrote {write_json(result, out, 'generate')}")


if __name__ == "__main__":
    main()
