"""Where the generator gets embeddings: its LRU cache, uploads, or the encoder service."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch

from zimage_split.client.aio import AsyncClient
from zimage_split.common.encoder_pool import encoder_identity, identity_fields
from zimage_split.common.errors import (
    EMBEDDING_UNKNOWN,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
    ZSplitError,
)
from zimage_split.common.lru import ByteBoundedLRU
from zimage_split.common.vocabulary import LONG_PROMPT_MODES
from zimage_split.common.wire import TensorMeta, describe, embedding_key
from zimage_split.dit_service.disk_store import DiskEmbeddingStore
from zimage_split.dit_service.validation import validate_embedding

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class TextEncoding:
    """How prompt text is encoded: `max_sequence_length` (None: the encoder's default, 512) and what the
    encoder does with a longer prompt, `long_prompt_mode` "truncate" (diffusers), "interpolate" or "pool".
    Every mode gives min(prompt tokens, max_sequence_length) rows."""

    max_sequence_length: int | None = None
    long_prompt_mode: str = "truncate"

    def __post_init__(self) -> None:
        if self.long_prompt_mode not in LONG_PROMPT_MODES:
            raise InvalidArgument(
                f"long_prompt_mode must be one of {', '.join(LONG_PROMPT_MODES)} (got {self.long_prompt_mode!r})."
            )


@dataclass(frozen=True)
class TextPrompt:
    """Prompt text, to be encoded by the encoder service (or found in the cache)."""

    text: str


@dataclass(frozen=True)
class UploadedPrompt:
    """An embedding the client sent earlier with UploadEmbedding, by the key it got back."""

    embedding_key: str


# A prompt or negative prompt of a request, as GenerateRequest's `Conditioning` gives it.
Prompt = TextPrompt | UploadedPrompt


@dataclass(frozen=True)
class Embedding:
    """A prompt's embedding as the generator holds it, and how the encoder made it."""

    tensor: torch.Tensor
    key: str
    # Seconds spent fetching it from the encoder; 0 when it came from the cache.
    encode_seconds: float = 0.0
    # Of those, what the encoder reported spending on it; the rest went to the network and the stream.
    encoder_seconds: float = 0.0
    # Tokens of the formatted prompt before shortening; 0 when not known (an uploaded embedding).
    source_token_count: int = 0
    # "truncate", "interpolate" or "pool" when the encoder shortened the prompt to token_count rows, else "".
    shortened_by: str = ""

    @property
    def token_count(self) -> int:
        """Rows of the embedding."""
        return int(self.tensor.shape[0])


def tensor_key(tensor: torch.Tensor) -> str:
    """Key of an uploaded embedding (see wire.embedding_key)."""
    return embedding_key(describe(tensor)[0])


def _left(deadline: float | None, cap: float | None = None) -> float | None:
    """Seconds until `deadline` (None: no deadline), at most `cap`."""
    left = None if deadline is None else deadline - time.monotonic()
    if cap is not None:
        left = cap if left is None else min(left, cap)
    return left


class EncoderRefused(Unavailable):
    """The encoder turned down this generator's credentials: a configuration error, not an outage."""


def encoder_refused(address: str | None, error: ZSplitError) -> EncoderRefused:
    return EncoderRefused(
        f"The encoder at {address} refused this generator's credentials ({error.message}) Check the "
        "generator's --encoder-auth-token-file (or ZSPLIT_ENCODER_AUTH_TOKEN), and --encoder-tls-cert/"
        "--encoder-tls-key if the encoder requires client certificates."
    )


class EmbeddingStore:
    """Embeddings by key: an in-memory LRU, then the optional disk tier (`disk`), then the encoder."""

    def __init__(
        self,
        encoder: AsyncClient | None,
        *,
        caption_dim: int,
        max_tokens: int,
        cache_bytes: int,
        disk: DiskEmbeddingStore | None = None,
        encoder_retries: int = 0,
    ) -> None:
        if encoder_retries < 0:
            raise InvalidArgument(f"--encoder-retries must be 0 or more (got {encoder_retries}).")
        self.encoder = encoder
        self.encoder_retries = encoder_retries
        self.caption_dim = caption_dim
        self.max_tokens = max_tokens
        # Entries keep what the encoder said about the prompt, so a hit reports it as the first fetch did.
        self.cache: ByteBoundedLRU[Embedding] = ByteBoundedLRU(
            cache_bytes, lambda entry: entry.tensor.numel() * entry.tensor.element_size()
        )
        self.disk = disk
        # Set once the encoder's Info has been checked; text keys depend on it.
        self._encoder_identity: str | None = None

    def check(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        return validate_embedding(tensor, caption_dim=self.caption_dim, max_tokens=self.max_tokens, what=what)

    def _require_encoder(self) -> AsyncClient:
        if self.encoder is None:
            raise Unavailable(
                "This generator has no encoder service, so it cannot encode prompt text. Start it with "
                "--encoder HOST:PORT, or send embeddings (client.encode(...) then generate(embeddings=...))."
            )
        return self.encoder

    async def check_encoder(self, timeout: float | None = 10.0) -> dict[str, Any]:
        """Fetches the Info of every encoder and refuses one made for another DiT, or, with several, one
        that serves another model than the others."""
        encoder = self._require_encoder()
        try:
            info = await encoder.check_encoders(timeout=timeout)
        except Unauthenticated as error:
            raise encoder_refused(encoder.encoder_address, error) from None
        if int(info.get("hidden_size", 0)) != self.caption_dim:
            raise InvalidArgument(
                f"The encoder at {encoder.encoder_address} serves {info.get('model_id')} with hidden size "
                f"{info.get('hidden_size')}, but this DiT takes {self.caption_dim}. Point --encoder at an encoder "
                "serving the same model."
            )
        identity = encoder_identity(info)
        if self.disk is not None and identity != self._encoder_identity:
            fields = identity_fields(info)
            try:
                await asyncio.to_thread(self.disk.write_identity, identity, fields)
            except Unavailable as error:
                # The encoder is fine; only serving text prompts from disk while it is down would suffer.
                logger.warning("%s", error.message)
        self._encoder_identity = identity
        return info

    def _not_cached(self, error: Unavailable | DeadlineExceeded) -> Unavailable:
        where = "embedding cache or --embedding-store" if self.disk is not None else "embedding cache"
        return Unavailable(
            f"The encoder is unreachable and this prompt is not in the generator's {where}, so it cannot be "
            f"served. {error.message} Start the encoder (or point --encoder at a running one), or send "
            "embeddings made earlier with generate(embeddings=...).",
            retry_after_seconds=error.retry_after_seconds,
            reason=error.reason,
        )

    def _text_key(self, identity: str, text: str, encoding: TextEncoding) -> str:
        digest = hashlib.sha256(
            f"{identity}|{encoding.max_sequence_length}|{encoding.long_prompt_mode}|".encode()
        )
        digest.update(text.encode("utf-8"))
        return "text-" + digest.hexdigest()

    async def _cached(self, key: str) -> Embedding | None:
        """From memory, then disk; always with encode_seconds 0."""
        embedding = self.cache.get(key)
        if self.disk is None:
            return embedding
        if embedding is not None:
            self.disk.touch(key)  # in use, so its file is not the next to go
            return embedding
        stored = await asyncio.to_thread(self.disk.get, key)
        if stored is None:
            return None
        try:
            tensor = self.check(stored.tensor, f"The stored embedding {key[:16]}...")
        except InvalidArgument as error:  # e.g. a folder shared with a generator of another model
            logger.warning("%s; ignoring the file in %s.", error.message, self.disk.directory)
            return None
        embedding = Embedding(
            tensor, key, source_token_count=stored.source_token_count, shortened_by=stored.shortened_by
        )
        self.cache.put(key, embedding)
        return embedding

    async def _keep(self, embedding: Embedding) -> None:
        embedding = replace(embedding, encode_seconds=0.0, encoder_seconds=0.0)
        self.cache.put(embedding.key, embedding)
        if self.disk is not None:
            await asyncio.to_thread(
                self.disk.put,
                embedding.key,
                embedding.tensor,
                source_token_count=embedding.source_token_count,
                shortened_by=embedding.shortened_by,
            )

    async def from_text(self, text: str, encoding: TextEncoding, timeout: float | None = None) -> Embedding:
        """The embedding of prompt `text` encoded as `encoding`: from memory, the disk tier, or the encoder
        (`timeout` bounds the encoder calls). A cached one reports the source_token_count and shortened_by
        of the first encode, with encode_seconds 0."""
        encoder = self._require_encoder()
        deadline = None if timeout is None else time.monotonic() + timeout
        identity = self._encoder_identity
        if identity is None:  # the encoder was not reachable at start-up, or not since
            try:
                identity = encoder_identity(await self.check_encoder(timeout=_left(deadline, cap=10.0)))
            except EncoderRefused:
                raise
            except (Unavailable, DeadlineExceeded) as error:
                # Prompts encoded before a restart are on disk under the identity of the encoder then.
                stored = await asyncio.to_thread(self.disk.read_identity) if self.disk is not None else None
                if stored is not None:
                    key = self._text_key(stored, text, encoding)
                    if (cached := await self._cached(key)) is not None:
                        return cached
                try:
                    info = await self._retrying(
                        lambda left: self.check_encoder(timeout=left), deadline, first_failure=error
                    )
                except Unavailable as again:
                    raise self._not_cached(again) from None
                identity = encoder_identity(info)
        key = self._text_key(identity, text, encoding)
        cached = await self._cached(key)
        if cached is not None:
            return cached
        started = time.perf_counter()
        try:
            encoded = await self._retrying(
                lambda left: encoder.encode(
                    [text],
                    max_sequence_length=encoding.max_sequence_length,
                    long_prompt_mode=encoding.long_prompt_mode,
                    timeout=left,
                ),
                deadline,
            )
        except Unauthenticated as error:
            raise encoder_refused(encoder.encoder_address, error) from None
        except Unavailable as error:
            raise self._not_cached(error) from None
        item = encoded[0]
        embedding = Embedding(
            self.check(item.tensor, "The encoder's embedding"),
            key,
            encode_seconds=time.perf_counter() - started,
            encoder_seconds=item.encode_seconds,
            source_token_count=item.source_token_count,
            shortened_by=item.shortened_by,
        )
        await self._keep(embedding)
        return embedding

    async def _retrying(
        self,
        call: Callable[[float | None], Awaitable[T]],
        deadline: float | None,
        first_failure: Unavailable | DeadlineExceeded | None = None,
    ) -> T:
        """Encoder calls are idempotent: one that fails UNAVAILABLE (a restart, a connection dropped
        mid-stream) is tried again `encoder_retries` times with backoff, each try given what is left of the
        caller's deadline. `first_failure`: the first try already happened and failed so."""
        failure = first_failure
        for attempt in range(0 if first_failure is None else 1, self.encoder_retries + 1):
            if failure is not None:
                backoff = min(2.0, max(failure.retry_after_seconds or 0.0, 0.5 * 2 ** (attempt - 1)))
                if deadline is not None and time.monotonic() + backoff >= deadline:
                    raise failure
                logger.info(
                    "Encoder unavailable (%s); retry %d of %d in %.2f s.",
                    failure.message,
                    attempt,
                    self.encoder_retries,
                    backoff,
                )
                await asyncio.sleep(backoff)
            left = _left(deadline)
            if left is not None and left <= 0:
                raise DeadlineExceeded("The request's deadline passed while waiting for the encoder.")
            try:
                return await call(left)
            except Unavailable as error:
                failure = error
                if attempt == self.encoder_retries or isinstance(error, EncoderRefused):
                    raise
        assert failure is not None
        raise failure

    async def from_key(self, key: str) -> Embedding:
        embedding = await self._cached(key)
        if embedding is None:
            raise NotFound(
                f"embedding_key {key[:16]}... is not held by this generator (never uploaded, or evicted). "
                "Upload the embedding again with UploadEmbedding.",
                reason=EMBEDDING_UNKNOWN,
            )
        return embedding

    async def add_upload(self, tensor: torch.Tensor, meta: TensorMeta | None = None) -> str:
        """Keeps a received tensor; `meta` is its verified wire header, which saves hashing it again."""
        tensor = self.check(tensor, "The uploaded embedding")
        key = embedding_key(meta) if meta is not None else tensor_key(tensor)
        await self._keep(Embedding(tensor, key))
        return key

    async def resolve(
        self, prompt: Prompt, encoding: TextEncoding, timeout: float | None = None
    ) -> Embedding:
        """The embedding of a prompt: text encoded as `encoding` (`timeout` bounds the encoder calls), or an
        upload by its key."""
        if isinstance(prompt, TextPrompt):
            return await self.from_text(prompt.text, encoding, timeout)
        return await self.from_key(prompt.embedding_key)

    async def resolve_pair(
        self,
        prompt: Prompt,
        negative: Prompt | None,
        encoding: TextEncoding,
        timeout: float | None = None,
    ) -> tuple[Embedding, Embedding | None]:
        """Resolves a prompt and its negative prompt (None: none) concurrently, as `resolve` does."""
        if negative is None:
            return await self.resolve(prompt, encoding, timeout), None
        positive, negative_embedding = await asyncio.gather(
            self.resolve(prompt, encoding, timeout), self.resolve(negative, encoding, timeout)
        )
        return positive, negative_embedding
