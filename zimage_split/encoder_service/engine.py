"""Qwen3 prompt encoding as ZImagePipeline does it, minus the padding to 512 and the unused last layers."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from zimage_split.common.errors import InvalidArgument
from zimage_split.common.vocabulary import LONG_PROMPT_MODES
from zimage_split.encoder_service.config import check_batching
from zimage_split.encoder_service.packed_linear import can_pack, pack_linear_layers
from zimage_split.encoder_service.quantization import quantize_model
from zimage_split.model_source import ModelSource, load_component
from zimage_split.random_weights import load_config, materialize, meta_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt after the chat template and tokenizer, with the key that identifies its embedding.

    `input_ids` are the tokens the encoder runs: the first max_sequence_length for "truncate", all of them
    for "interpolate" and "pool", whose hidden states are then resampled to max_sequence_length rows.
    """

    text: str
    formatted_text: str
    input_ids: tuple[int, ...]
    # Tokens of the formatted prompt, before any shortening.
    source_token_count: int
    hidden_layer: int
    max_sequence_length: int
    long_prompt_mode: str
    content_key: str

    @property
    def token_count(self) -> int:
        """Rows of the embedding: min(source tokens, max_sequence_length), whatever the mode."""
        return min(self.source_token_count, self.max_sequence_length)

    @property
    def shortened_by(self) -> str:
        """The mode that shortened this prompt, or "" when it fit in max_sequence_length tokens."""
        return self.long_prompt_mode if self.source_token_count > self.max_sequence_length else ""

    @property
    def truncated(self) -> bool:
        """True when the prompt lost its last tokens (mode "truncate"); interpolate and pool keep them all."""
        return self.shortened_by == "truncate"


