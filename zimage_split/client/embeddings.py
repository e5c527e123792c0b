"""Prompt embeddings as the SDK hands them out, and their file: one safetensors file, one tensor per prompt.

The file's header metadata describes every prompt (text, formatted text, content key, model, layer, max
length, dtype, token counts, how a long prompt was shortened) and holds each tensor's BLAKE3 (sha256 in
version 1 files, which still load), so a file made on one machine (say, a Mac running the encoder) can be
checked before any DiT work on another. No pickle anywhere, and no torch: the tensors are held as their
bytes (client/tensor_bytes.py) and become numpy or torch arrays on request.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from zimage_split.client.tensor_bytes import (
    StoredTensor,
    TensorBytes,
    need_torch,
    read_safetensors,
    safetensors_bytes,
)
from zimage_split.common import wire
from zimage_split.common.errors import DataLoss, InvalidArgument, NotFound
from zimage_split.common.files import write_atomically

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import Tensor  # `torch` is also a method name in the classes below

FILE_FORMAT = "zimage-split/embeddings"
# 2: each prompt's checksum is "blake3". 1 (still read): "sha256".
FILE_FORMAT_VERSION = 2
READABLE_VERSIONS = ("1", "2")


@dataclass(frozen=True, init=False)
class PromptEmbedding:
    """One prompt's Qwen3 hidden states, shape [token_count, hidden_size], held as bytes in `values`.

    `.numpy()` gives them as float32; `.torch()` (or `.tensor`) as a torch tensor of their own dtype, which
    needs torch. The third argument may be a TensorBytes, a torch tensor or a float32/float16 numpy array.

    `token_count` is min(source_token_count, max_sequence_length). When the formatted prompt had more tokens
    than that, `shortened_by` names the long-prompt mode that brought it down ("truncate", "interpolate"
    or "pool"; `truncated` is true for "truncate" only); otherwise it is "".
    """

    text: str
    content_key: str
    values: TensorBytes
    token_count: int
    truncated: bool
    cache_hit: bool = False
    formatted_text: str = ""
    hidden_layer: int = -2
    max_sequence_length: int = 512
    # Tokens of the formatted prompt before shortening; 0 when not known (an embedding built by hand).
    source_token_count: int = 0
    shortened_by: str = ""
    # Seconds the encoder spent on it, waiting for its batch included (0 for a cache hit or a loaded file).
    encode_seconds: float = 0.0

    # Written out rather than generated so the tensor argument keeps its name (`tensor=`) and takes torch,
    # numpy or bytes alike; the fields are the dataclass's, in its order.
    def __init__(
        self,
        text: str,
        content_key: str,
        tensor: TensorBytes | Tensor | np.ndarray,
        token_count: int,
        truncated: bool,
        cache_hit: bool = False,
        formatted_text: str = "",
        hidden_layer: int = -2,
        max_sequence_length: int = 512,
        source_token_count: int = 0,
        shortened_by: str = "",
        encode_seconds: float = 0.0,
    ) -> None:
        fields = {name: value for name, value in locals().items() if name not in ("self", "tensor")}
        for name, value in {**fields, "values": TensorBytes.of(tensor)}.items():
            object.__setattr__(self, name, value)

    @property
    def dtype(self) -> str:
        """ "bfloat16", "float16" or "float32"."""
        return self.values.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def numpy(self) -> np.ndarray:
        """The hidden states as a float32 numpy array [token_count, hidden_size]; needs no torch."""
        return self.values.numpy()

    def torch(self) -> Tensor:
        """The hidden states as a CPU torch tensor of their own dtype (bfloat16 as the encoder sent them)."""
        return self.values.torch()

    @property
    def tensor(self) -> Tensor:
        """`torch()`, as earlier versions held it; needs torch."""
        return self.values.torch()


class Embeddings(Sequence[PromptEmbedding]):
    """The result of `encode(prompts)`: one PromptEmbedding per prompt, in order.

    `save(path)` writes them to one safetensors file; `Embeddings.load(path)` reads and checks it.
    """

    def __init__(self, items: Sequence[PromptEmbedding], *, model_id: str = "") -> None:
        self._items = list(items)
        self.model_id = model_id

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> PromptEmbedding: ...

    @overload
    def __getitem__(self, index: slice) -> list[PromptEmbedding]: ...

    def __getitem__(self, index: int | slice) -> PromptEmbedding | list[PromptEmbedding]:
        return self._items[index]

    def __iter__(self) -> Iterator[PromptEmbedding]:
        return iter(self._items)

    def __repr__(self) -> str:
        return f"Embeddings({len(self)} prompts, model_id={self.model_id!r})"

    @property
    def hidden_size(self) -> int:
        return int(self._items[0].shape[-1]) if self._items else 0

    def to_diffusers(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> list[Tensor]:
        """What diffusers' `ZImagePipeline(prompt_embeds=...)` takes: one [tokens, hidden_size] tensor per
        prompt, on `device` (CPU when None) in `dtype` (the encoder's when None). Needs torch.

            >>> pipe(prompt_embeds=client.encode(["a red fox"]).to_diffusers("cuda", torch.bfloat16))
        """
        need_torch("Embeddings.to_diffusers")
        return [item.torch().to(device=device, dtype=dtype) for item in self._items]

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes one safetensors file atomically: a crash leaves the old file or none, never half of one."""
        if not self._items:
            raise InvalidArgument("There are no embeddings to save; encode at least one prompt.")
        target = Path(path)
        tensors: dict[str, TensorBytes] = {}
        prompts: list[dict[str, Any]] = []
        for index, item in enumerate(self._items):
            name = f"prompt.{index:06d}"
            meta = wire.describe_bytes(item.dtype, item.shape, item.values.data)
            tensors[name] = item.values
            prompts.append(
                {
                    "tensor": name,
                    "text": item.text,
                    "formatted_text": item.formatted_text,
                    "content_key": item.content_key,
                    "model_id": self.model_id,
                    "hidden_layer": item.hidden_layer,
                    "max_sequence_length": item.max_sequence_length,
                    "dtype": meta.dtype_name,
                    "token_count": item.token_count,
                    "truncated": item.truncated,
                    "source_token_count": item.source_token_count,
                    "shortened_by": item.shortened_by,
                    "blake3": meta.blake3,
                }
            )
        metadata = {
            "format": FILE_FORMAT,
            "format_version": str(FILE_FORMAT_VERSION),
            "model_id": self.model_id,
            "hidden_size": str(self.hidden_size),
            "prompts": json.dumps(prompts, ensure_ascii=False),
        }
        write_atomically(target, safetensors_bytes(tensors, metadata))
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Embeddings:
        """Reads a file written by `save` (or `zsplit encode`) and checks every tensor's shape, dtype and
        checksum (BLAKE3; sha256 in a file from before version 2)."""
        source = Path(path)
        if not source.is_file():
            raise NotFound(f"No embeddings file at {source}. Make one with `zsplit encode -o {source}`.")
        try:
            metadata, stored = read_safetensors(source.read_bytes())
        except ValueError as error:
            raise DataLoss(
                f"{source} is not a readable safetensors file ({error}); it may be truncated or corrupted. "
                "Make it again with `zsplit encode`."
            ) from None
        _check_format(metadata, source)
        prompts = _prompt_entries(metadata, source)
        tensors = {}
        for entry in prompts:
            if entry["tensor"] not in stored:
                raise DataLoss(
                    f"{source} names a tensor {entry['tensor']!r} it does not hold; it may be truncated or "
                    "corrupted. Make it again with `zsplit encode`."
                )
            tensors[entry["tensor"]] = stored[entry["tensor"]]
        items = [_checked_item(entry, tensors[entry["tensor"]], metadata, source) for entry in prompts]
        return cls(items, model_id=metadata.get("model_id", ""))


def _check_format(metadata: dict[str, str], source: Path) -> None:
    if metadata.get("format") != FILE_FORMAT:
        raise InvalidArgument(
            f"{source} is a safetensors file but not a zimage-split embeddings file (no "
            f"format={FILE_FORMAT!r} in its header). Make one with `zsplit encode`."
        )
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise InvalidArgument(
            f"{source} has embeddings-file version {metadata.get('format_version')!r}; this zimage-split "
            f"reads versions {', '.join(READABLE_VERSIONS)}. Re-encode it with this version's `zsplit encode`."
        )


_REQUIRED_FIELDS = ("tensor", "text", "content_key", "dtype", "token_count")
# The checksum field of each file version.
_CHECKSUM_FIELDS = {"1": "sha256", "2": "blake3"}
_FIELD_TYPES: dict[str, type] = {
    **dict.fromkeys(
        ("tensor", "text", "content_key", "dtype", "sha256", "blake3", "formatted_text", "shortened_by"), str
    ),
    **dict.fromkeys(("token_count", "hidden_layer", "max_sequence_length", "source_token_count"), int),
    "truncated": bool,
}


def _prompt_entries(metadata: dict[str, str], source: Path) -> list[dict[str, Any]]:
    try:
        prompts = json.loads(metadata["prompts"])
        if not isinstance(prompts, list) or not prompts:
            raise ValueError("no prompts")
        for entry in prompts:
            if not isinstance(entry, dict):
                raise ValueError(f"a prompt is a JSON {type(entry).__name__}, not an object")
            for field in (*_REQUIRED_FIELDS, _CHECKSUM_FIELDS[metadata["format_version"]]):
                if field not in entry:
                    raise ValueError(f"a prompt has no {field!r}")
            for field, kind in _FIELD_TYPES.items():
                value = entry.get(field)
                # bool is an int to Python, but no count is true or false.
                if field in entry and (
                    not isinstance(value, kind) or (kind is int and isinstance(value, bool))
                ):
                    raise ValueError(f"a prompt's {field!r} is {value!r:.40}, not a {kind.__name__}")
        if "hidden_size" in metadata and not re.fullmatch(r"[0-9]{1,9}", metadata["hidden_size"]):
            raise ValueError(f"hidden_size is {metadata['hidden_size']!r:.40}, not a number")
    except (KeyError, ValueError, TypeError, RecursionError) as error:  # RecursionError: nested too deep
        raise DataLoss(
            f"The prompt list in {source}'s header is damaged ({error}). Make the file again with `zsplit encode`."
        ) from None
    return prompts


def _checked_item(
    entry: dict[str, Any], stored: StoredTensor, metadata: dict[str, str], source: Path
) -> PromptEmbedding:
    where = f"{source}, prompt {entry['tensor']} ({entry['text'][:40]!r})"
    if len(stored.shape) != 2:
        raise DataLoss(
            f"{where}: tensor is {list(stored.shape)}, not [tokens, hidden_size]. Make the file again with "
            "`zsplit encode`."
        )
    hidden_size = int(metadata.get("hidden_size", stored.shape[-1]))
    expected_shape = (int(entry["token_count"]), hidden_size)
    tensor = stored.as_tensor_bytes()
    if stored.shape != expected_shape or tensor is None or tensor.dtype != entry["dtype"]:
        raise DataLoss(
            f"{where}: tensor is {list(stored.shape)} {stored.dtype}, but the header says "
            f"{list(expected_shape)} {entry['dtype']}. Make the file again with `zsplit encode`."
        )
    algorithm = _CHECKSUM_FIELDS[metadata["format_version"]]
    if wire.checksum(tensor.data, algorithm) != entry[algorithm]:
        raise DataLoss(
            f"{where}: the tensor bytes do not match their {algorithm}; the file is corrupted. Make it again."
        )
    truncated = bool(entry.get("truncated", False))
    return PromptEmbedding(
        text=entry["text"],
        content_key=entry["content_key"],
        tensor=tensor,
        token_count=int(entry["token_count"]),
        truncated=truncated,
        formatted_text=entry.get("formatted_text", ""),
        hidden_layer=int(entry.get("hidden_layer", -2)),
        max_sequence_length=int(entry.get("max_sequence_length", 512)),
        # Files from before long-prompt modes: those prompts could only be truncated.
        source_token_count=int(entry.get("source_token_count", entry["token_count"])),
        shortened_by=entry.get("shortened_by", "truncate" if truncated else ""),
    )


def check_for_generator(
    embeddings: Embeddings, generator_info: dict[str, Any], *, allow_other_model: bool = False
) -> None:
    """Refuses embeddings the generator cannot use, before any DiT work: wrong hidden size or model."""
    caption_dim = int(generator_info.get("caption_dim", 0))
    generator_model = str(generator_info.get("model_id", ""))
    if embeddings.hidden_size != caption_dim:
        raise InvalidArgument(
            f"These embeddings have hidden size {embeddings.hidden_size} (from {embeddings.model_id!r}), but the "
            f"generator's DiT ({generator_model!r}) takes {caption_dim}. Encode the prompts with the text "
            "encoder of the generator's model."
        )
    if not allow_other_model and embeddings.model_id and embeddings.model_id != generator_model:
        raise InvalidArgument(
            f"These embeddings were encoded for {embeddings.model_id!r}, but the generator serves "
            f"{generator_model!r}. Encode with `--model {generator_model}`, or pass --allow-other-model if both "
            "name the same weights (a hub id and a local copy of it)."
        )
