"""`zsplit serve encoder | generator | http`: run a service until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import os

from zimage_split.cli.flags import (
    add_client_security,
    add_listen,
    add_metrics,
    add_model,
    add_server_limits,
    add_settings_file,
    client_security,
    server_security,
    transport_limits,
)
from zimage_split.common import extras
from zimage_split.common.errors import InvalidArgument
from zimage_split.common.server import check_metrics_port
from zimage_split.common.vocabulary import (
    DEFAULT_TIMEOUT_SECONDS,
    DTYPES,
    GENERATOR_PORT,
    HTTP_PORT,
    QUANTIZATIONS,
)
from zimage_split.dit_service.config import (
    ATTENTION_BACKENDS,
    VAE_TILING_MODES,
    EngineOptions,
    GeneratorConfig,
    Limits,
    RayOptions,
)
from zimage_split.dit_service.controlnets import parse_controlnet_flag
from zimage_split.encoder_service.config import ENCODE_BATCHING, EncoderConfig


def add_command(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="run a service until SIGINT/SIGTERM")
    services = serve.add_subparsers(dest="service", required=True)
    _add_encoder(services)
    _add_generator(services)
    _add_http(services)


def _add_encoder(services: argparse._SubParsersAction) -> None:
    encoder = services.add_parser("encoder", help="the Qwen3 text-encoder service")
    encoder.set_defaults(handler=serve_encoder)
    add_settings_file(encoder, "encoder")
    add_model(encoder)
    add_listen(encoder, host=EncoderConfig.host, port=EncoderConfig.port, device=EncoderConfig.device)
    encoder.add_argument(
        "--dtype",
        default=EncoderConfig.dtype,
        choices=("auto", *DTYPES),
        help="auto: bfloat16 on CUDA, MPS and CPUs with native bf16 matrix instructions (AMX-BF16, "
        "AVX512-BF16, Arm BF16), float32 on other CPUs (auto)",
    )
    encoder.add_argument(
        "--quantize",
        default=EncoderConfig.quantize,
        choices=QUANTIZATIONS,
        help="int8: int8 weights with dynamic int8 activations, CPU only, float32 elsewhere; needs "
        f"pip install 'zimage-split[int8]' ({EncoderConfig.quantize})",
    )
    encoder.add_argument(
        "--hidden-layer",
        type=int,
        default=EncoderConfig.hidden_layer,
        help=f"hidden state to return (default {EncoderConfig.hidden_layer})",
    )
    encoder.add_argument(
        "--max-sequence-length",
        type=int,
        default=EncoderConfig.max_sequence_length,
        help=f"default token limit ({EncoderConfig.max_sequence_length})",
    )
    encoder.add_argument(
        "--cache-mb",
        type=int,
        default=EncoderConfig.cache_bytes >> 20,
        help=f"embedding cache size in MiB ({EncoderConfig.cache_bytes >> 20})",
    )
    encoder.add_argument(
        "--max-batch-size",
        type=int,
        default=EncoderConfig.max_batch_size,
        help=f"prompts per forward pass ({EncoderConfig.max_batch_size})",
    )
    encoder.add_argument(
        "--max-batch-wait-ms",
        type=float,
        default=EncoderConfig.max_batch_wait_ms,
        help=f"wait for a batch to fill ({EncoderConfig.max_batch_wait_ms:g})",
    )
    encoder.add_argument(
        "--batching",
        default=EncoderConfig.batching,
        choices=ENCODE_BATCHING,
        help="exact: one forward pass per prompt, every embedding bit-identical to its prompt encoded alone; "
        "padded: prompts queued together share one right-padded pass, faster on a CPU, last bits depend on "
        f"the batch ({EncoderConfig.batching})",
    )
    encoder.add_argument(
        "--pack-weights",
        action=argparse.BooleanOptionalAction,
        default=EncoderConfig.pack_weights,
        help="on a CPU, hold the linear layers' weights in oneDNN's packed layout once instead of reordering "
        "them on every call (faster; --no-pack-weights for plain nn.Linear)",
    )
    add_metrics(encoder)
    add_server_limits(encoder, max_prompt_bytes=EncoderConfig.max_prompt_bytes).add_argument(
        "--max-prompts-per-request",
        type=int,
        default=EncoderConfig.max_prompts_per_request,
        help=f"prompts one Encode call may carry ({EncoderConfig.max_prompts_per_request})",
    )


def _add_generator(services: argparse._SubParsersAction) -> None:
    generator = services.add_parser("generator", help="the DiT + VAE generator service")
    generator.set_defaults(handler=serve_generator)
    add_settings_file(generator, "generator")
    add_model(generator)
    add_listen(generator, host=GeneratorConfig.host, port=GeneratorConfig.port, device=GeneratorConfig.device)
    generator.add_argument(
        "--encoder",
        default=GeneratorConfig.encoder,
        help="encoder service HOST:PORT, several separated by commas, or dns:NAME:PORT for every address NAME "
        "resolves to (calls are spread over them, with failover); 'none' accepts only uploaded embeddings",
    )
    add_client_security(generator, "encoder-", "the encoder")
    generator.add_argument(
        "--dtype",
        default=GeneratorConfig.dtype,
        choices=("auto", *DTYPES),
        help="auto: bfloat16 on CUDA, MPS and CPUs with native bf16 matrix instructions, float32 on other "
        "CPUs (auto)",
    )
    generator.add_argument(
        "--attention",
        default=EngineOptions.attention,
        choices=ATTENTION_BACKENDS,
        help="attention kernel: auto (the fastest that works here; native off CUDA), native (SDPA), flash, "
        f"_flash_3, sage ({EngineOptions.attention})",
    )
    generator.add_argument(
        "--compile",
        action="store_true",
        help="regional torch.compile of the DiT blocks, compiled before health reports SERVING (off)",
    )
    generator.add_argument(
        "--vae-tiling",
        default=EngineOptions.vae_tiling,
        choices=VAE_TILING_MODES,
        help=f"decode in 1024-pixel tiles: auto (from 2048x2048 pixels), on, off ({EngineOptions.vae_tiling})",
    )
    generator.add_argument(
        "--max-queue",
        type=int,
        default=GeneratorConfig.max_queue,
        help=f"requests waiting or running ({GeneratorConfig.max_queue})",
    )
    generator.add_argument(
        "--cache-mb",
        type=int,
        default=GeneratorConfig.cache_bytes >> 20,
        help=f"embedding cache size in MiB ({GeneratorConfig.cache_bytes >> 20})",
    )
    generator.add_argument(
        "--embedding-store",
        metavar="DIR",
        help="also keep embeddings on disk in DIR (safetensors named by key), so a restart or an encoder "
        "outage does not lose them",
    )
    generator.add_argument(
        "--embedding-store-max-gb",
        type=float,
        default=None,
        metavar="GIB",
        help="most GiB the --embedding-store folder may hold; the least recently used files go first, never "
        "one in use (unset: no limit)",
    )
    generator.add_argument(
        "--result-cache-mb",
        type=int,
        default=GeneratorConfig.completed_cache_bytes >> 20,
        help="finished images kept by request_id, so retries get the same image without rerunning "
        f"({GeneratorConfig.completed_cache_bytes >> 20})",
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
    add_metrics(generator)
    add_server_limits(generator, max_prompt_bytes=Limits.max_prompt_bytes).add_argument(
        "--max-images-per-request",
        type=int,
        default=Limits.max_images_per_request,
        help=f"most images one request may ask for, num_images ({Limits.max_images_per_request})",
    )
    generator.add_argument(
        "--lora-dir",
        metavar="DIR",
        default=EngineOptions.lora_dir,
        help="folder of LoRA .safetensors files requests may name (unset: LoRA off); with Ray, the same "
        "folder on every replica host",
    )
    generator.add_argument(
        "--lora-cache",
        type=int,
        default=EngineOptions.lora_cache,
        help=f"LoRA adapters each replica keeps loaded ({EngineOptions.lora_cache})",
    )
    generator.add_argument(
        "--controlnet",
        dest="controlnets",
        action="append",
        default=None,
        metavar="NAME=PATH",
        help="a ControlNet requests may name: a diffusers folder or a Union-layout .safetensors file; repeat for "
        "several; with Ray, the same path on every replica host",
    )
    generator.add_argument(
        "--image-cache-mb",
        type=int,
        default=GeneratorConfig.image_cache_bytes >> 20,
        help=f"uploaded img2img images and masks kept, MiB ({GeneratorConfig.image_cache_bytes >> 20})",
    )
    generator.add_argument(
        "--encoder-retries",
        type=int,
        default=GeneratorConfig.encoder_retries,
        help="retries of an encoder call that failed UNAVAILABLE, within the request's deadline "
        f"({GeneratorConfig.encoder_retries})",
    )
    ray = generator.add_argument_group("Ray (several replicas, GPUs and hosts)")
    ray.add_argument(
        "--ray-address",
        default=None,
        help="run replicas under Ray Serve: 'local' (Ray in this process), 'auto' or HOST:PORT (join a "
        "cluster started with `ray start`). Unset: one in-process worker",
    )
    ray.add_argument(
        "--replicas",
        default=str(RayOptions.replicas),
        help="'auto' = one per GPU, growing as GPUs join; or N (CPU replicas on CPU hosts)",
    )
    ray.add_argument(
        "--max-batch-size",
        type=int,
        default=RayOptions.max_batch_size,
        help=f"requests per batched denoising loop ({RayOptions.max_batch_size})",
    )
    ray.add_argument(
        "--max-batch-wait-ms",
        type=float,
        default=RayOptions.max_batch_wait_ms,
        help=f"wait for a batch to fill ({RayOptions.max_batch_wait_ms:g})",
    )
    ray.add_argument(
        "--torch-threads",
        type=int,
        default=RayOptions.torch_threads,
        help=f"torch threads per replica ({RayOptions.torch_threads}: one per reserved CPU)",
    )
    ray.add_argument(
        "--cpus-per-replica",
        type=float,
        default=RayOptions.cpus_per_replica,
        help=f"Ray CPUs reserved per replica ({RayOptions.cpus_per_replica:g})",
    )
    ray.add_argument(
        "--replica-start-timeout",
        type=float,
        default=RayOptions.start_timeout_s,
        help="seconds for every replica to get its resources, load and warm up before start-up fails "
        f"({RayOptions.start_timeout_s:g})",
    )
    ray.add_argument(
        "--replica-start-failures",
        type=int,
        default=RayOptions.max_start_failures,
        help="failed replica starts (each logged with its host) before start-up fails with the last error "
        f"({RayOptions.max_start_failures})",
    )


def _add_http(services: argparse._SubParsersAction) -> None:
    http = services.add_parser(
        "http",
        help="an OpenAI-compatible HTTP gateway to a generator (POST /v1/images/generations)",
        description="zsplit serve http --generator HOST:PORT [--port 8000] (docs at /docs, spec at /openapi.json)",
    )
    http.set_defaults(handler=serve_http)
    add_settings_file(http, "http")
    http.add_argument("--generator", default=f"127.0.0.1:{GENERATOR_PORT}", help="generator HOST:PORT")
    add_client_security(http, "generator-", "the generator")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    http.add_argument("--port", type=int, default=HTTP_PORT, help=f"port to listen on (default {HTTP_PORT})")
    http.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (chain)")
    http.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    http.add_argument(
        "--auth-token-file",
        metavar="FILE",
        help="bearer tokens accepted, one per line (or one token in env ZSPLIT_AUTH_TOKEN)",
    )
    http.add_argument("--insecure", action="store_true", help="serve plain HTTP (trusted networks only)")
    http.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_SECONDS,
        help=f"seconds per image request ({DEFAULT_TIMEOUT_SECONDS:g})",
    )
    add_metrics(http)


def encoder_config(args: argparse.Namespace) -> EncoderConfig:
    return EncoderConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        hidden_layer=args.hidden_layer,
        max_sequence_length=args.max_sequence_length,
        cache_bytes=args.cache_mb << 20,
        max_batch_size=args.max_batch_size,
        max_batch_wait_ms=args.max_batch_wait_ms,
        batching=args.batching,
        pack_weights=args.pack_weights,
        max_prompt_bytes=args.max_prompt_bytes,
        max_prompts_per_request=args.max_prompts_per_request,
        transport=transport_limits(args),
        security=server_security(args),
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        metrics_token_file=args.metrics_auth_token_file,
    )


def _replicas(value: str) -> int | None:
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise InvalidArgument(f"--replicas takes 'auto' or a positive number (got {value!r}).")
    return int(value)


def generator_config(args: argparse.Namespace) -> GeneratorConfig:
    if not args.ray_address and args.replicas != str(RayOptions.replicas):
        raise InvalidArgument("--replicas needs --ray-address (local, auto or HOST:PORT).")
    # Built (and so checked) even without Ray, as the flags are there either way.
    ray = RayOptions(
        address=args.ray_address or RayOptions.address,
        replicas=_replicas(args.replicas),
        max_batch_size=args.max_batch_size,
        max_batch_wait_ms=args.max_batch_wait_ms,
        torch_threads=args.torch_threads,
        cpus_per_replica=args.cpus_per_replica,
        start_timeout_s=args.replica_start_timeout,
        max_start_failures=args.replica_start_failures,
    )
    encoder = None if args.encoder in ("", "none") else args.encoder
    return GeneratorConfig(
        model=args.model,
        encoder=encoder,
        security=server_security(args),
        encoder_security=client_security(args, encoder, prefix="encoder-"),
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        engine=EngineOptions(
            attention=args.attention,
            compile=args.compile,
            vae_tiling=args.vae_tiling,
            lora_dir=args.lora_dir,
            lora_cache=args.lora_cache,
            controlnets=tuple(parse_controlnet_flag(value) for value in args.controlnets or ()),
        ),
        max_queue=args.max_queue,
        cache_bytes=args.cache_mb << 20,
        completed_cache_bytes=args.result_cache_mb << 20,
        embedding_store=args.embedding_store,
        embedding_store_max_bytes=None
        if args.embedding_store_max_gb is None
        else int(args.embedding_store_max_gb * (1 << 30)),
        image_cache_bytes=args.image_cache_mb << 20,
        limits=Limits(
            max_pixels=args.max_pixels,
            max_steps=args.max_steps,
            max_prompt_bytes=args.max_prompt_bytes,
            max_images_per_request=args.max_images_per_request,
        ),
        transport=transport_limits(args),
        encoder_retries=args.encoder_retries,
        ray=ray if args.ray_address else None,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        metrics_token_file=args.metrics_auth_token_file,
    )


def serve_encoder(args: argparse.Namespace) -> int:
    extras.require("encoder", *(("int8",) if args.quantize == "int8" else ()), what="zsplit serve encoder")
    from zimage_split.encoder_service.server import serve_encoder as serve

    asyncio.run(serve(encoder_config(args)))
    return 0


def serve_generator(args: argparse.Namespace) -> int:
    extras.require(
        "generator",
        *(("ray",) if args.ray_address else ()),
        what="zsplit serve generator" + (" --ray-address" if args.ray_address else ""),
    )
    from zimage_split.dit_service.server import serve_generator as serve

    asyncio.run(serve(generator_config(args)))
    return 0


def serve_http(args: argparse.Namespace) -> int:
    from zimage_split.common.metrics import ServiceMetrics, metrics_settings
    from zimage_split.common.security import accepted_tokens

    extras.require("http", what="zsplit serve http")
    from zimage_split.http_gateway import create_app, serve_http

    if not args.insecure and not (args.tls_cert and args.tls_key):
        raise InvalidArgument(
            "zsplit serve http needs --tls-cert and --tls-key, or --insecure for plain HTTP on a trusted network."
        )
    if args.insecure and (args.tls_cert or args.tls_key):
        given = ", ".join(
            flag for flag, value in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)) if value
        )
        raise InvalidArgument(
            f"--insecure (plain HTTP) contradicts {given} (HTTPS); drop --insecure to serve HTTPS, or the TLS "
            "settings for plain HTTP."
        )
    check_metrics_port(args.port, args.metrics_port)
    tokens = accepted_tokens(
        args.auth_token_file,
        (os.environ["ZSPLIT_AUTH_TOKEN"],) if os.environ.get("ZSPLIT_AUTH_TOKEN") else (),
    )
    metrics = ServiceMetrics("http")
    app = create_app(
        args.generator,
        security=client_security(args, args.generator, prefix="generator-"),
        tokens=tokens or (),
        timeout=args.timeout,
        metrics=metrics,
    )
    asyncio.run(
        serve_http(
            app,
            host=args.host,
            port=args.port,
            cert_file=args.tls_cert,
            key_file=args.tls_key,
            metrics=metrics,
            metrics_settings=metrics_settings(
                args.host,
                args.metrics_host,
                args.metrics_port,
                token_file=args.metrics_auth_token_file,
                cert_file=args.tls_cert,
                key_file=args.tls_key,
            ),
        )
    )
    return 0
