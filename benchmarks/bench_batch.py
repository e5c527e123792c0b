"""Encode once, generate many: P prompts x K seeds, the encoder passes it costs, and its overhead over the DiT.

One round = the whole batch job as `zsplit encode` + `zsplit generate --embeddings` run it: encode the P
prompts on the encoder service (one call, written to a safetensors file and read back), then
`run_batch` makes every image through the generator service, writes each PNG atomically and appends
the manifest. Both services are real gRPC servers on loopback in this process, with one in-process
generator worker. The baseline is the DiT engine alone: the same images from the same embeddings and
seeds, one after another, on an engine of its own in this process (loaded and run on one thread), with
nothing else running, each PNG encoded as the generator encodes it, right after the job (it needs the
job's embeddings). The figures: the encoder's forward passes and prompts encoded (from its
Info), and the job's wall time against the engine alone (the generator's own denoise + decode time
inside the job is recorded too, but it overlaps the client's work and so is no baseline).

    python -m benchmarks.bench_batch --rounds 10
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

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

TARGET_OVERHEAD = 1.05  # job wall time / the same images from the DiT engine alone
STEPS = 8
WORDS = [
    "red",
    "fox",
    "lighthouse",
    "dusk",
    "ramen",
    "neon",
    "city",
    "rain",
    "harbour",
    "forest",
    "mountain",
    "lake",
    "snow",
    "desert",
    "bridge",
]


def prompts_for(round_index: int, count: int) -> list[str]:
    """Distinct prompts of a few lengths, new every round so no cache from an earlier round helps."""
    return [
        f"round {round_index} prompt {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 5))
        for i in range(count)
    ]


def engine_alone(engine, embeddings, seeds: list[int], size: int) -> float:  # type: ignore[no-untyped-def]
    """Seconds for the DiT engine alone to make every prompt x seed image, one after another."""
    from zimage_split.dit_service.engine import GenerationJob, GenerationParams

    started = time.perf_counter()
    for embedding in embeddings:
        for seed in seeds:
            params = GenerationParams(width=size, height=size, steps=STEPS, seed=seed)
            engine.generate([GenerationJob(params=params, prompt_embeds=embedding.tensor)])
    return time.perf_counter() - started


async def one_round(folder: str, args: argparse.Namespace, round_index: int, engine, thread) -> dict:  # type: ignore[no-untyped-def]
    from zimage_split.batch_jobs import BatchSettings, encode_prompts, run_batch
    from zimage_split.client import AsyncClient, Embeddings
    from zimage_split.dit_service.config import GeneratorConfig
    from zimage_split.dit_service.server import start_generator_server
    from zimage_split.encoder_service.config import EncoderConfig
    from zimage_split.encoder_service.server import start_encoder_server

    encoder = await start_encoder_server(EncoderConfig(model=folder, port=0, device="cpu", dtype="float32"))
    generator = await start_generator_server(
        GeneratorConfig(
            model=folder, encoder=f"127.0.0.1:{encoder.port}", port=0, device="cpu", dtype="float32"
        )
    )
    try:
        async with AsyncClient(
            generator=f"127.0.0.1:{generator.port}", encoder=f"127.0.0.1:{encoder.port}", busy_retries=100
        ) as client:
            before = await client.encoder_info()
            with tempfile.TemporaryDirectory() as scratch:
                started = clock()
                embeddings = await encode_prompts(client, prompts_for(round_index, args.prompts))
                embeddings = Embeddings.load(embeddings.save(Path(scratch) / "embeds.safetensors"))
                encoded = since(started)
                report = await run_batch(
                    client,
                    embeddings,
                    Path(scratch) / "out",
                    seeds=list(range(args.seeds)),
                    sizes=[(args.size, args.size)],
                    settings=BatchSettings(steps=STEPS, guidance_scale=None),
                    concurrency=args.concurrency,
                )
                job = since(started)
                alone_s = await asyncio.get_running_loop().run_in_executor(
                    thread, engine_alone, engine, embeddings, list(range(args.seeds)), args.size
                )
            after = await client.encoder_info()
    finally:
        await generator.stop(grace=0)
        await encoder.stop(grace=0)
    images = args.prompts * args.seeds
    assert report.made == images, report
    return {
        "round": round_index,
        "images": images,
        "job_wall_s": job["wall_s"],
        "encode_and_file_wall_s": encoded["wall_s"],
        "engine_alone_s": alone_s,
        "overhead_ratio": job["wall_s"] / alone_s,
        "dit_sum_s": report.dit_seconds,
        "overhead_ratio_to_dit_sum": job["wall_s"] / report.dit_seconds,
        "prompts_encoded": int(after["prompts_encoded"]) - int(before.get("prompts_encoded", 0)),
        "encoder_forward_passes": int(after["forward_passes"]) - int(before.get("forward_passes", 0)),
        "others_cpu_share": job["others_cpu_share"],
    }


async def run(args: argparse.Namespace, folder: str) -> list[dict]:
    import torch

    from zimage_split.devices import build_on_torch_thread
    from zimage_split.dit_service.engine import DiTEngine
    from zimage_split.model_source import resolve_model

    thread, engine = await build_on_torch_thread(
        "engine-alone",
        lambda: DiTEngine(resolve_model(folder), device=torch.device("cpu"), dtype=torch.float32),
    )
    rounds = []
    try:
        for index in range(args.rounds):
            rounds.append(await one_round(folder, args, index, engine, thread))
            print_round(rounds[-1], args)
    finally:
        thread.shutdown()
    return rounds


def print_round(result: dict, args: argparse.Namespace) -> None:
    print(
        f"round {result['round'] + 1}/{args.rounds}: {result['images']} images in {result['job_wall_s']:.2f}s, "
        f"engine alone {result['engine_alone_s']:.2f}s -> {result['overhead_ratio']:.3f}x (DiT time inside "
        f"the job {result['dit_sum_s']:.2f}s); encoder: "
        f"{result['prompts_encoded']} prompts in {result['encoder_forward_passes']} forward passes",
        flush=True,
    )


DEFAULTS = {"rounds": 10, "prompts": 8, "seeds": 4, "size": 256, "concurrency": 8}
QUICK = {"prompts": 2, "seeds": 2, "size": 64, "concurrency": 2}


def measure(settings: Settings, **overrides: object) -> dict:
    args = options(settings, DEFAULTS, QUICK, overrides)
    folder = model_folder(settings.model)
    machine = machine_info()
    rounds = asyncio.run(run(args, folder))
    ratios = [r["overhead_ratio"] for r in rounds]
    encoder_passes_ok = all(r["prompts_encoded"] == args.prompts for r in rounds)
    result = {
        "benchmark": "batch",
        "description": (__doc__ or "").split("\n\n")[1].replace("\n", " "),
        "machine": machine,
        "model": model_info(folder, settings.model),
        "settings": {
            "prompts": args.prompts,
            "seeds": args.seeds,
            "width": args.size,
            "height": args.size,
            "steps": STEPS,
            "dtype": "float32",
            "device": "cpu",
            "concurrency": args.concurrency,
            "generator_workers": 1,
            "rounds": args.rounds,
            "quick": settings.quick,
        },
        "rounds": rounds,
        "overhead_ratio_median": statistics.median(ratios),
        "overhead_ratio_spread": summary(ratios),
        "overhead_ratio_to_dit_sum_median": statistics.median(r["overhead_ratio_to_dit_sum"] for r in rounds),
        "prompts_encoded_per_round": [r["prompts_encoded"] for r in rounds],
        "encoder_forward_passes_per_round": [r["encoder_forward_passes"] for r in rounds],
        "target": f"prompts encoded == {args.prompts} and job wall / engine alone <= {TARGET_OVERHEAD}",
        "target_met": encoder_passes_ok and statistics.median(ratios) <= TARGET_OVERHEAD,
    }
    result["headline"] = headline(result)
    return result


def headline(result: dict) -> list[dict]:
    settings = result["settings"]
    images = settings["prompts"] * settings["seeds"]
    return [
        headline_row(
            "batch",
            f"encode-once job: {settings['prompts']} prompts x {settings['seeds']} seeds, "
            f"{settings['width']}x{settings['height']}",
            unit="s per job",
            ours=statistics.median(r["job_wall_s"] for r in result["rounds"]),
            baseline=statistics.median(r["engine_alone_s"] for r in result["rounds"]),
            baseline_name="the DiT engine alone, the same images one after another",
            ratio=statistics.median(r["job_wall_s"] for r in result["rounds"])
            / statistics.median(r["engine_alone_s"] for r in result["rounds"]),
            ratio_meaning="job wall / engine alone (lower is better)",
            target=f"<= {TARGET_OVERHEAD}, one encode per prompt",
            target_met=result["target_met"],
            note=f"{images} images; per-round ratio median {result['overhead_ratio_median']:.3f}, IQR "
            f"{result['overhead_ratio_spread']['q1_s']:.3f}-{result['overhead_ratio_spread']['q3_s']:.3f}, "
            f"{len(result['rounds'])} rounds; prompts encoded per job {result['prompts_encoded_per_round']} in "
            f"{result['encoder_forward_passes_per_round']} forward passes",
        )
    ]


def main() -> None:
    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--prompts", type=int, default=None, help="prompts P (8)")
        parser.add_argument("--seeds", type=int, default=None, help="seeds K per prompt (4)")
        parser.add_argument("--size", type=int, default=None, help="image width and height (256)")
        parser.add_argument("--concurrency", type=int, default=None, help="requests in flight (8)")

    settings, overrides, out = standalone(__doc__, "batch", flags)
    result = measure(settings, **overrides)
    print(
        f"\n{result['settings']['prompts']} prompts x {result['settings']['seeds']} seeds: job / engine alone "
        f"median {result['overhead_ratio_median']:.3f}x (target <= {TARGET_OVERHEAD}); prompts encoded per "
        f"round {result['prompts_encoded_per_round']} in {result['encoder_forward_passes_per_round']} forward "
        f"passes; target {'met' if result['target_met'] else 'NOT met'}"
    )
    print(f"wrote {write_json(result, out, 'batch')}")


if __name__ == "__main__":
    main()
