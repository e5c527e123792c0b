"""AsyncClient: the SDK's one implementation. `Client` (sync) runs it on a private event loop."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import random
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from google.protobuf.json_format import MessageToDict
from grpc import aio
from PIL import Image

from zimage.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from zimage.generator.v1 import generator_pb2, generator_pb2_grpc
from zimage_split.client.batch import ImageJob, JobResult, job_request_id, plan_jobs
from zimage_split.client.embeddings import Embeddings, PromptEmbedding
from zimage_split.client.errors import from_rpc_error
from zimage_split.common import wire
from zimage_split.common.errors import DataLoss, InvalidArgument, NotFound, ResourceExhausted, ZSplitError
from zimage_split.common.security import ClientSecurity, is_loopback
from zimage_split.common.server import GRPC_OPTIONS

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 600.0
CHANNEL_OPTIONS = [
    *GRPC_OPTIONS,
    # A restarted service is reached again within a second, not after gRPC's default backoff of up to 2
    # min (the generator's encoder retries, 0.5 s then 1 s, outlast this).
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Each client owns its connections (gRPC would otherwise share one between all clients of a process
    # with the same target), so closing a client and the servers' per-connection limits behave as expected.
    ("grpc.use_local_subchannel_pool", 1),
]
T = TypeVar("T")
ProgressCallback = Callable[[int, int], None]
EmbeddingLike = PromptEmbedding | Embeddings | torch.Tensor


@contextlib.contextmanager
def _fields_in_range() -> Iterator[None]:
    """Protobuf refuses a value its field cannot hold (a negative seed, a width past 32 bits) with a bare
    ValueError or TypeError; the caller gets an InvalidArgument that names the ranges instead."""
    try:
        yield
    except (ValueError, TypeError) as error:
        raise InvalidArgument(
            f"A request field is out of range or of the wrong type ({error}). seed takes 0 to 2**64-1; "
            "width, height, steps and max_sequence_length take integers from 0 to 2**32-1; hidden_layer a "
            "32-bit integer; guidance values numbers."
        ) from None


def _single_tensor(value: EmbeddingLike, what: str) -> tuple[torch.Tensor, str]:
    if isinstance(value, Embeddings):
        if len(value) != 1:
            raise InvalidArgument(f"{what} holds {len(value)} prompts; pass one, e.g. embeddings[0].")
        value = value[0]
    if isinstance(value, PromptEmbedding):
        return value.tensor, value.content_key
    if isinstance(value, torch.Tensor):
        return value, ""
    raise InvalidArgument(f"{what} must be a PromptEmbedding, a one-prompt Embeddings or a tensor.")


class AsyncClient:
    """Asyncio client for the generator and encoder services.

    Example:
        >>> import asyncio
        >>> from zimage_split.client import AsyncClient
        >>> async def main():
        ...     async with AsyncClient(generator="localhost:50052") as client:
        ...         image = await client.generate("a red fox in snow", seed=42, width=512, height=512)
        ...         image.save("fox.png")
        >>> asyncio.run(main())  # doctest: +SKIP
    """

    def __init__(
        self,
        generator: str | None = "localhost:50052",
        encoder: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        busy_retries: int = 0,
        security: ClientSecurity | None = None,
    ) -> None:
        """`busy_retries`: how often `generate` retries, with backoff, when the generator is full.

        `security`: TLS and the bearer token, e.g. `ClientSecurity(ca_file="ca.crt", token=...)`; unset
        means plaintext (loopback and trusted networks only).
        """
        if generator is None and encoder is None:
            raise InvalidArgument(
                "Give at least one address: generator='host:port' and/or encoder='host:port'."
            )
        self.generator_address = generator
        self.encoder_address = encoder
        self.timeout = timeout
        self.busy_retries = busy_retries
        self.security = security or ClientSecurity.plaintext()
        self._metadata = self.security.metadata()
        self._channels: dict[str, aio.Channel] = {}
        self._encoder_model_id: str | None = None
        # Keys of embeddings this client has uploaded to the generator: sent once, not with every request.
        self._uploaded: set[str] = set()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()

    def _channel(self, address: str | None, role: str) -> aio.Channel:
        if address is None:
            raise InvalidArgument(
                f"This client has no {role} address; pass {role}='host:port' to the client."
            )
        if address not in self._channels:
            if self.security.insecure and not is_loopback(address.rsplit(":", 1)[0]):
                logger.warning(
                    "Plaintext connection to %s: no TLS. Pass security=ClientSecurity(...).", address
                )
            self._channels[address] = self.security.channel(address, CHANNEL_OPTIONS)
        return self._channels[address]

    def _generator(self) -> generator_pb2_grpc.GeneratorServiceStub:
        return generator_pb2_grpc.GeneratorServiceStub(self._channel(self.generator_address, "generator"))

    def _encoder(self) -> encoder_pb2_grpc.EncoderServiceStub:
        return encoder_pb2_grpc.EncoderServiceStub(self._channel(self.encoder_address, "encoder"))

    async def encode(
        self,
        prompts: str | Sequence[str],
        *,
        max_sequence_length: int | None = None,
        hidden_layer: int | None = None,
        timeout: float | None = None,
    ) -> Embeddings:
        """Encodes prompts on the encoder service; returns one PromptEmbedding per prompt."""
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        with _fields_in_range():
            options = encoder_pb2.EncodeOptions(
                max_sequence_length=max_sequence_length, hidden_layer=hidden_layer
            )
            request = encoder_pb2.EncodeRequest(prompts=texts, options=options)
        target = f"encoder {self.encoder_address}"
        try:
            stream = self._encoder().Encode(request, timeout=timeout or self.timeout, metadata=self._metadata)
            items, model_id = await read_embedding_stream(stream, texts)
        except aio.AioRpcError as error:
            raise from_rpc_error(error, target) from None
        if not model_id:  # an encoder from before EmbeddingHeader.model_id: ask it once
            if self._encoder_model_id is None:
                self._encoder_model_id = str((await self.encoder_info(timeout=timeout)).get("model_id", ""))
            model_id = self._encoder_model_id
        return Embeddings(items, model_id=model_id)

    async def encoder_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        try:
            reply = await self._encoder().Info(
                encoder_pb2.InfoRequest(), timeout=timeout or self.timeout, metadata=self._metadata
            )
        except aio.AioRpcError as error:
            raise from_rpc_error(error, f"encoder {self.encoder_address}") from None
        return MessageToDict(reply, preserving_proto_field_name=True)

    async def generator_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        try:
            reply = await self._generator().Info(
                generator_pb2.InfoRequest(), timeout=timeout or self.timeout, metadata=self._metadata
            )
        except aio.AioRpcError as error:
            raise from_rpc_error(error, f"generator {self.generator_address}") from None
        return MessageToDict(reply, preserving_proto_field_name=True)

    async def upload(self, embedding: EmbeddingLike, *, timeout: float | None = None) -> str:
        """Sends one embedding to the generator in chunks; returns the key Generate accepts."""
        return await self._upload(embedding, timeout=timeout, again=True)

    async def _upload(self, embedding: EmbeddingLike, *, timeout: float | None, again: bool) -> str:
        """Uploads unless this client already did (`again` forces it, after the generator lost it)."""
        tensor, content_key = _single_tensor(embedding, "embedding")
        meta, payload = wire.describe(tensor)
        if not again and wire.embedding_key(meta) in self._uploaded:
            return wire.embedding_key(meta)

        async def messages() -> AsyncIterator[generator_pb2.UploadEmbeddingRequest]:
            header = generator_pb2.UploadHeader(tensor=wire.meta_to_proto(meta), content_key=content_key)
            yield generator_pb2.UploadEmbeddingRequest(header=header)
            for chunk in wire.iter_chunks(payload):
                yield generator_pb2.UploadEmbeddingRequest(chunk=chunk)

        try:
            reply = await self._generator().UploadEmbedding(
                messages(), timeout=timeout or self.timeout, metadata=self._metadata
            )
        except aio.AioRpcError as error:
            raise from_rpc_error(error, f"generator {self.generator_address}") from None
        self._uploaded.add(reply.embedding_key)
        return reply.embedding_key

    async def generate(
        self,
        prompt: str | None = None,
        *,
        embeddings: EmbeddingLike | None = None,
        negative_prompt: str | None = None,
        negative_embeddings: EmbeddingLike | None = None,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        cfg_normalization: float = 0.0,
        cfg_truncation: float | None = None,
        max_sequence_length: int | None = None,
        model: str = "",
        request_id: str | None = None,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> Image.Image:
        """Generates one image; unset parameters take the server's Turbo defaults (1024², 8 steps, no CFG).

        Give `prompt` text, or `embeddings` from `encode()`. The returned PIL image's `.info` holds the
        seed, size, steps, guidance, timings, request id, model and replica.
        """
        images = await self.generate_images(
            prompt=prompt,
            embeddings=embeddings,
            negative_prompt=negative_prompt,
            negative_embeddings=negative_embeddings,
            seed=seed,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance_scale,
            cfg_normalization=cfg_normalization,
            cfg_truncation=cfg_truncation,
            max_sequence_length=max_sequence_length,
            model=model,
            request_id=request_id,
            on_progress=on_progress,
            timeout=timeout,
        )
        return images[0]

    async def generate_images(
        self,
        prompt: str | None = None,
        *,
        embeddings: EmbeddingLike | None = None,
        negative_prompt: str | None = None,
        negative_embeddings: EmbeddingLike | None = None,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        cfg_normalization: float = 0.0,
        cfg_truncation: float | None = None,
        max_sequence_length: int | None = None,
        model: str = "",
        request_id: str | None = None,
        num_images: int = 1,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> list[Image.Image]:
        """Generates `num_images` images of one prompt, with seeds seed, seed+1, ... (the server picks
        `seed` when unset); the prompt is encoded once. Parameters as for `generate`. Progress counts the
        steps of all the images.
        """
        if (prompt is None) == (embeddings is None):
            raise InvalidArgument("Pass exactly one of `prompt` (text) or `embeddings` (from encode()).")
        if negative_prompt is not None and negative_embeddings is not None:
            raise InvalidArgument("Pass at most one of `negative_prompt` or `negative_embeddings`.")
        with _fields_in_range():
            request = generator_pb2.GenerateRequest(
                request_id=request_id or uuid.uuid4().hex,
                seed=seed,
                width=width,
                height=height,
                steps=steps,
                guidance_scale=guidance_scale,
                cfg_normalization=cfg_normalization,
                cfg_truncation=cfg_truncation,
                model=model,
                max_sequence_length=max_sequence_length,
                num_images=None if num_images == 1 else num_images,
            )
        if negative_prompt is not None:
            request.negative_prompt.text = negative_prompt
        if prompt is not None:
            request.prompt.text = prompt
        # An uploaded embedding may be evicted before Generate runs: upload again once and retry.
        return await self._with_busy_retries(
            lambda: self._generate_uploading(request, embeddings, negative_embeddings, on_progress, timeout)
        )

    async def generate_many(
        self,
        embeddings: Embeddings | Sequence[PromptEmbedding],
        *,
        seeds: Iterable[int],
        sizes: Iterable[tuple[int, int]] = ((1024, 1024),),
        jobs: Sequence[ImageJob] | None = None,
        concurrency: int = 8,
        steps: int | None = None,
        guidance_scale: float | None = None,
        negative_embeddings: EmbeddingLike | None = None,
        timeout: float | None = None,
    ) -> AsyncGenerator[JobResult, None]:
        """Generates every prompt x size x seed from embeddings encoded once; yields results as they finish.

        Each prompt's embedding is uploaded once. Up to `concurrency` requests run at a time, so the
        generator's replicas all get work. `jobs` (from batch.plan_jobs) replaces the full plan, e.g. to
        skip images already made. Each job has a deterministic request id, so a resumed batch can be
        answered from the generator's store of finished images.
        """
        items = list(embeddings)
        planned = list(jobs) if jobs is not None else plan_jobs(len(items), seeds, sizes)
        if concurrency < 1:
            raise InvalidArgument(f"concurrency must be >= 1 (got {concurrency}).")
        for job in planned:
            if not 0 <= job.prompt_index < len(items):
                raise InvalidArgument(f"{job} names a prompt outside the {len(items)} embeddings.")
        options = {"steps": steps, "guidance_scale": guidance_scale}
        queue: asyncio.Queue[JobResult | BaseException] = asyncio.Queue()
        waiting = iter(planned)

        async def work() -> None:
            for job in waiting:  # shared iterator: each job is taken by exactly one worker
                item = items[job.prompt_index]
                try:
                    image = await self.generate(
                        embeddings=item,
                        negative_embeddings=negative_embeddings,
                        seed=job.seed,
                        width=job.width,
                        height=job.height,
                        request_id=job_request_id(_key_of(item), job, options),
                        timeout=timeout,
                        **options,  # type: ignore[arg-type]
                    )
                except Exception as error:  # handed to the consumer, which stops the batch
                    await queue.put(error)
                    return
                await queue.put(JobResult(job, image))

        workers = [asyncio.ensure_future(work()) for _ in range(min(concurrency, len(planned)))]
        try:
            for _ in planned:
                result = await queue.get()
                if isinstance(result, BaseException):
                    raise result
                yield result
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _with_busy_retries(self, call: Callable[[], Awaitable[T]]) -> T:
        """Retries RESOURCE_EXHAUSTED up to `busy_retries` times, waiting the server's hint or backing off."""
        for attempt in range(self.busy_retries + 1):
            try:
                return await call()
            except ResourceExhausted as error:
                if attempt == self.busy_retries:
                    raise
                backoff = min(30.0, max(error.retry_after_seconds or 0.0, 0.25 * 2**attempt))
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
        raise AssertionError("unreachable")

    async def _generate_uploading(
        self,
        request: generator_pb2.GenerateRequest,
        embeddings: EmbeddingLike | None,
        negative_embeddings: EmbeddingLike | None,
        on_progress: ProgressCallback | None,
        timeout: float | None,
    ) -> list[Image.Image]:
        for attempt in range(2):
            if embeddings is not None:
                request.prompt.embedding_key = await self._upload(
                    embeddings, timeout=timeout, again=attempt > 0
                )
            if negative_embeddings is not None:
                request.negative_prompt.embedding_key = await self._upload(
                    negative_embeddings, timeout=timeout, again=attempt > 0
                )
            try:
                return await self._generate_once(request, on_progress, timeout)
            except NotFound as error:
                uploaded = embeddings is not None or negative_embeddings is not None
                if attempt or not uploaded or "embedding_key" not in error.message:
                    raise
        raise AssertionError("unreachable")

    async def _generate_once(
        self,
        request: generator_pb2.GenerateRequest,
        on_progress: ProgressCallback | None,
        timeout: float | None,
    ) -> list[Image.Image]:
        received: list[tuple[generator_pb2.ImageHeader, bytearray]] = []
        try:
            async for response in self._generator().Generate(
                request, timeout=timeout or self.timeout, metadata=self._metadata
            ):
                kind = response.WhichOneof("event")
                if kind == "progress":
                    if on_progress is not None:
                        on_progress(response.progress.step, response.progress.total_steps)
                elif kind == "image":
                    received.append((response.image, bytearray()))
                elif kind == "image_chunk" and received:
                    received[-1][1].extend(response.image_chunk)
        except aio.AioRpcError as error:
            raise from_rpc_error(error, f"generator {self.generator_address}") from None
        expected = request.num_images if request.HasField("num_images") else 1
        if len(received) != expected or any(len(data) != header.byte_length for header, data in received):
            raise DataLoss(
                f"The image stream from {self.generator_address} ended early ({len(received)} of {expected} "
                "images, or an image cut short). Retry the request."
            )
        images: list[Image.Image] = []
        for header, data in received:
            if hashlib.sha256(data).hexdigest() != header.sha256:
                raise DataLoss(
                    "The image bytes do not match their sha256; they were corrupted. Retry the request."
                )
            image = Image.open(io.BytesIO(bytes(data)))
            image.load()
            image.info.update(image_metadata(header))
            images.append(image)
        return images


