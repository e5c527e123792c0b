"""The encoder servicer's caches: a hit sends the bytes and checksum made at encode time, and skips the tokenizer."""

import asyncio
import hashlib

import pytest
import torch
from blake3 import blake3

from zimage_split._proto.encoder.v1 import encoder_pb2
from zimage_split.common import wire
from zimage_split.encoder_service.engine import TokenizedPrompt
from zimage_split.encoder_service.servicer import EncoderServicer


class FakeEncoder:
    """TextEncoder's contract, with a bf16 [tokens, 256] embedding per prompt and call counts."""

    model_id = "fake"
    hidden_layer = -2

    def __init__(self) -> None:
        self.tokenized = 0
        self.returned: list[torch.Tensor] = []

    def check_layer(self, hidden_layer: int) -> int:
        return hidden_layer

    def tokenize(
        self, text: str, *, hidden_layer: int, max_sequence_length: int, long_prompt_mode: str
    ) -> TokenizedPrompt:
        self.tokenized += 1
        ids = tuple(text.encode())[:max_sequence_length] or (0,)
        key = hashlib.sha256(f"{hidden_layer}|{max_sequence_length}|{text}".encode()).hexdigest()
        return TokenizedPrompt(
            text, f"<{text}>", ids, max(len(text), 1), hidden_layer, max_sequence_length, "truncate", key
        )

    def encode(self, prompts: list[TokenizedPrompt]) -> list[torch.Tensor]:
        out = [torch.randn(len(p.input_ids), 256).to(torch.bfloat16) for p in prompts]
        self.returned.extend(out)
        return out


class Context:
    def time_remaining(self) -> float:
        return 60.0


async def encode(
    servicer: EncoderServicer, text: str, **options: int
) -> tuple[encoder_pb2.EmbeddingHeader, bytes]:
    request = encoder_pb2.EncodeRequest(prompts=[text], options=encoder_pb2.EncodeOptions(**options))
    responses = [response async for response in servicer.Encode(request, Context())]  # type: ignore[arg-type]
    header = responses[0].header
    # The chunks are messages wire.freeze wrote, which the server sends as they are.
    data = b"".join(encoder_pb2.EncodeResponse.FromString(message).chunk for message in responses[1:])
    assert blake3(data).hexdigest() == header.tensor.blake3 and header.tensor.sha256 == ""
    return header, data


def test_a_cache_hit_sends_without_hashing_or_tokenizing_again(monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = FakeEncoder()
    calls = {"freeze": 0, "describe": 0}
    freeze, describe = wire.freeze, wire.describe

    def counting_freeze(tensor: torch.Tensor) -> wire.FrozenTensor:
        calls["freeze"] += 1
        return freeze(tensor)

    def counting_describe(tensor: torch.Tensor):  # type: ignore[no-untyped-def]
        calls["describe"] += 1
        return describe(tensor)

    monkeypatch.setattr(wire, "freeze", counting_freeze)
    monkeypatch.setattr(wire, "describe", counting_describe)

    async def main() -> None:
        servicer = EncoderServicer(encoder, max_sequence_length_limit=4096)  # type: ignore[arg-type]
        servicer.batcher.start()
        try:
            text = "x" * 40_000  # 4096 tokens (the max length) x 256 bf16: 2 MiB, two chunks
            first, first_data = await encode(servicer, text, max_sequence_length=4096)
            assert len(first_data) == 2 * wire.CHUNK_BYTES and not first.cache_hit
            assert calls == {"freeze": 1, "describe": 0} and encoder.tokenized == 1
            # Nothing done to the tensor the engine returned reaches the cache: it keeps its own bytes.
            encoder.returned[0].fill_(float("nan"))
            second, second_data = await encode(servicer, text, max_sequence_length=4096)
            assert second.cache_hit and second.tensor == first.tensor and second_data == first_data
            assert calls == {"freeze": 1, "describe": 0} and encoder.tokenized == 1
            # Another max length is another prompt: tokenized and encoded again.
            third, _ = await encode(servicer, text, max_sequence_length=64)
            assert not third.cache_hit and third.token_count == 64
            assert calls == {"freeze": 2, "describe": 0} and encoder.tokenized == 2
        finally:
            await servicer.batcher.stop()

    asyncio.run(main())


def test_no_cache_means_no_tokenized_cache() -> None:
    servicer = EncoderServicer(FakeEncoder(), cache_bytes=0)  # type: ignore[arg-type]
    assert servicer.tokenized.max_bytes == 0
