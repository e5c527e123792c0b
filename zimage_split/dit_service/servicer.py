"""gRPC face of the generator: converts messages, resolves embeddings, streams progress and the PNG."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import cast

from grpc import aio

from zimage.generator.v1 import generator_pb2, generator_pb2_grpc
from zimage_split.common import wire
from zimage_split.common.errors import InvalidArgument, NotFound
from zimage_split.common.lru import ByteBoundedLRU
from zimage_split.dit_service.embedding_store import EmbeddingStore
from zimage_split.dit_service.engine import GenerationJob
from zimage_split.dit_service.validation import Limits, validate_params
from zimage_split.dit_service.worker import Worker

_DONE = object()


@dataclass(frozen=True)
class CompletedImages:
    """A finished Generate, kept so that a retry with the same request_id gets the same images back."""

    fingerprint: str
    images: tuple[tuple[generator_pb2.ImageHeader, bytes], ...]

    @property
    def size(self) -> int:
        return sum(len(png) + header.ByteSize() for header, png in self.images)


def request_fingerprint(request: generator_pb2.GenerateRequest) -> str:
    """Identifies what was asked, apart from the request_id itself."""
    unnamed = generator_pb2.GenerateRequest()
    unnamed.CopyFrom(request)
    unnamed.request_id = ""
    return hashlib.sha256(unnamed.SerializeToString(deterministic=True)).hexdigest()


def _conditioning(message: generator_pb2.Conditioning, what: str, limits: Limits) -> tuple[str, str]:
    kind = message.WhichOneof("source")
    if kind is None:
        raise InvalidArgument(f"{what} is empty; set its `text` or an `embedding_key` from UploadEmbedding.")
    value: str = getattr(message, kind)
    if (
        kind == "text"
        and (size := len(value.encode("utf-8", errors="surrogatepass"))) > limits.max_prompt_bytes
    ):
        raise InvalidArgument(
            f"{what}.text is {size} bytes of UTF-8; this generator takes at most {limits.max_prompt_bytes} "
            "(--max-prompt-bytes). Shorten it: only the first max_sequence_length tokens are used anyway."
        )
    return kind, value


class GeneratorServicer(generator_pb2_grpc.GeneratorServiceServicer):
    def __init__(
        self,
        worker: Worker,
        store: EmbeddingStore,
        limits: Limits,
        encoder_address: str = "",
        *,
        completed_bytes: int = 128 << 20,
    ) -> None:
        self.worker = worker
        self.info = worker.info
        self.store = store
        self.limits = limits
        self.encoder_address = encoder_address
        self._active: set[threading.Event] = set()
        # Images by request_id: a client that lost the response and retries gets the same image, not a new run.
        self.completed: ByteBoundedLRU[CompletedImages] = ByteBoundedLRU(
            completed_bytes, lambda done: done.size
        )

    def cancel_all(self) -> None:
        """Stops every running job before its next step (used at shutdown, after the grace period)."""
        for cancelled in list(self._active):
            cancelled.set()

    def _job_parts(self, request: generator_pb2.GenerateRequest):  # type: ignore[no-untyped-def]
        if request.model and request.model != self.info.model_id:
            raise NotFound(
                f"This generator serves {self.info.model_id!r}, not {request.model!r}. "
                "Send the request to a generator started with that --model, or leave `model` empty."
            )
        params = validate_params(
            self.limits,
            width=request.width if request.HasField("width") else None,
            height=request.height if request.HasField("height") else None,
            steps=request.steps if request.HasField("steps") else None,
            guidance_scale=request.guidance_scale if request.HasField("guidance_scale") else None,
            cfg_normalization=request.cfg_normalization,
            cfg_truncation=request.cfg_truncation if request.HasField("cfg_truncation") else None,
            seed=request.seed if request.HasField("seed") else random.getrandbits(63),
        )
        if request.HasField("max_sequence_length") and not 1 <= request.max_sequence_length <= 4096:
            raise InvalidArgument(
                f"max_sequence_length must be between 1 and 4096 (got {request.max_sequence_length}); default 512."
            )
        prompt = _conditioning(request.prompt, "GenerateRequest.prompt", self.limits)
        negative = None
        if params.uses_guidance:
            negative = (
                _conditioning(request.negative_prompt, "GenerateRequest.negative_prompt", self.limits)
                if request.HasField("negative_prompt")
                else ("text", "")
            )
        max_length = request.max_sequence_length if request.HasField("max_sequence_length") else None
        return params, prompt, negative, max_length

    def _image_count(self, request: generator_pb2.GenerateRequest, seed: int) -> int:
        count = request.num_images if request.HasField("num_images") else 1
        if not 1 <= count <= self.limits.max_images_per_request:
            raise InvalidArgument(
                f"num_images must be between 1 and {self.limits.max_images_per_request} (got {count}); send "
                "several requests for more (this generator's --max-images-per-request)."
            )
        if seed + count - 1 > wire.MAX_SEED:
            raise InvalidArgument(
                f"seed {seed} + num_images {count} runs past the largest seed, 2**64 - 1; pick a smaller seed."
            )
        return count

    async def Generate(
        self, request: generator_pb2.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[generator_pb2.GenerateResponse]:
        received = time.perf_counter()
        fingerprint = request_fingerprint(request) if request.request_id else ""
        if request.request_id and (done := self.completed.get(request.request_id)) is not None:
            if done.fingerprint != fingerprint:
                raise InvalidArgument(
                    f"request_id {request.request_id!r} was already used for a different request; "
                    "give every distinct request its own request_id."
                )
            for header, png in done.images:
                for response in _image_responses(header, png):
                    yield response
            return
        params, prompt, negative, max_length = self._job_parts(request)
        count = self._image_count(request, params.seed)
        # The caller's deadline also bounds the call to the encoder.
        positive_embedding, negative_embedding = await self.store.resolve_pair(
            prompt, negative, max_length, timeout=context.time_remaining()
        )
        encode_seconds = max(
            positive_embedding.encode_seconds, getattr(negative_embedding, "encode_seconds", 0.0)
        )

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, int, str] | object] = asyncio.Queue()
        cancelled = threading.Event()
        self._active.add(cancelled)

        def step_reporter(index: int) -> Callable[..., None]:
            def on_step(step: int, total: int, replica: str = "") -> None:
                loop.call_soon_threadsafe(events.put_nowait, (index, step, replica))

            return on_step

        # Image i has seed + i; each is a job of its own, so replicas (and Ray's batching) share them out.
        tasks = []
        for index in range(count):
            job = GenerationJob(
                params=dataclasses.replace(params, seed=params.seed + index),
                prompt_embeds=positive_embedding.tensor,
                negative_prompt_embeds=negative_embedding.tensor if negative_embedding else None,
                on_step=step_reporter(index),
                is_cancelled=cancelled.is_set,
            )
            job_id = (
                f"{request.request_id}#{index}" if request.request_id and count > 1 else request.request_id
            )
            task = asyncio.ensure_future(self.worker.run(job, request_id=job_id))
            task.add_done_callback(lambda _: events.put_nowait(_DONE))
            tasks.append(task)
        steps_done = [0] * count
        try:
            finished = 0
            while finished < count:
                event = await events.get()
                if event is _DONE:
                    finished += 1
                    # A failed image fails the request at once; the finally below stops the others.
                    if failed := next(
                        (t for t in tasks if t.done() and not t.cancelled() and t.exception()), None
                    ):
                        await failed
                    continue
                index, step, replica = cast(tuple[int, int, str], event)
                steps_done[index] = step
                yield generator_pb2.GenerateResponse(
                    progress=generator_pb2.Progress(
                        step=sum(steps_done),
                        total_steps=params.steps * count,
                        elapsed_seconds=time.perf_counter() - received,
                        replica=replica,
                    )
                )
            results = [await task for task in tasks]
        finally:
            # Reached on client cancel, deadline or error: the engine stops before its next step.
            cancelled.set()
            for task in tasks:
                task.cancel()  # a no-op once done; a Ray worker passes it on to the replica
                # Nobody awaits an abandoned job; retrieve its outcome so asyncio does not log it as lost.
                task.add_done_callback(lambda done: done.cancelled() or done.exception())
            self._active.discard(cancelled)

        images = []
        for index, result in enumerate(results):
            image = result.image
            header = generator_pb2.ImageHeader(
                request_id=request.request_id,
                seed=params.seed + index,
                width=image.width,
                height=image.height,
                steps=params.steps,
                guidance_scale=params.guidance_scale,
                format="png",
                byte_length=len(image.png),
                sha256=hashlib.sha256(image.png).hexdigest(),
                timings=generator_pb2.Timings(
                    queue_seconds=result.queue_seconds,
                    encode_seconds=encode_seconds,
                    denoise_seconds=image.denoise_seconds,
                    decode_seconds=image.decode_seconds,
                    total_seconds=time.perf_counter() - received,
                ),
                model_id=self.info.model_id,
                replica=result.replica,
                batch_size=result.batch_size,
                prompt_key=positive_embedding.key,
                negative_prompt_key=negative_embedding.key if negative_embedding else "",
                image_index=index,
                vae_tiled=image.vae_tiled,
            )
            images.append((header, image.png))
        if request.request_id:
            self.completed.put(request.request_id, CompletedImages(fingerprint, tuple(images)))
        for header, png in images:
            for response in _image_responses(header, png):
                yield response

    async def UploadEmbedding(
        self,
        request_iterator: AsyncIterator[generator_pb2.UploadEmbeddingRequest],
        context: aio.ServicerContext,
    ) -> generator_pb2.UploadEmbeddingResponse:
        assembler: wire.TensorAssembler | None = None
        async for message in request_iterator:
            if message.WhichOneof("item") == "header":
                if assembler is not None:
                    raise InvalidArgument("UploadEmbedding takes one header; upload one embedding per call.")
                assembler = wire.TensorAssembler(wire.meta_from_proto(message.header.tensor))
            elif assembler is None:
                raise InvalidArgument("UploadEmbedding must start with a header message, then the chunks.")
            else:
                assembler.add(message.chunk)
        if assembler is None:
            raise InvalidArgument("UploadEmbedding received no header; send a header, then the chunks.")
        key = await self.store.add_upload(assembler.finish(), assembler.meta)
        return generator_pb2.UploadEmbeddingResponse(embedding_key=key)

    async def Info(
        self, request: generator_pb2.InfoRequest, context: aio.ServicerContext
    ) -> generator_pb2.InfoResponse:
        cache = self.store.cache
        return generator_pb2.InfoResponse(
            model_id=self.info.model_id,
            caption_dim=self.info.caption_dim,
            dtype=wire.dtype_to_proto(self.info.dtype),  # type: ignore[arg-type]
            device=self.info.device,
            encoder_address=self.encoder_address,
            parameter_count=self.info.parameter_count,
            components=list(self.info.components),
            max_pixels=self.limits.max_pixels,
            max_steps=self.limits.max_steps,
            max_images_per_request=self.limits.max_images_per_request,
            attention_backend=self.info.attention_backend,
            compiled=self.info.compiled,
            vae_tiling=self.info.vae_tiling,
            embedding_cache_hits=cache.hits,
            embedding_cache_misses=cache.misses,
            embedding_cache_bytes=cache.bytes,
        )


def _image_responses(
    header: generator_pb2.ImageHeader, png: bytes
) -> Iterator[generator_pb2.GenerateResponse]:
    yield generator_pb2.GenerateResponse(image=header)
    for chunk in wire.iter_chunks(memoryview(png)):
        yield generator_pb2.GenerateResponse(image_chunk=chunk)
