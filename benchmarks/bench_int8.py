"""`--quantize int8` against float32 and bfloat16 on the CPU: encoder tokens/s at batch 1, 4 and 16, the
per-token cosine of the embeddings, and the PSNR of the bench DiT's images made from them.

The three encoders are timed in interleaved rounds; with `--model full` they are built and timed one at a
time instead (float32 Qwen3-4B alone is about 16 GB), and no images are made (the full DiT would add 25 GB). Random weights have none of the outlier
channels real LLM weights and activations have, and those are what int8 quantization gets wrong: the
fidelity measured here understates the error real weights would show.

    python -m benchmarks.bench_int8 --rounds 5
    python -m benchmarks.bench_int8 --model full --rounds 3   # tokens/s and cosine only (no images)
"""

from __future__ import annotations

import argparse
import gc
import io
import logging
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
    write_json,
)
from zimage_split.common.logs import NOISY_IMPORT_LOGGERS

RANDOM_WEIGHTS_CAVEAT = (
    "Random weights understate the error: real LLM weights and activations have outlier channels (values "
    "tens to hundreds of times the typical one) that int8's per-row weight and per-token activation scales "
    "round coarsely, and random weights have none. Expect a real checkpoint's int8 cosine and PSNR to be "
    "worse than measured here; measure them on the real model before serving int8."
)
BATCHES = (1, 4, 16)
VARIANTS = (
    ("float32", torch.float32, "none"),
    ("bfloat16", torch.bfloat16, "none"),
    ("int8", torch.float32, "int8"),
)
SUBJECTS = (
    "a red fox in fresh snow",
    "a lighthouse on a rocky coast at dusk",
    "a bowl of ramen with a soft egg",
    "an old tram in a narrow street",
)
DETAILS = (
    "soft light",
    "35mm film",
    "shallow depth of field",
    "dramatic clouds",
    "detailed",
    "muted colours",
)


def mixed_prompts(count: int) -> list[str]:
    """`count` prompts of mixed lengths (0 to 5 detail phrases after a subject)."""
    return [
        ", ".join([SUBJECTS[index % len(SUBJECTS)], *DETAILS[: index % len(DETAILS)]])
        for index in range(count)
    ]


def build_encoder(folder: str, dtype: torch.dtype, quantize: str):  # type: ignore[no-untyped-def]
    from zimage_split.encoder_service.engine import TextEncoder
    from zimage_split.model_source import resolve_model

    return TextEncoder(
        resolve_model(folder),  # `full` is configs only: its weights are drawn, not read
        device=torch.device("cpu"),
        dtype=dtype,
        hidden_layer=-2,
        quantize=quantize,
    )


def time_batches(encoders: dict, rounds: int, warmup: int) -> dict:
    """Tokens/s of each encoder at each batch size: prompts of mixed lengths, one `encode` call per round
    (one forward pass per prompt, as the service's default --batching exact). Rounds interleave the encoders,
    first one first, then the next, so a busy neighbour slows them alike."""
    result: dict[str, dict] = {name: {} for name in encoders}
    for batch in BATCHES:
        texts = mixed_prompts(batch)
        prompts = {
            name: [encoder.tokenize(text, hidden_layer=-2, max_sequence_length=512) for text in texts]
            for name, encoder in encoders.items()
        }
        timings: dict[str, list[dict]] = {name: [] for name in encoders}
        names = list(encoders)
        for index in range(-warmup, rounds):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                start = clock()
                encoders[name].encode(prompts[name])
                if index >= 0:
                    timings[name].append(since(start))
        for name, measured in timings.items():
            median = statistics.median(timing["wall_s"] for timing in measured)
            tokens = sum(prompt.token_count for prompt in prompts[name])
            result[name][str(batch)] = {
                "prompts": batch,
                "tokens": tokens,
                "median_s": median,
                "tokens_per_s": tokens / median,
                "others_cpu_share_median": statistics.median(t["others_cpu_share"] or 0.0 for t in measured),
            }
    return result


