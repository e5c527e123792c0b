"""Prompt embeddings as the SDK hands them out: tensors plus the encoder's description of them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PromptEmbedding:
    """One prompt's Qwen3 hidden states, shape [tokens, hidden_size]."""

    text: str
    content_key: str
    tensor: torch.Tensor
    token_count: int
    truncated: bool
    cache_hit: bool = False


class Embeddings(Sequence[PromptEmbedding]):
    """The result of `encode(prompts)`: one PromptEmbedding per prompt, in order."""

    def __init__(self, items: Sequence[PromptEmbedding], *, model_id: str = "") -> None:
        self._items = list(items)
        self.model_id = model_id

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):  # type: ignore[no-untyped-def,override]
        return self._items[index]

    def __iter__(self) -> Iterator[PromptEmbedding]:
        return iter(self._items)

    def __repr__(self) -> str:
        return f"Embeddings({len(self)} prompts, model_id={self.model_id!r})"
