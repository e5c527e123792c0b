"""Tensors on the wire: a checked header plus raw little-endian bytes in chunks of at most 1 MiB.

Every tensor carries the hex BLAKE3 of its bytes (TensorHeader.blake3); headers from older senders carry
sha256 instead, and are still checked with it.
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeVar

from blake3 import blake3
from google.protobuf.message import Message

from zimage_split._proto.tensor.v1 import tensor_pb2
from zimage_split.common.errors import DataLoss, InvalidArgument

CHUNK_BYTES = 1 << 20
# Seeds travel as uint64 (GenerateRequest.seed): the largest one, for the client's and the server's checks.
MAX_SEED = 2**64 - 1
# An embedding is at most a few MiB (512 x 2560 x 4 bytes is 5 MiB); anything far above is a mistake.
MAX_TENSOR_BYTES = 256 << 20
# Embeddings are 2-D; a header with thousands of dimensions is hostile (their product takes minutes to compute).
MAX_TENSOR_DIMS = 8

# The dtypes the wire carries, by their torch names, and their DType codes.
DTYPE_CODES = {
    "bfloat16": tensor_pb2.DTYPE_BFLOAT16,
    "float16": tensor_pb2.DTYPE_FLOAT16,
    "float32": tensor_pb2.DTYPE_FLOAT32,
}
# Bytes per element of each: the wire's sizes are checked without torch (the SDK may not have it).
ITEM_SIZES = {"bfloat16": 2, "float16": 2, "float32": 4}
_NAMES_BY_CODE: dict[int, str] = {int(code): name for name, code in DTYPE_CODES.items()}

# Upload keys start with this; keys from before BLAKE3 were bare sha256 hex, so the two never collide and a
# key of the old scheme simply misses.
EMBEDDING_KEY_PREFIX = "b3-"
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
M = TypeVar("M", bound=Message)

if TYPE_CHECKING:
    import torch

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("zimage-split's wire format is little-endian; this platform is not.")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a wire dtype name. torch is imported here, by the first tensor, not by this
    module: the SDK works on bytes and never loads it unless its caller asks for a torch tensor."""
    import torch

    dtype: torch.dtype = getattr(torch, name)
    return dtype


def dtype_name(dtype: torch.dtype | str) -> str | None:
    """The wire's name for a torch dtype or a name ("bfloat16", ...), or None if the wire does not carry it."""
    name = str(dtype).removeprefix("torch.")
    return name if name in DTYPE_CODES else None


@dataclass(frozen=True)
class TensorMeta:
    """What a receiver needs to rebuild and check a tensor."""

    # The wire's name: "bfloat16", "float16" or "float32" (a torch dtype is accepted too).
    dtype: str
    shape: tuple[int, ...]
    byte_length: int
    # Hex BLAKE3 of the bytes. Empty only in a header received from an older sender, which gave sha256;
    # TensorAssembler.finish fills it in.
    blake3: str
    # Hex sha256 of the bytes, from an older sender's header; never set by this version.
    sha256: str = ""

    @property
    def dtype_name(self) -> str:
        """ "bfloat16", "float16" or "float32": a TensorMeta only ever holds a dtype the wire carries."""
        return str(self.dtype).removeprefix("torch.")


def dtype_to_proto(dtype: torch.dtype | str) -> int:
    name = dtype_name(dtype)
    if name is None:
        raise InvalidArgument(f"Cannot send a {dtype} tensor; use one of {', '.join(DTYPE_CODES)}.")
    return DTYPE_CODES[name]


def dtype_from_proto(code: int) -> str:
    """The wire's dtype name for a DType code."""
    try:
        return _NAMES_BY_CODE[code]
    except KeyError:
        raise InvalidArgument(
            f"Unsupported tensor dtype code {code}; send bfloat16, float16 or float32 "
            "(zimage.tensor.v1.DType)."
        ) from None