def _key_of(item: PromptEmbedding | torch.Tensor) -> str:
    if isinstance(item, PromptEmbedding) and item.content_key:
        return item.content_key
    tensor = item.tensor if isinstance(item, PromptEmbedding) else item
    return wire.embedding_key(wire.describe(tensor)[0])


def image_metadata(header: generator_pb2.ImageHeader) -> dict[str, Any]:
    timings = header.timings
    return {
        "request_id": header.request_id,
        "seed": header.seed,
        "width": header.width,
        "height": header.height,
        "steps": header.steps,
        "guidance_scale": header.guidance_scale,
        "model_id": header.model_id,
        "replica": header.replica,
        "batch_size": header.batch_size,
        "image_index": header.image_index,
        "vae_tiled": header.vae_tiled,
        "sha256": header.sha256,
        "prompt_key": header.prompt_key,
        "timings": {
            "queue": timings.queue_seconds,
            "encode": timings.encode_seconds,
            "denoise": timings.denoise_seconds,
            "decode": timings.decode_seconds,
            "total": timings.total_seconds,
        },
    }


async def read_embedding_stream(
    stream: AsyncIterator[encoder_pb2.EncodeResponse], texts: Sequence[str]
) -> tuple[list[PromptEmbedding], str]:
    """Reassembles an Encode stream (header, chunks, header, chunks, ...) and checks every tensor; returns
    the embeddings and the model id the headers name."""
    items: list[PromptEmbedding] = []
    model_id = ""
    current: tuple[encoder_pb2.EmbeddingHeader, wire.TensorAssembler] | None = None

    def finish(header: encoder_pb2.EmbeddingHeader, assembler: wire.TensorAssembler) -> None:
        items.append(
            PromptEmbedding(
                text=texts[header.prompt_index],
                content_key=header.content_key,
                tensor=assembler.finish(),
                token_count=header.token_count,
                truncated=header.truncated,
                cache_hit=header.cache_hit,
                formatted_text=header.formatted_text,
                hidden_layer=header.hidden_layer,
                max_sequence_length=header.max_sequence_length,
            )
        )

    try:
        async for response in stream:
            if response.WhichOneof("item") == "header":
                if current is not None:
                    finish(*current)
                header = response.header
                model_id = model_id or header.model_id
                if header.prompt_index >= len(texts):
                    raise DataLoss(
                        f"Encoder sent prompt_index {header.prompt_index} for {len(texts)} prompts."
                    )
                current = (header, wire.TensorAssembler(wire.meta_from_proto(header.tensor)))
            elif current is None:
                raise DataLoss("Encoder sent embedding bytes before any header.")
            else:
                current[1].add(response.chunk)
        if current is not None:
            finish(*current)
    except InvalidArgument as error:  # a malformed stream is the encoder's fault, not the caller's
        raise DataLoss(f"The encoder sent a malformed embedding: {error.message}") from None
    if len(items) != len(texts):
        raise DataLoss(
            f"Encoder returned {len(items)} embeddings for {len(texts)} prompts. Retry the request."
        )
    return items, model_id


__all__ = ["AsyncClient", "ZSplitError", "read_embedding_stream"]
