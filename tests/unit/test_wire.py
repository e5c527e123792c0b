import pytest
import torch

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


def test_corrupted_bytes_fail_the_checksum() -> None:
    header, chunks = send(torch.randn(8, 16))
    corrupted = bytearray(chunks[0])
    corrupted[5] ^= 0xFF
    assembler = wire.TensorAssembler(wire.meta_from_proto(header))
    assembler.add(bytes(corrupted))
    with pytest.raises(DataLoss, match="sha256"):
        assembler.finish()


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


def test_frozen_tensor_is_a_copy_with_the_same_header_and_bytes() -> None:
    tensor = torch.randn(700, 1000).to(torch.bfloat16)
    meta, payload = wire.describe(tensor)
    frozen = wire.freeze(tensor)
    assert frozen.meta == meta and frozen.data == bytes(payload) and isinstance(frozen.data, bytes)
    tensor.zero_()  # the copy does not follow the tensor, so its sha256 stays true
    assert (
        frozen.meta.sha256
        == wire.describe(torch.frombuffer(bytearray(frozen.data), dtype=torch.bfloat16))[0].sha256
    )
    assembler = wire.TensorAssembler(frozen.meta)
    for chunk in wire.iter_chunks(frozen.data):
        assembler.add(chunk)
    assert assembler.finish().view(torch.uint8).numpy().tobytes() == frozen.data
