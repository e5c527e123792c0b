"""AsyncClient: the SDK's one implementation. `Client` (sync) runs it on a private event loop."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import os
import random
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, cast

from google.protobuf.json_format import MessageToDict
from grpc import aio
from PIL import Image

from zimage_split._proto.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from zimage_split._proto.generator.v1 import generator_pb2, generator_pb2_grpc
from zimage_split.client.batch import ImageJob, JobResult, job_request_id, plan_jobs
from zimage_split.client.embeddings import Embeddings, PromptEmbedding
from zimage_split.client.errors import typed_errors
from zimage_split.client.tensor_bytes import TensorBytes, need_torch
from zimage_split.common import tracing, wire
from zimage_split.common.addresses import host_of, with_default_port
from zimage_split.common.encoder_pool import EncoderPool
from zimage_split.common.errors import (
    BUSY,
    EMBEDDING_UNKNOWN,
    IMAGE_UNKNOWN,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ZSplitError,
)
from zimage_split.common.logs import REQUEST_ID_KEY, current_request_id, new_request_id
from zimage_split.common.security import ClientSecurity, is_loopback
from zimage_split.common.server import GRPC_OPTIONS
from zimage_split.common.vocabulary import (
    DEFAULT_TIMEOUT_SECONDS,
    ENCODER_LONG_PROMPT_MODE,
    GENERATOR_LONG_PROMPT_MODE,
    GENERATOR_PORT,
    OUTPUT_FORMAT,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

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
EmbeddingLike: TypeAlias = "PromptEmbedding | Embeddings | TensorBytes | torch.Tensor"
# A LoRA of a request: "name", ("name", scale) or {"name": ..., "scale": ...}.
LoraLike = str | tuple[str, float] | Mapping[str, Any]
# An image to upload: a file path, file bytes, or a PIL image (sent as PNG).
ImageInput = str | os.PathLike[str] | bytes | Image.Image


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
            "32-bit integer; guidance values and shift numbers."
        ) from None


PassLike: TypeAlias = "dict[str, float] | generator_pb2.Pass"


def _pass(spec: PassLike) -> generator_pb2.Pass:
    """A pass as the request carries it, from ``{"scale": 0.5, "steps": 8, "strength": 0.6}``."""
    if isinstance(spec, generator_pb2.Pass):
        return spec
    unknown = set(spec) - {"scale", "steps", "strength"}
    if unknown or "scale" not in spec:
        raise InvalidArgument(
            f"A pass is a dict with 'scale' and, if wanted, 'steps' and 'strength' (got {spec!r})."
        )
    return generator_pb2.Pass(**spec)


def _with_intermediate(images: list[Image.Image | Latents]) -> list[Image.Image | Latents]:
    """The final images, each with the images of its earlier passes in info["intermediate"]."""
    finals: list[Image.Image | Latents] = []
    earlier: list[Image.Image | Latents] = []
    for image in images:
        if image.info["pass_index"] < image.info["pass_count"] - 1:
            earlier.append(image)
            continue
        image.info["intermediate"] = earlier
        finals.append(image)
        earlier = []
    return finals


def _skip_layer_guidance(
    scale: float, layers: Sequence[int], start: float | None, stop: float | None
) -> generator_pb2.SkipLayerGuidance | None:
    """The request's SkipLayerGuidance; None when nothing is set, which leaves it off. The generator checks
    the values (a layer list without a scale included) and says what to fix."""
    if not scale and not layers and start is None and stop is None:
        return None
    return generator_pb2.SkipLayerGuidance(scale=scale, layers=list(layers), start=start, stop=stop)


def _dype(
    on: bool, method: str | None, scale: float | None, exponent: float | None
) -> generator_pb2.Dype | None:
    """The request's Dype; None when off. The generator checks the values and says what to fix."""
    if not on:
        if method is not None or scale is not None or exponent is not None:
            raise InvalidArgument("dype_method, dype_scale and dype_exponent need dype=True.")
        return None
    return generator_pb2.Dype(method=method or "", scale=scale, exponent=exponent)


