"""The embeddings file: one safetensors file, checked on load; refused for another model before any DiT work."""

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zimage_split.client.embeddings import Embeddings, PromptEmbedding, check_for_generator
from zimage_split.common import wire
from zimage_split.common.errors import DataLoss, InvalidArgument, NotFound


def make_embeddings(dtype: torch.dtype = torch.bfloat16, model_id: str = "zimage-split/tiny") -> Embeddings:
    items = [
        PromptEmbedding(
            text=text,
            content_key=f"key-{index}",
            tensor=torch.randn(tokens, 16).to(dtype),
            token_count=tokens,
            truncated=index == 1,
            formatted_text=f"<|im_start|>user\n{text}<|im_end|>",
            hidden_layer=-2,
            max_sequence_length=512,
            source_token_count=source_tokens,
            shortened_by=shortened_by,
        )
        for index, (text, tokens, source_tokens, shortened_by) in enumerate(
            [("a red fox", 7, 700, "pool"), ("雪中的狐狸", 11, 600, "truncate"), ("", 3, 3, "")]
        )
    ]
    return Embeddings(items, model_id=model_id)


def header_of(path: Path) -> dict:
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    return json.loads(path.read_bytes()[8 : 8 + length])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_save_then_load_gives_the_same_tensors_and_metadata(tmp_path: Path, dtype: torch.dtype) -> None:
    original = make_embeddings(dtype)
    path = original.save(tmp_path / "embeds.safetensors")
    loaded = Embeddings.load(path)
    assert loaded.model_id == original.model_id and len(loaded) == 3
    for before, after in zip(original, loaded, strict=True):
        assert torch.equal(before.tensor, after.tensor) and after.tensor.dtype == dtype
        assert (before.text, before.content_key, before.token_count, before.truncated) == (
            after.text,
            after.content_key,
            after.token_count,
            after.truncated,
        )
        assert after.formatted_text == before.formatted_text and after.max_sequence_length == 512
        assert (after.source_token_count, after.shortened_by) == (
            before.source_token_count,
            before.shortened_by,
        )
    # One tensor per prompt, and every prompt described in the header (no pickle: it is all JSON).
    header = header_of(path)
    prompts = json.loads(header["__metadata__"]["prompts"])
    assert sorted(name for name in header if name != "__metadata__") == [p["tensor"] for p in prompts]
    assert {
        "text",
        "formatted_text",
        "content_key",
        "model_id",
        "hidden_layer",
        "max_sequence_length",
        "dtype",
        "token_count",
        "truncated",
        "source_token_count",
        "shortened_by",
        "blake3",
    } <= set(prompts[0])
    assert "sha256" not in prompts[0] and header["__metadata__"]["format_version"] == "2"
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file is left behind"


