"""gRPC face of the text encoder: validates requests, serves the cache, streams embeddings in chunks."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from grpc import aio

from zimage_split._proto.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from zimage_split.common import wire
from zimage_split.common.errors import InvalidArgument
from zimage_split.common.lru import ByteBoundedLRU
from zimage_split.common.metrics import ServiceMetrics
from zimage_split.common.vocabulary import DEFAULT_LONG_PROMPT_MODE, ENCODER_LONG_PROMPT_MODE
from zimage_split.encoder_service.batching import MicroBatcher
from zimage_split.encoder_service.config import (
    DEFAULT_MAX_SEQUENCE_LENGTH,
    MAX_PROMPT_BYTES,
    MAX_PROMPTS_PER_CALL,
)
from zimage_split.encoder_service.engine import TextEncoder, TokenizedPrompt

logger = logging.getLogger(__name__)

# Z-Image's DiT gives caption tokens RoPE positions up to axes_lens[0] - 32 = 1504; more would not fit.
DEFAULT_MAX_SEQUENCE_LENGTH_LIMIT = 1504
# Tokenized prompts kept, so a repeated prompt skips the chat template and the tokenizer (about 1 ms).
TOKENIZED_CACHE_BYTES = 32 << 20


@dataclass(frozen=True)
class EncodedPrompt:
    prompt: TokenizedPrompt
    embedding: wire.FrozenTensor
    cache_hit: bool
    encode_seconds: float


def check_default_length(max_sequence_length: int, limit: int, model_id: str) -> None:
    """The server's default max_sequence_length must be one a request could ask for."""
    if not 1 <= max_sequence_length <= limit:
        raise InvalidArgument(
            f"--max-sequence-length must be between 1 and {limit} for {model_id}, whose DiT takes at most "
            f"{limit} caption tokens (got {max_sequence_length}). Pass --max-sequence-length {limit} or less."
        )


def tokenized_bytes(prompt: TokenizedPrompt) -> int:
    """Roughly what a cached TokenizedPrompt holds: its key and texts (up to 4 bytes a character) and a
    Python int per token id."""
    return 4 * (2 * len(prompt.text) + len(prompt.formatted_text)) + 40 * len(prompt.input_ids)


