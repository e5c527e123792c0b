"""The GPU checks in one step, for a CUDA machine with no network: `python -m benchmarks.device_check`.

Phases, in order; after each, the results so far are written (device-check.json and device-check.md in
--out-dir), so a late failure loses nothing measured before it:

1. versions: library versions, the GPU, and an import of every module the run needs (nothing is built
   before they all import; Ray is not needed and must not be imported).
2. cuda_smoke: the tiny model through both services (real gRPC servers in this process) on the device, one
   image: the CUDA path works before any time goes into the full-size model.
3. full_build: the `full` preset (the real Z-Image-Turbo sizes, random bf16 weights built on the GPU): one
   generator engine built, warmed up, and one image at --size.
4. latency, latency_compiled: p50 prompt-to-image seconds through both services against diffusers'
   ZImagePipeline in-process with the same weights (benchmarks/bench_gpu.py), eager, then with regional
   torch.compile on both sides (the compile warm-up seconds are recorded).
5. vram: one generator replica's peak memory at 1024x1024 and 2048x2048 (tiled under --vae-tiling auto):
   torch's peak allocated and peak reserved, and the driver's free memory (torch.cuda.mem_get_info).
6. encode: the full text encoder's tokens/s on the GPU.

A phase runs only if the phases it needs succeeded and its estimated time fits in what is left of
--budget-seconds; otherwise it is recorded as skipped, with the reason. `--quick` runs the same phases on the
tiny model on the CPU in seconds (the test suite does): it checks the code, and its figures mean nothing.

    python -m benchmarks.device_check --out-dir results/          # on the GPU machine, under 8 minutes
    python -m benchmarks.device_check --quick --out-dir /tmp/dc   # anywhere: the rehearsal
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import importlib.metadata
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "device-check"
# What `python -m benchmarks.device_check` needs beyond the standard library, imported by the versions
# phase before anything is built. zimage_split's own modules bring in the rest (prometheus_client, ...).
MODULES = (
    "torch",
    "numpy",
    "PIL.Image",
    "safetensors.torch",
    "google.protobuf",
    "grpc",
    "grpc.aio",
    "grpc_health.v1.health_pb2",
    "grpc_health.v1.health_pb2_grpc",
    "transformers",
    "peft",
    "accelerate",
    "diffusers",
    "zimage_split._proto.tensor.v1.tensor_pb2",
    "zimage_split._proto.encoder.v1.encoder_pb2_grpc",
    "zimage_split._proto.generator.v1.generator_pb2_grpc",
    "zimage_split.model_source",
    "zimage_split.tiny_model",
    "zimage_split.random_weights",
    "zimage_split.encoder_service.engine",
    "zimage_split.encoder_service.server",
    "zimage_split.dit_service.engine",
    "zimage_split.dit_service.server",
    "zimage_split.client",
    "benchmarks.report",
    "benchmarks.bench_gpu",
)
# Classes looked up by name inside diffusers (its lazy imports fail only when first used).
DIFFUSERS_CLASSES = (
    "ZImagePipeline",
    "ZImageImg2ImgPipeline",
    "ZImageInpaintPipeline",
    "ZImageTransformer2DModel",
    "AutoencoderKL",
    "FlowMatchEulerDiscreteScheduler",
)
DISTRIBUTIONS = (
    "torch",
    "triton",
    "diffusers",
    "transformers",
    "tokenizers",
    "huggingface-hub",
    "peft",
    "accelerate",
    "safetensors",
    "grpcio",
    "grpcio-health-checking",
    "protobuf",
    "pillow",
    "numpy",
    "prometheus-client",
    "blake3",
    "ray",
)
BUDGET_SECONDS = 420
# Rough seconds each phase takes on one H100/H200 (quick mode: none), to skip a phase that would not fit.
ESTIMATES = {
    "versions": 10,
    "cuda_smoke": 20,
    "full_build": 40,
    "latency": 60,
    "latency_compiled": 150,
    "vram": 40,
    "encode": 30,
}
NEEDS = {
    "versions": (),
    "cuda_smoke": ("versions",),
    "full_build": ("cuda_smoke",),
    "latency": ("full_build",),
    "latency_compiled": ("full_build",),
    "vram": ("full_build",),
    "encode": ("full_build",),
}
PHASES = tuple(NEEDS)


@dataclass
class Check:
    """The run's settings and the results so far."""

    out_dir: Path
    quick: bool
    device_name: str
    budget_seconds: float
    size: int
    steps: int
    rounds: int
    warmup: int
    attention: str
    skip: frozenset[str]
    started: float = field(default_factory=time.perf_counter)
    report: dict = field(default_factory=dict)

    @property
    def model(self) -> str:
        """The model of the full-size phases: `full`, or `tiny` in the rehearsal."""
        return "tiny" if self.quick else "full"

    @property
    def vram_sizes(self) -> tuple[int, ...]:
        # Quick: a size over one 1024-pixel tile, so that the tiled decode runs (under --vae-tiling on).
        return (self.size, 1040) if self.quick else (1024, 2048)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def gib(value: int) -> float:
    return value / (1 << 30)


