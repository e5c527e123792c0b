"""Qwen3 prompt encoding as ZImagePipeline does it, minus the padding to 512 and the unused last layers."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from zimage_split.common.errors import InvalidArgument
from zimage_split.model_source import ModelSource, load_component
from zimage_split.random_weights import load_config, materialize, meta_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt after the chat template and tokenizer, with the key that identifies its embedding."""

    text: str
    formatted_text: str
    input_ids: tuple[int, ...]
    truncated: bool
    hidden_layer: int
    max_sequence_length: int
    content_key: str


class TextEncoder:
    """Loads `tokenizer/` and `text_encoder/` only, keeping just the layers up to `hidden_layer`.

    `hidden_layer` indexes transformers' `hidden_states` (so -2 is the raw output of the second-to-last
    decoder layer, Z-Image's choice). Layers after it never run, and are not kept in memory.
    """

    def __init__(
        self,
        source: ModelSource,
        *,
        device: torch.device,
        dtype: torch.dtype,
        hidden_layer: int = -2,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.model_id = source.model_id
        self.device = device
        self.dtype = dtype
        self.tokenizer = load_component(
            source, "tokenizer", lambda loc, sub: AutoTokenizer.from_pretrained(loc, subfolder=sub)
        )
        seed = source.random_weights_seed
        if seed is None:
            model = load_component(
                source,
                "text_encoder",
                lambda loc, sub: AutoModel.from_pretrained(
                    loc, subfolder=sub, dtype=dtype, use_safetensors=True
                ),
            )
        else:
            # Random weights: the model starts on the meta device, so the layers dropped below are never built.
            model = load_component(
                source,
                "text_encoder",
                lambda loc, sub: meta_model(AutoModel, load_config(AutoModel, loc, sub), dtype=dtype),
            )
        self.total_layers = int(model.config.num_hidden_layers)
        self.hidden_layer = self._check_layer(hidden_layer, self.total_layers)
        keep = self.total_layers + 1 + self.hidden_layer
        if keep < self.total_layers:
            # hidden_states[k] for k < L is a decoder layer's raw output: drop later layers and the norm.
            model.layers = model.layers[:keep]
            model.config.num_hidden_layers = keep
            model.norm = torch.nn.Identity()
        if seed is not None:
            # The kept layers get the same weights as in a full build (reference_pipeline) on this device.
            materialize(model, seed=seed, component="text_encoder", device=device)
        self.layers_loaded = keep
        self.model = model.to(device).eval()
        self.hidden_size = int(model.config.hidden_size)
        self.pad_token_id = self.tokenizer.pad_token_id
        self.forward_passes = 0
        if self.pad_token_id is None:
            raise InvalidArgument(
                f"The tokenizer of {self.model_id} has no pad token; it is not a Qwen3 tokenizer."
            )

    @staticmethod
    def _check_layer(hidden_layer: int, total_layers: int) -> int:
        if not -total_layers <= hidden_layer <= -1:
            raise InvalidArgument(
                f"hidden_layer must be between -{total_layers} and -1 for this {total_layers}-layer encoder "
                f"(got {hidden_layer}); Z-Image uses -2."
            )
        return hidden_layer

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def check_layer(self, hidden_layer: int) -> int:
        """Validates a per-request layer: it must be one this process keeps."""
        self._check_layer(hidden_layer, self.total_layers)
        if hidden_layer > self.hidden_layer:
            raise InvalidArgument(
                f"This encoder keeps layers only up to hidden_layer {self.hidden_layer}; got {hidden_layer}. "
                f"Restart it with --hidden-layer {hidden_layer} to serve deeper layers."
            )
        return hidden_layer

    def format(self, prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        return str(
            self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
        )

    def content_key(self, formatted_text: str, hidden_layer: int, max_sequence_length: int) -> str:
        digest = hashlib.sha256()
        for part in (
            self.model_id,
            formatted_text,
            str(hidden_layer),
            str(max_sequence_length),
            self.dtype_name,
        ):
            encoded = part.encode("utf-8")
            digest.update(len(encoded).to_bytes(8, "little"))
            digest.update(encoded)
        return digest.hexdigest()

    def tokenize(self, prompt: str, *, hidden_layer: int, max_sequence_length: int) -> TokenizedPrompt:
        formatted = self.format(prompt)
        # diffusers truncates on the right and Qwen adds no special tokens, so a prefix is its truncation;
        # unlike diffusers, no padding to max_length.
        full = self.tokenizer(formatted).input_ids
        return TokenizedPrompt(
            text=prompt,
            formatted_text=formatted,
            input_ids=tuple(full[:max_sequence_length]),
            truncated=len(full) > max_sequence_length,
            hidden_layer=hidden_layer,
            max_sequence_length=max_sequence_length,
            content_key=self.content_key(formatted, hidden_layer, max_sequence_length),
        )

    @torch.inference_mode()
    def encode(self, prompts: Sequence[TokenizedPrompt]) -> list[torch.Tensor]:
        """Returns each prompt's hidden states on the CPU; prompts of equal token count share a forward pass.

        Padding a shorter prompt changes the last bits of its hidden states (the kernels see other
        shapes), so prompts of different lengths never share a pass: an embedding is bit-identical
        whether it was encoded alone or in a batch, and a prompt gives the same image either way.
        """
        by_length: dict[int, list[int]] = {}
        for index, prompt in enumerate(prompts):
            by_length.setdefault(len(prompt.input_ids), []).append(index)
        results: list[torch.Tensor | None] = [None] * len(prompts)
        for indices in by_length.values():
            group = [prompts[i] for i in indices]
            for index, hidden in zip(indices, self._forward(group), strict=True):
                results[index] = hidden
        return results  # type: ignore[return-value]

    def _forward(self, prompts: Sequence[TokenizedPrompt]) -> list[torch.Tensor]:
        input_ids = torch.tensor([p.input_ids for p in prompts], dtype=torch.long)
        outputs = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=torch.ones_like(input_ids).to(self.device),
            output_hidden_states=True,
            use_cache=False,
        )
        self.forward_passes += 1
        return [
            outputs.hidden_states[self.total_layers + 1 + prompt.hidden_layer][row].to("cpu").clone()
            for row, prompt in enumerate(prompts)
        ]
