"""The encoder service's embeddings match diffusers' encode_prompt on the same model folder."""

import asyncio

import pytest
import torch

from tests.conftest import start_encoder
from zimage_split.client import AsyncClient, Client

PROMPTS = [
    "a watercolor painting of a fox",
    "一只在雪地里奔跑的红狐狸，水彩画风格",
    "",
    "long " * 200,  # > 512 tokens after the chat template: truncated as diffusers truncates
]


def reference(pipe, prompts):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return pipe.encode_prompt(list(prompts), device="cpu", do_classifier_free_guidance=False)[0]


def test_float32_matches_diffusers(encoder_fp32, reference_pipeline) -> None:  # type: ignore[no-untyped-def]
    expected = reference(reference_pipeline, PROMPTS)
    with Client(generator=None, encoder=f"127.0.0.1:{encoder_fp32.port}") as client:
        embeddings = client.encode(PROMPTS)
    for item, want in zip(embeddings, expected, strict=True):
        assert item.tensor.dtype == torch.float32
        assert item.token_count == want.shape[0] == item.tensor.shape[0]
        assert (item.tensor - want).abs().max().item() <= 1e-5
    assert [item.truncated for item in embeddings] == [False, False, False, True]
    assert embeddings[3].token_count == 512


def test_bfloat16_matches_diffusers(loop_thread, tiny_model_dir, reference_pipeline) -> None:  # type: ignore[no-untyped-def]
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
    expected = reference(pipe, PROMPTS)
    server = start_encoder(loop_thread, tiny_model_dir)  # default dtype: bfloat16
    try:
        with Client(generator=None, encoder=f"127.0.0.1:{server.port}") as client:
            embeddings = client.encode(PROMPTS)
            info = client.encoder_info()
    finally:
        loop_thread.run(server.stop(grace=0))
    assert info["dtype"] == "DTYPE_BFLOAT16"
    for item, want in zip(embeddings, expected, strict=True):
        assert item.tensor.dtype == torch.bfloat16 and item.token_count == want.shape[0]
        cosine = torch.nn.functional.cosine_similarity(
            item.tensor.float().flatten(), want.float().flatten(), dim=0
        )
        assert cosine.item() >= 0.9999


def test_repeated_prompts_hit_the_cache_and_keys_are_stable(encoder_fp32) -> None:  # type: ignore[no-untyped-def]
    with Client(generator=None, encoder=f"127.0.0.1:{encoder_fp32.port}") as client:
        before = client.encoder_info()
        first = client.encode(["cache me please"])[0]
        second = client.encode(["cache me please"])[0]
        after = client.encoder_info()
        other = client.encode(["cache me please"], max_sequence_length=64)[0]
    assert not first.cache_hit and second.cache_hit
    assert first.content_key == second.content_key != other.content_key
    assert torch.equal(first.tensor, second.tensor)
    assert int(after.get("cache_hits", 0)) == int(before.get("cache_hits", 0)) + 1
    assert int(after["prompts_encoded"]) == int(before.get("prompts_encoded", 0)) + 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_concurrent_requests_are_bit_identical_to_alone(loop_thread, tiny_model_dir, dtype) -> None:  # type: ignore[no-untyped-def]
    server = start_encoder(loop_thread, tiny_model_dir, dtype=dtype, max_batch_wait_ms=200)
    address = f"127.0.0.1:{server.port}"
    prompts = [f"prompt number {i}" for i in range(6)] + ["a longer prompt, with more tokens", "short"]

    async def burst() -> list:
        async with AsyncClient(generator=None, encoder=address) as client:
            return await asyncio.gather(*(client.encode([prompt]) for prompt in prompts))

    try:
        results = asyncio.run(burst())
        with Client(generator=None, encoder=address) as client:
            info = client.encoder_info()
            # A new max length gives new keys, so these are computed again, one pass each.
            alone = [client.encode([prompt], max_sequence_length=511)[0] for prompt in prompts]
    finally:
        loop_thread.run(server.stop(grace=0))
    assert len(results) == 8 and int(info["prompts_encoded"]) == 8
    # --batching exact: one pass per prompt, as sharing one changes the matmuls' summation order.
    assert int(info["forward_passes"]) == 8
    for batched, single in zip(results, alone, strict=True):
        assert torch.equal(batched[0].tensor, single.tensor), "batching must not change a single bit"


def test_layers_after_the_returned_one_are_not_loaded(encoder_fp32, reference_pipeline) -> None:  # type: ignore[no-untyped-def]
    with Client(generator=None, encoder=f"127.0.0.1:{encoder_fp32.port}") as client:
        info = client.encoder_info()
    total = reference_pipeline.text_encoder.config.num_hidden_layers
    assert int(info["layers_loaded"]) == total - 1
    assert info["components"] == ["tokenizer", "text_encoder"]
    full = sum(p.numel() for p in reference_pipeline.text_encoder.parameters())
    assert 0 < int(info["parameter_count"]) < full


@pytest.mark.parametrize("layer", [-3, -1, 1])
def test_unservable_layers_are_refused(encoder_fp32, layer) -> None:  # type: ignore[no-untyped-def]
    from zimage_split.client import InvalidArgument

    with (
        Client(generator=None, encoder=f"127.0.0.1:{encoder_fp32.port}") as client,
        pytest.raises(InvalidArgument, match="hidden_layer"),
    ):
        client.encode(["x"], hidden_layer=layer)


def test_bad_encode_requests_are_refused_with_a_fix(encoder_fp32) -> None:  # type: ignore[no-untyped-def]
    from zimage_split.client import InvalidArgument

    with Client(generator=None, encoder=f"127.0.0.1:{encoder_fp32.port}") as client:
        with pytest.raises(InvalidArgument, match=r"at most 65536 \(--max-prompt-bytes\)"):
            client.encode(["x" * 100_001])
        with pytest.raises(InvalidArgument, match="at most 64 per call"):
            client.encode(["x"] * 65)
        with pytest.raises(InvalidArgument, match="send at least one prompt"):
            client.encode([])
        with pytest.raises(InvalidArgument, match="max_sequence_length must be between 1 and 1504"):
            client.encode(["x"], max_sequence_length=0)
        assert client.encode(["still serving"])[0].token_count > 0
