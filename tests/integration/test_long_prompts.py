"""Long prompts: every long-prompt mode gives exactly max_sequence_length rows, up to the DiT's caption limit."""

import asyncio
import json
import math
import shutil
import socket
from pathlib import Path

import grpc
import pytest
import torch

from tests.conftest import start_encoder
from zimage_split._proto.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from zimage_split.client import AsyncClient, Client, InvalidArgument
from zimage_split.dit_service.disk_store import DiskEmbeddingStore
from zimage_split.dit_service.embedding_store import EmbeddingStore, TextEncoding, TextPrompt
from zimage_split.encoder_service.engine import shorten
from zimage_split.encoder_service.server import caption_token_limit
from zimage_split.model_source import resolve_model

MODES = ("truncate", "interpolate", "pool")
ROWS = 64
# About 400 tokens once the chat template is applied: far more than ROWS, well under the limit.
LONG_PROMPT = "a lighthouse on a cliff at dusk, waves breaking on the rocks below, " * 6
SHORT_PROMPT = "a red fox in snow"


def address(server) -> str:  # type: ignore[no-untyped-def]
    return f"127.0.0.1:{server.port}"


def full_encoding(client: Client, prompt: str):  # type: ignore[no-untyped-def]
    """The prompt with every token kept: max_sequence_length at the limit, so nothing is shortened."""
    item = client.encode([prompt], max_sequence_length=1504)[0]
    assert item.shortened_by == "" and item.token_count == item.source_token_count > ROWS
    return item


@pytest.fixture(scope="module")
def encoded(encoder_fp32):  # type: ignore[no-untyped-def]
    with Client(generator=None, encoder=address(encoder_fp32), timeout=60) as client:
        full = full_encoding(client, LONG_PROMPT)
        by_mode = {
            mode: client.encode([LONG_PROMPT], max_sequence_length=ROWS, long_prompt_mode=mode)[0]
            for mode in MODES
        }
        default = client.encode([LONG_PROMPT], max_sequence_length=ROWS)[0]
    return full, by_mode, default


def test_every_mode_gives_exactly_max_sequence_length_rows_and_says_so(encoded) -> None:  # type: ignore[no-untyped-def]
    full, by_mode, _ = encoded
    for mode, item in by_mode.items():
        assert tuple(item.tensor.shape) == (ROWS, 16) and item.tensor.dtype == torch.float32
        assert item.token_count == ROWS and item.max_sequence_length == ROWS
        assert item.source_token_count == full.token_count
        assert item.shortened_by == mode
        assert item.truncated == (mode == "truncate")
    assert len({item.content_key for item in by_mode.values()} | {full.content_key}) == 4


def test_truncate_keeps_the_first_tokens_as_diffusers_does(encoded, reference_pipeline) -> None:  # type: ignore[no-untyped-def]
    full, by_mode, default = encoded
    truncated = by_mode["truncate"].tensor
    torch.testing.assert_close(truncated, full.tensor[:ROWS], rtol=0, atol=1e-5)
    with torch.no_grad():
        (want,) = reference_pipeline.encode_prompt(
            [LONG_PROMPT], device="cpu", do_classifier_free_guidance=False, max_sequence_length=ROWS
        )[0]
    torch.testing.assert_close(truncated, want, rtol=0, atol=1e-5)
    # No mode asked for is truncation, the diffusers default: the same bytes and key.
    assert torch.equal(default.tensor, truncated) and default.content_key == by_mode["truncate"].content_key
    assert default.shortened_by == "truncate"


