"""What the per-request generation options cost: each against the plain image, side by side in one run.

In-process `DiTEngine` (loaded and run on one worker thread, as the services do), one embedding, the same
size, steps and seed everywhere; every round times each variant once, in a new order each round:

- plain: the image with every option off;
- shift: the same with `shift=6` (it only moves the sigmas, so it should cost nothing);
- slg: Skip Layer Guidance active on half the steps (start 0, stop 0.5) over the middle third of the DiT's
  blocks: one more DiT pass, with those blocks skipped, per active step;
- two_passes: multi-pass as the generator runs it, a first pass at half the size and then img2img of its
  PNG, upscaled (Lanczos), at the full size with strength 0.6 (the default), both with the same steps.
- controlnet: a random-weight ControlNet in the Union 2.1 layout (built for the model at start), with a
  control image and conditioning scale 0.75: the ControlNet's own blocks run beside the DiT's at every step.
- dype: DyPE (vision_yarn, the defaults) against `large_plain`, the same image without it, both at
  `--dype-size` (1280: DyPE changes nothing at 1024 pixels a side or less, so it cannot be timed at 256) and
  denoising only (latents out, no VAE decode, the same on both sides).

The ratio is variant / plain per round (same embedding, seed, size and steps; only the option differs); for
dype it is dype / large_plain.

    python -m benchmarks.bench_features --rounds 10
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

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

STEPS = 8
DEFAULTS = {"rounds": 10, "size": 256, "dype_size": 1280}
QUICK = {"size": 64, "dype_size": 1088}
VARIANTS = ("plain", "shift", "slg", "two_passes", "controlnet", "large_plain", "dype")
# What each variant's ratio is taken against.
BASELINES = {"dype": "large_plain"}
SECOND_PASS_STRENGTH = 0.6


def variant_params(name: str, side: int, dit_layers: int, dype_side: int):  # type: ignore[no-untyped-def]
    from zimage_split.dit_service.dype import Dype
    from zimage_split.dit_service.engine import GenerationParams
    from zimage_split.dit_service.skip_layer_guidance import SkipLayerGuidance

    if name == "controlnet":
        return GenerationParams(
            width=side, height=side, steps=STEPS, seed=0, controlnet="bench", controlnet_scale=0.75
        )
    if name == "large_plain":
        return GenerationParams(width=dype_side, height=dype_side, steps=STEPS, seed=0)
    if name == "dype":
        return GenerationParams(width=dype_side, height=dype_side, steps=STEPS, seed=0, dype=Dype())

    if name == "shift":
        return GenerationParams(width=side, height=side, steps=STEPS, seed=0, shift=6.0)
    if name == "slg":
        third = max(1, dit_layers // 3)
        layers = tuple(range(third, min(dit_layers, 2 * third)))
        slg = SkipLayerGuidance(scale=3.0, layers=layers, start=0.0, stop=0.5)
        return GenerationParams(width=side, height=side, steps=STEPS, seed=0, skip_layer_guidance=slg)
    return GenerationParams(width=side, height=side, steps=STEPS, seed=0)


NOTES = {
    "shift": "shift 6 against the model's 3: only the sigmas move",
    "slg": "SLG on {active} of {steps} steps over blocks {layers} of {dit_layers}: one more pass of the DiT "
    "without those blocks per active step",
    "two_passes": "half the size, then img2img at the full size with strength 0.6: the second pass runs 5 of "
    "its {steps} steps; two VAE decodes and one encode",
    "controlnet": "a random Union 2.1-layout ControlNet for this model, scale 0.75: its blocks run beside the "
    "DiT's at every step, and the control image is VAE-encoded once",
    "large_plain": "the plain image at {dype_side}x{dype_side}, denoising only: the baseline of dype",
    "dype": "DyPE vision_yarn (scale 2, exponent 2) against the same {dype_side}x{dype_side} image without it, "
    "denoising only (latents out on both sides): the per-step RoPE table",
}


def measure(settings: Settings, **overrides: object) -> dict:
    import tempfile

    import torch
    from PIL import ImageDraw

    from zimage_split.dit_service.controlnets import ControlNetSpec
    from zimage_split.dit_service.engine import DiTEngine, GenerationJob
    from zimage_split.dit_service.outputs import OutputOptions
    from zimage_split.model_source import resolve_model
    from zimage_split.tiny_model import build_tiny_controlnet

    args = options(settings, DEFAULTS, QUICK, overrides)
    folder = model_folder(settings.model)
    scratch = tempfile.TemporaryDirectory(prefix="bench-controlnet-")
    if settings.model not in ("tiny", "bench"):
        raise ValueError(
            "bench_features builds a random ControlNet for its model, which it can for tiny or bench only; "
            "run it with --model bench (the default) or tiny."
        )
    controlnet = build_tiny_controlnet(Path(scratch.name) / "controlnet", size=settings.model, seed=0)
    control = Image.new("RGB", (args.size, args.size))
    ImageDraw.Draw(control).ellipse(
        (args.size // 4, args.size // 4, 3 * args.size // 4, 3 * args.size // 4), fill="white"
    )
    machine = machine_info()
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dit")
    try:
        engine = worker.submit(
            lambda: DiTEngine(
                resolve_model(folder),
                device=torch.device(settings.device),
                dtype=torch.float32,
                controlnets=(ControlNetSpec("bench", str(controlnet)),),
            )
        ).result()
        dit_layers = engine.info.dit_layers
        embedding = torch.randn(48, engine.caption_dim, generator=torch.Generator().manual_seed(0))
        params = {name: variant_params(name, args.size, dit_layers, args.dype_size) for name in VARIANTS}
        latents_only = OutputOptions(format="latent")

        def one_image(name: str) -> float:
            started = time.perf_counter()
            if name in ("large_plain", "dype"):
                engine.render(
                    [GenerationJob(params=params[name], prompt_embeds=embedding, output=latents_only)]
                )
                return time.perf_counter() - started
            if name == "controlnet":
                engine.generate(
                    [GenerationJob(params=params[name], prompt_embeds=embedding, control_image=control)]
                )
                return time.perf_counter() - started
            if name != "two_passes":
                engine.generate([GenerationJob(params=params[name], prompt_embeds=embedding)])
                return time.perf_counter() - started
            half = dataclasses.replace(params["plain"], width=args.size // 2, height=args.size // 2)
            [first] = engine.generate([GenerationJob(params=half, prompt_embeds=embedding)])
            with Image.open(io.BytesIO(first.data)) as decoded:  # type: ignore[union-attr]
                start = decoded.convert("RGB").resize((args.size, args.size), Image.Resampling.LANCZOS)
            second = dataclasses.replace(params["plain"], strength=SECOND_PASS_STRENGTH)
            engine.generate([GenerationJob(params=second, prompt_embeds=embedding, init_image=start)])
            return time.perf_counter() - started

        for name in VARIANTS:  # warm-up: lazy initialisation, and each variant's first run
            worker.submit(one_image, name).result()
        order = random.Random(0)
        seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for index in range(args.rounds):
            for name in order.sample(VARIANTS, len(VARIANTS)):
                seconds[name].append(worker.submit(one_image, name).result())
            print(
                f"round {index + 1}/{args.rounds}: "
                + ", ".join(f"{name} {seconds[name][-1]:.3f} s" for name in VARIANTS),
                flush=True,
            )
    finally:
        worker.shutdown()
        scratch.cleanup()
    stats = {name: summary(values) for name, values in seconds.items()}
    ratios = {
        name: summary(
            [v / p for v, p in zip(seconds[name], seconds[BASELINES.get(name, "plain")], strict=True)]
        )
        for name in VARIANTS
    }
    slg = params["slg"].skip_layer_guidance
    result = {
        "benchmark": "features",
        "description": "seconds per image of DiTEngine.generate with one generation option on, against the "
        "plain image (same embedding, seed, size and steps), one variant after another in a new order each "
        "round",
        "machine": machine | {"load_average_at_end": list(os.getloadavg())},
        "model": model_info(folder, settings.model),
        "settings": {
            "width": args.size,
            "height": args.size,
            "steps": STEPS,
            "dtype": "float32",
            "device": settings.device,
            "rounds": args.rounds,
            "quick": settings.quick,
            "dype_size": args.dype_size,
            "slg": {
                "scale": slg.scale,
                "layers": list(slg.layers),
                "start": slg.start,
                "stop": slg.stop,
                "active_steps": slg.active_steps(STEPS),
                "dit_layers": dit_layers,
            },
        },
        "seconds": seconds,
        "variants": stats,
        "ratio_to_plain": ratios,
        "target": "none: each option's cost is reported, not held to a bound",
        "target_met": None,
    }
    result["headline"] = [
        headline_row(
            "features",
            f"DiT image with {name}, {side}x{side}, {STEPS} steps, float32",
            unit="s",
            ours=stats[name]["median_s"],
            baseline=stats[BASELINES.get(name, "plain")]["median_s"],
            baseline_name=f"the plain image at {side}x{side}",
            ratio=ratios[name]["median_s"],
            ratio_meaning=f"{name} / {BASELINES.get(name, 'plain')}, per round (lower is cheaper)",
            note=NOTES[name].format(
                active=slg.active_steps(STEPS),
                steps=STEPS,
                layers=list(slg.layers),
                dit_layers=dit_layers,
                dype_side=args.dype_size,
            )
            + f"; {args.rounds} rounds",
        )
        for name in VARIANTS
        if name not in ("plain", "large_plain")
        for side in [args.dype_size if name == "dype" else args.size]
    ]
    return result


def print_table(result: dict) -> None:
    settings = result["settings"]
    print()
    print(
        f"DiT engine in-process, {settings['width']}x{settings['height']}, {settings['steps']} steps, float32; "
        "seconds per image: median (IQR, 95% CI of the median); ratio per round to plain (dype: to large_plain)"
    )
    for name in VARIANTS:
        ratio = result["ratio_to_plain"][name]
        print(
            f"  {name:<11} {spread_text(result['variants'][name])}  x{ratio['median_s']:.3f} (IQR {ratio['q1_s']:.3f}-{ratio['q3_s']:.3f})"
        )


def main() -> None:
    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--size", type=int, default=None, help="image width and height (256)")
        parser.add_argument(
            "--dype-size", type=int, default=None, help="width and height of the DyPE pair (1280)"
        )

    settings, overrides, out = standalone(__doc__, "features", flags)
    result = measure(settings, **overrides)
    print_table(result)
    print(f"wrote {write_json(result, out, 'features')}")


if __name__ == "__main__":
    main()
