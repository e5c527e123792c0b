"""Tensors on the wire: a checked header plus raw little-endian bytes in chunks of at most 1 MiB."""

from __future__ import annotations

import functools
import hashlib
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    import torch

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("zimage-split's wire format is little-endian; this platform is not.")


@functools.cache
def _torch_dtypes() -> dict[int, torch.dtype]:
    # torch is imported by the first tensor, not by this module: a client that only sends prompts and
    # receives images (the SDK's common path, the CLI's client commands) never loads it.
    import torch

    return {code: getattr(torch, name) for name, code in DTYPE_CODES.items()}


def dtype_name(dtype: torch.dtype) -> str | None:
    """The wire's name for a torch dtype ("bfloat16", ...), or None if the wire does not carry it."""
    name = str(dtype).removeprefix("torch.")
    return name if name in DTYPE_CODES else None


@dataclass(frozen=True)
class TensorMeta:
    """What a receiver needs to rebuild and check a tensor."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    byte_length: int
    sha256: str

    @property
    def dtype_name(self) -> str:
        """ "bfloat16", "float16" or "float32": a TensorMeta only ever holds a dtype the wire carries."""
        return str(self.dtype).removeprefix("torch.")


def dtype_to_proto(dtype: torch.dtype) -> int:
    name = dtype_name(dtype)
    if name is None:
        raise InvalidArgument(f"Cannot send a {dtype} tensor; use one of {', '.join(DTYPE_CODES)}.")
    return DTYPE_CODES[name]


def dtype_from_proto(code: int) -> torch.dtype:
    try:
        return _torch_dtypes()[code]
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


@dataclass(frozen=True)
class FrozenTensor:
    """A tensor's header fields and a copy of its bytes: `bytes` cannot change, so the sha256 stays true
    however often it is sent."""

    meta: TensorMeta
    data: bytes


def freeze(tensor: torch.Tensor) -> FrozenTensor:
    """Copies and hashes `tensor` once, for a tensor sent many times (the encoder's cache)."""
    dtype_to_proto(tensor.dtype)
    data = bytes(payload_view(tensor))
    return FrozenTensor(_meta(tensor, data), data)


def _meta(tensor: torch.Tensor, payload: bytes | memoryview) -> TensorMeta:
    return TensorMeta(
        dtype=tensor.dtype,
        shape=tuple(tensor.shape),
        byte_length=memoryview(payload).nbytes,
        sha256=hashlib.sha256(payload).hexdigest(),
    )


def embedding_key(meta: TensorMeta) -> str:
    """Content key of a tensor (the generator's key for an upload): sha256 over dtype, shape and bytes' sha256.

    Built from the checksum the wire already computes, so neither side hashes the bytes twice, and a
    client can tell which key an upload will get before sending it.
    """
    return hashlib.sha256(f"{meta.dtype_name}|{list(meta.shape)}|{meta.sha256}".encode()).hexdigest()


def iter_chunks(payload: bytes | memoryview, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    view = memoryview(payload)  # slicing a view copies nothing; bytes() then copies each chunk once
    for start in range(0, view.nbytes, chunk_bytes):
        yield bytes(view[start : start + chunk_bytes])


def meta_to_proto(meta: TensorMeta) -> tensor_pb2.TensorHeader:
    return tensor_pb2.TensorHeader(
        dtype=dtype_to_proto(meta.dtype),  # type: ignore[arg-type]
        shape=list(meta.shape),
        byte_length=meta.byte_length,
        sha256=meta.sha256,
    )


def meta_from_proto(header: tensor_pb2.TensorHeader, max_bytes: int = MAX_TENSOR_BYTES) -> TensorMeta:
    """Checks a received header: known dtype, sane shape, and a byte count that matches both."""
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
    size = math.prod(dim for dim in shape if dim) * dtype.itemsize
    if size > max_bytes:
        counted = " (counting zero dimensions as 1)" if 0 in shape else ""
        raise InvalidArgument(
            f"Tensor of shape {list(shape)} would take {size} bytes{counted}, over the {max_bytes}-byte "
            "limit; send a smaller tensor."
        )
    expected = math.prod(shape) * dtype.itemsize
    if header.byte_length != expected:
        raise InvalidArgument(
            f"Header says {header.byte_length} bytes but shape {list(shape)} in {dtype_name(dtype)} "
            f"needs {expected}; the sender's header is inconsistent."
        )
    if len(header.sha256) != 64:
        raise InvalidArgument("Tensor header needs the payload's hex sha256 (64 characters).")
    return TensorMeta(dtype=dtype, shape=shape, byte_length=expected, sha256=header.sha256.lower())


class TensorAssembler:
    """Collects one tensor's chunks and checks it when complete.

    The buffer grows as chunks arrive rather than being preallocated from the header: a sender that
    announces 256 MiB and then stalls must not make the receiver hold 256 MiB.
    """

    def __init__(self, meta: TensorMeta) -> None:
        self.meta = meta
        self._buffer = bytearray()
        self._received = 0
        self._hash = hashlib.sha256()

    @property
    def complete(self) -> bool:
        return self._received == self.meta.byte_length

    def add(self, chunk: bytes) -> None:
        end = self._received + len(chunk)
        if end > self.meta.byte_length:
            raise InvalidArgument(
                f"Received {end} bytes for a tensor announced as {self.meta.byte_length}; "
                "the sender sent more data than its header said."
            )
        self._buffer += chunk
        self._hash.update(chunk)
        self._received = end

    def finish(self) -> torch.Tensor:
        if not self.complete:
            raise InvalidArgument(
                f"Tensor stream ended after {self._received} of {self.meta.byte_length} bytes; "
                "the transfer was cut short. Send it again."
            )
        if self._hash.hexdigest() != self.meta.sha256:
            raise DataLoss("Tensor bytes do not match their sha256: the data was corrupted. Send it again.")
        import torch

        if self.meta.byte_length == 0:
            return torch.empty(self.meta.shape, dtype=self.meta.dtype)
        return torch.frombuffer(self._buffer, dtype=self.meta.dtype).reshape(self.meta.shape)