def device(check: Check):  # type: ignore[no-untyped-def]
    import torch

    return torch.device(check.device_name)


def free_memory(check: Check) -> None:
    import torch

    gc.collect()
    if device(check).type == "cuda":
        torch.cuda.empty_cache()


# ---- phases ------------------------------------------------------------------------------------------------


def versions(check: Check) -> dict:
    """Versions, the device, and every module imported; raises listing every import that failed."""
    found = {}
    for name in DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    print("versions: " + ", ".join(f"{k} {v or '-'}" for k, v in found.items()), flush=True)
    failed = []
    for module in MODULES:
        try:
            importlib.import_module(module)
        except Exception as error:
            failed.append(f"{module}: {type(error).__name__}: {error}")
    if not any(line.startswith("diffusers:") for line in failed):
        diffusers = importlib.import_module("diffusers")
        for name in DIFFUSERS_CLASSES:
            try:
                getattr(diffusers, name)
            except Exception as error:
                failed.append(f"diffusers.{name}: {type(error).__name__}: {error}")
    if failed:
        raise RuntimeError(
            "These imports failed; install the missing wheels (benchmarks/README.md, 'device check'):\n"
            + "\n".join(failed)
        )
    import torch
    from torch.utils._triton import has_triton

    result: dict = {
        "python": sys.version.split()[0],
        "distributions": found,
        "modules_imported": len(MODULES) + len(DIFFUSERS_CLASSES),
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
    }
    where = device(check)
    if where.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {check.device_name}: this torch ({torch.__version__}) sees no GPU.")
        free, total = torch.cuda.mem_get_info(where)
        result |= {
            "gpu": torch.cuda.get_device_name(where),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(where))),
            "free_gib": gib(free),
            "total_gib": gib(total),
            "triton": has_triton(),
        }
    result["summary"] = (
        f"torch {torch.__version__}, diffusers {found['diffusers']}, grpcio {found['grpcio']}, "
        f"protobuf {found['protobuf']}" + (f"; {result['gpu']}" if "gpu" in result else "; no GPU used")
    )
    return result


def cuda_smoke(check: Check) -> dict:
    """The tiny model through both services on the device: one image."""
    import numpy as np

    from zimage_split.client import AsyncClient
    from zimage_split.dit_service.config import GeneratorConfig
    from zimage_split.dit_service.server import start_generator_server
    from zimage_split.encoder_service.config import EncoderConfig
    from zimage_split.encoder_service.server import start_encoder_server

    async def one_image() -> dict:
        started = time.perf_counter()
        encoder = await start_encoder_server(
            EncoderConfig(model="tiny", port=0, device=check.device_name, dtype="bfloat16", cache_bytes=0)
        )
        generator = await start_generator_server(
            GeneratorConfig(
                model="tiny",
                encoder=f"127.0.0.1:{encoder.port}",
                port=0,
                device=check.device_name,
                dtype="bfloat16",
                cache_bytes=0,
            )
        )
        start_s = time.perf_counter() - started
        try:
            async with AsyncClient(generator=f"127.0.0.1:{generator.port}", timeout=300) as client:
                started = time.perf_counter()
                image = await client.generate("a red fox in snow", seed=1, width=128, height=128, steps=2)
                seconds = time.perf_counter() - started
        finally:
            await generator.stop(grace=1)
            await encoder.stop(grace=1)
        pixels = np.asarray(image.convert("RGB"))
        return {
            "servers_start_s": start_s,
            "image_s": seconds,
            "size": list(image.size),
            "pixel_std": float(pixels.std()),
            "stages_s": dict(image.info["timings"]),
            "summary": f"tiny model, both services on {check.device_name}: one 128x128 image in {seconds:.2f} s",
        }

    result = asyncio.run(one_image())
    if result["size"] != [128, 128]:
        raise RuntimeError(f"The smoke image is {result['size']}, not 128x128.")
    return result


