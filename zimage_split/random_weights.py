"""Builds a model from its config with random weights drawn directly on the target device and dtype.

This is how `--model full` (the real architecture, no 31 GB download) and any folder marked with
`random_weights.json` load: nothing is read from disk but the configs.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

MARKER = "random_weights.json"
# transformers' initializer_range. Outputs stay finite through the real model's 30 (DiT) and 36 (Qwen3)
# bf16 layers, while PyTorch's default init has no such guarantee for every module.
INIT_STD = 0.02
# Each chunk of a parameter gets its own generator, so weights depend on the seed, the parameter's name,
# the device and the dtype only: not on the build order, the layers kept, or how many threads draw them.
CHUNK_ELEMENTS = 1 << 24


def write_marker(folder: Path, seed: int) -> None:
    """Marks `folder` as configs only: loaders build its models with random weights from `seed`."""
    marker = {
        "seed": seed,
        "about": "zimage-split: no weight files; every model is built from its config with random weights "
        "(the same for the same seed, device and dtype). Images are noise; use it to time the real "
        "architecture.",
    }
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def read_marker(folder: Path) -> int | None:
    """The seed of a random-weights folder, or None for a folder with real weights."""
    path = folder / MARKER
    if not path.is_file():
        return None
    seed = json.loads(path.read_text()).get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"{path} must hold an integer 'seed' (got {seed!r}).")
    return seed


def _is_diffusers(model_class: Any) -> bool:
    # A diffusers class comes with diffusers imported; an encoder-only install has no diffusers to import.
    configuration = sys.modules.get("diffusers.configuration_utils")
    return (
        configuration is not None
        and isinstance(model_class, type)
        and issubclass(model_class, configuration.ConfigMixin)
    )


def load_config(model_class: Any, location: str, subfolder: str) -> Any:
    """A diffusers model's config dict, or a transformers `PretrainedConfig` (for `AutoModel` and the like)."""
    if _is_diffusers(model_class):
        return model_class.load_config(location, subfolder=subfolder)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(location, subfolder=subfolder)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # As from_pretrained(dtype=...) does: modules create their parameters in `dtype`, while buffers that
    # ask for float32 (RoPE frequencies) keep it.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def meta_model(model_class: Any, config: Any, *, dtype: torch.dtype) -> torch.nn.Module:
    """The model for `config` with its parameters on the meta device: no memory, no init, instant.

    Cut it down (drop layers) before `materialize`, and what was dropped never takes memory.
    """
    with torch.device("meta"), _default_dtype(dtype):
        if not _is_diffusers(model_class):
            return model_class.from_config(config, dtype=dtype)
        model = model_class.from_config(config)
    # Parameters created with an explicit dtype get the one diffusers' from_pretrained(dtype=...) gives them.
    keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, parameter in model.named_parameters():
        wanted = torch.float32 if any(pattern in name for pattern in keep_fp32) else dtype
        if parameter.is_floating_point() and parameter.dtype != wanted:
            parameter.data = parameter.data.to(wanted)
    return model


def _seed_for(seed: int, component: str, name: str, chunk: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{component}\0{name}\0{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _draw(target: torch.Tensor, seed: int) -> None:
    generator = torch.Generator(device=target.device).manual_seed(seed)
    target.normal_(mean=0.0, std=INIT_STD, generator=generator)


@torch.no_grad()
def materialize(
    model: torch.nn.Module, *, seed: int, component: str, device: torch.device | str
) -> torch.nn.Module:
    """Allocates a meta model's parameters on `device` (in their dtype) and fills them with random weights.

    Biases are 0, 1-D weights (the norms' scales) are 1, everything else is normal(0, 0.02) drawn from a
    generator on `device`: so the same seed, component name, device and dtype give the same weights in
    any process, and a model with its last layers dropped has the same weights in the layers it keeps.
    Non-persistent buffers (RoPE frequencies) are recomputed. Returns the model, in eval mode.
    """
    device = torch.device(device)
    model.to_empty(device=device)
    draws: list[tuple[torch.Tensor, int]] = []
    for name, parameter in model.named_parameters():
        if name.endswith("bias"):
            parameter.zero_()
        elif parameter.dim() == 1:
            parameter.fill_(1.0)
        else:
            flat = parameter.detach().view(-1)  # to_empty allocates dense, contiguous tensors
            for index, chunk in enumerate(flat.split(CHUNK_ELEMENTS)):
                draws.append((chunk, _seed_for(seed, component, name, index)))
    if device.type == "cpu":
        # CPU random number generation is single-threaded per call; chunks have their own generators,
        # so drawing them on all cores gives the same weights, several times faster.
        with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
            list(pool.map(lambda draw: _draw(*draw), draws))
    else:
        for chunk, chunk_seed in draws:
            _draw(chunk, chunk_seed)
    _rebuild_buffers(model)
    return model.eval()


def _rebuild_buffers(model: torch.nn.Module) -> None:
    init_weights: Callable[[torch.nn.Module], None] | None = getattr(model, "_init_weights", None)
    for module in model.modules():
        names = [name for name, _ in module.named_buffers(recurse=False)]
        if not names:
            continue
        if init_weights is not None and hasattr(module, "original_inv_freq"):
            init_weights(module)  # transformers recomputes rotary frequencies from the config
        else:
            raise RuntimeError(
                f"Cannot rebuild the buffers {names} of {type(module).__name__} after random init; "
                "teach zimage_split/random_weights.py how."
            )


def build_random_model(
    model_class: Any,
    config: Any,
    *,
    seed: int,
    component: str,
    device: torch.device | str,
    dtype: torch.dtype,
) -> torch.nn.Module:
    """`model_class` (a diffusers model class, or `AutoModel`) for `config`, with random weights built on
    `device` in `dtype`. The same arguments give the same weights in any process."""
    return materialize(
        meta_model(model_class, config, dtype=dtype), seed=seed, component=component, device=device
    )
