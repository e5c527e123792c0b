"""Where the generator gets embeddings: its LRU cache, uploads, or the encoder service."""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import torch

from zimage_split.client.aio import AsyncClient
from zimage_split.common.errors import InvalidArgument, NotFound, Unavailable
from zimage_split.common.lru import ByteBoundedLRU
from zimage_split.common.wire import TensorMeta, describe, embedding_key
from zimage_split.dit_service.validation import validate_embedding


@dataclass(frozen=True)
class Embedding:
    tensor: torch.Tensor
    key: str
    # Seconds spent fetching it from the encoder; 0 when it came from the cache.
    encode_seconds: float = 0.0


def tensor_key(tensor: torch.Tensor) -> str:
    """Key of an uploaded embedding (see wire.embedding_key)."""
    return embedding_key(describe(tensor)[0])


class EmbeddingStore:
    def __init__(
        self,
        encoder: AsyncClient | None,
        *,
        caption_dim: int,
        max_tokens: int,
        cache_bytes: int,
        disk_dir: str | None = None,
    ) -> None:
        self.encoder = encoder
        self.caption_dim = caption_dim
        self.max_tokens = max_tokens
        self.cache: ByteBoundedLRU[torch.Tensor] = ByteBoundedLRU(
            cache_bytes, lambda tensor: tensor.numel() * tensor.element_size()
        )
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

    async def check_encoder(self) -> dict[str, Any]:
        """Fetches the encoder's Info once and refuses an encoder made for another DiT."""
        encoder = self._require_encoder()
        info = await encoder.encoder_info(timeout=10)
        if int(info.get("hidden_size", 0)) != self.caption_dim:
            raise InvalidArgument(
                f"The encoder at {encoder.encoder_address} serves {info.get('model_id')} with hidden size "
                f"{info.get('hidden_size')}, but this DiT takes {self.caption_dim}. Point --encoder at an encoder "
                "serving the same model."
            )
        self._encoder_identity = "|".join(
            str(info.get(field, "")) for field in ("model_id", "dtype", "hidden_layer", "max_sequence_length")
        )
        return info

    def _text_key(self, text: str, max_sequence_length: int | None) -> str:
        digest = hashlib.sha256(f"{self._encoder_identity}|{max_sequence_length}|".encode())
        digest.update(text.encode("utf-8"))
        return "text-" + digest.hexdigest()

    async def from_text(
        self, text: str, max_sequence_length: int | None, timeout: float | None = None
    ) -> Embedding:
        encoder = self._require_encoder()
        if self._encoder_identity is None:
            await self.check_encoder()
        key = self._text_key(text, max_sequence_length)
        cached = self.cache.get(key)
        if cached is not None:
            return Embedding(cached, key)
        started = time.perf_counter()
        encoded = await encoder.encode([text], max_sequence_length=max_sequence_length, timeout=timeout)
        tensor = self.check(encoded[0].tensor, "The encoder's embedding")
        self.cache.put(key, tensor)
        return Embedding(tensor, key, encode_seconds=time.perf_counter() - started)

    def from_key(self, key: str) -> Embedding:
        tensor = self.cache.get(key)
        if tensor is None:
            raise NotFound(
                f"embedding_key {key[:16]}... is not held by this generator (never uploaded, or evicted). "
                "Upload the embedding again with UploadEmbedding."
            )
        return Embedding(tensor, key)

    def add_upload(self, tensor: torch.Tensor, meta: TensorMeta | None = None) -> str:
        """Keeps a received tensor; `meta` is its verified wire header, which saves hashing it again."""
        tensor = self.check(tensor, "The uploaded embedding")
        key = embedding_key(meta) if meta is not None else tensor_key(tensor)
        self.cache.put(key, tensor)
        return key

    async def resolve_pair(
        self,
        prompt: tuple[str, str],
        negative: tuple[str, str] | None,
        max_sequence_length: int | None,
        timeout: float | None = None,
    ) -> tuple[Embedding, Embedding | None]:
        """Resolves ("text"|"embedding_key", value) pairs concurrently; `timeout` bounds encoder calls."""

        async def resolve(kind: str, value: str) -> Embedding:
            if kind == "text":
                return await self.from_text(value, max_sequence_length, timeout)
            return self.from_key(value)

        if negative is None:
            return await resolve(*prompt), None
        positive, negative_embedding = await asyncio.gather(resolve(*prompt), resolve(*negative))
        return positive, negative_embedding