class EncoderServicer(encoder_pb2_grpc.EncoderServiceServicer):
    def __init__(
        self,
        encoder: TextEncoder,
        *,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        max_sequence_length_limit: int = DEFAULT_MAX_SEQUENCE_LENGTH_LIMIT,
        cache_bytes: int = 1 << 30,
        max_batch_size: int = 16,
        max_batch_wait_seconds: float = 0.005,
        max_prompt_bytes: int = MAX_PROMPT_BYTES,
        max_prompts_per_call: int = MAX_PROMPTS_PER_CALL,
        metrics: ServiceMetrics | None = None,
        dtype_reason: str = "",
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        """`max_sequence_length` is the default for requests that set none; no request may ask for more than
        `max_sequence_length_limit` (the DiT's caption limit). `dtype_reason` says why the encoder computes in
        its dtype, for Info. `executor` is the thread that loaded the encoder (devices.torch_thread), where
        batches then run."""
        check_default_length(max_sequence_length, max_sequence_length_limit, encoder.model_id)
        self.encoder = encoder
        self.dtype_reason = dtype_reason
        self.max_sequence_length_limit = max_sequence_length_limit
        self.max_prompt_bytes = max_prompt_bytes
        self.max_prompts_per_call = max_prompts_per_call
        self.max_sequence_length = max_sequence_length
        self.cache: ByteBoundedLRU[wire.FrozenTensor] = ByteBoundedLRU(
            cache_bytes, lambda frozen: frozen.meta.byte_length
        )
        self.tokenized: ByteBoundedLRU[TokenizedPrompt] = ByteBoundedLRU(
            min(cache_bytes, TOKENIZED_CACHE_BYTES), tokenized_bytes
        )
        self.metrics = metrics or ServiceMetrics("encoder")
        self.batcher: MicroBatcher[TokenizedPrompt, wire.FrozenTensor] = MicroBatcher(
            self._forward,
            max_batch_size=max_batch_size,
            max_wait_seconds=max_batch_wait_seconds,
            on_batch=self._observe_batch,
            executor=executor,
        )
        self.metrics.watch_cache("embeddings", self.cache)
        self.metrics.watch_cache("tokenized", self.tokenized)
        self.metrics.watch_queue_depth(lambda: self.batcher.queued)
        self._in_flight: dict[str, asyncio.Future[wire.FrozenTensor]] = {}
        self.prompts_encoded = 0

    def _forward(self, prompts: Sequence[TokenizedPrompt]) -> list[wire.FrozenTensor]:
        self.prompts_encoded += len(prompts)
        # Copied to immutable 1 MiB chunk messages and hashed once, here on the batcher's thread: a cache hit
        # then sends them as they are, and nothing can change them under their checksum.
        return [wire.freeze(embedding) for embedding in self.encoder.encode(prompts)]

    def _observe_batch(self, queue_seconds: list[float], run_seconds: float) -> None:
        # One observation per prompt: a prompt's encode stage is the forward pass it shared.
        for waited in queue_seconds:
            self.metrics.observe_stage("queue", waited)
            self.metrics.observe_stage("encode", run_seconds)

    def _tokenize_request(self, request: encoder_pb2.EncodeRequest) -> list[TokenizedPrompt]:
        if not request.prompts:
            raise InvalidArgument("EncodeRequest.prompts is empty; send at least one prompt ('' is allowed).")
        if len(request.prompts) > self.max_prompts_per_call:
            raise InvalidArgument(
                f"{len(request.prompts)} prompts in one call; send at most {self.max_prompts_per_call} per "
                "call (split the list, or raise the encoder's --max-prompts-per-request)."
            )
        for index, text in enumerate(request.prompts):
            size = len(text.encode("utf-8", errors="surrogatepass"))
            if size > self.max_prompt_bytes:
                raise InvalidArgument(
                    f"Prompt {index} is {size} bytes of UTF-8; this encoder takes at most {self.max_prompt_bytes} "
                    "(--max-prompt-bytes). Shorten it: it ends up as at most max_sequence_length rows anyway."
                )
        options = request.options
        max_length = (
            options.max_sequence_length
            if options.HasField("max_sequence_length")
            else self.max_sequence_length
        )
        limit = self.max_sequence_length_limit
        if not 1 <= max_length <= limit:
            raise InvalidArgument(
                f"max_sequence_length must be between 1 and {limit} (got {max_length}); default "
                f"{self.max_sequence_length}. {limit} tokens is the DiT's caption limit: for a longer prompt, "
                f"ask for at most {limit} with long_prompt_mode interpolate or pool, which fold all its tokens "
                "into that many rows instead of truncating them."
            )
        try:
            mode = ENCODER_LONG_PROMPT_MODE.name(options.long_prompt_mode, DEFAULT_LONG_PROMPT_MODE)
        except InvalidArgument:
            raise InvalidArgument(
                f"long_prompt_mode {options.long_prompt_mode} is not one this encoder knows; send TRUNCATE, "
                "INTERPOLATE or POOL (unset means TRUNCATE)."
            ) from None
        layer = options.hidden_layer if options.HasField("hidden_layer") else self.encoder.hidden_layer
        layer = self.encoder.check_layer(layer)
        return [self._tokenize(text, layer, max_length, mode) for text in request.prompts]

    def _tokenize(
        self, text: str, hidden_layer: int, max_sequence_length: int, long_prompt_mode: str
    ) -> TokenizedPrompt:
        # The template and the tokenizer are fixed for this process, so the text, layer, length and mode decide.
        key = f"{hidden_layer}|{max_sequence_length}|{long_prompt_mode}|{text}"
        prompt = self.tokenized.get(key)
        if prompt is None:
            prompt = self.encoder.tokenize(
                text,
                hidden_layer=hidden_layer,
                max_sequence_length=max_sequence_length,
                long_prompt_mode=long_prompt_mode,
            )
            self.tokenized.put(key, prompt)
        return prompt

    async def encode_prompt(self, prompt: TokenizedPrompt) -> EncodedPrompt:
        """Cache, then an identical in-flight request, then a batched forward pass."""
        key = prompt.content_key
        cached = self.cache.get(key)
        if cached is not None:
            return EncodedPrompt(prompt, cached, cache_hit=True, encode_seconds=0.0)
        started = time.perf_counter()
        pending = self._in_flight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self.batcher.submit(prompt))
            self._in_flight[key] = pending
            pending.add_done_callback(lambda done: self._finish_in_flight(key, done))
        # Shielded: a caller that goes away does not waste the forward pass others may share.
        embedding = await asyncio.shield(pending)
        return EncodedPrompt(prompt, embedding, cache_hit=False, encode_seconds=time.perf_counter() - started)

    def _finish_in_flight(self, key: str, done: asyncio.Future[wire.FrozenTensor]) -> None:
        self._in_flight.pop(key, None)
        if not done.cancelled() and done.exception() is None:
            self.cache.put(key, done.result())

    async def Encode(
        self, request: encoder_pb2.EncodeRequest, context: aio.ServicerContext
    ) -> AsyncIterator[encoder_pb2.EncodeResponse | bytes]:
        """Streams each prompt's header, then its chunk messages (bytes, written by wire.freeze)."""
        prompts = self._tokenize_request(request)
        remaining = context.time_remaining()
        logger.debug(
            "Encode: %d prompt(s), %s",
            len(prompts),
            "no deadline" if remaining is None else f"deadline in {remaining:.2f} s",
        )
        started = time.perf_counter()
        try:
            encoded = await asyncio.gather(*(self.encode_prompt(prompt) for prompt in prompts))
        except asyncio.CancelledError:
            # The caller went away or its deadline passed; a forward pass others share still completes.
            logger.debug("Encode cancelled by the caller after %.2f s.", time.perf_counter() - started)
            raise
        for index, item in enumerate(encoded):
            meta = item.embedding.meta
            yield encoder_pb2.EncodeResponse(
                header=encoder_pb2.EmbeddingHeader(
                    prompt_index=index,
                    content_key=item.prompt.content_key,
                    tensor=wire.meta_to_proto(meta),
                    token_count=item.prompt.token_count,
                    truncated=item.prompt.truncated,
                    cache_hit=item.cache_hit,
                    encode_seconds=item.encode_seconds,
                    formatted_text=item.prompt.formatted_text,
                    hidden_layer=item.prompt.hidden_layer,
                    max_sequence_length=item.prompt.max_sequence_length,
                    model_id=self.encoder.model_id,
                    source_token_count=item.prompt.source_token_count,
                    shortened_by=ENCODER_LONG_PROMPT_MODE.number(item.prompt.shortened_by),
                )
            )
            self.metrics.count_bytes("sent", "embedding", meta.byte_length)
            # Written once by wire.freeze; common.interceptors.ChunkMessages sends them as they are.
            for message in item.embedding.chunk_messages:
                yield message

    async def Info(
        self, request: encoder_pb2.InfoRequest, context: aio.ServicerContext
    ) -> encoder_pb2.InfoResponse:
        return encoder_pb2.InfoResponse(
            model_id=self.encoder.model_id,
            hidden_size=self.encoder.hidden_size,
            dtype=wire.dtype_to_proto(self.encoder.dtype),  # type: ignore[arg-type]
            dtype_reason=self.dtype_reason,
            quantization=self.encoder.quantize,
            hidden_layer=self.encoder.hidden_layer,
            max_sequence_length=self.max_sequence_length,
            device=str(self.encoder.device),
            layers_loaded=self.encoder.layers_loaded,
            cache_hits=self.cache.hits,
            cache_misses=self.cache.misses,
            prompts_encoded=self.prompts_encoded,
            forward_passes=self.encoder.forward_passes,
            parameter_count=self.encoder.parameter_count,
            components=["tokenizer", "text_encoder"],
            max_sequence_length_limit=self.max_sequence_length_limit,
        )
