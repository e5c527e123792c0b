"""A tensor held as its little-endian bytes, dtype name and shape, so the SDK needs no torch; and the
safetensors layout (8-byte header length, JSON header, raw bytes) written and read for such tensors."""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from zimage_split.common import wire
from zimage_split.common.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from torch import Tensor  # `torch` is also a method name in the classes below

# safetensors' names for the wire's dtypes.
SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_WIRE_DTYPES = {code: name for name, code in SAFETENSORS_DTYPES.items()}
# A header this large is not an embeddings file (safetensors itself refuses headers over 100 MB).
MAX_HEADER_BYTES = 100_000_000
_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


def is_torch_tensor(value: object) -> bool:
    """Whether `value` is a torch tensor, without importing torch (a caller who made one has imported it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def need_torch(what: str) -> None:
    """Raises FailedPrecondition naming the install when torch is missing; `what` says what needed it."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise FailedPrecondition(
            f"{what} needs torch, which this install lacks (the SDK's base install has no torch). Install it: "
            "pip install torch (or 'zimage-split[generator]'), or use .numpy()."
        )


@dataclass(frozen=True)
class TensorBytes:
    """A tensor as the wire carries it: `dtype` ("bfloat16", "float16" or "float32"), `shape`, and `data`,
    its little-endian bytes. `.numpy()` gives float32 values; `.torch()` the tensor in its own dtype."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def __post_init__(self) -> None:
        if self.dtype not in wire.ITEM_SIZES:
            raise InvalidArgument(
                f"A {self.dtype} tensor cannot be sent; use one of {', '.join(wire.ITEM_SIZES)}."
            )
        expected = math.prod(self.shape) * wire.ITEM_SIZES[self.dtype]
        if len(self.data) != expected:
            raise InvalidArgument(
                f"A {self.dtype} tensor of shape {list(self.shape)} holds {expected} bytes, not {len(self.data)}."
            )

    @classmethod
    def of(cls, value: TensorBytes | Tensor | np.ndarray) -> TensorBytes:
        """`value` as bytes: a TensorBytes as it is, a torch tensor (bfloat16, float16 or float32) or a numpy
        array (float16 or float32) copied."""
        if isinstance(value, TensorBytes):
            return value
        if isinstance(value, np.ndarray):
            name = next((n for n, d in _NUMPY_DTYPES.items() if value.dtype == d), None)
            if name is None:
                raise InvalidArgument(
                    f"A numpy array of {value.dtype} cannot be sent; pass float32 or float16 values."
                )
            return cls(
                name, tuple(value.shape), np.ascontiguousarray(value, dtype=_NUMPY_DTYPES[name]).tobytes()
            )
        if is_torch_tensor(value):
            meta, payload = wire.describe(value)
            return cls(meta.dtype_name, meta.shape, bytes(payload))
        raise InvalidArgument(
            f"Expected a tensor (torch or numpy) or TensorBytes, got {type(value).__name__}."
        )

    def __repr__(self) -> str:
        return f"TensorBytes({self.dtype}, {list(self.shape)}, {len(self.data)} bytes)"

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def numpy(self) -> np.ndarray:
        """The values as a float32 numpy array of `shape` (bfloat16 and float16 widen exactly)."""
        if self.dtype == "bfloat16":
            # bfloat16 is the top half of a float32: shift its 16 bits up and read them as float32.
            widened = np.frombuffer(self.data, dtype="<u2").astype(np.uint32) << 16
            return widened.view(np.float32).reshape(self.shape)
        return (
            np.frombuffer(self.data, dtype=_NUMPY_DTYPES[self.dtype]).astype(np.float32).reshape(self.shape)
        )

    def torch(self) -> Tensor:
        """The tensor in its own dtype, on the CPU; imports torch, so it needs torch installed."""
        need_torch("A torch tensor")
        import torch

        dtype = wire.torch_dtype(self.dtype)
        if not self.data:
            return torch.empty(self.shape, dtype=dtype)
        return torch.frombuffer(bytearray(self.data), dtype=dtype).reshape(self.shape)


def safetensors_bytes(tensors: Mapping[str, TensorBytes], metadata: Mapping[str, str]) -> bytes:
    """A safetensors file holding `tensors` and `metadata`, laid out as safetensors itself lays one out
    (tensors by decreasing element size, then name; the header padded with spaces to 8 bytes)."""
    names = sorted(tensors, key=lambda name: (-wire.ITEM_SIZES[tensors[name].dtype], name))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        tensor = tensors[name]
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    encoded = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return b"".join([struct.pack("<Q", len(encoded)), encoded, *(tensors[name].data for name in names)])


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file as its header gives it: `dtype` is safetensors' name ("BF16")."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def as_tensor_bytes(self) -> TensorBytes | None:
        """As TensorBytes, or None for a dtype the wire does not carry."""
        name = _WIRE_DTYPES.get(self.dtype)
        return None if name is None else TensorBytes(name, self.shape, self.data)


def read_safetensors(data: bytes) -> tuple[dict[str, str], dict[str, StoredTensor]]:
    """The metadata and tensors of a safetensors file's bytes; ValueError saying what is wrong otherwise."""
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes, shorter than the header's length")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(MAX_HEADER_BYTES, len(data) - 8):
        raise ValueError(f"the header claims {length} bytes, and the file has {len(data) - 8} after it")
    try:
        header = json.loads(data[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"the header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError("the header's __metadata__ is not a map of strings")
    body = memoryview(data)[8 + length :]
    tensors: dict[str, StoredTensor] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"tensor {name!r} has no dtype, shape and data_offsets") from None
        numbers = [*shape, start, end] if isinstance(shape, list) else [None]
        if not isinstance(dtype, str) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers
        ):
            raise ValueError(f"tensor {name!r} has a malformed dtype, shape or data_offsets")
        if not start <= end <= len(body):
            raise ValueError(f"tensor {name!r} lies at bytes {start}-{end}, past the file's {len(body)}")
        if len(shape) > wire.MAX_TENSOR_DIMS:
            raise ValueError(f"tensor {name!r} has {len(shape)} dimensions")
        size = wire.ITEM_SIZES.get(_WIRE_DTYPES.get(dtype, ""), 0)
        if size and math.prod(shape) * size != end - start:
            raise ValueError(
                f"tensor {name!r} of shape {shape} in {dtype} does not fill its {end - start} bytes"
            )
        tensors[name] = StoredTensor(dtype, tuple(shape), bytes(body[start:end]))
    return metadata, tensors
