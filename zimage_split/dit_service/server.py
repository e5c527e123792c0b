"""Starts the generator service: open the port (NOT_SERVING), load DiT + VAE, check the encoder, warm up,
then serve."""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, replace
from types import ModuleType

from zimage_split._proto.generator.v1 import generator_pb2_grpc
from zimage_split.client.aio import AsyncClient
from zimage_split.common.errors import InvalidArgument, Unavailable, ZSplitError
from zimage_split.common.server import (
    LateServicer,
    RunningServer,
    catch_stop_signals,
    exit_abandoning_load,
    injected_load_delay,
    load_until_signal,
    open_service_port,
    serve_until_signal,
)
from zimage_split.devices import choose_dtype, parse_dtype, pick_device
from zimage_split.dit_service.config import EngineOptions, GeneratorConfig, Limits
from zimage_split.dit_service.controlnets import check_controlnet_specs
from zimage_split.dit_service.disk_store import DiskEmbeddingStore
from zimage_split.dit_service.embedding_store import EmbeddingStore, EncoderRefused
from zimage_split.dit_service.init_images import ImageStore
from zimage_split.dit_service.lora.library import LoraLibrary, check_lora_dir
from zimage_split.dit_service.servicer import GeneratorServicer
from zimage_split.dit_service.worker import LocalWorker, Worker
from zimage_split.model_source import resolve_model

logger = logging.getLogger(__name__)

SERVICE_NAME = "zimage.generator.v1.GeneratorService"


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


def checked_options(config: GeneratorConfig) -> EngineOptions:
    """The engine's options, checked as far as they can be without the model (or Ray): the LoRA folder,
    the ControlNet names and paths, and with Ray on CPU replicas, options that need a GPU."""
    options = replace(
        config.engine,
        warm_up_side=warm_up_side(config.limits),
        warm_up_guidance=config.limits.max_guidance_scale > 0,
    )
    if options.lora_dir:
        check_lora_dir(options.lora_dir)
    check_controlnet_specs(options.controlnets)  # names and paths; their layout is checked as they load
    if config.ray is not None and config.device == "cpu":  # so will the replicas: check before Ray starts
        options.resolved(pick_device("cpu"), parse_dtype(config.dtype, pick_device("cpu")))
    return options


def _ray_pool() -> ModuleType:
    """zimage_split.dit_service.ray_pool, imported only when Ray is used; Unavailable, saying what to
    install, where Ray is missing."""
    try:
        from zimage_split.dit_service import ray_pool
    except ImportError as error:
        raise Unavailable(
            f"--ray-address needs Ray ({error}); install it with `pip install 'zimage-split[ray]'`."
        ) from error
    return ray_pool


async def open_generator_port(
    config: GeneratorConfig,
) -> tuple[RunningServer, LateServicer[GeneratorServicer]]:
    """Listens at once, before the model loads (with Ray, before any replica starts): health says NOT_SERVING
    and calls get UNAVAILABLE (reason `loading`) until `load_generator` is done. With --ray-address local,
    Ray's local node starts first, a few seconds, while no gRPC thread runs yet (ray_pool.LOCAL_RAY_TRIES)."""
    if config.ray is not None and config.ray.address == "local":
        checked_options(config)  # a bad option fails before Ray starts
        _ray_pool().connect("local")  # load_generator's connect then finds it, and that it started it
    late = LateServicer(GeneratorServicer)
    running = await open_service_port(
        lambda server: generator_pb2_grpc.add_GeneratorServiceServicer_to_server(late, server),
        SERVICE_NAME,
        "generator",
        config,
    )
    return running, late


async def load_generator(
    config: GeneratorConfig, running: RunningServer, late: LateServicer[GeneratorServicer]
) -> GeneratorServer:
    """Loads and warms up the model (or starts the Ray replicas) behind the open port, checks the encoder,
    then reports SERVING."""
    await injected_load_delay()
    worker: Worker
    options = checked_options(config)
    # A folder it cannot use fails now, before the model loads.
    disk = (
        DiskEmbeddingStore(config.embedding_store, config.embedding_store_max_bytes)
        if config.embedding_store
        else None
    )
    if config.ray is None:
        device = pick_device(config.device)
        dtype = choose_dtype(config.dtype, device)
        logger.info("Generator dtype %s (%s)", dtype.name, dtype.reason)
        # Before the model loads, options this device cannot run fail, saying the fix; `auto` is decided.
        options = options.resolved(device, dtype.dtype)
        source = resolve_model(config.model)
        # The warm-up (with --compile, the compilation) ends before the server reports SERVING.
        worker = await LocalWorker.start(
            lambda: options.start_engine(source, device, dtype.dtype, dtype.reason),
            max_queue=config.max_queue,
        )
    else:
        RayWorkerPool = _ray_pool().RayWorkerPool

        source = resolve_model(config.model)
        worker = await RayWorkerPool.start(
            source,
            config.ray,
            device=config.device,
            dtype=config.dtype,
            max_queue=config.max_queue,
            engine=options,
        )
    try:
        return await _serve_on(config, running, late, worker, disk, options.lora_dir, source.model_id)
    except BaseException:
        await asyncio.to_thread(worker.close)
        raise


async def _serve_on(
    config: GeneratorConfig,
    running: RunningServer,
    late: LateServicer[GeneratorServicer],
    worker: Worker,
    disk: DiskEmbeddingStore | None,
    lora_dir: str | None,
    model_id: str,
) -> GeneratorServer:
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
        disk=disk,
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
        loras=LoraLibrary(lora_dir),
        metrics=running.metrics,
    )
    late.target = servicer
    await running.set_serving()
    logger.info(
        "Generator %s on %s (%s, attention %s%s, VAE tiling %s%s) listening on %s:%d (%s), encoder %s",
        model_id,
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


async def start_generator_server(config: GeneratorConfig) -> GeneratorServer:
    """Opens the port, loads the model and returns once the generator serves."""
    running, late = await open_generator_port(config)
    try:
        return await load_generator(config, running, late)
    except BaseException:
        await running.stop(0)
        raise


async def serve_generator(config: GeneratorConfig) -> None:
    running, late = await open_generator_port(config)
    logger.info("Generator port %s:%d open, NOT_SERVING while the model loads", config.host, running.port)
    signalled = catch_stop_signals()
    # With Ray, a stop during the start-up removes the Serve application first: give it that time.
    abandon_wait = _ray_pool().ABANDON_SECONDS + 5.0 if config.ray else 5.0
    server = await load_until_signal(running, load_generator(config, running, late), signalled, abandon_wait)
    if server is None:
        exit_abandoning_load()
        return
    await serve_until_signal(server.running, server.stop, config.transport.shutdown_grace_seconds, signalled)