def _single_tensor(value: EmbeddingLike, what: str) -> tuple[TensorBytes, str]:
    if isinstance(value, Embeddings):
        if len(value) != 1:
            raise InvalidArgument(f"{what} holds {len(value)} prompts; pass one, e.g. embeddings[0].")
        value = value[0]
    if isinstance(value, PromptEmbedding):
        return value.values, value.content_key
    try:
        return TensorBytes.of(value), ""
    except InvalidArgument:
        raise InvalidArgument(
            f"{what} must be a PromptEmbedding, a one-prompt Embeddings or a tensor."
        ) from None


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
        generator: str | None = f"localhost:{GENERATOR_PORT}",
        encoder: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        busy_retries: int = 0,
        security: ClientSecurity | None = None,
    ) -> None:
        """`busy_retries`: how often `generate` retries, with backoff, when the generator is full.

        `security`: TLS and the bearer token, e.g. `ClientSecurity(ca_file="ca.crt", token=...)`; unset
        means plaintext (loopback and trusted networks only).

        `encoder` may list several encoders, `"10.0.0.5:50051,10.0.0.6:50051"`, or name them all with
        `"dns:NAME:PORT"`: `encode` spreads its calls over them and fails over to another when one is
        down (see `EncoderPool`). A host without a port gets the service's own: `generator="gpu-box"` dials
        gpu-box:50052, `encoder="cpu-box"` cpu-box:50051.
        """
        if generator is None and encoder is None:
            raise InvalidArgument(
                "Give at least one address: generator='host:port' and/or encoder='host:port'."
            )
        # A host without a port gets the service's default (gRPC would dial 443).
        self.generator_address = (
            with_default_port(generator, GENERATOR_PORT) if generator is not None else None
        )
        # Checks the addresses now, so a malformed list fails here rather than at the first call.
        self.encoder_pool = EncoderPool(encoder, self._encoder_info_at) if encoder is not None else None
        self.encoder_address = ",".join(self.encoder_pool.entries) if self.encoder_pool else None
        self.timeout = timeout
        self.busy_retries = busy_retries
        self.security = security or ClientSecurity.plaintext()
        self._metadata = self.security.metadata()
        self._channels: dict[str, aio.Channel] = {}
        # Keys of embeddings this client has uploaded to the generator: sent once, not with every request.
        self._uploaded: set[str] = set()
        self._uploaded_images: dict[tuple[str, bool], str] = {}

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
            if self.security.insecure and not is_loopback(host_of(address)):
                logger.warning(
                    "Plaintext connection to %s: no TLS. Pass security=ClientSecurity(...).", address
                )
            self._channels[address] = self.security.channel(address, CHANNEL_OPTIONS)
        return self._channels[address]

    def _call_metadata(self, request_id: str = "") -> tuple[tuple[str, str], ...]:
        """Metadata for one call: the token, the request id (that of the request this code serves, as in a
        generator calling its encoder; else `request_id`; else a new one) and the trace context."""
        metadata = [*self._metadata, (REQUEST_ID_KEY, current_request_id() or request_id or new_request_id())]
        tracing.inject(metadata)
        return tuple(metadata)

    @property
    def _generator_target(self) -> str:
        return f"generator {self.generator_address}"

    def _generator(self) -> generator_pb2_grpc.GeneratorServiceStub:
        return generator_pb2_grpc.GeneratorServiceStub(self._channel(self.generator_address, "generator"))

    def _encoders(self) -> EncoderPool:
        if self.encoder_pool is None:
            raise InvalidArgument(
                "This client has no encoder address; pass encoder='host:port' to the client."
            )
        return self.encoder_pool

    def _encoder_at(self, address: str) -> encoder_pb2_grpc.EncoderServiceStub:
        return encoder_pb2_grpc.EncoderServiceStub(self._channel(address, "encoder"))

    def _encode_call(self, address: str) -> aio.UnaryStreamMultiCallable:
        """Encode, with its chunk messages read by wire.read_chunk_or (no protobuf copies)."""
        return self._channel(address, "encoder").unary_stream(
            wire.ENCODE_METHOD,
            request_serializer=encoder_pb2.EncodeRequest.SerializeToString,
            response_deserializer=wire.read_chunk_or(encoder_pb2.EncodeResponse.FromString),
        )

    def _upload_embedding_call(self) -> aio.StreamUnaryMultiCallable:
        """UploadEmbedding, taking chunk messages written by wire.encode_chunk_message."""
        return self._channel(self.generator_address, "generator").stream_unary(
            wire.UPLOAD_EMBEDDING_METHOD,
            request_serializer=wire.write_message,
            response_deserializer=generator_pb2.UploadEmbeddingResponse.FromString,
        )

    async def _encoder_info_at(self, address: str, timeout: float | None) -> dict[str, Any]:
        with typed_errors(f"encoder {address}"):
            reply = await self._encoder_at(address).Info(
                encoder_pb2.InfoRequest(), timeout=timeout, metadata=self._call_metadata()
            )
        return MessageToDict(reply, preserving_proto_field_name=True)

    async def encode(
        self,
        prompts: str | Sequence[str],
        *,
        max_sequence_length: int | None = None,
        hidden_layer: int | None = None,
        long_prompt_mode: str | None = None,
        timeout: float | None = None,
    ) -> Embeddings:
        """Encodes prompts on the encoder service; returns one PromptEmbedding per prompt.

        A prompt longer than `max_sequence_length` tokens (the encoder's default, 512, when None; at most
        the DiT's limit, 1504) becomes exactly that many rows: `long_prompt_mode` "truncate" (the default,
        as diffusers) keeps its first tokens, "interpolate" and "pool" resample all of them. A prompt that
        fits is the same in every mode; `shortened_by` and `source_token_count` say what happened.
        """
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        mode = ENCODER_LONG_PROMPT_MODE.number(long_prompt_mode)
        with _fields_in_range():
            options = encoder_pb2.EncodeOptions(
                max_sequence_length=max_sequence_length, hidden_layer=hidden_layer, long_prompt_mode=mode
            )
            request = encoder_pb2.EncodeRequest(prompts=texts, options=options)

        async def encode_at(address: str, left: float | None) -> tuple[list[PromptEmbedding], str]:
            with typed_errors(f"encoder {address}"):
                stream = self._encode_call(address)(request, timeout=left, metadata=self._call_metadata())
                return await read_embedding_stream(stream, texts)

        items, model_id = await self._encoders().call(encode_at, timeout or self.timeout)
        return Embeddings(items, model_id=model_id)

    async def encoder_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The Info of an encoder (of one of them, when several are given)."""
        return await self._encoders().call(self._encoder_info_at, timeout or self.timeout)

    async def check_encoders(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The Info of every encoder, asked at once; raises InvalidArgument, naming it, for an encoder that
        serves another model than the others. Returns one matching Info."""
        return await self._encoders().check_all(timeout or self.timeout)

    async def generator_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        with typed_errors(self._generator_target):
            reply = await self._generator().Info(
                generator_pb2.InfoRequest(), timeout=timeout or self.timeout, metadata=self._call_metadata()
            )
        return MessageToDict(reply, preserving_proto_field_name=True)

    async def upload(self, embedding: EmbeddingLike, *, timeout: float | None = None) -> str:
        """Sends one embedding to the generator in chunks; returns the key Generate accepts."""
        return await self._upload(embedding, timeout=timeout, again=True)

    async def _upload(self, embedding: EmbeddingLike, *, timeout: float | None, again: bool) -> str:
        """Uploads unless this client already did (`again` forces it, after the generator lost it)."""
        tensor, content_key = _single_tensor(embedding, "embedding")
        meta, payload = wire.describe_bytes(tensor.dtype, tensor.shape, tensor.data), memoryview(tensor.data)
        if not again and wire.embedding_key(meta) in self._uploaded:
            return wire.embedding_key(meta)

        async def messages() -> AsyncIterator[generator_pb2.UploadEmbeddingRequest | bytes]:
            header = generator_pb2.UploadHeader(tensor=wire.meta_to_proto(meta), content_key=content_key)
            yield generator_pb2.UploadEmbeddingRequest(header=header)
            for message in wire.chunk_messages(payload):
                yield message

        with typed_errors(self._generator_target):
            reply = await self._upload_embedding_call()(
                messages(), timeout=timeout or self.timeout, metadata=self._call_metadata()
            )
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
        shift: float | None = None,
        slg_scale: float = 0.0,
        slg_layers: Sequence[int] = (),
        slg_start: float | None = None,
        slg_stop: float | None = None,
        dype: bool = False,
        dype_method: str | None = None,
        dype_scale: float | None = None,
        dype_exponent: float | None = None,
        passes: Sequence[PassLike] = (),
        return_intermediate: bool = False,
        max_sequence_length: int | None = None,
        long_prompt_mode: str | None = None,
        loras: Sequence[LoraLike] = (),
        init_image: ImageInput | None = None,
        strength: float | None = None,
        mask: ImageInput | None = None,
        controlnet: str | None = None,
        control_image: ImageInput | None = None,
        controlnet_scale: float | None = None,
        output_format: str | None = None,
        quality: int | None = None,
        strip_metadata: bool = False,
        model: str = "",
        request_id: str | None = None,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> Image.Image | Latents:
        """Generates one image; unset parameters take the server's Turbo defaults (1024², 8 steps, no CFG).

        Give `prompt` text, or `embeddings` from `encode()`. The returned PIL image's `.info` holds the
        seed, size, steps, guidance, timings, request id, model, replica, LoRAs, prompt shortening, and
        `file_bytes`: the file exactly as the generator made it (PNG with the settings in text chunks by
        default; write it to keep them).

        - `loras`: ``[{"name": "style", "scale": 0.8}]`` or ``[("style", 0.8)]``, files under the
          generator's --lora-dir, for this request only.
        - `init_image` (a path, PIL image or file bytes) with `strength` (0.6): img2img, as diffusers'
          ZImageImg2ImgPipeline; with `mask` (white = repaint) inpainting, as ZImageInpaintPipeline.
          Without width and height the image's own size is kept.
        - `controlnet` (a name the generator loaded with --controlnet; `generator_info()["controlnets"]`) with
          `control_image` (a path, PIL image or file bytes: a pose, depth or edge map) and `controlnet_scale`
          (0.75): diffusers' ZImageControlNetPipeline; with `init_image` and `mask` (no `strength`) its
          ZImageControlNetInpaintPipeline. The control image is resized to the request's size if it has its
          shape; without width and height its own size is kept.
        - `shift`: the flow-matching schedule's shift (0.1 to 20); unset is the model's own, 3 for Turbo.
          Higher spends more steps at high noise (composition), lower more at low noise (detail).
        - `slg_scale` (0 = off; 2 to 4 is usual) turns on Skip Layer Guidance: on the steps from `slg_start`
          (0.05) to `slg_stop` (0.5) of the way through, the DiT runs again with blocks `slg_layers` (7-12)
          skipped and the prediction moves away from that one. Each active step costs one more DiT pass.
        - `dype=True`: DyPE position extrapolation for images over 1024 pixels a side (2048², or 4096² where
          the generator's --max-pixels allows it): `dype_method` "vision_yarn" (default), "ntk" or "pi",
          `dype_scale` and `dype_exponent` (2 and 2) shape how far and how long it extrapolates. Changes
          nothing at 1024² or below.
        - `passes`: multi-pass ("hires"), e.g. ``[{"scale": 0.5}, {"scale": 1, "strength": 0.5}]``: the first
          pass makes the image at half the size, each later one upscales it (Lanczos) and refines it with
          img2img (`strength`, default 0.6; `steps`, default `steps`). With `return_intermediate`,
          `image.info["intermediate"]` holds the images of the passes before the last.
        - `long_prompt_mode`: "truncate" (default), "interpolate" or "pool" for prompts over
          `max_sequence_length` tokens.
        - `output_format`: "png" (default), "jpeg" or "webp" (with `quality`), or "latent", which returns
          `Latents` (the DiT's output before the VAE) instead of an image.
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
            shift=shift,
            slg_scale=slg_scale,
            slg_layers=slg_layers,
            slg_start=slg_start,
            slg_stop=slg_stop,
            dype=dype,
            dype_method=dype_method,
            dype_scale=dype_scale,
            dype_exponent=dype_exponent,
            passes=passes,
            return_intermediate=return_intermediate,
            max_sequence_length=max_sequence_length,
            long_prompt_mode=long_prompt_mode,
            loras=loras,
            init_image=init_image,
            strength=strength,
            mask=mask,
            controlnet=controlnet,
            control_image=control_image,
            controlnet_scale=controlnet_scale,
            output_format=output_format,
            quality=quality,
            strip_metadata=strip_metadata,
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
        shift: float | None = None,
        slg_scale: float = 0.0,
        slg_layers: Sequence[int] = (),
        slg_start: float | None = None,
        slg_stop: float | None = None,
        dype: bool = False,
        dype_method: str | None = None,
        dype_scale: float | None = None,
        dype_exponent: float | None = None,
        passes: Sequence[PassLike] = (),
        return_intermediate: bool = False,
        max_sequence_length: int | None = None,
        long_prompt_mode: str | None = None,
        loras: Sequence[LoraLike] = (),
        init_image: ImageInput | None = None,
        strength: float | None = None,
        mask: ImageInput | None = None,
        controlnet: str | None = None,
        control_image: ImageInput | None = None,
        controlnet_scale: float | None = None,
        output_format: str | None = None,
        quality: int | None = None,
        strip_metadata: bool = False,
        model: str = "",
        request_id: str | None = None,
        num_images: int = 1,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> list[Image.Image | Latents]:
        """Generates `num_images` images of one prompt, with seeds seed, seed+1, ... (the server picks
        `seed` when unset); the prompt is encoded once. Parameters as for `generate`. Progress counts the
        steps of all the images.
        """
        if (prompt is None) == (embeddings is None):
            raise InvalidArgument("Pass exactly one of `prompt` (text) or `embeddings` (from encode()).")
        if negative_prompt is not None and negative_embeddings is not None:
            raise InvalidArgument("Pass at most one of `negative_prompt` or `negative_embeddings`.")
        if init_image is None and (mask is not None or strength is not None):
            raise InvalidArgument("`mask` and `strength` need an `init_image` (img2img / inpainting).")
        if (controlnet is None) != (control_image is None):
            raise InvalidArgument("Pass `controlnet` (its name) and `control_image` together, or neither.")
        if controlnet_scale is not None and controlnet is None:
            raise InvalidArgument("`controlnet_scale` needs a `controlnet` and its `control_image`.")
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
                shift=shift,
                skip_layer_guidance=_skip_layer_guidance(slg_scale, slg_layers, slg_start, slg_stop),
                dype=_dype(dype, dype_method, dype_scale, dype_exponent),
                passes=[_pass(spec) for spec in passes],
                return_intermediate=return_intermediate,
                model=model,
                max_sequence_length=max_sequence_length,
                num_images=None if num_images == 1 else num_images,
                long_prompt_mode=GENERATOR_LONG_PROMPT_MODE.number(long_prompt_mode),
                output_format=OUTPUT_FORMAT.number(output_format),
                quality=quality,
                strip_metadata=strip_metadata,
                loras=[_lora_request(lora) for lora in loras],
                controlnet=(
                    generator_pb2.ControlNetRequest(name=controlnet, conditioning_scale=controlnet_scale)
                    if controlnet is not None
                    else None
                ),
            )
        if negative_prompt is not None:
            request.negative_prompt.text = negative_prompt
        if prompt is not None:
            request.prompt.text = prompt
        start = _StartImages(init_image, mask, strength) if init_image is not None else None
        control = _image_file_bytes(control_image) if control_image is not None else None
        # An uploaded embedding or image may be evicted before Generate runs: upload again once and retry.
        return await self._with_busy_retries(
            lambda: self._generate_uploading(
                request, embeddings, negative_embeddings, start, control, on_progress, timeout
            )
        )

    async def upload_image(
        self, image: ImageInput, *, mask: bool = False, timeout: float | None = None
    ) -> str:
        """Sends an image file (PNG, JPEG or WebP; a PIL image is sent as PNG) to the generator in chunks;
        returns the key for img2img (or, with `mask`, inpainting). The generator checks it on arrival."""
        return await self._upload_image(_image_file_bytes(image), mask=mask, timeout=timeout, again=True)

    async def _upload_image(self, data: bytes, *, mask: bool, timeout: float | None, again: bool) -> str:
        digest = hashlib.sha256(data).hexdigest()
        known = self._uploaded_images.get((digest, mask))
        if known is not None and not again:
            return known

        async def messages() -> AsyncIterator[generator_pb2.UploadImageRequest]:
            header = generator_pb2.UploadImageHeader(byte_length=len(data), sha256=digest, mask=mask)
            yield generator_pb2.UploadImageRequest(header=header)
            for chunk in wire.iter_chunks(memoryview(data)):
                yield generator_pb2.UploadImageRequest(chunk=bytes(chunk))

        with typed_errors(self._generator_target):
            reply = await self._generator().UploadImage(
                messages(), timeout=timeout or self.timeout, metadata=self._call_metadata()
            )
        self._uploaded_images[(digest, mask)] = reply.image_key
        return reply.image_key

    async def list_loras(self, *, timeout: float | None = None) -> list[dict[str, Any]]:
        """The LoRA files the generator can load (under its --lora-dir): name, format, rank, size, ..."""
        with typed_errors(self._generator_target):
            reply = await self._generator().ListLoras(
                generator_pb2.ListLorasRequest(),
                timeout=timeout or self.timeout,
                metadata=self._call_metadata(),
            )
        if not reply.enabled:
            raise InvalidArgument(
                f"The generator at {self.generator_address} was started without --lora-dir, so it takes no "
                "LoRA; restart it with --lora-dir DIR."
            )
        return [
            MessageToDict(
                file,
                preserving_proto_field_name=True,
                always_print_fields_with_no_presence=True,
            )
            for file in reply.loras
        ]

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
        loras: Sequence[LoraLike] = (),
        shift: float | None = None,
        slg_scale: float = 0.0,
        slg_layers: Sequence[int] = (),
        slg_start: float | None = None,
        slg_stop: float | None = None,
        dype: bool = False,
        dype_method: str | None = None,
        dype_scale: float | None = None,
        dype_exponent: float | None = None,
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
        options: dict[str, Any] = {"steps": steps, "guidance_scale": guidance_scale}
        if loras:  # part of each request id only when set, so ids of batches without LoRA stay as they were
            options["loras"] = [MessageToDict(_lora_request(lora)) for lora in loras]
        if shift is not None:  # the same: ids of batches with the model's own shift stay as they were
            options["shift"] = shift
        slg = _skip_layer_guidance(slg_scale, slg_layers, slg_start, slg_stop)
        if slg is not None:
            options["skip_layer_guidance"] = MessageToDict(slg)
        dype_settings = _dype(dype, dype_method, dype_scale, dype_exponent)
        if dype_settings is not None:
            options["dype"] = MessageToDict(dype_settings)
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
                        steps=steps,
                        guidance_scale=guidance_scale,
                        loras=loras,
                        shift=shift,
                        slg_scale=slg_scale,
                        slg_layers=slg_layers,
                        slg_start=slg_start,
                        slg_stop=slg_stop,
                        dype=dype,
                        dype_method=dype_method,
                        dype_scale=dype_scale,
                        dype_exponent=dype_exponent,
                    )
                except Exception as error:  # handed to the consumer, which stops the batch
                    await queue.put(error)
                    return
                await queue.put(JobResult(job, cast(Image.Image, image)))  # PNG: no output_format given

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
        """Retries a full generator (RESOURCE_EXHAUSTED, reason busy) up to `busy_retries` times, waiting the
        server's hint or backing off."""
        for attempt in range(self.busy_retries + 1):
            try:
                return await call()
            except ResourceExhausted as error:
                if attempt == self.busy_retries or error.reason != BUSY:
                    raise
                backoff = min(30.0, max(error.retry_after_seconds or 0.0, 0.25 * 2**attempt))
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
        raise AssertionError("unreachable")

    async def _generate_uploading(
        self,
        request: generator_pb2.GenerateRequest,
        embeddings: EmbeddingLike | None,
        negative_embeddings: EmbeddingLike | None,
        start: _StartImages | None,
        control: bytes | None,
        on_progress: ProgressCallback | None,
        timeout: float | None,
    ) -> list[Image.Image | Latents]:
        for attempt in range(2):
            if control is not None:
                request.controlnet.image_key = await self._upload_image(
                    control, mask=False, timeout=timeout, again=attempt > 0
                )
            if start is not None:
                request.init_image.image_key = await self._upload_image(
                    start.image_bytes, mask=False, timeout=timeout, again=attempt > 0
                )
                if start.mask_bytes is not None:
                    request.init_image.mask_key = await self._upload_image(
                        start.mask_bytes, mask=True, timeout=timeout, again=attempt > 0
                    )
                if start.strength is not None:
                    request.init_image.strength = start.strength
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
                uploaded = (
                    embeddings is not None
                    or negative_embeddings is not None
                    or start is not None
                    or control is not None
                )
                lost = error.reason in (EMBEDDING_UNKNOWN, IMAGE_UNKNOWN)
                if attempt or not uploaded or not lost:
                    raise
        raise AssertionError("unreachable")

    async def _generate_once(
        self,
        request: generator_pb2.GenerateRequest,
        on_progress: ProgressCallback | None,
        timeout: float | None,
    ) -> list[Image.Image | Latents]:
        received: list[tuple[generator_pb2.ImageHeader, bytearray]] = []
        with typed_errors(self._generator_target):
            async for response in self._generator().Generate(
                request, timeout=timeout or self.timeout, metadata=self._call_metadata(request.request_id)
            ):
                kind = response.WhichOneof("event")
                if kind == "progress":
                    if on_progress is not None:
                        on_progress(response.progress.step, response.progress.total_steps)
                elif kind == "image":
                    received.append((response.image, bytearray()))
                elif kind == "image_chunk" and received:
                    received[-1][1].extend(response.image_chunk)
        expected = request.num_images if request.HasField("num_images") else 1
        if request.return_intermediate:
            expected *= len(request.passes)
        if len(received) != expected or any(len(data) != header.byte_length for header, data in received):
            raise DataLoss(
                f"The image stream from {self.generator_address} ended early ({len(received)} of {expected} "
                "images, or an image cut short). Retry the request."
            )
        if request.HasField("shift") and any(header.shift == 0 for header, _ in received):
            # A generator from before GenerateRequest.shift skips the field it does not know and reports none.
            raise FailedPrecondition(
                f"The generator at {self.generator_address} ignored `shift`: it is older than per-request "
                "schedule shifts. Upgrade it, or leave shift unset."
            )
        if request.skip_layer_guidance.scale and any(
            not header.HasField("skip_layer_guidance") for header, _ in received
        ):
            raise FailedPrecondition(
                f"The generator at {self.generator_address} ignored Skip Layer Guidance: it is older than "
                "slg_scale. Upgrade it, or leave slg_scale at 0."
            )
        if request.HasField("dype") and any(not header.HasField("dype") for header, _ in received):
            raise FailedPrecondition(
                f"The generator at {self.generator_address} ignored DyPE: it is older than per-request "
                "position extrapolation. Upgrade it, or leave dype off."
            )
        if request.HasField("controlnet") and any(
            not header.HasField("controlnet") for header, _ in received
        ):
            raise FailedPrecondition(
                f"The generator at {self.generator_address} ignored `controlnet`: it is older than ControlNet "
                "requests. Upgrade it, or leave controlnet unset."
            )
        images: list[Image.Image | Latents] = []
        for header, data in received:
            if hashlib.sha256(data).hexdigest() != header.sha256:
                raise DataLoss(
                    "The image bytes do not match their sha256; they were corrupted. Retry the request."
                )
            info = image_metadata(header) | {"file_bytes": bytes(data), "format": header.format}
            if header.format == "safetensors":
                need_torch('output_format="latent" (latents come back as torch tensors)')
                from safetensors.torch import load as safetensors_load

                images.append(Latents(safetensors_load(bytes(data))["latents"], info))
                continue
            image = Image.open(io.BytesIO(bytes(data)))
            image.load()
            image.info.update(info)
            images.append(image)
        return _with_intermediate(images) if request.return_intermediate else images