def full_build(check: Check) -> dict:
    """One generator engine on the full-size model: build, warm-up, one image at --size."""
    import torch

    from zimage_split.dit_service.engine import DiTEngine, GenerationJob, GenerationParams
    from zimage_split.model_source import resolve_model

    where = device(check)
    cuda = where.type == "cuda"
    started = time.perf_counter()
    source = resolve_model(check.model)
    folder_s = time.perf_counter() - started
    before = torch.cuda.memory_allocated(where) if cuda else 0
    started = time.perf_counter()
    engine = DiTEngine(source, device=where, dtype=torch.bfloat16, attention=check.attention)
    build_s = time.perf_counter() - started
    weights = gib(torch.cuda.memory_allocated(where) - before) if cuda else None
    started = time.perf_counter()
    engine.warm_up()
    warm_up_s = time.perf_counter() - started
    embeds = torch.randn(160, engine.caption_dim, generator=torch.Generator().manual_seed(0))
    params = GenerationParams(width=check.size, height=check.size, steps=check.steps, seed=1)
    started = time.perf_counter()
    (image,) = engine.generate([GenerationJob(params, embeds)])
    image_s = time.perf_counter() - started
    assert image is not None  # no job was cancelled
    result = {
        "model": check.model,
        "folder": source.location,
        "folder_s": folder_s,
        "engine_build_s": build_s,
        "weights_gib": weights,
        "parameter_count": engine.info.parameter_count,
        "attention_backend": engine.info.attention_backend,
        "warm_up_s": warm_up_s,
        "image_s": image_s,
        "stages_s": {
            "denoise": image.denoise_seconds,
            "decode": image.decode_seconds,
            "file": image.file_seconds,
        },
        "png_bytes": len(image.data),
        "summary": f"{check.model}: engine built in {build_s:.1f} s"
        + (f" ({weights:.2f} GiB)" if weights is not None else "")
        + f", one {check.size}x{check.size} image in {image_s:.2f} s",
    }
    del engine
    free_memory(check)
    return result


def latency(check: Check, *, compile: bool) -> dict:
    """bench_gpu's latency against diffusers in-process, eager or compiled."""
    from benchmarks.bench_gpu import measure_latency
    from zimage_split.model_source import resolve_model

    args = argparse.Namespace(
        size=check.size,
        steps=check.steps,
        rounds=check.rounds,
        warmup=check.warmup,
        attention=check.attention,
        compile=compile,
    )
    result = asyncio.run(measure_latency(resolve_model(check.model), check.model, device(check), args))
    free_memory(check)
    result["summary"] = (
        f"{'compiled' if compile else 'eager'}: ours {result['ours_p50_s']:.3f} s, diffusers "
        f"{result['diffusers_p50_s']:.3f} s (+ PNG {result['diffusers_with_png_p50_s']:.3f} s), ratio "
        f"{result['ratio_p50']:.3f} ({result['ratio_with_png_p50']:.3f} with PNG); generator start "
        f"{result['generator_start_s']:.1f} s"
    )
    return result


