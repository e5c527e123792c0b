"""Starts the generator service: load DiT + VAE, check the encoder, warm up, then serve."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from zimage.generator.v1 import generator_pb2_grpc
from zimage_split.client.aio import AsyncClient
from zimage_split.common.errors import InvalidArgument, ZSplitError
from zimage_split.common.server import RunningServer, start_server, wait_for_shutdown_signal
from zimage_split.devices import parse_dtype, pick_device
from zimage_split.dit_service.embedding_store import EmbeddingStore
from zimage_split.dit_service.engine import DiTEngine, GenerationJob, GenerationParams
from zimage_split.dit_service.servicer import GeneratorServicer
from zimage_split.dit_service.validation import Limits
from zimage_split.dit_service.worker import LocalWorker
from zimage_split.model_source import resolve_model

logger = logging.getLogger(__name__)

SERVICE_NAME = "zimage.generator.v1.GeneratorService"
DEFAULT_PORT = 50052


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything `zsplit serve generator` can set, resolved once."""

    model: str
    encoder: str | None = "127.0.0.1:50051"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    device: str = "auto"
    dtype: str = "auto"
    max_queue: int = 32
    cache_bytes: int = 2 << 30
    limits: Limits = field(default_factory=Limits)


@dataclass
class GeneratorServer:
    running: RunningServer
    servicer: GeneratorServicer

    @property
    def port(self) -> int:
        return self.running.port

    async def stop(self, grace: float | None = 5.0) -> None:
        await self.running.stop(grace)
        self.servicer.cancel_all()
        self.servicer.worker.close()
        if self.servicer.store.encoder is not None:
            await self.servicer.store.encoder.close()


def warm_up(engine: DiTEngine) -> None:
    """One smallest-size, one-step image, so the first real request does not pay for lazy init."""
    side = 64
    job = GenerationJob(
        params=GenerationParams(width=side, height=side, steps=1, seed=0),
        prompt_embeds=torch.zeros(4, engine.caption_dim),
    )
    engine.generate([job])


async def start_generator_server(config: GeneratorConfig) -> GeneratorServer:
    source = resolve_model(config.model)
    device = pick_device(config.device)
    engine = DiTEngine(source, device=device, dtype=parse_dtype(config.dtype, device))
    limits = Limits(
        # The API promises multiples of 16 (the real model's need) even where a tiny VAE would take less.
        size_multiple=max(config.limits.size_multiple, engine.size_multiple),
        min_side=config.limits.min_side,
        max_side=config.limits.max_side,
        max_pixels=config.limits.max_pixels,
        max_steps=config.limits.max_steps,
        max_guidance_scale=config.limits.max_guidance_scale,
    )
    encoder = AsyncClient(generator=None, encoder=config.encoder) if config.encoder else None
    store = EmbeddingStore(
        encoder,
        caption_dim=engine.caption_dim,
        max_tokens=engine.max_caption_tokens,
        cache_bytes=config.cache_bytes,
    )
    if encoder is not None:
        try:
            await store.check_encoder()
        except InvalidArgument:
            await encoder.close()
            raise
        except ZSplitError as error:
            logger.warning(
                "Encoder not reachable yet (%s); prompts will be encoded once it is.", error.message
            )
    servicer = GeneratorServicer(
        LocalWorker(engine, max_queue=config.max_queue), store, limits, config.encoder or ""
    )
    running = await start_server(
        lambda server: generator_pb2_grpc.add_GeneratorServiceServicer_to_server(servicer, server),
        (SERVICE_NAME,),
        config.host,
        config.port,
    )
    warm_up(engine)
    await running.set_serving()
    logger.info(
        "Generator %s on %s (%s) listening on %s:%d, encoder %s",
        source.model_id,
        device,
        engine.dtype,
        config.host,
        running.port,
        config.encoder or "none",
    )
    return GeneratorServer(running, servicer)


async def serve_generator(config: GeneratorConfig) -> None:
    server = await start_generator_server(config)
    await wait_for_shutdown_signal()
    await server.stop()
