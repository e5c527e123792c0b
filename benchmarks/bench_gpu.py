"""The GPU figures, on the `full` preset: the real Z-Image-Turbo sizes with random bf16 weights built on the GPU.

- **latency**: p50 seconds per image, prompt text to PIL image, through both services (encoder and generator
  gRPC servers in this process, both on the GPU, caches off, a new prompt every round) against diffusers'
  `ZImagePipeline` in-process with the same weights, attention backend and compile setting. Target <= 1.03.
- **throughput**: images/s of one generator engine (what one replica runs) at batch 1 and batch 4.
- **VRAM**: the peak memory torch allocated for a generator replica (DiT + VAE, 1024x1024, batch 1), from
  engine build to the decoded image. Target <= 16 GiB, so that a replica fits a 16 GB card.
- **encode**: tokens/s of the full text encoder (Qwen3-4B up to hidden_states[-2], bf16) on the GPU and on
  the CPU.

Without CUDA only the CPU encode figure is taken and the JSON says the rest was not measured; `--quick` runs
every part on the tiny model on the CPU, which checks the code and means nothing as a figure.

    python -m benchmarks.bench_gpu --device cuda --rounds 10
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time

import numpy as np
import torch

from benchmarks.report import (
    Settings,
    clock,
    headline_row,
    machine_info,
    model_info,
    options,
    since,
    standalone,
    summary,
    write_json,
)

TARGET_LATENCY_RATIO = 1.03  # ours / diffusers, p50
TARGET_VRAM_GIB = 16.0
ANCHOR = "SGLang: 1.93 s end to end at 1024x1024 on one H100 with torch.compile (2.35 s without)"
PROMPTS = [
    "a red fox sitting in fresh snow at the edge of a pine forest at dawn, soft golden light",
    "a lighthouse on a rocky coast at dusk, waves breaking, long exposure, dramatic clouds",
    "a bowl of ramen with a soft egg, steam rising, neon reflections on a wet counter",
    "an old tram in a narrow street of a hillside town, morning sun, washing lines overhead",
]

DEFAULTS = {
    "rounds": 10,
    "warmup": 2,
    "size": 1024,
    "steps": 8,
    "attention": "auto",
    "compile": False,
    "cpu_encode_rounds": 1,
    "cpu_encode_prompts": 1,
}
# At least one warm-up round even when quick: the first pays for lazy initialisation (and compilation).
QUICK = {"warmup": 1, "size": 64, "steps": 2, "cpu_encode_rounds": 1}


def prompt_for(index: int) -> str:
    return f"{PROMPTS[index % len(PROMPTS)]}, variation {index}"


def gib(value: int) -> float:
    return value / (1 << 30)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_memory(device: torch.device) -> dict:
    """What the driver says is free on the whole device (other processes and torch's cache count as used)."""
    free, total = torch.cuda.mem_get_info(device)
    return {"free_gib": gib(free), "total_gib": gib(total)}


def generator_options(args: argparse.Namespace) -> dict:
    return {"attention": args.attention, "compile": args.compile}


def measure_engine(source, device: torch.device, args: argparse.Namespace) -> dict:  # type: ignore[no-untyped-def]
    """Peak VRAM of one replica at batch 1, then images/s at batch 1 and batch 4, on one DiTEngine."""
    from zimage_split.dit_service.engine import DiTEngine, GenerationJob, GenerationParams

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    started = clock()
    engine = DiTEngine(source, device=device, dtype=torch.bfloat16, **generator_options(args))
    synchronize(device)
    build = since(started)
    caption_dim = engine.caption_dim

    def jobs(count: int, seed: int) -> list:
        embeddings = torch.randn(count, 160, caption_dim, generator=torch.Generator().manual_seed(seed))
        return [
            GenerationJob(
                params=GenerationParams(width=args.size, height=args.size, steps=args.steps, seed=seed + i),
                prompt_embeds=e,
            )
            for i, e in enumerate(embeddings)
        ]

    engine.warm_up()
    synchronize(device)
    result: dict = {"engine_build_s": build["wall_s"], "attention_backend": engine.info.attention_backend}
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    engine.generate(jobs(1, 1))
    synchronize(device)
    if cuda:
        result["vram"] = {
            "weights_gib": gib(torch.cuda.memory_allocated(device) - before),
            "peak_allocated_gib": gib(torch.cuda.max_memory_allocated(device) - before),
            "peak_reserved_gib": gib(torch.cuda.max_memory_reserved(device)),
            "after": device_memory(device),
            "target": f"peak_allocated_gib <= {TARGET_VRAM_GIB}",
            "target_met": gib(torch.cuda.max_memory_allocated(device) - before) <= TARGET_VRAM_GIB,
        }
    for batch in (1, 4):
        for warm in range(args.warmup):
            engine.generate(jobs(batch, 10_000 + warm))
        seconds = []
        for index in range(args.rounds):
            started = clock()
            engine.generate(jobs(batch, 1000 * index))
            synchronize(device)
            seconds.append(since(started)["wall_s"])
        result[f"batch_{batch}"] = summary(seconds) | {
            "images_per_s": batch / statistics.median(seconds),
            "seconds": seconds,
        }
    del engine
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def measure_encode(source, device: torch.device, rounds: int, prompts: int = len(PROMPTS)) -> dict:  # type: ignore[no-untyped-def]
    """Tokens/s of our TextEncoder on a batch of `prompts` prompts (one forward pass), bf16."""
    from zimage_split.encoder_service.engine import TextEncoder

    started = clock()
    encoder = TextEncoder(source, device=device, dtype=torch.bfloat16, hidden_layer=-2)
    build = since(started)
    tokens = [
        encoder.tokenize(prompt, hidden_layer=-2, max_sequence_length=512) for prompt in PROMPTS[:prompts]
    ]
    count = sum(len(t.input_ids) for t in tokens)
    with torch.inference_mode():
        # Lazy initialisation and kernels, on a short prompt: a full one takes minutes on a CPU.
        encoder.encode([encoder.tokenize(PROMPTS[0], hidden_layer=-2, max_sequence_length=8)])
        seconds = []
        for _ in range(rounds):
            started = clock()
            encoder.encode(tokens)
            synchronize(device)
            seconds.append(since(started)["wall_s"])
    del encoder
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "device": str(device),
        "build_s": build["wall_s"],
        "prompts_per_pass": len(tokens),
        "tokens_per_pass": count,
        "seconds": seconds,
        "tokens_per_s": count / statistics.median(seconds),
        "torch_threads": torch.get_num_threads(),
    }


