import hashlib

import pytest
import torch
from blake3 import blake3

from zimage_split._proto.tensor.v1 import tensor_pb2
from zimage_split.common import wire
from zimage_split.common.errors import DataLoss, InvalidArgument


def send(
    tensor: torch.Tensor, chunk_bytes: int = wire.CHUNK_BYTES
) -> tuple[tensor_pb2.TensorHeader, list[bytes]]:
    meta, payload = wire.describe(tensor)
    return wire.meta_to_proto(meta), list(wire.iter_chunks(payload, chunk_bytes))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_is_exact_for_every_dtype(dtype: torch.dtype) -> None:
    tensor = torch.randn(700, 1000).to(dtype)  # 1.4-2.8 MB: several chunks
    header, chunks = send(tensor)
    assert len(chunks) > 1 and all(len(chunk) <= wire.CHUNK_BYTES for chunk in chunks)
    assembler = wire.TensorAssembler(wire.meta_from_proto(header))
    for chunk in chunks:
        assembler.add(chunk)
    received = assembler.finish()
    assert received.dtype == dtype and received.shape == tensor.shape
    assert torch.equal(received.view(torch.uint8), tensor.view(torch.uint8))


def test_sender_does_not_copy_a_contiguous_cpu_tensor() -> None:
    tensor = torch.zeros(4, 8, dtype=torch.bfloat16)
    payload = wire.payload_view(tensor)
    tensor[0, 0] = 1.0
    assert bytes(payload[:2]) == tensor[0, 0:1].view(torch.uint8).numpy().tobytes()


def test_truncated_stream_is_rejected() -> None:
    header, chunks = send(torch.randn(64, 16), chunk_bytes=1024)
    assembler = wire.TensorAssembler(wire.meta_from_proto(header))
    for chunk in chunks[:-1]:
        assembler.add(chunk)
    with pytest.raises(InvalidArgument, match="cut short"):
        assembler.finish()


def test_extra_bytes_are_rejected() -> None:
    header, chunks = send(torch.randn(8, 16))
    assembler = wire.TensorAssembler(wire.meta_from_proto(header))
    assembler.add(chunks[0])
    with pytest.raises(InvalidArgument, match="more data"):
        assembler.add(b"x")


@pytest.mark.parametrize("position", [0, 5, 1023, 1024, 2047])
def test_a_flipped_byte_anywhere_fails_the_checksum(position: int) -> None:
    header, chunks = send(torch.randn(32, 16), chunk_bytes=1024)
    payload = bytearray(b"".join(chunks))
    payload[position] ^= 0x01
    assembler = wire.TensorAssembler(wire.meta_from_proto(header))
    for start in range(0, len(payload), 1024):
        assembler.add(bytes(payload[start : start + 1024]))
    with pytest.raises(DataLoss, match="do not match their BLAKE3"):
        assembler.finish()


def test_sender_sends_blake3_only() -> None:
    tensor = torch.randn(8, 16)
    header, _ = send(tensor)
    assert header.blake3 == blake3(wire.payload_view(tensor)).hexdigest()
    assert header.sha256 == ""


def legacy_header(tensor: torch.Tensor) -> tuple[tensor_pb2.TensorHeader, list[bytes]]:
    """What a sender from before BLAKE3 sent: sha256 only."""
    header, chunks = send(tensor)
    header.ClearField("blake3")
    header.sha256 = hashlib.sha256(b"".join(chunks)).hexdigest()
    return header, chunks


def test_header_with_only_sha256_from_an_older_sender_is_checked_with_sha256() -> None:
    tensor = torch.randn(8, 16)
    header, chunks = legacy_header(tensor)
    assembler = wire.TensorAssembler(wire.meta_from_proto(header))
    for chunk in chunks:
        assembler.add(chunk)
    assert torch.equal(assembler.finish(), tensor)
    # The receiver hashed BLAKE3 on the way, so the tensor gets the same key as from a current sender.
    assert assembler.meta.blake3 == wire.describe(tensor)[0].blake3
    assert wire.embedding_key(assembler.meta) == wire.embedding_key(wire.describe(tensor)[0])

    corrupted = wire.TensorAssembler(wire.meta_from_proto(header))
    corrupted.add(bytes([chunks[0][0] ^ 0x80]) + chunks[0][1:])
    with pytest.raises(DataLoss, match="do not match their sha256"):
        corrupted.finish()