def test_a_flipped_byte_is_caught_by_the_checksum(tmp_path: Path) -> None:
    path = make_embeddings().save(tmp_path / "embeds.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(DataLoss, match="do not match their blake3; the file is corrupted"):
        Embeddings.load(path)


def version_1_file(path: Path, embeddings: Embeddings) -> Path:
    """The file an older zimage-split wrote: format_version "1", each prompt's checksum in "sha256"."""
    embeddings.save(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    prompts = json.loads(metadata["prompts"])
    for entry in prompts:
        del entry["blake3"]
        entry["sha256"] = hashlib.sha256(wire.payload_view(tensors[entry["tensor"]])).hexdigest()
    metadata |= {"format_version": "1", "prompts": json.dumps(prompts)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_a_version_1_file_with_sha256_still_loads_and_is_checked_with_sha256(tmp_path: Path) -> None:
    original = make_embeddings()
    path = version_1_file(tmp_path / "old.safetensors", original)
    loaded = Embeddings.load(path)
    for before, after in zip(original, loaded, strict=True):
        assert torch.equal(before.tensor, after.tensor)

    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DataLoss, match="do not match their sha256; the file is corrupted"):
        Embeddings.load(path)


def test_a_file_without_its_versions_checksum_is_damaged(tmp_path: Path) -> None:
    path = make_embeddings().save(tmp_path / "embeds.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    # A version 2 file that holds the version 1 field only.
    prompts = [
        {**{k: v for k, v in entry.items() if k != "blake3"}, "sha256": "0" * 64}
        for entry in json.loads(metadata["prompts"])
    ]
    save_file(tensors, str(path), metadata=metadata | {"prompts": json.dumps(prompts)})
    with pytest.raises(DataLoss, match="a prompt has no 'blake3'"):
        Embeddings.load(path)
    save_file(tensors, str(path), metadata=metadata | {"format_version": "3"})
    with pytest.raises(InvalidArgument, match="reads versions 1, 2. Re-encode it"):
        Embeddings.load(path)


def test_a_truncated_file_is_refused_clearly(tmp_path: Path) -> None:
    path = make_embeddings().save(tmp_path / "embeds.safetensors")
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataLoss, match="truncated or corrupted"):
        Embeddings.load(path)


def test_other_safetensors_files_and_missing_files_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(InvalidArgument, match="not a zimage-split embeddings file"):
        Embeddings.load(other)
    with pytest.raises(NotFound, match="zsplit encode"):
        Embeddings.load(tmp_path / "missing.safetensors")


def test_embeddings_for_another_model_are_refused_before_any_dit_work() -> None:
    embeddings = make_embeddings()
    check_for_generator(embeddings, {"caption_dim": 16, "model_id": "zimage-split/tiny"})
    with pytest.raises(InvalidArgument, match="hidden size 16"):
        check_for_generator(embeddings, {"caption_dim": 2560, "model_id": "zimage-split/tiny"})
    with pytest.raises(InvalidArgument, match="--allow-other-model"):
        check_for_generator(embeddings, {"caption_dim": 16, "model_id": "Tongyi-MAI/Z-Image-Turbo"})
    check_for_generator(
        embeddings, {"caption_dim": 16, "model_id": "Tongyi-MAI/Z-Image-Turbo"}, allow_other_model=True
    )


def test_a_file_from_before_long_prompt_modes_loads_with_what_its_fields_imply(tmp_path: Path) -> None:
    original = make_embeddings()
    path = original.save(tmp_path / "embeds.safetensors")
    metadata = header_of(path)["__metadata__"]
    prompts = json.loads(metadata["prompts"])
    for entry in prompts:
        del entry["source_token_count"], entry["shortened_by"]
    metadata["prompts"] = json.dumps(prompts)
    save_file(
        {entry["tensor"]: item.tensor for entry, item in zip(prompts, original, strict=True)},
        str(path),
        metadata=metadata,
    )

    loaded = Embeddings.load(path)
    # Such a file's prompts could only have been truncated, and it kept no count of the tokens before.
    assert [(item.source_token_count, item.shortened_by) for item in loaded] == [
        (7, ""),
        (11, "truncate"),
        (3, ""),
    ]


# ---------------------------------------------------------------- held as bytes: numpy, torch, and no torch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_an_embedding_is_its_bytes_with_numpy_and_torch_views(dtype: torch.dtype) -> None:
    tensor = torch.randn(5, 16).to(dtype)
    item = PromptEmbedding("a fox", "key", tensor, 5, False)
    assert item.dtype == wire.dtype_name(dtype) and item.shape == (5, 16)
    assert item.values.data == bytes(wire.payload_view(tensor))
    # bfloat16 and float16 widen to float32 exactly, without torch.
    values = item.numpy()
    assert values.dtype == np.float32 and np.array_equal(values, tensor.float().numpy())
    assert (
        item.torch().dtype == dtype and torch.equal(item.torch(), tensor) and torch.equal(item.tensor, tensor)
    )
    # The same embedding from numpy or from its bytes.
    assert PromptEmbedding("a fox", "key", item.values, 5, False) == item
    if dtype != torch.bfloat16:
        assert PromptEmbedding("a fox", "key", tensor.numpy(), 5, False) == item


def test_the_file_is_the_one_safetensors_writes(tmp_path: Path) -> None:
    """Written without torch, read by safetensors itself: the same tensors and metadata as its own save."""
    original = make_embeddings()
    path = original.save(tmp_path / "embeds.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        for index, item in enumerate(original):
            assert torch.equal(handle.get_tensor(f"prompt.{index:06d}"), item.tensor)
        metadata = handle.metadata()
    again = tmp_path / "by-safetensors.safetensors"
    save_file(
        {f"prompt.{i:06d}": item.tensor for i, item in enumerate(original)}, str(again), metadata=metadata
    )
    ours, theirs = header_of(path), header_of(again)
    assert ours == theirs  # the same header, tensor for tensor (the metadata's key order aside)
    assert path.stat().st_size == again.stat().st_size
    # Each prompt's checksum is the wire's, computed on the same bytes with or without torch.
    for entry, item in zip(json.loads(metadata["prompts"]), original, strict=True):
        assert entry["blake3"] == wire.describe(item.tensor)[0].blake3


def test_a_numpy_array_of_another_dtype_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="pass float32 or float16"):
        PromptEmbedding("a fox", "key", np.zeros((2, 16), dtype=np.float64), 2, False)
    with pytest.raises(InvalidArgument, match="Expected a tensor"):
        PromptEmbedding("a fox", "key", [[0.0] * 16], 2, False)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda data: data[:6], "shorter than the header's length"),
        (lambda data: struct.pack("<Q", 10**9) + data[8:], "the header claims"),
        (lambda data: data[:8] + b"[" + data[9:], "the header is not JSON"),
        (lambda data: data.replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1), "does not fill its"),
    ],
)
def test_a_damaged_layout_is_refused_with_what_is_wrong(tmp_path: Path, damage, words: str) -> None:  # type: ignore[no-untyped-def]
    path = make_embeddings().save(tmp_path / "embeds.safetensors")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataLoss, match=f"not a readable safetensors file .*{words}"):
        Embeddings.load(path)
