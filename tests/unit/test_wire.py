import hashlib

import pytest
import torch
from blake3 import blake3

from zimage_split._proto.encoder.v1 import encoder_pb2
from zimage_split._proto.generator.v1 import generator_pb2
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


def test_frozen_tensor_is_a_copy_in_chunk_messages_with_the_same_header_and_bytes() -> None:
    tensor = torch.randn(700, 1000).to(torch.bfloat16)
    meta, payload = wire.describe(tensor)
    frozen = wire.freeze(tensor)
    assert frozen.meta == meta and len(frozen.chunk_messages) == 2
    # Exactly what protobuf writes for EncodeResponse(chunk=...), so any peer reads them.
    assert frozen.chunk_messages == tuple(
        encoder_pb2.EncodeResponse(chunk=chunk).SerializeToString() for chunk in wire.iter_chunks(payload)
    )
    data = b"".join(encoder_pb2.EncodeResponse.FromString(message).chunk for message in frozen.chunk_messages)
    tensor.zero_()  # the copy does not follow the tensor, so its checksum stays true
    assert frozen.meta.blake3 == blake3(data).hexdigest()
    assembler = wire.TensorAssembler(frozen.meta)
    for message in frozen.chunk_messages:
        chunk = wire.decode_chunk_message(message)
        assert chunk is not None
        assembler.add(chunk)
    assert assembler.finish().view(torch.uint8).numpy().tobytes() == data


@pytest.mark.parametrize("length", [0, 1, 127, 128, 300, 16383, 16384, 2097151, 2097152, wire.CHUNK_BYTES])
def test_chunk_messages_are_what_protobuf_writes_and_read_back_without_a_copy(length: int) -> None:
    piece = bytes(range(256)) * (length // 256) + bytes(length % 256)
    message = wire.encode_chunk_message(memoryview(piece))
    for message_type in (encoder_pb2.EncodeResponse, generator_pb2.UploadEmbeddingRequest):
        assert message == message_type(chunk=piece).SerializeToString()
        assert message_type.FromString(message).chunk == piece
    chunk = wire.decode_chunk_message(message)
    assert isinstance(chunk, memoryview) and chunk == piece and chunk.obj is message


def test_other_messages_are_left_to_protobuf() -> None:
    header = encoder_pb2.EncodeResponse(
        header=encoder_pb2.EmbeddingHeader(prompt_index=3)
    ).SerializeToString()
    chunk = wire.encode_chunk_message(b"abcdef")
    unknown_field_after = (
        chunk + generator_pb2.UploadEmbeddingRequest(header=generator_pb2.UploadHeader()).SerializeToString()
    )
    for message in (
        header,
        b"",
        chunk[:-1],
        chunk + b"\0",
        unknown_field_after,
        b"\x12",
        b"\x12" + b"\xff" * 11,
    ):
        assert wire.decode_chunk_message(message) is None, message[:20]
    read = wire.read_chunk_or(encoder_pb2.EncodeResponse.FromString)
    assert read(header) == encoder_pb2.EncodeResponse(header=encoder_pb2.EmbeddingHeader(prompt_index=3))
    assert read(chunk) == b"abcdef" and isinstance(read(chunk), memoryview)
    assert wire.write_message(chunk) is chunk
    assert wire.write_message(encoder_pb2.EncodeResponse.FromString(header)) == header


def test_chunk_message_methods_name_the_calls_of_the_protos() -> None:
    encode = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].methods_by_name["Encode"]
    upload = generator_pb2.DESCRIPTOR.services_by_name["GeneratorService"].methods_by_name["UploadEmbedding"]
    assert f"/{encode.containing_service.full_name}/{encode.name}" == wire.ENCODE_METHOD
    assert f"/{upload.containing_service.full_name}/{upload.name}" == wire.UPLOAD_EMBEDDING_METHOD
    for method in (encode.output_type, upload.input_type):
        field = method.fields_by_name["chunk"]
        assert field.number == wire.CHUNK_FIELD_NUMBER and field.containing_oneof is not None