@dataclass(frozen=True)
class Latents:
    """`output_format="latent"`: the DiT's final latents, [1, 16, height/8, width/8] float32 for the real
    VAE, before VAE decoding. `info` is as an image's; `info["file_bytes"]` is the safetensors file."""

    tensor: torch.Tensor
    info: dict[str, Any]

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_bytes(self.info["file_bytes"])


class _StartImages:
    """An img2img request's start image and mask as file bytes, read once, uploaded (again) when needed."""

    def __init__(self, image: ImageInput, mask: ImageInput | None, strength: float | None) -> None:
        self.image_bytes = _image_file_bytes(image)
        self.mask_bytes = _image_file_bytes(mask) if mask is not None else None
        self.strength = strength


def _image_file_bytes(image: ImageInput) -> bytes:
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    try:
        return Path(image).read_bytes()
    except OSError as error:
        raise InvalidArgument(f"Cannot read the image {image}: {error.strerror}.") from None


def _lora_request(lora: LoraLike) -> generator_pb2.LoraRequest:
    if isinstance(lora, str):
        return generator_pb2.LoraRequest(name=lora)
    name, scale = (lora["name"], lora.get("scale")) if isinstance(lora, Mapping) else lora
    return generator_pb2.LoraRequest(name=name, scale=None if scale is None else float(scale))


