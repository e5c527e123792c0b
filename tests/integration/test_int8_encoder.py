"""`--quantize int8` on the tiny model: close to float32 within a stated tolerance, reported in Info, its
own keys and identity, and clear errors for what it cannot do."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import LoopThread, start_encoder
from zimage_split.client import Client
from zimage_split.common.errors import InvalidArgument
from zimage_split.encoder_service.engine import TextEncoder
from zimage_split.model_source import ModelSource

# Measured on tiny: the worst token's cosine to float32 is 0.99999 for the embeddings, and 0.9987 for what
# the decoder layers add to the token embeddings (the part int8 changes; the embedding table stays float32
# and dominates tiny's hidden states). The tolerances leave about 20x and 10x that error as margin.
MIN_TOKEN_COSINE = 0.9995
MIN_LAYER_UPDATE_COSINE = 0.99
PROMPTS = ("", "a red fox in snow", "A lighthouse on a cliff at dusk, dramatic clouds, 35mm film", "x" * 300)


@pytest.fixture(scope="module")
def encoders(tiny_model_dir: Path) -> tuple[TextEncoder, TextEncoder]:
    source = ModelSource(location=str(tiny_model_dir), model_id=str(tiny_model_dir))
    cpu = torch.device("cpu")
    return (
        TextEncoder(source, device=cpu, dtype=torch.float32),
        TextEncoder(source, device=cpu, dtype=torch.float32, quantize="int8"),
    )


def token_cosines(ours: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(ours.double(), reference.double(), dim=-1)


def test_int8_stays_within_the_stated_tolerance_of_float32(encoders: tuple[TextEncoder, TextEncoder]) -> None:
    fp32, int8 = encoders
    assert type(int8.model.layers[0].mlp.down_proj.weight).__name__ == "Int8Tensor"
    for text in PROMPTS:
        prompt = fp32.tokenize(text, hidden_layer=-2, max_sequence_length=512)
        (reference,), (quantized,) = fp32.encode([prompt]), int8.encode([prompt])
        assert quantized.dtype == torch.float32 and quantized.shape == reference.shape
        assert not torch.equal(quantized, reference), (
            "int8 gave float32's exact values: nothing was quantized"
        )
        worst = token_cosines(quantized, reference).min().item()
        assert worst >= MIN_TOKEN_COSINE, f"{text[:20]!r}: worst token cosine {worst:.6f}"

        ids = torch.tensor([prompt.input_ids])
        with torch.inference_mode():
            ref_states = fp32.model(input_ids=ids, output_hidden_states=True).hidden_states
            int8_states = int8.model(input_ids=ids, output_hidden_states=True).hidden_states
        updates = token_cosines(int8_states[-1][0] - int8_states[0][0], ref_states[-1][0] - ref_states[0][0])
        assert updates.min().item() >= MIN_LAYER_UPDATE_COSINE, f"{text[:20]!r}: {updates.min().item():.5f}"


def test_only_a_quantized_encoder_changes_its_content_keys(encoders: tuple[TextEncoder, TextEncoder]) -> None:
    fp32, int8 = encoders
    formatted = fp32.format("a red fox")
    digest = hashlib.sha256()
    for part in (fp32.model_id, formatted, "-2", "512", "float32"):  # the key as it was before --quantize
        digest.update(len(part.encode()).to_bytes(8, "little") + part.encode())
    assert fp32.content_key(formatted, -2, 512) == digest.hexdigest()
    assert int8.content_key(formatted, -2, 512) != digest.hexdigest()


def test_the_service_reports_int8_and_keeps_its_keys_apart(
    loop_thread: LoopThread, tiny_model_dir: Path, encoder_fp32
) -> None:  # type: ignore[no-untyped-def]
    server = start_encoder(loop_thread, tiny_model_dir, dtype="auto", quantize="int8")
    try:
        quantized_address, plain_address = f"127.0.0.1:{server.port}", f"127.0.0.1:{encoder_fp32.port}"
        with Client(generator=None, encoder=quantized_address, timeout=60) as client:
            info = client.encoder_info()
            (quantized,) = client.encode(["a red fox"])
        with Client(generator=None, encoder=plain_address, timeout=60) as client:
            plain_info = client.encoder_info()
            (plain,) = client.encode(["a red fox"])
        both = f"{plain_address},{quantized_address}"
        with (
            Client(generator=None, encoder=both, timeout=60) as client,
            pytest.raises(InvalidArgument, match="quantization int8") as mixed,
        ):
            client.check_encoders()
    finally:
        loop_thread.run(server.stop(grace=0))
    assert (info["quantization"], info["dtype"]) == ("int8", "DTYPE_FLOAT32")
    assert info["dtype_reason"] == "auto: --quantize int8 computes its activations in float32"
    assert plain_info["quantization"] == "none" and plain_info["dtype"] == "DTYPE_FLOAT32"
    assert quantized.content_key != plain.content_key
    assert token_cosines(quantized.tensor, plain.tensor).min().item() >= MIN_TOKEN_COSINE
    assert "quantization none" in mixed.value.message


def test_without_torchao_int8_fails_at_start_up_naming_the_install(
    loop_thread: LoopThread, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torchao is installed with the dev extra; a None entry makes `import torchao...` fail as if it were not.
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(
        InvalidArgument, match=r"needs torchao, which is not installed .*pip install 'zimage-split\[int8\]'"
    ):
        start_encoder(loop_thread, tiny_model_dir, dtype="auto", quantize="int8")