async def measure_latency(source, model: str, device: torch.device, args: argparse.Namespace) -> dict:  # type: ignore[no-untyped-def]
    """p50 prompt-to-image seconds, both services on `device` against ZImagePipeline in-process."""
    from zimage_split.client import AsyncClient
    from zimage_split.dit_service.config import EngineOptions, GeneratorConfig
    from zimage_split.dit_service.outputs import OutputOptions, encode_image
    from zimage_split.dit_service.server import start_generator_server
    from zimage_split.encoder_service.config import EncoderConfig
    from zimage_split.encoder_service.server import start_encoder_server
    from zimage_split.model_source import reference_pipeline

    encoder = await start_encoder_server(
        EncoderConfig(model=model, port=0, device=str(device), dtype="bfloat16", cache_bytes=0)
    )
    started = time.perf_counter()
    generator = await start_generator_server(
        GeneratorConfig(
            model=model,
            encoder=f"127.0.0.1:{encoder.port}",
            port=0,
            device=str(device),
            dtype="bfloat16",
            cache_bytes=0,
            engine=EngineOptions(**generator_options(args)),
        )
    )
    # Engine build and warm-up: with --compile, the compilation of the graphs requests need.
    generator_start_s = time.perf_counter() - started
    from diffusers.models.attention_dispatch import attention_backend

    backend = generator.servicer.info.attention_backend
    pipe = reference_pipeline(source, device=device, dtype=torch.bfloat16)
    if args.compile:
        # As the generator does (DiTEngine._compile), limit included: this thread may not see the one it set.
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, limit, max(getattr(config, limit), 64))
        pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=True)

    def theirs(prompt: str, seed: int) -> tuple[float, float, np.ndarray]:
        """Seconds to the PIL image, then seconds to write the PNG file our generator sends."""
        started = time.perf_counter()
        with attention_backend(backend):  # what the generator does around its own pipeline calls
            image = pipe(
                prompt,
                width=args.size,
                height=args.size,
                num_inference_steps=args.steps,
                guidance_scale=0.0,
                generator=torch.Generator("cpu").manual_seed(seed),
            ).images[0]
        pil_s = time.perf_counter() - started
        started = time.perf_counter()
        encode_image(image, OutputOptions())
        return pil_s, time.perf_counter() - started, np.asarray(image.convert("RGB"), dtype=np.int16)

    rounds, warmup_rounds = [], []
    try:
        async with AsyncClient(generator=f"127.0.0.1:{generator.port}", timeout=1800) as client:

            async def ours(prompt: str, seed: int) -> tuple[float, dict, np.ndarray]:
                started = time.perf_counter()
                image = await client.generate(
                    prompt, seed=seed, width=args.size, height=args.size, steps=args.steps
                )
                pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
                return time.perf_counter() - started, dict(image.info["timings"]), pixels

            for index in range(-args.warmup, args.rounds):
                prompt, seed = prompt_for(index + args.warmup), 7 + index
                if index % 2 == 0:
                    ours_s, timings, ours_pixels = await ours(prompt, seed)
                    theirs_s, png_s, their_pixels = theirs(prompt, seed)
                else:
                    theirs_s, png_s, their_pixels = theirs(prompt, seed)
                    ours_s, timings, ours_pixels = await ours(prompt, seed)
                print(
                    f"latency {'warm-up' if index < 0 else index + 1}: ours {ours_s:.3f} s, "
                    f"diffusers {theirs_s:.3f} s (+ PNG {png_s:.3f} s)",
                    flush=True,
                )
                round_result = {
                    "ours_s": ours_s,
                    "diffusers_s": theirs_s,
                    "diffusers_png_s": png_s,
                    # The generator's own stages (decode includes writing the PNG), as the image reports them.
                    "ours_stages_s": timings,
                    "max_pixel_diff": int(np.abs(ours_pixels - their_pixels).max()),
                }
                (warmup_rounds if index < 0 else rounds).append(round_result)
    finally:
        await generator.stop(grace=1)
        await encoder.stop(grace=1)
    ours_p50 = statistics.median(r["ours_s"] for r in rounds)
    theirs_p50 = statistics.median(r["diffusers_s"] for r in rounds)
    theirs_png_p50 = statistics.median(r["diffusers_s"] + r["diffusers_png_s"] for r in rounds)
    return {
        "attention_backend": backend,
        "compiled": args.compile,
        # Building the generator engine and warming it up; compiled, most of it is compilation.
        "generator_start_s": generator_start_s,
        # The first warm-up round of each side pays for lazy initialisation (and diffusers' compilation).
        "warmup_rounds": warmup_rounds,
        "rounds": rounds,
        "ours_p50_s": ours_p50,
        "diffusers_p50_s": theirs_p50,
        "ratio_p50": ours_p50 / theirs_p50,
        # Against diffusers that also writes the PNG file our generator sends (same encoder, same level).
        "diffusers_with_png_p50_s": theirs_png_p50,
        "ratio_with_png_p50": ours_p50 / theirs_png_p50,
        "ratio_per_round_median": statistics.median(r["ours_s"] / r["diffusers_s"] for r in rounds),
        "max_pixel_diff": max(r["max_pixel_diff"] for r in rounds),
        "target": f"ratio_p50 <= {TARGET_LATENCY_RATIO}",
        "target_met": ours_p50 / theirs_p50 <= TARGET_LATENCY_RATIO,
    }


