"""The encoder's linear layers with their weights packed once for oneDNN, on a CPU.

A plain `nn.Linear` in bf16 or fp32 on a CPU hands its weight to oneDNN in the ordinary layout, and oneDNN
reorders it into its blocked layout on every call. A prompt is tens to hundreds of rows, so that reorder is
a large share of each call: packing once made the encoder's matmuls 1.3x to 1.9x faster at 40 to 150 rows
on a Xeon with AMX (bf16), 1.15x to 1.3x in fp32 (benchmarks/README.md, `encoder_host`). The packed result
is what inductor's CPU freezing pass uses (`mkldnn._linear_pointwise`).

Packing makes a copy; each original weight is dropped as soon as its copy exists, and where it lived in a
memory-mapped safetensors shard that other tensors still map, its pages are handed back to the kernel, so
the encoder never holds two copies of more than one weight.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys

import torch

logger = logging.getLogger(__name__)

# The row count oneDNN is told to expect when it picks the packed layout: a typical prompt.
ROWS_HINT = 128
_MADV_DONTNEED = 4


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch can pack linear weights for oneDNN on `device` in `dtype`."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(torch.nn.Module):
    """`y = x @ W.T + b` with W held in oneDNN's packed layout (an opaque tensor, not a Parameter)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), ROWS_HINT)
        self.bias = (
            None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed for oneDNN"


def pack_linear_layers(module: torch.nn.Module) -> int:
    """Replaces every `nn.Linear` under `module` with a PackedLinear, one at a time; returns how many."""
    count = 0
    others = _byte_ranges(module)
    mapped_files = _file_mappings()
    # Parents only: a list that held the Linear modules themselves would keep every original weight alive
    # until the last one is packed (measured: 1.9x the weights at the peak instead of 1.0x).
    parents = [m for m in module.modules() if type(m) is not torch.nn.Linear]
    for parent in parents:
        names = [name for name, child in parent.named_children() if type(child) is torch.nn.Linear]
        for name in names:
            linear = getattr(parent, name)
            setattr(parent, name, PackedLinear(linear))
            weight = linear.weight
            del linear
            _release_pages(weight, others, mapped_files)
            del weight
            count += 1
    return count


def _byte_ranges(module: torch.nn.Module) -> list[tuple[int, int, int]]:
    """(start, end, id) of the bytes of every parameter and buffer: tied or overlapping tensors show here."""
    return [
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), id(t))
        for t in [*module.parameters(), *module.buffers()]
    ]


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's memory-mapped files (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def _release_pages(
    weight: torch.Tensor, others: list[tuple[int, int, int]], mapped_files: list[tuple[int, int]]
) -> None:
    """Hands back the resident pages of a weight nothing uses any more, when freeing it would not.

    A weight with an anonymous storage of its own is freed with its last reference. One that lives in a
    larger storage, or in a memory-mapped safetensors file (which safetensors keeps mapped while any tensor
    of the file lives), would otherwise stay resident: madvise(MADV_DONTNEED) on the whole pages inside its
    bytes drops them. Those pages hold only this weight (no other tensor of the module overlaps them), and
    nothing reads it again (a mapped file would reload them; anonymous pages would read as zeros).
    """
    size = weight.numel() * weight.element_size()
    address = weight.data_ptr()
    in_file = any(lo <= address and address + size <= hi for lo, hi in mapped_files)
    if not sys.platform.startswith("linux") or (weight.untyped_storage().nbytes() <= size and not in_file):
        return
    page = mmap.PAGESIZE
    start = (address + page - 1) // page * page
    end = (address + size) // page * page
    if end <= start or any(lo < end and start < hi for lo, hi, key in others if key != id(weight)):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) != 0:
        logger.debug(
            "madvise(MADV_DONTNEED) failed with errno %d; the pages stay resident", ctypes.get_errno()
        )
