"""Starts the generator service: load DiT + VAE, check the encoder, warm up, then serve."""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from zimage_split._proto.generator.v1 import generator_pb2_grpc
from zimage_split.client.aio import AsyncClient
from zimage_split.common.errors import InvalidArgument, Unavailable, ZSplitError
from zimage_split.common.security import ClientSecurity, ServerSecurity
from zimage_split.common.server import (
    RunningServer,
    TransportLimits,
    metrics_address,
    serve_until_signal,
    start_server,
)
from zimage_split.common.vocabulary import ENCODER_PORT, GENERATOR_PORT
from zimage_split.devices import parse_dtype, pick_device
from zimage_split.dit_service.embedding_store import EmbeddingStore, EncoderRefused
from zimage_split.dit_service.engine import EngineOptions
from zimage_split.dit_service.init_images import ImageStore
from zimage_split.dit_service.lora.library import LoraLibrary
from zimage_split.dit_service.servicer import GeneratorServicer
from zimage_split.dit_service.validation import Limits
from zimage_split.dit_service.worker import LocalWorker, Worker
from zimage_split.model_source import resolve_model

logger = logging.getLogger(__name__)

SERVICE_NAME = "zimage.generator.v1.GeneratorService"


@dataclass(frozen=True)
class RayOptions:
    """`zsplit serve generator --ray-address ... --replicas ...`: run the replicas under Ray Serve."""

    address: str = "local"  # "local" starts Ray in this process; "auto" or HOST:PORT joins a cluster
    replicas: int | None = 1  # None ("auto"): one per GPU, growing as GPU hosts join the cluster
    max_batch_size: int = 4
    max_batch_wait_ms: float = 10.0
    torch_threads: int = 0  # torch threads per replica; 0 keeps Ray's default (one per reserved CPU)
    cpus_per_replica: float = 1.0


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything `zsplit serve generator` can set, resolved once."""

    model: str
    encoder: str | None = f"127.0.0.1:{ENCODER_PORT}"
    # None: one in-process worker. Otherwise the replicas run under Ray Serve (see ray_pool.RayOptions).
    ray: RayOptions | None = None
    host: str = "127.0.0.1"
    port: int = GENERATOR_PORT
    device: str = "auto"
    dtype: str = "auto"
    # Attention kernel: auto (the fastest that works here; native off CUDA), native, flash, _flash_3, sage.
    attention: str = "auto"
    # Regional torch.compile of the DiT blocks, compiled during warm-up, before health reports SERVING.
    compile: bool = False
    # VAE decode in tiles: auto (above 2048x2048 pixels), on, off.
    vae_tiling: str = "auto"
    max_queue: int = 32
    cache_bytes: int = 2 << 30
    # A folder of <key>.safetensors embeddings behind the in-memory cache; survives restarts.
    embedding_store: str | None = None
    # Finished images kept by request_id, so a retried request is answered without running again.
    completed_cache_bytes: int = 128 << 20
    # LoRA files requests may name (None: LoRA off), and how many adapters each replica keeps loaded.
    lora_dir: str | None = None
    lora_cache: int = 8
    # Decoded start images and masks from UploadImage, kept for Generate.
    image_cache_bytes: int = 256 << 20
    limits: Limits = field(default_factory=Limits)
    transport: TransportLimits = TransportLimits()
    # Prometheus metrics on http://HOST:PORT/metrics (None: not served); the host defaults to `host`.
    metrics_port: int | None = None
    metrics_host: str | None = None
    # Extra tries of an encoder call that failed with UNAVAILABLE (a restart, a dropped connection), within
    # the caller's deadline.
    encoder_retries: int = 2
    # Plaintext suits the default loopback address; the CLI makes --insecure explicit.
    security: ServerSecurity = ServerSecurity(insecure=True)
    # How this generator reaches its encoder: TLS, its client certificate, its token.
    encoder_security: ClientSecurity = ClientSecurity(insecure=True)


@dataclass
class GeneratorServer:
    running: RunningServer
    servicer: GeneratorServicer

    @property
    def port(self) -> int:
        return self.running.port

    async def stop(self, grace: float | None = 5.0) -> bool:
        """Drains for up to `grace` seconds (see RunningServer.stop), then stops what still runs."""
        drained = await self.running.stop(grace)
        self.servicer.cancel_all()
        await asyncio.to_thread(self.servicer.worker.close)  # Ray's shutdown blocks for seconds
        if self.servicer.store.encoder is not None:
            await self.servicer.store.encoder.close()
        return drained


def warm_up_side(limits: Limits) -> int:
    """The square side compiled graphs are warmed up at: the default 1024, or the largest allowed if smaller."""
    largest = math.isqrt(limits.max_pixels) // limits.size_multiple * limits.size_multiple
    return max(limits.min_side, min(1024, largest, limits.max_side))


async def start_generator_server(config: GeneratorConfig) -> GeneratorServer:
    worker: Worker
    options = EngineOptions(
        attention=config.attention,
        compile=config.compile,
        vae_tiling=config.vae_tiling,
        warm_up_side=warm_up_side(config.limits),
        warm_up_guidance=config.limits.max_guidance_scale > 0,
        lora_dir=config.lora_dir or "",
        lora_cache=config.lora_cache,
    )
    if config.lora_dir and not Path(config.lora_dir).is_dir():
        raise InvalidArgument(
            f"--lora-dir {config.lora_dir} is not a folder; create it and put LoRA .safetensors files in it."
        )
    if config.lora_cache < 1:
        raise InvalidArgument(f"--lora-cache must be at least 1 (got {config.lora_cache}).")
    if config.ray is None:
        device = pick_device(config.device)
        dtype = parse_dtype(config.dtype, device)
        # Before the model loads, options this device cannot run fail, saying the fix; `auto` is decided.
        options = options.resolved(device, dtype)
        source = resolve_model(config.model)
        # The warm-up (with --compile, the compilation) ends before the server even listens.
        worker = LocalWorker(options.start_engine(source, device, dtype), max_queue=config.max_queue)
    else:
        try:
            from zimage_split.dit_service.ray_pool import RayWorkerPool  # Ray is imported only when used
        except ImportError as error:
            raise Unavailable(
                f"--ray-address needs Ray ({error}); install it with `pip install 'zimage-split[ray]'`."
            ) from error

        if config.device == "cpu":  # so will the replicas: check the options before Ray starts
            options.resolved(pick_device("cpu"), parse_dtype(config.dtype, pick_device("cpu")))
        source = resolve_model(config.model)
        worker = await RayWorkerPool.start(
            source,
            config.ray,
            device=config.device,
            dtype=config.dtype,
            max_queue=config.max_queue,
            engine=options,
        )
    info = worker.info
    # The API promises multiples of 16 (the real model's need) even where a tiny VAE would take less.
    limits = replace(config.limits, size_multiple=max(config.limits.size_multiple, info.size_multiple))
    encoder = (
        AsyncClient(generator=None, encoder=config.encoder, security=config.encoder_security)
        if config.encoder
        else None
    )
    store = EmbeddingStore(
        encoder,
        caption_dim=info.caption_dim,
        max_tokens=info.max_caption_tokens,
        cache_bytes=config.cache_bytes,
        disk_dir=config.embedding_store,
        encoder_retries=config.encoder_retries,
    )
    if encoder is not None:
        try:
            await store.check_encoder()
        except InvalidArgument:
            await encoder.close()
            raise
        except EncoderRefused as error:
            await encoder.close()
            raise InvalidArgument(error.message) from None
        except ZSplitError as error:
            logger.warning(
                "Encoder not reachable yet (%s); prompts will be encoded once it is.", error.message
            )
    servicer = GeneratorServicer(
        worker,
        store,
        limits,
        config.encoder or "",
        completed_bytes=config.completed_cache_bytes,
        images=ImageStore(config.image_cache_bytes),
        loras=LoraLibrary(config.lora_dir),
    )
    running = await start_server(
        lambda server: generator_pb2_grpc.add_GeneratorServiceServicer_to_server(servicer, server),
        (SERVICE_NAME,),
        config.host,
        config.port,
        config.security,
        config.transport,
        metrics=servicer.metrics,
        metrics_address=metrics_address(config.host, config.metrics_host, config.metrics_port),
    )
    await running.set_serving()
    logger.info(
        "Generator %s on %s (%s, attention %s%s, VAE tiling %s%s) listening on %s:%d (%s), encoder %s",
        source.model_id,
        info.device,
        info.dtype,
        info.attention_backend,
        ", compiled" if info.compiled else "",
        info.vae_tiling,
        f", Ray Serve at {config.ray.address}" if config.ray else "",
        config.host,
        running.port,
        config.security.describe(),
        config.encoder or "none",
    )
    return GeneratorServer(running, servicer)


async def serve_generator(config: GeneratorConfig) -> None:
    server = await start_generator_server(config)
    await serve_until_signal(server.running, server.stop, config.transport.shutdown_grace_seconds)