def test_header_without_any_checksum_or_with_a_malformed_one_is_invalid() -> None:
    header, _ = send(torch.randn(8, 16))
    header.ClearField("blake3")
    with pytest.raises(InvalidArgument, match="no checksum; send the payload's hex BLAKE3"):
        wire.meta_from_proto(header)
    for field, value in (("blake3", "abc"), ("blake3", "z" * 64), ("sha256", "0" * 63)):
        bad, _ = send(torch.randn(8, 16))
        setattr(bad, field, value)
        with pytest.raises(InvalidArgument, match=f"{field} must be 64 hex characters"):
            wire.meta_from_proto(bad)


def test_upload_keys_are_blake3_and_never_look_like_the_old_sha256_keys() -> None:
    tensor = torch.randn(8, 16)
    meta = wire.describe(tensor)[0]
    key = wire.embedding_key(meta)
    described = f"float32|[8, 16]|{blake3(wire.payload_view(tensor)).hexdigest()}".encode()
    assert key == "b3-" + blake3(described).hexdigest()
    # The scheme before BLAKE3: bare sha256 hex, 64 characters, so the two can never be equal.
    old_key = hashlib.sha256(
        f"float32|[8, 16]|{hashlib.sha256(wire.payload_view(tensor)).hexdigest()}".encode()
    )
    assert len(old_key.hexdigest()) == 64 and len(key) == 67 and key != old_key.hexdigest()
    # The key follows dtype, shape and bytes.
    assert wire.embedding_key(wire.describe(tensor.reshape(16, 8))[0]) != key
    assert wire.embedding_key(wire.describe(tensor.to(torch.float16))[0]) != key
    with pytest.raises(ValueError, match="needs the tensor's BLAKE3"):
        wire.embedding_key(wire.TensorMeta(torch.float32, (8, 16), 512, blake3="", sha256="0" * 64))


def test_header_checks_dtype_shape_and_length() -> None:
    header, _ = send(torch.randn(8, 16))
    bad_dtype = tensor_pb2.TensorHeader()
    bad_dtype.CopyFrom(header)
    bad_dtype.dtype = tensor_pb2.DTYPE_UNSPECIFIED
    with pytest.raises(InvalidArgument, match="dtype"):
        wire.meta_from_proto(bad_dtype)
    bad_length = tensor_pb2.TensorHeader()
    bad_length.CopyFrom(header)
    bad_length.byte_length += 2
    with pytest.raises(InvalidArgument, match="needs 512"):
        wire.meta_from_proto(bad_length)
    huge = tensor_pb2.TensorHeader()
    huge.CopyFrom(header)
    del huge.shape[:]
    huge.shape.extend([1 << 20, 1 << 20])
    with pytest.raises(InvalidArgument, match="limit"):
        wire.meta_from_proto(huge)


def test_unsupported_tensor_dtype_is_refused_by_the_sender() -> None:
    with pytest.raises(InvalidArgument, match="bfloat16, float16, float32"):
        wire.describe(torch.zeros(2, 2, dtype=torch.int64))


def test_frozen_tensor_is_a_copy_in_wire_chunks_with_the_same_header_and_bytes() -> None:
    tensor = torch.randn(700, 1000).to(torch.bfloat16)
    meta, payload = wire.describe(tensor)
    frozen = wire.freeze(tensor)
    assert frozen.meta == meta and frozen.chunks == tuple(wire.iter_chunks(payload))
    assert len(frozen.chunks) == 2 and all(isinstance(chunk, bytes) for chunk in frozen.chunks)
    data = b"".join(frozen.chunks)
    tensor.zero_()  # the copy does not follow the tensor, so its checksum stays true
    assert frozen.meta.blake3 == blake3(data).hexdigest()
    assembler = wire.TensorAssembler(frozen.meta)
    for chunk in frozen.chunks:
        assembler.add(chunk)
    assert assembler.finish().view(torch.uint8).numpy().tobytes() == data