def _key_of(item: PromptEmbedding | TensorBytes | torch.Tensor) -> str:
    if isinstance(item, PromptEmbedding) and item.content_key:
        return item.content_key
    tensor = item.values if isinstance(item, PromptEmbedding) else TensorBytes.of(item)
    return wire.embedding_key(wire.describe_bytes(tensor.dtype, tensor.shape, tensor.data))


def image_metadata(header: generator_pb2.ImageHeader) -> dict[str, Any]:
    timings = header.timings
    return {
        "request_id": header.request_id,
        "seed": header.seed,
        "width": header.width,
        "height": header.height,
        "steps": header.steps,
        "guidance_scale": header.guidance_scale,
        "shift": header.shift,
        "pass_index": header.pass_index,
        "pass_count": header.pass_count,
        "skip_layer_guidance": (
            MessageToDict(header.skip_layer_guidance, preserving_proto_field_name=True)
            if header.HasField("skip_layer_guidance")
            else None
        ),
        "dype": (
            MessageToDict(header.dype, preserving_proto_field_name=True) if header.HasField("dype") else None
        ),
        "controlnet": (
            {"name": header.controlnet.name, "scale": header.controlnet.conditioning_scale}
            if header.HasField("controlnet")
            else None
        ),
        "model_id": header.model_id,
        "replica": header.replica,
        "batch_size": header.batch_size,
        "image_index": header.image_index,
        "vae_tiled": header.vae_tiled,
        "sha256": header.sha256,
        "prompt_key": header.prompt_key,
        "loras": [{"name": lora.name, "scale": lora.scale} for lora in header.loras],
        "prompt_token_count": header.prompt_token_count,
        "prompt_source_token_count": header.prompt_source_token_count,
        "prompt_shortened_by": GENERATOR_LONG_PROMPT_MODE.reported(header.prompt_shortened_by),
        "strength": header.strength,
        "steps_run": header.steps_run,
        "timings": {
            "queue": timings.queue_seconds,
            "encode": timings.encode_seconds,
            "denoise": timings.denoise_seconds,
            "decode": timings.decode_seconds,
            "total": timings.total_seconds,
        },
    }


