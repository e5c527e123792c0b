"""Device and dtype choice shared by both services' command lines."""

from __future__ import annotations

import torch

from zimage_split.common.errors import InvalidArgument
from zimage_split.common.vocabulary import DTYPES as DTYPE_NAMES

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` means cuda, then mps, then cpu."""
    if requested != "auto":
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise InvalidArgument(
                f"Unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps."
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidArgument(
                f"--device {requested}: CUDA is not available on this host; use cpu or auto."
            )
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise InvalidArgument(
                f"--device {requested}: MPS is not available on this host; use cpu or auto."
            )
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def parse_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` means bfloat16 on CUDA and float32 elsewhere (bf16 convolutions are slow on CPUs)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidArgument(f"Unknown dtype {name!r}; use auto, {', '.join(DTYPES)}.") from None