def test_interpolate_resamples_all_tokens_linearly_keeping_the_ends(encoded) -> None:  # type: ignore[no-untyped-def]
    full, by_mode, _ = encoded
    rows, source = by_mode["interpolate"].tensor, full.tensor.double()
    tokens = source.shape[0]
    torch.testing.assert_close(rows[0], full.tensor[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(rows[-1], full.tensor[-1], rtol=0, atol=1e-6)
    for index in range(ROWS):
        position = index * (tokens - 1) / (ROWS - 1)
        below = min(math.floor(position), tokens - 2)
        weight = position - below
        want = (1 - weight) * source[below] + weight * source[below + 1]
        torch.testing.assert_close(rows[index].double(), want, rtol=0, atol=1e-5)


def test_pool_averages_adjacent_tokens(encoded) -> None:  # type: ignore[no-untyped-def]
    full, by_mode, _ = encoded
    rows, source = by_mode["pool"].tensor, full.tensor.double()
    tokens = source.shape[0]
    for index in range(ROWS):
        start, end = (index * tokens) // ROWS, math.ceil((index + 1) * tokens / ROWS)
        torch.testing.assert_close(rows[index].double(), source[start:end].mean(0), rtol=0, atol=1e-5)


def test_a_prompt_that_fits_is_the_same_in_every_mode(encoder_fp32) -> None:  # type: ignore[no-untyped-def]
    with Client(generator=None, encoder=address(encoder_fp32), timeout=60) as client:
        short = [client.encode([SHORT_PROMPT], long_prompt_mode=mode)[0] for mode in MODES]
        # Exactly max_sequence_length tokens still fits: nothing to shorten.
        exact = full_encoding(client, LONG_PROMPT).token_count
        at_the_edge = [
            client.encode([LONG_PROMPT], max_sequence_length=exact, long_prompt_mode=mode)[0]
            for mode in MODES
        ]
    for items in (short, at_the_edge):
        first = items[0]
        assert first.shortened_by == "" and not first.truncated
        assert first.source_token_count == first.token_count == first.tensor.shape[0]
        for item in items[1:]:
            assert torch.equal(item.tensor, first.tensor) and item.content_key == first.content_key
            assert (item.shortened_by, item.source_token_count) == ("", first.token_count)
    assert at_the_edge[0].token_count == exact
    assert all(item.cache_hit for item in short[1:] + at_the_edge[1:]), "one cache entry for every mode"


def test_above_the_limit_is_refused_with_the_limit_and_the_fix(encoder_fp32) -> None:  # type: ignore[no-untyped-def]
    with Client(generator=None, encoder=address(encoder_fp32), timeout=60) as client:
        info = client.encoder_info()
        for mode in (None, "pool"):
            with pytest.raises(InvalidArgument, match=r"between 1 and 1504 \(got 1505\)") as raised:
                client.encode([LONG_PROMPT], max_sequence_length=1505, long_prompt_mode=mode)
            assert "interpolate or pool" in raised.value.message
        with pytest.raises(InvalidArgument, match=r"Unknown long_prompt_mode 'squash'"):
            client.encode([LONG_PROMPT], long_prompt_mode="squash")
    axes_lens = json.loads(Path(info["model_id"], "transformer", "config.json").read_text())["axes_lens"]
    assert int(info["max_sequence_length_limit"]) == axes_lens[0] - 32 == 1504


def test_an_unknown_mode_number_is_invalid_argument(encoder_fp32) -> None:  # type: ignore[no-untyped-def]
    request = encoder_pb2.EncodeRequest(
        prompts=["x"],
        options=encoder_pb2.EncodeOptions(long_prompt_mode=7),  # type: ignore[arg-type]
    )
    with grpc.insecure_channel(address(encoder_fp32)) as channel:
        stub = encoder_pb2_grpc.EncoderServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Encode(request, timeout=30))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "long_prompt_mode 7" in raised.value.details()  # type: ignore[attr-defined]


def encoder_only_folder(model: Path, target: Path, axes_lens: list[int] | None) -> Path:
    """The tokenizer and text encoder of `model`, plus (if `axes_lens`) a transformer config with no weights."""
    target.mkdir()
    shutil.copy(model / "model_index.json", target)
    for component in ("tokenizer", "text_encoder"):
        shutil.copytree(model / component, target / component)
    if axes_lens is not None:
        config = json.loads((model / "transformer" / "config.json").read_text())
        (target / "transformer").mkdir()
        (target / "transformer" / "config.json").write_text(json.dumps({**config, "axes_lens": axes_lens}))
    return target


def test_the_limit_comes_from_the_models_transformer_config(loop_thread, tiny_model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    no_dit = encoder_only_folder(tiny_model_dir, tmp_path / "no-dit", None)
    assert caption_token_limit(resolve_model(str(no_dit))) == 1504  # Z-Image's, when there is nothing to read

    small = encoder_only_folder(tiny_model_dir, tmp_path / "small-dit", [256, 32, 32])
    with pytest.raises(InvalidArgument, match=r"--max-sequence-length must be between 1 and 224 .*got 512"):
        start_encoder(loop_thread, small, dtype="float32")  # the default, 512, is more than this DiT takes
    server = start_encoder(loop_thread, small, dtype="float32", max_sequence_length=200)
    try:
        with Client(generator=None, encoder=address(server), timeout=60) as client:
            assert int(client.encoder_info()["max_sequence_length_limit"]) == 224
            with pytest.raises(InvalidArgument, match=r"between 1 and 224 \(got 225\)"):
                client.encode([LONG_PROMPT], max_sequence_length=225)
            item = client.encode([LONG_PROMPT * 2], max_sequence_length=224, long_prompt_mode="pool")[0]
    finally:
        loop_thread.run(server.stop(grace=0))
    assert item.token_count == 224 and item.source_token_count > 224 and item.shortened_by == "pool"


@pytest.mark.parametrize("mode", ["interpolate", "pool"])
def test_shortening_keeps_the_dtype_and_leaves_short_inputs_alone(mode: str) -> None:
    hidden = torch.randn(10, 16).to(torch.bfloat16)
    shortened = shorten(hidden, 4, mode)
    assert shortened.shape == (4, 16) and shortened.dtype == torch.bfloat16
    assert shorten(hidden, 10, mode) is hidden and shorten(hidden, 12, mode) is hidden


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_generators_store_reports_shortening_on_every_hit(encoder_fp32, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pooled = TextEncoding(max_sequence_length=ROWS, long_prompt_mode="pool")

    def store(encoder_address: str) -> EmbeddingStore:
        return EmbeddingStore(
            AsyncClient(generator=None, encoder=encoder_address, timeout=30),
            caption_dim=16,
            max_tokens=1504,
            cache_bytes=1 << 20,
            disk=DiskEmbeddingStore(tmp_path),
        )

    async def first_process():  # type: ignore[no-untyped-def]
        live = store(address(encoder_fp32))
        try:
            first = await live.from_text(LONG_PROMPT, pooled, timeout=30)
            again = await live.from_text(LONG_PROMPT, pooled, timeout=30)
            truncated, _ = await live.resolve_pair(
                TextPrompt(LONG_PROMPT), None, TextEncoding(ROWS), timeout=30
            )
        finally:
            await live.encoder.close()  # type: ignore[union-attr]
        return first, again, truncated

    async def after_a_restart_with_the_encoder_down():  # type: ignore[no-untyped-def]
        restarted = store(f"127.0.0.1:{closed_port()}")
        try:
            return await restarted.from_text(LONG_PROMPT, pooled, timeout=30)
        finally:
            await restarted.encoder.close()  # type: ignore[union-attr]

    first, again, truncated = asyncio.run(first_process())
    from_disk = asyncio.run(after_a_restart_with_the_encoder_down())

    assert first.encode_seconds > 0 and again.encode_seconds == from_disk.encode_seconds == 0
    for item in (first, again, from_disk):
        assert (item.token_count, item.shortened_by) == (ROWS, "pool")
        assert item.source_token_count > ROWS and item.source_token_count == first.source_token_count
        assert torch.equal(item.tensor, first.tensor) and item.key == first.key
    # The mode is part of the text key: truncation is another embedding, encoded afresh.
    assert truncated.key != first.key and truncated.encode_seconds > 0
    assert (truncated.shortened_by, truncated.source_token_count) == ("truncate", first.source_token_count)