async def read_embedding_stream(
    stream: AsyncIterator[encoder_pb2.EncodeResponse | memoryview], texts: Sequence[str]
) -> tuple[list[PromptEmbedding], str]:
    """Reassembles an Encode stream (header, chunks, header, chunks, ...) and checks every tensor; returns
    the embeddings and the model id the headers name. A chunk may come as a memoryview (wire.read_chunk_or)."""
    items: list[PromptEmbedding] = []
    model_id = ""
    current: tuple[encoder_pb2.EmbeddingHeader, wire.TensorAssembler] | None = None

    def finish(header: encoder_pb2.EmbeddingHeader, assembler: wire.TensorAssembler) -> None:
        items.append(
            PromptEmbedding(
                text=texts[header.prompt_index],
                content_key=header.content_key,
                tensor=TensorBytes(
                    assembler.meta.dtype_name, assembler.meta.shape, bytes(assembler.finish_bytes())
                ),
                token_count=header.token_count,
                truncated=header.truncated,
                cache_hit=header.cache_hit,
                formatted_text=header.formatted_text,
                hidden_layer=header.hidden_layer,
                max_sequence_length=header.max_sequence_length,
                source_token_count=header.source_token_count,
                shortened_by=ENCODER_LONG_PROMPT_MODE.reported(header.shortened_by),
                encode_seconds=header.encode_seconds,
            )
        )

    try:
        async for response in stream:
            if not isinstance(response, memoryview) and response.WhichOneof("item") == "header":
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
                current[1].add(response if isinstance(response, memoryview) else response.chunk)
        if current is not None:
            finish(*current)
    except InvalidArgument as error:  # a malformed stream is the encoder's fault, not the caller's
        raise DataLoss(f"The encoder sent a malformed embedding: {error.message}") from None
    if len(items) != len(texts):
        raise DataLoss(
            f"Encoder returned {len(items)} embeddings for {len(texts)} prompts. Retry the request."
        )
    return items, model_id


__all__ = ["AsyncClient", "Latents", "ZSplitError", "read_embedding_stream"]