def shorten(hidden: torch.Tensor, rows: int, mode: str) -> torch.Tensor:
    """Brings `hidden` ([tokens, hidden_size]) down to `rows` rows; fewer rows come back unchanged.

    "interpolate" resamples linearly along the token axis (the first and last rows are kept), "pool"
    averages adjacent rows (adaptive average pooling), both in float32 and cast back; "truncate" keeps the
    first `rows`.
    """
    if hidden.shape[0] <= rows:
        return hidden
    if mode == "truncate":
        return hidden[:rows]
    channels_first = hidden.float().T.unsqueeze(0)  # [1, hidden_size, tokens]: the layout 1-D ops take
    if mode == "interpolate":
        resampled = torch.nn.functional.interpolate(
            channels_first, size=rows, mode="linear", align_corners=True
        )
    elif mode == "pool":
        resampled = torch.nn.functional.adaptive_avg_pool1d(channels_first, rows)
    else:
        raise InvalidArgument(
            f"long_prompt_mode must be one of {', '.join(LONG_PROMPT_MODES)} (got {mode!r})."
        )
    return resampled[0].T.to(hidden.dtype).contiguous()


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
        batching: str = "exact",
        quantize: str = "none",
        pack_weights: bool = True,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        check_batching(batching)
        self.batching = batching
        self.model_id = source.model_id
        self.device = device
        self.dtype = dtype
        self.quantize = quantize
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
        self.model = quantize_model(model.to(device).eval(), quantize)
        self.weight_bytes = sum(t.numel() * t.element_size() for t in self.model.parameters())
        self._parameter_count = sum(p.numel() for p in self.model.parameters())
        # int8 layers are torchao's own; plain ones get oneDNN-packed weights where this CPU allows.
        self.packed_linears = (
            pack_linear_layers(self.model)
            if pack_weights and quantize == "none" and can_pack(device, dtype)
            else 0
        )
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
        return self._parameter_count

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

    def content_key(
        self,
        formatted_text: str,
        hidden_layer: int,
        max_sequence_length: int,
        long_prompt_mode: str = "truncate",
    ) -> str:
        """Only interpolated and pooled prompts hash their mode, and only quantized encoders their
        quantization: the other keys stay what they always were."""
        parts = [self.model_id, formatted_text, str(hidden_layer), str(max_sequence_length), self.dtype_name]
        if long_prompt_mode != "truncate":
            parts.append(long_prompt_mode)
        if self.quantize != "none":
            parts.append(f"quantize={self.quantize}")
        digest = hashlib.sha256()
        for part in parts:
            encoded = part.encode("utf-8")
            digest.update(len(encoded).to_bytes(8, "little"))
            digest.update(encoded)
        return digest.hexdigest()

    def tokenize(
        self, prompt: str, *, hidden_layer: int, max_sequence_length: int, long_prompt_mode: str = "truncate"
    ) -> TokenizedPrompt:
        """The prompt's tokens and key. Its embedding will have min(tokens, max_sequence_length) rows in
        every mode; a prompt that fits is the same in all of them."""
        if long_prompt_mode not in LONG_PROMPT_MODES:
            raise InvalidArgument(
                f"long_prompt_mode must be one of {', '.join(LONG_PROMPT_MODES)} (got {long_prompt_mode!r}); "
                "truncate is diffusers' behaviour."
            )
        formatted = self.format(prompt)
        # diffusers truncates on the right and Qwen adds no special tokens, so a prefix is its truncation;
        # unlike diffusers, no padding to max_length.
        full = self.tokenizer(formatted).input_ids
        # A prompt that fits is encoded as "truncate" whatever was asked: same tokens, key and cache entry.
        mode = "truncate" if len(full) <= max_sequence_length else long_prompt_mode
        return TokenizedPrompt(
            text=prompt,
            formatted_text=formatted,
            input_ids=tuple(full if mode != "truncate" else full[:max_sequence_length]),
            source_token_count=len(full),
            hidden_layer=hidden_layer,
            max_sequence_length=max_sequence_length,
            long_prompt_mode=mode,
            content_key=self.content_key(formatted, hidden_layer, max_sequence_length, mode),
        )

    @torch.inference_mode()
    def encode(self, prompts: Sequence[TokenizedPrompt]) -> list[torch.Tensor]:
        """Returns each prompt's hidden states on the CPU, `prompt.token_count` rows each (an interpolated or
        pooled prompt runs all its tokens, then is resampled).

        "exact" batching runs one forward pass per prompt, so an embedding is bit-identical whether its
        prompt was encoded alone or in a batch. Sharing a pass cannot keep that promise: the matmul kernels
        pick their blocking, and so their summation order, by the number of rows, so a prompt's hidden
        states change in their last bits with its companions, even at equal lengths (measured on oneDNN
        with AMX, bf16 and fp32). "padded" trades the promise for throughput: prompts are right-padded to
        the longest in the batch and share one pass, as transformers batches them.
        """
        if self.batching == "padded" and prompts:
            return self._forward(prompts)
        return [self._forward([prompt])[0] for prompt in prompts]

    def _forward(self, prompts: Sequence[TokenizedPrompt]) -> list[torch.Tensor]:
        """One forward pass over `prompts`, right-padded to the longest (a lone prompt has no padding)."""
        longest = max(len(p.input_ids) for p in prompts)
        input_ids = torch.full((len(prompts), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, : len(prompt.input_ids)] = torch.tensor(prompt.input_ids, dtype=torch.long)
            attention_mask[row, : len(prompt.input_ids)] = 1
        outputs = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            output_hidden_states=True,
            use_cache=False,
        )
        self.forward_passes += 1
        return [
            # Padding is on the right and attention causal, so a prompt's own rows never see it.
            self._result(
                outputs.hidden_states[self.total_layers + 1 + prompt.hidden_layer][
                    row, : len(prompt.input_ids)
                ],
                prompt,
            )
            for row, prompt in enumerate(prompts)
        ]

    @staticmethod
    def _result(hidden: torch.Tensor, prompt: TokenizedPrompt) -> torch.Tensor:
        return shorten(hidden, prompt.token_count, prompt.long_prompt_mode).to("cpu").clone()