def vram(check: Check) -> dict:
    """One replica's memory at each size; an out-of-memory is recorded as that size's result."""
    import torch

    from zimage_split.common.errors import ResourceExhausted
    from zimage_split.dit_service.engine import DiTEngine, GenerationJob, GenerationParams
    from zimage_split.model_source import resolve_model

    where = device(check)
    cuda = where.type == "cuda"
    free_memory(check)
    if cuda:
        torch.cuda.reset_peak_memory_stats(where)
    before = torch.cuda.memory_allocated(where) if cuda else 0
    engine = DiTEngine(
        resolve_model(check.model),
        device=where,
        dtype=torch.bfloat16,
        attention=check.attention,
        vae_tiling="on" if check.quick else "auto",
    )
    engine.warm_up()
    weights = gib(torch.cuda.memory_allocated(where) - before) if cuda else None
    points = []
    for side in check.vram_sizes:
        free_memory(check)
        if cuda:
            torch.cuda.reset_peak_memory_stats(where)
        point: dict = {"width": side, "height": side, "vae_tiled": engine.decodes_tiled(side, side)}
        embeds = torch.randn(160, engine.caption_dim, generator=torch.Generator().manual_seed(side))
        params = GenerationParams(width=side, height=side, steps=check.steps, seed=side)
        started = time.perf_counter()
        try:
            (image,) = engine.generate([GenerationJob(params, embeds)])
        except ResourceExhausted as error:
            point["out_of_memory"] = error.message
        else:
            assert image is not None  # no job was cancelled
            point |= {
                "image_s": time.perf_counter() - started,
                "stages_s": {
                    "denoise": image.denoise_seconds,
                    "decode": image.decode_seconds,
                    "file": image.file_seconds,
                },
            }
        if cuda:
            free, total = torch.cuda.mem_get_info(where)
            point |= {
                "peak_allocated_gib": gib(torch.cuda.max_memory_allocated(where) - before),
                "peak_reserved_gib": gib(torch.cuda.max_memory_reserved(where)),
                # The driver's view after the image: what another replica on this GPU could still get.
                "device_free_gib": gib(free),
                "device_total_gib": gib(total),
            }
        points.append(point)
        print(f"vram {side}x{side}: {json.dumps(point)}", flush=True)
    del engine
    free_memory(check)

    def line(point: dict) -> str:
        if "out_of_memory" in point:
            return f"{point['width']}²: out of memory"
        memory = (
            f" peak {point['peak_allocated_gib']:.2f} GiB allocated, {point['peak_reserved_gib']:.2f} reserved"
            if cuda
            else ""
        )
        return f"{point['width']}²{' tiled' if point['vae_tiled'] else ''}:{memory} {point['image_s']:.2f} s"

    return {
        "weights_gib": weights,
        "points": points,
        "summary": "; ".join(line(point) for point in points),
    }


def encode(check: Check) -> dict:
    from benchmarks.bench_gpu import measure_encode
    from zimage_split.model_source import resolve_model

    result = measure_encode(resolve_model(check.model), device(check), check.rounds)
    result["summary"] = (
        f"{result['tokens_per_s']:,.0f} tokens/s ({result['tokens_per_pass']} tokens per pass)"
    )
    free_memory(check)
    return result


STEPS: dict[str, Callable[[Check], dict]] = {
    "versions": versions,
    "cuda_smoke": cuda_smoke,
    "full_build": full_build,
    "latency": lambda check: latency(check, compile=False),
    "latency_compiled": lambda check: latency(check, compile=True),
    "vram": vram,
    "encode": encode,
}


# ---- running and writing -----------------------------------------------------------------------------------


def why_skip(check: Check, name: str) -> str | None:
    if name in check.skip:
        return "--skip"
    phases = check.report["phases"]
    failed = [need for need in NEEDS[name] if phases.get(need, {}).get("status") != "ok"]
    if failed:
        return f"needs {', '.join(failed)}, which did not succeed"
    left = check.budget_seconds - check.elapsed()
    estimate = 0 if check.quick else ESTIMATES[name]
    if left < estimate or left <= 0:
        return f"--budget-seconds: {max(left, 0):.0f} s left, the phase takes about {estimate} s"
    return None


def markdown(report: dict) -> str:
    lines = [
        f"# Device check, {report['date']}, {report['device']}",
        "",
        f"Model of the full-size phases: `{report['model']}`; {report['settings']['size']}x"
        f"{report['settings']['size']}, {report['settings']['steps']} steps, {report['settings']['rounds']} "
        f"timed rounds after {report['settings']['warmup']} warm-up.",
    ]
    if report["quick"]:
        lines.append("**Quick mode (tiny model, CPU): the figures only show that the check runs.**")
    lines += ["", "| phase | status | seconds | result |", "| --- | --- | ---: | --- |"]
    for name in PHASES:
        phase = report["phases"].get(name, {"status": "not reached"})
        text = phase.get("summary") or phase.get("reason") or phase.get("error", "").splitlines()[0:1]
        if isinstance(text, list):
            text = text[0] if text else ""
        seconds = f"{phase['seconds']:.1f}" if "seconds" in phase else ""
        lines.append(f"| {name} | {phase['status']} | {seconds} | {text} |")
    errors = [(name, phase["error"]) for name, phase in report["phases"].items() if "error" in phase]
    for name, error in errors:
        lines += ["", f"## {name} failed", "", "```", error.rstrip(), "```"]
    lines += ["", f"Total {report['seconds']:.0f} s. Full results: `device-check.json`.", ""]
    return "\n".join(lines)


