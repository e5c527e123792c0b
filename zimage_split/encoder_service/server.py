"""Starts the encoder service: open the port (NOT_SERVING), load the text encoder, warm it up, then serve."""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from zimage_split._proto.encoder.v1 import encoder_pb2_grpc
from zimage_split.common.errors import InvalidArgument
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
from zimage_split.devices import DtypeChoice, build_on_torch_thread, choose_dtype, pick_device
from zimage_split.encoder_service.config import EncoderConfig
from zimage_split.encoder_service.engine import TextEncoder
from zimage_split.encoder_service.quantization import check_device, require_torchao
from zimage_split.encoder_service.servicer import (
    DEFAULT_MAX_SEQUENCE_LENGTH_LIMIT,
    EncoderServicer,
    check_default_length,
)
from zimage_split.model_source import ModelSource, resolve_model

logger = logging.getLogger(__name__)

SERVICE_NAME = "zimage.encoder.v1.EncoderService"


@dataclass
class EncoderServer:
    running: RunningServer
    servicer: EncoderServicer
    torch_thread: ThreadPoolExecutor

    @property
    def port(self) -> int:
        return self.running.port

    async def stop(self, grace: float | None = 5.0) -> bool:
        """Drains for up to `grace` seconds (see RunningServer.stop); True if every call finished."""
        drained = await self.running.stop(grace)
        await self.servicer.batcher.stop()
        self.torch_thread.shutdown(wait=True)
        return drained


def caption_token_limit(source: ModelSource) -> int:
    """The DiT's caption limit, `axes_lens[0] - 32` of the model's `transformer/config.json` (1504 for
    Z-Image), read without loading the transformer; 1504 when the model has no readable transformer config."""
    folder = Path(source.location)
    try:
        if folder.exists():
            config_path = folder / "transformer" / "config.json"
        else:
            from huggingface_hub import hf_hub_download

            config_path = Path(hf_hub_download(source.location, "config.json", subfolder="transformer"))
        # The DiT's first RoPE axis numbers caption positions; its last 32 are reserved.
        limit = int(json.loads(config_path.read_text())["axes_lens"][0]) - 32
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        logger.info(
            "No transformer config for %s (%s); max_sequence_length may go up to Z-Image's %d.",
            source.model_id,
            error,
            DEFAULT_MAX_SEQUENCE_LENGTH_LIMIT,
        )
        return DEFAULT_MAX_SEQUENCE_LENGTH_LIMIT
    if limit < 1:
        raise InvalidArgument(
            f"The transformer config of {source.model_id} leaves no room for caption tokens (axes_lens[0] - 32 "
            f"= {limit}); it is not a Z-Image model."
        )
    return limit


async def open_encoder_port(config: EncoderConfig) -> tuple[RunningServer, LateServicer[EncoderServicer]]:
    """Listens at once, before the model loads: health says NOT_SERVING and calls get UNAVAILABLE (reason
    `loading`) until `load_encoder` is done; a port in use fails here, in a second."""
    late = LateServicer(EncoderServicer)
    running = await open_service_port(
        lambda server: encoder_pb2_grpc.add_EncoderServiceServicer_to_server(late, server),
        SERVICE_NAME,
        "encoder",
        config,
    )
    return running, late


async def load_encoder(
    config: EncoderConfig, running: RunningServer, late: LateServicer[EncoderServicer]
) -> EncoderServer:
    """Loads and warms up the text encoder behind the open port, then reports SERVING."""
    await injected_load_delay()
    source = resolve_model(config.model)
    limit = caption_token_limit(source)
    # Before loading the text encoder, so a bad flag fails in a second, not after the weights load.
    check_default_length(config.max_sequence_length, limit, source.model_id)
    device = pick_device(config.device)
    dtype = choose_dtype(config.dtype, device)
    if config.quantize != "none":
        check_device(config.quantize, device)
        require_torchao()
        if config.dtype == "auto":
            dtype = DtypeChoice(
                torch.float32, f"auto: --quantize {config.quantize} computes its activations in float32"
            )
    logger.info("Encoder dtype %s (%s), quantize %s", dtype.name, dtype.reason, config.quantize)
    thread, encoder = await build_on_torch_thread(
        "encoder",
        lambda: TextEncoder(
            source,
            device=device,
            dtype=dtype.dtype,
            hidden_layer=config.hidden_layer,
            batching=config.batching,
            quantize=config.quantize,
            pack_weights=config.pack_weights,
        ),
    )
    try:
        # Warm-up: one real forward pass before reporting SERVING. Not cached, not counted.
        warm_up = encoder.tokenize("", hidden_layer=encoder.hidden_layer, max_sequence_length=16)
        await asyncio.get_running_loop().run_in_executor(thread, encoder.encode, [warm_up])
    except BaseException:
        thread.shutdown(wait=False)
        raise
    encoder.forward_passes = 0
    servicer = EncoderServicer(
        encoder,
        max_sequence_length=config.max_sequence_length,
        max_sequence_length_limit=limit,
        cache_bytes=config.cache_bytes,
        max_batch_size=config.max_batch_size,
        max_batch_wait_seconds=config.max_batch_wait_ms / 1000,
        max_prompt_bytes=config.max_prompt_bytes,
        max_prompts_per_call=config.max_prompts_per_request,
        dtype_reason=dtype.reason,
        executor=thread,
        metrics=running.metrics,
    )
    servicer.batcher.start()
    late.target = servicer
    await running.set_serving()
    logger.info(
        "Encoder %s on %s (%s, quantize %s, %s batching, %d linear layers packed for oneDNN, layer %d, "
        "%d layers kept) listening on %s:%d (%s)",
        source.model_id,
        encoder.device,
        dtype.name,
        config.quantize,
        encoder.batching,
        encoder.packed_linears,
        encoder.hidden_layer,
        encoder.layers_loaded,
        config.host,
        running.port,
        config.security.describe(),
    )
    return EncoderServer(running, servicer, thread)


async def start_encoder_server(config: EncoderConfig) -> EncoderServer:
    """Opens the port, loads the model and returns once the encoder serves."""
    running, late = await open_encoder_port(config)
    try:
        return await load_encoder(config, running, late)
    except BaseException:
        await running.stop(0)
        raise


async def serve_encoder(config: EncoderConfig) -> None:
    running, late = await open_encoder_port(config)
    logger.info("Encoder port %s:%d open, NOT_SERVING while the model loads", config.host, running.port)
    signalled = catch_stop_signals()
    server = await load_until_signal(running, load_encoder(config, running, late), signalled)
    if server is None:
        exit_abandoning_load()
        return
    await serve_until_signal(server.running, server.stop, config.transport.shutdown_grace_seconds, signalled)
