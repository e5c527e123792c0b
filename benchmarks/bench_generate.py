"""Seconds per image through both gRPC services against diffusers' ZImagePipeline in-process, two ways.

- Like for like: our generator given an embedding it already holds (uploaded before the rounds), against
  `ZImagePipeline(prompt_embeds=[the same unpadded tensor])` plus writing the same PNG (zlib level as ours).
  The same DiT and VAE arithmetic on both sides; ours adds the RPCs, the stream and the PNG's decode.
- Text path: `generate(prompt)` (the encoder runs, its cache off, a new prompt every round) against
  `ZImagePipeline(prompt)`. NOT the same arithmetic: diffusers pads every prompt to 512 tokens and runs
  every encoder layer, where our encoder does neither, so this ratio flatters us.

Both sides run in this process, in float32, from the same model folder, each on a torch thread of its own
(one OpenMP team per side). The four timings of a round run back to back, in reverse order every other
round; ratios are taken per round, so slow drifts in host load cancel.

    python -m benchmarks.bench_generate --rounds 20
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os

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
    spread_text,
    standalone,
    summary,
    write_json,
)
from zimage_split.devices import torch_thread
from zimage_split.dit_service.outputs import PNG_COMPRESS_LEVEL

TARGET_RATIO = 1.03  # ours / diffusers like for like, median of the per-round ratios
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


async def time_ours(client, seed: int, side: int, **conditioning: object) -> tuple[dict, np.ndarray]:  # type: ignore[no-untyped-def]
    """Timing (the services run in this process, so its CPU time is theirs) and the image's pixels.
    `conditioning` is `prompt=` text, or `embeddings=` the generator already holds."""
    start = clock()
    image = await client.generate(seed=seed, width=side, height=side, steps=STEPS, **conditioning)
    timing = since(start)
    return timing | {"server_timings_s": image.info["timings"]}, np.asarray(image.convert("RGB"))


def time_diffusers(pipe, seed: int, side: int, **conditioning: object) -> tuple[dict, np.ndarray]:  # type: ignore[no-untyped-def]
    """diffusers' own call; `conditioning` is `prompt=` text, or `prompt_embeds=` a list of unpadded
    tensors, in which case the image is also written as the PNG our generator sends (same zlib level)."""
    start = clock()
    image = pipe(
        width=side,
        height=side,
        num_inference_steps=STEPS,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(seed),
        **conditioning,
    ).images[0]
    if "prompt_embeds" in conditioning:
        image.save(io.BytesIO(), format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    timing = since(start)
    return timing, np.asarray(image.convert("RGB"))


def pixel_diff(ours: np.ndarray, theirs: np.ndarray) -> int:
    return int(np.abs(ours.astype(np.int16) - theirs.astype(np.int16)).max())


async def time_side(  # type: ignore[no-untyped-def]
    name: str, client, pipe, diffusers_thread, seed: int, side: int, prompt: str, tensor: torch.Tensor
) -> tuple[dict, np.ndarray]:
    """One of the four timings of a round (SIDES)."""
    if name == "ours":
        return await time_ours(client, seed, side, prompt=prompt)
    if name == "ours_ready":
        return await time_ours(client, seed, side, embeddings=tensor)
    conditioning: dict = {"prompt": prompt} if name == "diffusers" else {"prompt_embeds": [tensor]}
    return await asyncio.get_running_loop().run_in_executor(
        diffusers_thread, lambda: time_diffusers(pipe, seed, side, **conditioning)
    )


async def run(args: argparse.Namespace, folder: str) -> tuple[int, int, list[dict]]:
    from diffusers import ZImagePipeline

    from zimage_split.client import AsyncClient
    from zimage_split.dit_service.config import GeneratorConfig
    from zimage_split.dit_service.server import start_generator_server
    from zimage_split.encoder_service.config import EncoderConfig
    from zimage_split.encoder_service.server import start_encoder_server

    # The encoder defaults to bfloat16; float32 on both sides keeps the comparison like for like. The
    # encoder's cache is off, so the text path encodes every round; the generator keeps the embeddings
    # uploaded for the like-for-like path (the text path's prompts are new every round, so never hit).
    encoder = await start_encoder_server(
        EncoderConfig(model=folder, port=0, device="cpu", dtype="float32", cache_bytes=0)
    )
    generator = await start_generator_server(
        GeneratorConfig(
            model=folder, encoder=f"127.0.0.1:{encoder.port}", port=0, device="cpu", dtype="float32"
        )
    )
    # diffusers loads and runs on a thread of its own, as each service does: one OpenMP team per side.
    diffusers_thread = torch_thread("diffusers")
    loop = asyncio.get_running_loop()
    pipe = await loop.run_in_executor(
        diffusers_thread, lambda: ZImagePipeline.from_pretrained(folder, dtype=torch.float32)
    )
    pipe.set_progress_bar_config(disable=True)
    side = args.size
    image_tokens = (side // (2 * pipe.vae_scale_factor)) ** 2
    print(f"{side}x{side} images, {image_tokens} image tokens in the DiT", flush=True)

    rounds = []
    try:
        async with AsyncClient(
            generator=f"127.0.0.1:{generator.port}", encoder=f"127.0.0.1:{encoder.port}", timeout=600
        ) as client:
            indices = range(-args.warmup, args.rounds)  # negative indices are warm-up
            # Like for like: both sides start from the same unpadded embedding, ours already on the generator.
            ready = {i: (await client.encode([f"{prompt_for(i + args.warmup)}, ready"]))[0] for i in indices}
            for embedding in ready.values():
                await client.upload(embedding)
            for index in indices:
                prompt, seed = prompt_for(index + args.warmup), 1000 + index
                tensor = ready[index].tensor
                order = list(SIDES) if index % 2 == 0 else list(reversed(SIDES))
                timed = {
                    name: await time_side(name, client, pipe, diffusers_thread, seed, side, prompt, tensor)
                    for name in order
                }
                text_ratio = timed["ours"][0]["wall_s"] / timed["diffusers"][0]["wall_s"]
                ready_ratio = timed["ours_ready"][0]["wall_s"] / timed["diffusers_ready"][0]["wall_s"]
                text_diff = pixel_diff(timed["ours"][1], timed["diffusers"][1])
                ready_diff = pixel_diff(timed["ours_ready"][1], timed["diffusers_ready"][1])
                label = "warm-up" if index < 0 else f"round {index + 1}/{args.rounds}"
                print(
                    f"{label:>12}: text ours {timed['ours'][0]['wall_s']:6.3f} s diffusers "
                    f"{timed['diffusers'][0]['wall_s']:6.3f} s ratio {text_ratio:5.3f} | ready embeddings ours "
                    f"{timed['ours_ready'][0]['wall_s']:6.3f} s diffusers {timed['diffusers_ready'][0]['wall_s']:6.3f} "
                    f"s ratio {ready_ratio:5.3f} | max pixel diff {text_diff}, {ready_diff}",
                    flush=True,
                )
                if index >= 0:
                    rounds.append(
                        {"prompt": prompt, "seed": seed, "order": order}
                        | {name: timing for name, (timing, _) in timed.items()}
                        | {
                            "ratio": text_ratio,
                            "ratio_ready": ready_ratio,
                            "max_pixel_diff": text_diff,
                            "max_pixel_diff_ready": ready_diff,
                        }
                    )
    finally:
        await generator.stop(grace=1)
        await encoder.stop(grace=1)
        diffusers_thread.shutdown()
    return side, image_tokens, rounds


def side_summary(rounds: list[dict], side: str) -> dict:
    timings = [r[side] for r in rounds]
    result = summary([t["wall_s"] for t in timings])
    result["cpu_median_s"] = summary([t["cpu_s"] for t in timings])["median_s"]
    if side.startswith("ours"):
        result["server_median_s"] = {
            stage: summary([t["server_timings_s"][stage] for t in timings])["median_s"]
            for stage in ("encode", "denoise", "decode", "total")
        }
        # What the services add around the generator's own work: the RPCs, streaming and PNG decoding.
        result["outside_generator_median_s"] = summary(
            [t["wall_s"] - t["server_timings_s"]["total"] for t in timings]
        )["median_s"]
    return result


def print_table(result: dict) -> None:
    settings, machine = result["settings"], result["machine"]
    print()
    print(
        f"generate {settings['width']}x{settings['height']}, {settings['steps']} steps, float32 on "
        f"{machine['cpu_count']} CPUs ({machine['torch_threads']} torch threads), {settings['rounds']} rounds, "
        "seconds per image: median (IQR, 95% CI of the median)"
    )
    for name, label in SIDES.items():
        print(f"  {label:<58} {spread_text(result[name])}")
    for name in ("ours", "ours_ready"):
        server = result[name]["server_median_s"]
        print(
            f"  {name} inside the generator (medians): encode {server['encode']:.3f} s, denoise "
            f"{server['denoise']:.3f} s, decode+PNG {server['decode']:.3f} s; outside it (RPCs, streaming, "
            f"PNG decode) {result[name]['outside_generator_median_s'] * 1000:.1f} ms"
        )
    for key, meaning in (
        (
            "ratio_per_round",
            "text path (NOT like for like: diffusers pads to 512 tokens and runs every layer)",
        ),
        ("ratio_ready_per_round", "like for like, ready embeddings"),
    ):
        verdict = "" if key == "ratio_per_round" else f" (target <= {TARGET_RATIO}: "
        verdict += "" if key == "ratio_per_round" else ("met)" if result["target_met"] else "NOT met)")
        print(f"ratio ours/diffusers, {meaning}: per round {spread_text(result[key])}{verdict}")
    print(
        f"largest pixel difference: text path {result['max_pixel_diff']}/255, ready embeddings "
        f"{result['max_pixel_diff_ready']}/255"
    )
    print(f"other processes used a median {result['others_cpu_share_median']:.0%} of the CPUs meanwhile")
    if not result["diffusers_at_least_1s"]:
        print("warning: the median diffusers image took under 1 s; pass a larger --size")


SIDES = {
    "ours": "ours, prompt text through both services",
    "diffusers": "diffusers ZImagePipeline(prompt) in-process",
    "ours_ready": "ours, embedding already on the generator",
    "diffusers_ready": "diffusers given the same unpadded prompt_embeds, + PNG",
}
DEFAULTS = {"rounds": 20, "warmup": 1, "size": 256}
QUICK = {"warmup": 0, "size": 64}


def measure(settings: Settings, **overrides: object) -> dict:
    args = options(settings, DEFAULTS, QUICK, overrides)
    folder = model_folder(settings.model)
    machine = machine_info()
    side, image_tokens, rounds = asyncio.run(run(args, folder))

    sides = {name: side_summary(rounds, name) for name in SIDES}
    ready_ratio = summary([r["ratio_ready"] for r in rounds])
    result = {
        "benchmark": "generate",
        "description": "seconds per image. Text path: AsyncClient.generate(prompt) through the generator and "
        "encoder gRPC services on loopback, against ZImagePipeline(prompt) in-process, which pads every "
        "prompt to 512 tokens and runs all encoder layers (not the same arithmetic). Like for like: "
        "AsyncClient.generate(embeddings) with the embedding already uploaded, against ZImagePipeline("
        "prompt_embeds=[the same unpadded tensor]) plus writing the same PNG",
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
            "order": "the four timings of a round run back to back, in reverse order every other round",
            "service_caches": "encoder cache off and a new prompt every round on the text path; the "
            "like-for-like embeddings uploaded to the generator before the rounds",
            "diffusers_thread": "diffusers loads and runs on one thread of its own, as each service does",
        },
        "rounds": rounds,
        **sides,
        "ratio_median": sides["ours"]["median_s"] / sides["diffusers"]["median_s"],
        "ratio_ready_median": sides["ours_ready"]["median_s"] / sides["diffusers_ready"]["median_s"],
        # Each round's images ran back to back, so their ratio shrugs off slow drifts in host load.
        "ratio_per_round": summary([r["ratio"] for r in rounds]),
        "ratio_ready_per_round": ready_ratio,
        "max_pixel_diff": max(r["max_pixel_diff"] for r in rounds),
        "max_pixel_diff_ready": max(r["max_pixel_diff_ready"] for r in rounds),
        "others_cpu_share_median": summary(
            [r[name]["others_cpu_share"] or 0.0 for r in rounds for name in SIDES]
        )["median_s"],
        "target": f"like-for-like per-round ratio median <= {TARGET_RATIO}",
        "target_met": ready_ratio["median_s"] <= TARGET_RATIO,
        "diffusers_at_least_1s": sides["diffusers_ready"]["median_s"] >= 1.0,
    }
    result["headline"] = headline(result)
    return result


def headline(result: dict) -> list[dict]:
    settings = result["settings"]
    shape = f"{settings['width']}x{settings['height']}, {settings['steps']} steps, {settings['dtype']} on {settings['device']}"
    ready, text = result["ratio_ready_per_round"], result["ratio_per_round"]
    return [
        headline_row(
            "generate",
            f"embedding to image, like for like, {shape}",
            unit="s",
            ours=result["ours_ready"]["median_s"],
            baseline=result["diffusers_ready"]["median_s"],
            baseline_name="diffusers ZImagePipeline(prompt_embeds) in-process, + PNG",
            ratio=ready["median_s"],
            ratio_meaning="ours / diffusers per round, median (lower is better)",
            target=f"<= {TARGET_RATIO}",
            target_met=result["target_met"],
            note=f"IQR {ready['q1_s']:.3f}-{ready['q3_s']:.3f}, 95% CI {ready['median_ci95_s'][0]:.3f}-"
            f"{ready['median_ci95_s'][1]:.3f}, {ready['rounds']} rounds; largest pixel difference "
            f"{result['max_pixel_diff_ready']}/255",
        ),
        headline_row(
            "generate",
            f"prompt to image, text path (not like for like), {shape}",
            unit="s",
            ours=result["ours"]["median_s"],
            baseline=result["diffusers"]["median_s"],
            baseline_name="diffusers ZImagePipeline(prompt) in-process",
            ratio=text["median_s"],
            ratio_meaning="ours / diffusers per round, median (lower is better)",
            note="diffusers pads every prompt to 512 tokens and runs every encoder layer; we do neither. "
            f"IQR {text['q1_s']:.3f}-{text['q3_s']:.3f}, {text['rounds']} rounds; largest pixel difference "
            f"{result['max_pixel_diff']}/255",
        ),
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