def write(check: Check) -> None:
    report = check.report
    report["seconds"] = check.elapsed()
    report["ray_imported"] = "ray" in sys.modules
    check.out_dir.mkdir(parents=True, exist_ok=True)
    (check.out_dir / "device-check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (check.out_dir / "device-check.md").write_text(markdown(report))


def run(check: Check) -> dict:
    import datetime

    check.report = {
        "check": "zimage-split device check",
        "date": datetime.date.today().isoformat(),
        "device": check.device_name,
        "quick": check.quick,
        "model": check.model,
        "budget_seconds": check.budget_seconds,
        "settings": {
            "size": check.size,
            "steps": check.steps,
            "rounds": check.rounds,
            "warmup": check.warmup,
            "attention": check.attention,
            "vram_sizes": list(check.vram_sizes),
        },
        "phases": {},
    }
    for index, name in enumerate(PHASES, 1):
        reason = why_skip(check, name)
        if reason:
            print(f"=== [{index}/{len(PHASES)}] {name}: skipped ({reason}) ===", flush=True)
            check.report["phases"][name] = {"status": "skipped", "reason": reason}
            write(check)
            continue
        print(f"=== [{index}/{len(PHASES)}] {name} at {check.elapsed():.0f} s ===", flush=True)
        started = time.perf_counter()
        try:
            figures = STEPS[name](check)
        except Exception as error:
            traceback.print_exc()
            phase = {
                "status": "failed",
                "error": f"{type(error).__name__}: {error}\n{traceback.format_exc()}",
            }
            free_memory(check)
        else:
            phase = {"status": "ok", **figures}
            print(f"{name}: {figures.get('summary', '')}", flush=True)
        phase["seconds"] = time.perf_counter() - started
        check.report["phases"][name] = phase
        write(check)
    return check.report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.device_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU: the rehearsal")
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N (cuda); --quick uses the CPU")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help=f"where results go ({RESULTS})")
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=BUDGET_SECONDS,
        help=f"skip the phases that would not fit in this many seconds ({BUDGET_SECONDS})",
    )
    parser.add_argument("--size", type=int, default=None, help="image side of the latency phases (1024)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (8)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per latency phase (5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first, at least 1 (1)")
    parser.add_argument("--attention", default="auto", help="as --attention of serve (auto)")
    parser.add_argument(
        "--skip", default="", help=f"comma-separated phases to leave out: {', '.join(PHASES)}"
    )
    args = parser.parse_args(argv)
    skip = frozenset(name for name in args.skip.split(",") if name)
    if skip - set(PHASES):
        parser.error(
            f"unknown phase(s) {', '.join(sorted(skip - set(PHASES)))}; choose from {', '.join(PHASES)}"
        )
    if args.warmup < 1:
        parser.error("--warmup must be >= 1: the first round pays for lazy initialisation and compilation")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the machine has no network; never wait for the hub
    check = Check(
        out_dir=args.out_dir,
        quick=args.quick,
        device_name="cpu" if args.quick else args.device,
        budget_seconds=args.budget_seconds,
        size=args.size or (64 if args.quick else 1024),
        steps=args.steps or (2 if args.quick else 8),
        rounds=args.rounds or (1 if args.quick else 5),
        warmup=args.warmup,
        attention=args.attention,
        skip=skip,
    )
    report = run(check)
    print("\n" + markdown(report))
    print(f"wrote {check.out_dir / 'device-check.json'} and {check.out_dir / 'device-check.md'}")
    failed = [name for name, phase in report["phases"].items() if phase["status"] == "failed"]
    if report["ray_imported"]:
        print("ray was imported: the GPU machine has no ray", file=sys.stderr)
    return 1 if failed or report["ray_imported"] else 0


if __name__ == "__main__":
    sys.exit(main())
