"""The `zsplit` command line: serve either service, generate an image, build the tiny model."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from zimage_split.common.errors import InvalidArgument, NotFound, ZSplitError
from zimage_split.dit_service.validation import Limits
from zimage_split.model_source import DEFAULT_MODEL

ENCODER_PORT = 50051
GENERATOR_PORT = 50052


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(name) or default


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=_env("ZSPLIT_MODEL", DEFAULT_MODEL),
        help=f"hub id, local diffusers folder, or 'tiny' (offline random model). Default {DEFAULT_MODEL} "
        "(env ZSPLIT_MODEL).",
    )


def _add_listen(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for all (default loopback)"
    )
    parser.add_argument("--port", type=int, default=port, help=f"port to listen on (default {port})")
    parser.add_argument(
        "--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zsplit", description=__doc__)
    parser.add_argument(
        "--log-level",
        default=_env("ZSPLIT_LOG_LEVEL", None),
        help="DEBUG, INFO, WARNING (default INFO for services, WARNING for generate)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run a service until SIGINT/SIGTERM")
    services = serve.add_subparsers(dest="service", required=True)

    encoder = services.add_parser("encoder", help="the Qwen3 text-encoder service")
    _add_model(encoder)
    _add_listen(encoder, ENCODER_PORT)
    encoder.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    encoder.add_argument("--hidden-layer", type=int, default=-2, help="hidden state to return (default -2)")
    encoder.add_argument("--max-sequence-length", type=int, default=512, help="default token limit (512)")
    encoder.add_argument("--cache-mb", type=int, default=1024, help="embedding cache size in MiB (1024)")
    encoder.add_argument("--max-batch-size", type=int, default=16, help="prompts per forward pass (16)")
    encoder.add_argument("--max-batch-wait-ms", type=float, default=5.0, help="wait for a batch to fill (5)")

    generator = services.add_parser("generator", help="the DiT + VAE generator service")
    _add_model(generator)
    _add_listen(generator, GENERATOR_PORT)
    generator.add_argument(
        "--encoder",
        default=_env("ZSPLIT_ENCODER", f"127.0.0.1:{ENCODER_PORT}"),
        help="encoder service HOST:PORT, or 'none' to accept only uploaded embeddings (env ZSPLIT_ENCODER)",
    )
    generator.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    generator.add_argument("--max-queue", type=int, default=32, help="requests waiting or running (32)")
    generator.add_argument("--cache-mb", type=int, default=2048, help="embedding cache size in MiB (2048)")
    generator.add_argument(
        "--embedding-store",
        metavar="DIR",
        help="also keep embeddings on disk in DIR (safetensors named by key), so a restart or an encoder "
        "outage does not lose them",
    )
    generator.add_argument(
        "--result-cache-mb",
        type=int,
        default=128,
        help="finished images kept by request_id, so retries get the same image without rerunning (128)",
    )
    generator.add_argument(
        "--max-pixels",
        type=int,
        default=Limits.max_pixels,
        help=f"largest width*height ({Limits.max_pixels})",
    )
    generator.add_argument(
        "--max-steps", type=int, default=Limits.max_steps, help=f"most steps per request ({Limits.max_steps})"
    )
    ray = generator.add_argument_group("Ray (several replicas, GPUs and hosts)")
    ray.add_argument(
        "--ray-address",
        default=_env("ZSPLIT_RAY_ADDRESS", None),
        help="run replicas under Ray Serve: 'local' (Ray in this process), 'auto' or HOST:PORT (join a "
        "cluster started with `ray start`). Unset: one in-process worker (env ZSPLIT_RAY_ADDRESS)",
    )
    ray.add_argument(
        "--replicas",
        default="1",
        help="'auto' = one per GPU, growing as GPUs join; or N (CPU replicas on CPU hosts)",
    )
    ray.add_argument("--max-batch-size", type=int, default=4, help="requests per batched denoising loop (4)")
    ray.add_argument("--max-batch-wait-ms", type=float, default=10.0, help="wait for a batch to fill (10)")
    ray.add_argument(
        "--torch-threads", type=int, default=0, help="torch threads per replica (0: one per reserved CPU)"
    )
    ray.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs reserved per replica (1)")

    generate = commands.add_parser("generate", help="make one image")
    generate.add_argument("prompt")
    generate.add_argument("-o", "--output", default="out.png", help="image file to write (default out.png)")
    generate.add_argument("--generator", default=_env("ZSPLIT_GENERATOR", None), help="generator HOST:PORT")
    generate.add_argument(
        "--encoder", default=_env("ZSPLIT_ENCODER", None), help="encoder HOST:PORT (for a local generator)"
    )
    _add_model(generate)
    generate.add_argument(
        "--seed", type=int, default=None, help="random if unset; printed and stored in the PNG"
    )
    generate.add_argument("--width", type=int, default=None, help="pixels, multiple of 16 (1024)")
    generate.add_argument("--height", type=int, default=None, help="pixels, multiple of 16 (1024)")
    generate.add_argument("--steps", type=int, default=None, help="denoising steps (8)")
    generate.add_argument("--guidance-scale", type=float, default=None, help="CFG scale, 0 = off (0)")
    generate.add_argument("--negative-prompt", default=None, help="used when --guidance-scale > 0")
    generate.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up (600)")
    generate.add_argument("--device", default="auto", help="device for services started locally")
    generate.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    tiny = commands.add_parser("make-tiny-model", help="write the offline random model to DIR")
    tiny.add_argument("directory")
    tiny.add_argument("--size", default="tiny", choices=["tiny", "bench"])
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def _encoder_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from zimage_split.encoder_service.server import EncoderConfig

    return EncoderConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        hidden_layer=args.hidden_layer,
        max_sequence_length=args.max_sequence_length,
        cache_bytes=args.cache_mb << 20,
        max_batch_size=args.max_batch_size,
        max_batch_wait_ms=args.max_batch_wait_ms,
    )


def _replicas(value: str) -> int | None:
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise InvalidArgument(f"--replicas takes 'auto' or a positive number (got {value!r}).")
    return int(value)


def _generator_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from zimage_split.dit_service.server import GeneratorConfig, RayOptions

    ray = None
    if args.ray_address:
        ray = RayOptions(
            address=args.ray_address,
            replicas=_replicas(args.replicas),
            max_batch_size=args.max_batch_size,
            max_batch_wait_ms=args.max_batch_wait_ms,
            torch_threads=args.torch_threads,
            cpus_per_replica=args.cpus_per_replica,
        )
    elif args.replicas != "1":
        raise InvalidArgument("--replicas needs --ray-address (local, auto or HOST:PORT).")

    return GeneratorConfig(
        model=args.model,
        encoder=None if args.encoder in ("", "none") else args.encoder,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        max_queue=args.max_queue,
        cache_bytes=args.cache_mb << 20,
        completed_cache_bytes=args.result_cache_mb << 20,
        embedding_store=args.embedding_store,
        limits=Limits(max_pixels=args.max_pixels, max_steps=args.max_steps),
        ray=ray,
    )


@asynccontextmanager
async def local_services(model: str, device: str, encoder: str | None) -> AsyncIterator[str]:
    """Starts a generator (and an encoder unless one is given) on loopback; yields the generator address."""
    from zimage_split.dit_service.server import GeneratorConfig, start_generator_server
    from zimage_split.encoder_service.server import EncoderConfig, start_encoder_server

    encoder_server = None
    if encoder is None:
        encoder_server = await start_encoder_server(EncoderConfig(model=model, port=0, device=device))
        encoder = f"127.0.0.1:{encoder_server.port}"
    try:
        generator_server = await start_generator_server(
            GeneratorConfig(model=model, encoder=encoder, port=0, device=device)
        )
        try:
            yield f"127.0.0.1:{generator_server.port}"
        finally:
            await generator_server.stop(grace=1)
    finally:
        if encoder_server is not None:
            await encoder_server.stop(grace=1)


def write_png_atomically(image, path: Path, metadata: dict) -> None:  # type: ignore[no-untyped-def,type-arg]
    """Writes beside the target and renames, so a crash never leaves a half-written image."""
    from PIL.PngImagePlugin import PngInfo

    path.parent.mkdir(parents=True, exist_ok=True)
    text = PngInfo()
    text.add_text("zimage-split", json.dumps(metadata, sort_keys=True))
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


async def _generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from zimage_split.client.aio import AsyncClient

    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise InvalidArgument(f"--output {output} must end in .png; PNG is the only format written.")
    bars: list[tqdm] = []  # created on the first step, after any local services have loaded

    def on_progress(step: int, total: int) -> None:
        if not bars:
            bars.append(
                tqdm(total=total, desc="denoising", unit="step", disable=args.no_progress, leave=False)
            )
        bars[0].update(step - bars[0].n)

    def close_bar() -> None:
        for bar in bars:
            bar.close()

    async def run(address: str) -> None:
        async with AsyncClient(generator=address, timeout=args.timeout) as client:
            image = await client.generate(
                args.prompt,
                seed=args.seed,
                width=args.width,
                height=args.height,
                steps=args.steps,
                guidance_scale=args.guidance_scale,
                negative_prompt=args.negative_prompt,
                on_progress=on_progress,
            )
        close_bar()
        write_png_atomically(image, output, dict(image.info))
        timings = image.info["timings"]
        print(
            f"wrote {output} ({image.width}x{image.height}, seed {image.info['seed']}, "
            f"{image.info['steps']} steps) in {timings['total']:.2f}s "
            f"[queue {timings['queue']:.2f}s, encode {timings['encode']:.2f}s, "
            f"denoise {timings['denoise']:.2f}s, decode {timings['decode']:.2f}s]"
        )

    try:
        if args.generator:
            await run(args.generator)
        else:
            async with local_services(args.model, args.device, args.encoder) as address:
                await run(address)
    finally:
        close_bar()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_level = args.log_level or ("WARNING" if args.command == "generate" else "INFO")
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "make-tiny-model":
            from zimage_split.tiny_model import build_tiny_model

            try:
                path = build_tiny_model(args.directory, size=args.size, seed=args.seed)
            except FileExistsError as error:
                raise InvalidArgument(str(error)) from None
            print(f"wrote the {args.size} random Z-Image model to {path}")
            return 0
        if args.command == "serve" and args.service == "encoder":
            from zimage_split.encoder_service.server import serve_encoder

            asyncio.run(serve_encoder(_encoder_config(args)))
            return 0
        if args.command == "serve" and args.service == "generator":
            from zimage_split.dit_service.server import serve_generator

            asyncio.run(serve_generator(_generator_config(args)))
            return 0
        return asyncio.run(_generate(args))
    except ZSplitError as error:
        print(f"zsplit: error ({error.code}): {error.message}", file=sys.stderr)
        return 2 if isinstance(error, InvalidArgument | NotFound) else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