def payload_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as a flat memoryview; copies only if the tensor is not already contiguous on CPU."""
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


def describe(tensor: torch.Tensor) -> tuple[TensorMeta, memoryview]:
    """Returns the header fields for `tensor` and the bytes to send after it."""
    dtype_to_proto(tensor.dtype)  # rejects dtypes the wire does not carry
    payload = payload_view(tensor)
    return _meta(tensor, payload), payload


def describe_bytes(dtype: str, shape: tuple[int, ...], payload: bytes | memoryview) -> TensorMeta:
    """The header fields of a tensor held as its bytes (the SDK's, which needs no torch)."""
    dtype_to_proto(dtype)
    expected = math.prod(shape) * ITEM_SIZES[dtype]
    if memoryview(payload).nbytes != expected:
        raise InvalidArgument(
            f"A {dtype} tensor of shape {list(shape)} holds {expected} bytes, not {memoryview(payload).nbytes}."
        )
    return TensorMeta(dtype=dtype, shape=tuple(shape), byte_length=expected, blake3=checksum(payload))


@dataclass(frozen=True)
class FrozenTensor:
    """A tensor's header fields and its bytes, already written as the chunk messages that go on the wire
    (encode_chunk_message): `bytes` cannot change, so the checksum stays true however often it is sent, and
    a send copies nothing."""

    meta: TensorMeta
    chunk_messages: tuple[bytes, ...]


def freeze(tensor: torch.Tensor) -> FrozenTensor:
    """Copies, chunks and hashes `tensor` once, for a tensor sent many times (the encoder's cache)."""
    dtype_to_proto(tensor.dtype)
    payload = payload_view(tensor)
    return FrozenTensor(_meta(tensor, payload), tuple(chunk_messages(payload)))


def checksum(payload: bytes | memoryview, algorithm: str = "blake3") -> str:
    """The hex checksum of `payload`: BLAKE3, the wire's; "sha256" for what versions before it wrote."""
    if algorithm == "sha256":
        return hashlib.sha256(payload).hexdigest()
    return blake3(payload).hexdigest()


def _meta(tensor: torch.Tensor, payload: bytes | memoryview) -> TensorMeta:
    return TensorMeta(
        dtype=str(dtype_name(tensor.dtype)),
        shape=tuple(tensor.shape),
        byte_length=memoryview(payload).nbytes,
        blake3=checksum(payload),
    )


def embedding_key(meta: TensorMeta) -> str:
    """Content key of a tensor (the generator's key for an upload): "b3-" and the BLAKE3 of its dtype, shape
    and the BLAKE3 of its bytes.

    Built from the checksum the wire already computes, so neither side hashes the bytes twice, and a
    client can tell which key an upload will get before sending it. BLAKE3 is collision-resistant, as a key
    for bytes a client chooses must be.
    """
    if not meta.blake3:
        raise ValueError("embedding_key needs the tensor's BLAKE3; TensorAssembler.finish() fills it in.")
    described = f"{meta.dtype_name}|{list(meta.shape)}|{meta.blake3}".encode()
    return EMBEDDING_KEY_PREFIX + blake3(described).hexdigest()


def iter_chunks(payload: bytes | memoryview, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    view = memoryview(payload)  # slicing a view copies nothing; bytes() then copies each chunk once
    for start in range(0, view.nbytes, chunk_bytes):
        yield bytes(view[start : start + chunk_bytes])


# UploadEmbeddingRequest and EncodeResponse carry a tensor's bytes as `bytes chunk = 2` in their oneof. Those
# messages are written and read here rather than by protobuf, whose runtime copies every chunk into a message
# and out of it again: two extra copies of the payload on each side. The bytes on the wire are the same, so
# peers that use protobuf for them read and write them as ever.
CHUNK_FIELD_NUMBER = 2
_CHUNK_TAG = bytes([CHUNK_FIELD_NUMBER << 3 | 2])  # wire type 2: length-delimited
# The calls that carry those messages: the SDK and the services use wire.write_message and
# wire.read_chunk_or as their serializers (tests/unit/test_wire.py checks the names against the protos).
ENCODE_METHOD = "/zimage.encoder.v1.EncoderService/Encode"
UPLOAD_EMBEDDING_METHOD = "/zimage.generator.v1.GeneratorService/UploadEmbedding"
CHUNK_MESSAGE_METHODS = (ENCODE_METHOD, UPLOAD_EMBEDDING_METHOD)


def encode_chunk_message(piece: bytes | memoryview) -> bytes:
    """The serialized message whose one field is `chunk = piece` (what SerializeToString gives), in one
    copy of `piece`."""
    length = memoryview(piece).nbytes
    prefix = bytearray(_CHUNK_TAG)
    while length >= 0x80:  # base-128 varint, low group first
        prefix.append(length & 0x7F | 0x80)
        length >>= 7
    prefix.append(length)
    return bytes(prefix) + piece


def chunk_messages(payload: memoryview) -> Iterator[bytes]:
    """`payload` as the chunk messages that follow its header, CHUNK_BYTES each (the last may be shorter)."""
    for start in range(0, payload.nbytes, CHUNK_BYTES):
        yield encode_chunk_message(payload[start : start + CHUNK_BYTES])


def decode_chunk_message(serialized: bytes) -> memoryview | None:
    """The chunk of a serialized message that holds a `chunk` field and nothing else, as a view into
    `serialized` (no copy); None for any other message, which protobuf then parses."""
    if not serialized.startswith(_CHUNK_TAG):
        return None
    length = shift = 0
    for offset in range(1, min(len(serialized), 11)):  # a 64-bit varint takes at most 10 bytes
        byte = serialized[offset]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            start = offset + 1
            return memoryview(serialized)[start:] if len(serialized) - start == length else None
    return None


def write_message(message: bytes | Message) -> bytes:
    """A request or response serializer that passes messages encode_chunk_message already wrote."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def read_chunk_or(parse: Callable[[bytes], M]) -> Callable[[bytes], M | memoryview]:
    """A deserializer that gives a chunk message's bytes as a memoryview and parses any other message."""

    def read(serialized: bytes) -> M | memoryview:
        chunk = decode_chunk_message(serialized)
        return parse(serialized) if chunk is None else chunk

    return read


def meta_to_proto(meta: TensorMeta) -> tensor_pb2.TensorHeader:
    return tensor_pb2.TensorHeader(
        dtype=dtype_to_proto(meta.dtype),  # type: ignore[arg-type]
        shape=list(meta.shape),
        byte_length=meta.byte_length,
        blake3=meta.blake3,
        sha256=meta.sha256,
    )


def meta_from_proto(header: tensor_pb2.TensorHeader, max_bytes: int = MAX_TENSOR_BYTES) -> TensorMeta:
    """Checks a received header: known dtype, sane shape, a byte count that matches both, and a checksum
    (BLAKE3, or sha256 from an older sender)."""
    dtype = dtype_from_proto(header.dtype)
    if len(header.shape) > MAX_TENSOR_DIMS:
        raise InvalidArgument(
            f"Tensor shape has {len(header.shape)} dimensions; send at most {MAX_TENSOR_DIMS} "
            "(an embedding is [tokens, hidden_size])."
        )
    shape = tuple(int(dim) for dim in header.shape)
    if not shape or any(dim < 0 for dim in shape):
        raise InvalidArgument(f"Tensor shape {list(shape)} is invalid; send non-negative dimensions.")
    # Zero dimensions count as 1: [0, 2**40, 2**40] holds no bytes but still overflows torch's strides.
    size = math.prod(dim for dim in shape if dim) * ITEM_SIZES[dtype]
    if size > max_bytes:
        counted = " (counting zero dimensions as 1)" if 0 in shape else ""
        raise InvalidArgument(
            f"Tensor of shape {list(shape)} would take {size} bytes{counted}, over the {max_bytes}-byte "
            "limit; send a smaller tensor."
        )
    expected = math.prod(shape) * ITEM_SIZES[dtype]
    if header.byte_length != expected:
        raise InvalidArgument(
            f"Header says {header.byte_length} bytes but shape {list(shape)} in {dtype} "
            f"needs {expected}; the sender's header is inconsistent."
        )
    for field in ("blake3", "sha256"):
        value = getattr(header, field)
        if value and not _HEX_DIGEST.fullmatch(value):
            raise InvalidArgument(
                f"Tensor header's {field} must be 64 hex characters (got {len(value)} characters); send the "
                f"payload's hex {field}."
            )
    if not header.blake3 and not header.sha256:
        raise InvalidArgument(
            "Tensor header carries no checksum; send the payload's hex BLAKE3 in TensorHeader.blake3 "
            "(a sender this old sets neither; upgrade it)."
        )
    return TensorMeta(
        dtype=dtype,
        shape=shape,
        byte_length=expected,
        blake3=header.blake3.lower(),
        # Checked only when blake3 is absent (an older sender); kept out of the meta otherwise.
        sha256="" if header.blake3 else header.sha256.lower(),
    )


class TensorAssembler:
    """Collects one tensor's chunks, hashing each as it arrives, and checks it when complete.

    The buffer grows as chunks arrive rather than being preallocated from the header: a sender that
    announces 256 MiB and then stalls must not make the receiver hold 256 MiB.
    """

    def __init__(self, meta: TensorMeta) -> None:
        self.meta = meta
        self._buffer = bytearray()
        self._received = 0
        # BLAKE3 always, so the tensor has a key whatever its sender checked it with; sha256 as well only for
        # an older sender's header.
        self._blake3 = blake3()
        self._sha256 = None if meta.blake3 else hashlib.sha256()

    @property
    def complete(self) -> bool:
        return self._received == self.meta.byte_length

    def add(self, chunk: bytes | memoryview) -> None:
        end = self._received + len(chunk)
        if end > self.meta.byte_length:
            raise InvalidArgument(
                f"Received {end} bytes for a tensor announced as {self.meta.byte_length}; "
                "the sender sent more data than its header said."
            )
        self._buffer += chunk
        self._blake3.update(chunk)
        if self._sha256 is not None:
            self._sha256.update(chunk)
        self._received = end

    def finish(self) -> torch.Tensor:
        """The checked tensor; DataLoss if its bytes do not match the header's checksum. Afterwards `meta`
        holds the bytes' BLAKE3 even when the sender gave only sha256."""
        payload = self.finish_bytes()
        import torch

        dtype = torch_dtype(self.meta.dtype_name)
        if self.meta.byte_length == 0:
            return torch.empty(self.meta.shape, dtype=dtype)
        return torch.frombuffer(payload, dtype=dtype).reshape(self.meta.shape)

    def finish_bytes(self) -> bytearray:
        """The checked bytes, as `finish` checks them, without torch (the SDK's receiving side)."""
        if not self.complete:
            raise InvalidArgument(
                f"Tensor stream ended after {self._received} of {self.meta.byte_length} bytes; "
                "the transfer was cut short. Send it again."
            )
        digest = self._blake3.hexdigest()
        if self._sha256 is None:
            if digest != self.meta.blake3:
                raise DataLoss(
                    "Tensor bytes do not match their BLAKE3: the data was corrupted. Send it again."
                )
        elif self._sha256.hexdigest() != self.meta.sha256:
            raise DataLoss("Tensor bytes do not match their sha256: the data was corrupted. Send it again.")
        else:
            self.meta = replace(self.meta, blake3=digest)
        return self._buffer