def token_cosines(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> dict:
    cosines = torch.cat(
        [
            torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
            for a, b in zip(ours, reference, strict=True)
        ]
    )
    return {"min": cosines.min().item(), "mean": cosines.mean().item(), "tokens": cosines.numel()}


def psnr(image: np.ndarray, reference: np.ndarray) -> float | None:
    """PSNR in dB of 8-bit RGB pixels; None when the images are identical (infinite PSNR)."""
    error = np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return None if error == 0 else float(10 * np.log10(255.0**2 / error))


def render(folder: str, embeddings: dict[str, list[torch.Tensor]], side: int, steps: int, seed: int) -> dict:
    """The DiT (float32, in-process) makes one image per prompt from each variant's embeddings, same seed."""
    from PIL import Image

    from zimage_split.dit_service.engine import DiTEngine, GenerationJob, GenerationParams
    from zimage_split.model_source import ModelSource

    engine = DiTEngine(
        ModelSource(location=folder, model_id=folder), device=torch.device("cpu"), dtype=torch.float32
    )
    params = GenerationParams(width=side, height=side, steps=steps, seed=seed)
    pixels = {
        name: [
            np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB"))
            for tensor in tensors
            for image in engine.generate([GenerationJob(params=params, prompt_embeds=tensor)])
            if image is not None
        ]
        for name, tensors in embeddings.items()
    }

    def compare(name: str, reference: str) -> dict:
        values = [psnr(a, b) for a, b in zip(pixels[name], pixels[reference], strict=True)]
        finite = [value for value in values if value is not None]
        return {
            "per_image_db": values,
            "min_db": min(finite) if finite else None,
            "identical_images": len(values) - len(finite),
        }

    return {
        "int8_vs_float32": compare("int8", "float32"),
        "bfloat16_vs_float32": compare("bfloat16", "float32"),
        "int8_vs_bfloat16": compare("int8", "bfloat16"),
    }


DEFAULTS = {
    "rounds": 10,
    "warmup": 1,
    "fidelity_prompts": 16,
    "images": 2,
    "size": 256,
    "steps": 4,
    "seed": 42,
}
QUICK = {"warmup": 0, "fidelity_prompts": 4, "images": 1, "size": 64, "steps": 2}


def measure(settings: Settings, **overrides: object) -> dict:
    args = options(settings, DEFAULTS, QUICK, overrides)
    if settings.device != "cpu":
        raise ValueError(
            f"--quantize int8 runs on the CPU only; run this benchmark with --device cpu (got {settings.device})."
        )
    for name in NOISY_IMPORT_LOGGERS:  # as `zsplit` does: torchao's import warnings say nothing here
        logging.getLogger(name).setLevel(logging.ERROR)
    folder = model_folder(settings.model)
    machine = machine_info()
    texts = mixed_prompts(args.fidelity_prompts)
    speed: dict[str, dict] = {}
    embeddings: dict[str, list[torch.Tensor]] = {}
    # full: one encoder at a time (float32 Qwen3-4B alone is about 16 GB), timed one after the other;
    # the smaller presets hold all three and interleave their rounds.
    groups = [VARIANTS[i : i + 1] for i in range(len(VARIANTS))] if settings.model == "full" else [VARIANTS]
    for group in groups:
        encoders = {name: build_encoder(folder, dtype, quantize) for name, dtype, quantize in group}
        speed |= time_batches(encoders, args.rounds, args.warmup)
        for name, encoder in encoders.items():
            prompts = [encoder.tokenize(text, hidden_layer=-2, max_sequence_length=512) for text in texts]
            embeddings[name] = encoder.encode(prompts)
        del encoders, encoder
        gc.collect()
    for name, rows in speed.items():
        shown = "  ".join(f"batch {batch} {row['tokens_per_s']:8.0f} tokens/s" for batch, row in rows.items())
        print(f"{name:>9}: {shown}", flush=True)
    fidelity = {
        "int8_vs_float32": token_cosines(embeddings["int8"], embeddings["float32"]),
        "int8_vs_bfloat16": token_cosines(embeddings["int8"], embeddings["bfloat16"]),
        "bfloat16_vs_float32": token_cosines(embeddings["bfloat16"], embeddings["float32"]),
    }
    # The full DiT in float32 would take about 25 GB on top: images only for the small presets.
    images = None
    if settings.model != "full" and args.images > 0:
        images = render(
            folder,
            {name: tensors[: args.images] for name, tensors in embeddings.items()},
            args.size,
            args.steps,
            args.seed,
        )
    result = {
        "benchmark": "int8",
        "description": "encoder tokens/s in float32, bfloat16 and int8 (--quantize int8: int8 weights, dynamic "
        "per-token int8 activations, float32 elsewhere) at batch 1, 4 and 16, per-token cosine of the "
        "embeddings, and PSNR of the DiT's images made from them",
        "random_weights_caveat": RANDOM_WEIGHTS_CAVEAT,
        "machine": machine | {"load_average_at_end": list(os.getloadavg())},
        "model": model_info(folder, settings.model),
        "settings": {
            "rounds": args.rounds,
            "warmup_rounds": args.warmup,
            "device": settings.device,
            "quick": settings.quick,
            "batches": list(BATCHES),
            "fidelity_prompts": args.fidelity_prompts,
            "images": args.images if images is not None else 0,
            "image_size": args.size,
            "steps": args.steps,
            "seed": args.seed,
        },
        "tokens_per_s": speed,
        "token_cosine": fidelity,
        "image_psnr": images,
        "target": "none: a report of int8's speed and fidelity (tests/integration/test_int8_encoder.py holds "
        "the tolerance)",
        "target_met": None,
    }
    result["headline"] = headline(result)
    return result


def headline(result: dict) -> list[dict]:
    speed, cosine, images = result["tokens_per_s"], result["token_cosine"], result["image_psnr"]
    rows = [
        headline_row(
            "int8",
            f"encoder tokens/s at batch {batch}, int8",
            unit="tokens/s",
            ours=speed["int8"][batch]["tokens_per_s"],
            baseline=speed["float32"][batch]["tokens_per_s"],
            baseline_name="float32",
            ratio=speed["int8"][batch]["tokens_per_s"] / speed["float32"][batch]["tokens_per_s"],
            ratio_meaning="int8 / float32 (higher is faster)",
            note=f"bfloat16 {speed['bfloat16'][batch]['tokens_per_s']:.0f} tokens/s; "
            f"{speed['int8'][batch]['tokens']} tokens in {batch} prompts of mixed lengths",
        )
        for batch in speed["int8"]
    ]
    worst_image = images["int8_vs_float32"]["min_db"] if images else None
    psnr_note = (
        f"; image PSNR to float32's {worst_image:.1f} dB (worst image)" if worst_image is not None else ""
    )
    fp32 = cosine["int8_vs_float32"]
    bf16_error = 1 - cosine["bfloat16_vs_float32"]["min"]
    rows.append(
        headline_row(
            "int8",
            "int8 embedding error: 1 - per-token cosine to float32, worst token",
            unit="1 - cosine",
            ours=1 - fp32["min"],
            baseline=bf16_error,
            baseline_name="bfloat16's",
            ratio=(1 - fp32["min"]) / bf16_error if bf16_error > 0 else None,
            ratio_meaning="int8 / bfloat16 (lower is closer to float32)",
            note=f"cosine worst {fp32['min']:.6f}, mean {fp32['mean']:.6f}{psnr_note}. Random weights: real "
            "ones, with outliers, would show more error",
        )
    )
    return rows


def print_table(result: dict) -> None:
    print()
    print(
        f"encoder tokens/s on {result['machine']['cpu_count']} CPUs ({result['machine']['torch_threads']} torch threads)"
    )
    print(f"{'variant':<10}" + "".join(f"{'batch ' + batch:>14}" for batch in result["tokens_per_s"]["int8"]))
    for name, rows in result["tokens_per_s"].items():
        print(f"{name:<10}" + "".join(f"{row['tokens_per_s']:>14.0f}" for row in rows.values()))
    print()
    print(f"{'per-token cosine':<24}{'min':>10}{'mean':>10}")
    for pair, values in result["token_cosine"].items():
        print(f"{pair:<24}{values['min']:>10.6f}{values['mean']:>10.6f}")
    if result["image_psnr"]:
        settings = result["settings"]
        print()
        print(
            f"image PSNR, {settings['image_size']}x{settings['image_size']}, {settings['steps']} steps, seed {settings['seed']}"
        )
        for pair, values in result["image_psnr"].items():
            shown = ", ".join("identical" if v is None else f"{v:.2f} dB" for v in values["per_image_db"])
            print(f"  {pair:<22}{shown}")
    print()
    print(f"note: {RANDOM_WEIGHTS_CAVEAT}")


def main() -> None:
    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (1)")
        parser.add_argument(
            "--fidelity-prompts", type=int, default=None, help="prompts compared by cosine (16)"
        )
        parser.add_argument(
            "--images", type=int, default=None, help="images per variant for PSNR; 0: none (2)"
        )
        parser.add_argument("--size", type=int, default=None, help="image side in pixels (256)")
        parser.add_argument("--steps", type=int, default=None, help="denoising steps per image (4)")
        parser.add_argument("--seed", type=int, default=None, help="seed of every image (42)")

    settings, overrides, out = standalone(__doc__, "int8", flags)
    result = measure(settings, **overrides)
    print_table(result)
    print(f"wrote {write_json(result, out, 'int8')}")


if __name__ == "__main__":
    main()
