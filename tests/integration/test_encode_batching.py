"""How queued prompts share the encoder: `exact` (the default) keeps every embedding bit-identical to its
prompt encoded alone; `padded` shares one forward pass and stays within rounding of it.

The `bench` preset's widths (512) are where the matmul kernels of a real CPU pick their blocking by the
number of rows; the `tiny` model's are too small to show it."""

from __future__ import annotations

import pytest
import torch

from zimage_split.common.errors import InvalidArgument
from zimage_split.encoder_service.config import EncoderConfig
from zimage_split.encoder_service.engine import TextEncoder
from zimage_split.model_source import resolve_model
from zimage_split.tiny_model import cached_tiny_model


@pytest.fixture(scope="module", params=["bfloat16", "float32"])
def bench_encoder(request) -> TextEncoder:  # type: ignore[no-untyped-def]
    source = resolve_model(str(cached_tiny_model("bench")))
    return TextEncoder(source, device=torch.device("cpu"), dtype=getattr(torch, request.param))


def tokenized(encoder: TextEncoder, texts: list[str]) -> list:  # type: ignore[type-arg]
    return [encoder.tokenize(text, hidden_layer=-2, max_sequence_length=512) for text in texts]


def test_exact_batching_is_bit_identical_to_alone_at_equal_lengths(bench_encoder: TextEncoder) -> None:
    prompts = tokenized(bench_encoder, [f"prompt number {i} with a few more words" for i in range(8)])
    assert len({len(p.input_ids) for p in prompts}) == 1, "the case that used to share one pass"
    bench_encoder.batching = "exact"
    before = bench_encoder.forward_passes
    batched = bench_encoder.encode(prompts)
    assert bench_encoder.forward_passes - before == len(prompts)
    alone = [bench_encoder.encode([prompt])[0] for prompt in prompts]
    for one, other in zip(batched, alone, strict=True):
        assert torch.equal(one, other)


def test_padded_batching_shares_one_pass_within_rounding(bench_encoder: TextEncoder) -> None:
    texts = ["short", "a somewhat longer prompt about a fox in the snow", "medium length prompt here"]
    prompts = tokenized(bench_encoder, texts)
    bench_encoder.batching = "padded"
    try:
        before = bench_encoder.forward_passes
        batched = bench_encoder.encode(prompts)
        assert bench_encoder.forward_passes - before == 1
    finally:
        bench_encoder.batching = "exact"
    alone = [bench_encoder.encode([prompt])[0] for prompt in prompts]
    for prompt, one, other in zip(prompts, batched, alone, strict=True):
        assert one.shape == other.shape == (prompt.token_count, bench_encoder.hidden_size)
        # Right padding under causal attention: the same values up to the kernels' summation order.
        cosine = torch.nn.functional.cosine_similarity(one.double(), other.double(), dim=-1)
        assert cosine.min().item() > 0.999, cosine.min().item()


def test_unknown_batching_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="exact or padded"):
        EncoderConfig(model="tiny", batching="greedy")