def measure(settings: Settings, **overrides: object) -> dict:
    args = options(settings, DEFAULTS, QUICK, overrides)
    if args.warmup < 1:
        raise SystemExit(
            "--warmup must be >= 1: the first round pays for lazy initialisation and compilation"
        )
    if args.cpu_encode_rounds < 0:
        raise SystemExit("--cpu-encode-rounds must be >= 0 (0 skips the CPU encode)")
    from zimage_split.model_source import resolve_model

    model = settings.model if settings.quick or settings.model != "bench" else "full"
    source = resolve_model(model)
    device = torch.device("cpu" if settings.quick else settings.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device {settings.device}: this torch has no CUDA device; use --device cpu")
    machine = machine_info()
    result: dict = {
        "benchmark": "gpu",
        "description": (__doc__ or "").split("\n\n")[0],
        "machine": machine
        | ({"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda} if cuda else {}),
        "model": model_info(source.location, model),
        "settings": {
            "device": str(device),
            "dtype": "bfloat16",
            "width": args.size,
            "height": args.size,
            "steps": args.steps,
            "rounds": args.rounds,
            "warmup_rounds": args.warmup,
            "attention": args.attention,
            "compile": args.compile,
            "quick": settings.quick,
        },
        "anchor": ANCHOR,
        "not_measured": [],
    }
    if cuda or settings.quick:
        result["engine"] = measure_engine(source, device, args)
        result["encode_gpu" if cuda else "encode_device"] = measure_encode(source, device, args.rounds)
        result["latency"] = asyncio.run(measure_latency(source, model, device, args))
    else:
        result["not_measured"].append(
            "gpu: latency against diffusers, images/s at batch 1 and 4, peak VRAM and GPU encode tokens/s "
            "(no CUDA device on this machine; no figure is invented)"
        )
    if args.cpu_encode_rounds > 0:
        result["encode_cpu"] = measure_encode(
            source, torch.device("cpu"), args.cpu_encode_rounds, args.cpu_encode_prompts
        )
    else:
        result["not_measured"].append("encode tokens/s on the CPU (--cpu-encode-rounds 0)")
    vram = result.get("engine", {}).get("vram")
    latency = result.get("latency")
    result["target"] = (
        f"latency ours/diffusers p50 <= {TARGET_LATENCY_RATIO}; replica peak VRAM <= {TARGET_VRAM_GIB} GiB"
    )
    result["target_met"] = (
        None if not cuda else bool(latency and latency["target_met"] and vram and vram["target_met"])
    )
    result["headline"] = headline(result)
    return result


def headline(result: dict) -> list[dict]:
    settings = result["settings"]
    where = f"{settings['width']}x{settings['height']}, {settings['steps']} steps, {settings['device']}"
    rows = []
    latency, engine = result.get("latency"), result.get("engine")
    if latency:
        rows.append(
            headline_row(
                "gpu",
                f"p50 prompt to image, {where}" + (", compiled" if latency["compiled"] else ""),
                unit="s",
                ours=latency["ours_p50_s"],
                baseline=latency["diffusers_p50_s"],
                baseline_name="diffusers in-process",
                ratio=latency["ratio_p50"],
                ratio_meaning="ours / diffusers (lower is better)",
                target=f"<= {TARGET_LATENCY_RATIO}",
                target_met=latency["target_met"],
                note=f"attention {latency['attention_backend']}; anchor: {ANCHOR}",
            )
        )
    if engine:
        rows.append(
            headline_row(
                "gpu",
                f"generator replica images/s, batch 4 against batch 1, {where}",
                unit="images/s",
                ours=engine["batch_4"]["images_per_s"],
                baseline=engine["batch_1"]["images_per_s"],
                baseline_name="batch 1",
                ratio=engine["batch_4"]["images_per_s"] / engine["batch_1"]["images_per_s"],
                ratio_meaning="batch 4 / batch 1",
            )
        )
        if "vram" in engine:
            rows.append(
                headline_row(
                    "gpu",
                    f"generator replica peak VRAM, batch 1, {where}",
                    unit="GiB",
                    ours=engine["vram"]["peak_allocated_gib"],
                    target=f"<= {TARGET_VRAM_GIB}",
                    target_met=engine["vram"]["target_met"],
                    note=f"weights {engine['vram']['weights_gib']:.2f} GiB; peak reserved "
                    f"{engine['vram']['peak_reserved_gib']:.2f} GiB",
                )
            )
    for key in ("encode_gpu", "encode_device", "encode_cpu"):
        encode = result.get(key)
        if encode and not (key == "encode_device" and encode["device"] == "cpu" and "encode_cpu" in result):
            rows.append(
                headline_row(
                    "gpu",
                    f"encode tokens/s, {result['model']['name']} encoder, bf16, {encode['device']}",
                    unit="tokens/s",
                    ours=encode["tokens_per_s"],
                    note=f"{encode['prompts_per_pass']} prompts, {encode['tokens_per_pass']} tokens per "
                    f"forward pass; {encode['torch_threads']} torch threads",
                )
            )
    return rows


def main() -> None:
    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (2)")
        parser.add_argument("--size", type=int, default=None, help="image width and height (1024)")
        parser.add_argument("--steps", type=int, default=None, help="denoising steps (8)")
        parser.add_argument(
            "--attention", default=None, help="attention backend, as --attention of serve (auto)"
        )
        parser.add_argument(
            "--compile", action="store_true", default=None, help="regional torch.compile on both sides"
        )
        parser.add_argument(
            "--cpu-encode-rounds", type=int, default=None, help="CPU encode passes (1; 0 skips it)"
        )
        parser.add_argument("--cpu-encode-prompts", type=int, default=None, help="prompts per CPU pass (1)")

    settings, overrides, out = standalone(__doc__, "gpu", flags)
    result = measure(settings, **overrides)
    for row in result["headline"]:
        print(
            f"{row['metric']}: {row['ours']:.3f} {row['unit']}"
            + (f" (ratio {row['ratio']:.3f})" if row["ratio"] else "")
        )
    for line in result["not_measured"]:
        print(f"not measured: {line}")
    print(f"wrote {write_json(result, out, 'gpu')}")


if __name__ == "__main__":
    main()
