"""DyPE (Dynamic Position Extrapolation): RoPE frequencies for images larger than the DiT was trained on,
changed at every denoising step.

Source: Issachar et al., "DyPE: Dynamic Position Extrapolation for Ultra High Resolution Diffusion",
arXiv 2510.20766, and the public ComfyUI-DyPE node (github.com/wildminder/ComfyUI-DyPE, src/rope.py and
src/base.py), whose `vision_yarn` method llm-dit recommends for Z-Image. Early steps (high noise) settle the
image's low frequencies, late steps its fine detail; DyPE therefore extrapolates the positions strongly at the
start and less and less towards the end.

Z-Image's RoPE has three axes: caption position, image row, image column (`axes_dims`, 32/48/48 for Turbo,
base `rope_theta` 256). Only the two image axes change. For one image axis of d dimensions (frequency index
j = 0 .. d/2 - 1) on an image of L tokens along it (height or width / 16), trained at L0 tokens (1024 pixels,
64 tokens):

    s_axis = max(1, L / L0)                 s = max over both image axes of s_axis
    kappa(sigma) = dype_scale * sigma ** dype_exponent     (sigma: the step's noise level, 1 -> 0)
    base_j   = theta ** (-2j / d)

`vision_yarn` (YaRN's "NTK-by-parts" with DyPE's time-dependent ramps):

    linear_j = base_j / s_axis
    ntk_j    = (theta * s ** (d / (d - 2))) ** (-2j / d)
    r(n)     = d * ln(L0 / (2 pi n)) / (2 ln theta)            (the index that turns n times over L0 tokens)
    ramp(n0, n1)_j = clamp((j - lo) / (hi - lo), 0, 1),  lo = max(floor(r(n0)), 0),
                     hi = min(ceil(r(n1)), d - 1, d / 2)  (hi = lo + 0.001 when they meet)
    beta  = ramp(1.25 ** kappa, 0.75 ** kappa),   gamma = ramp(16 ** kappa, 2 ** kappa)
    f_j   = (linear_j * beta_j + ntk_j * (1 - beta_j)) * gamma_j + base_j * (1 - gamma_j)
    amplitude = 1 + 0.1 * ln(s) * sigma ** dype_exponent     (YaRN's attention scale, fading out)

`ntk`:  f_j = (theta * max(1, s ** (d / (d - 2)) ** kappa)) ** (-2j / d), amplitude 1.
`pi`:   f_j = base_j / max(1, s ** kappa), amplitude 1 (positions interpolated).

The rotation of a token at position p is amplitude * exp(i * p * f_j). Caption tokens sit at row and column
0, so only the amplitude reaches them, as in ComfyUI-DyPE, which embeds caption and image positions together.
At s = 1 (an image no larger than 1024 tokens a side) every method is the model's own RoPE, bit for bit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

DEFAULT_METHOD = "vision_yarn"
# ComfyUI-DyPE's defaults (the paper's lambda_s and lambda_t).
DEFAULT_SCALE = 2.0
DEFAULT_EXPONENT = 2.0
# The side Z-Image was trained at, in pixels: positions are extrapolated past it.
BASE_RESOLUTION = 1024
# YaRN's ramp bounds (Peng et al. 2023, section 3.3), in turns over the trained length.
BETA = (1.25, 0.75)
GAMMA = (16.0, 2.0)


@dataclass(frozen=True)
class Dype:
    method: str = DEFAULT_METHOD
    scale: float = DEFAULT_SCALE
    exponent: float = DEFAULT_EXPONENT

    def kappa(self, sigma: float) -> float:
        return self.scale * sigma**self.exponent


def _correction_index(turns: float, dim: int, theta: float, base_tokens: int) -> float:
    return dim * math.log(base_tokens / (2 * math.pi * turns)) / (2 * math.log(theta))


def _ramp(turns: tuple[float, float], dim: int, theta: float, base_tokens: int) -> torch.Tensor:
    low: float = max(math.floor(_correction_index(turns[0], dim, theta, base_tokens)), 0)
    high: float = min(math.ceil(_correction_index(turns[1], dim, theta, base_tokens)), dim - 1, dim // 2)
    if low == high:
        high += 0.001
    index = torch.arange(dim // 2, dtype=torch.float64)
    return ((index - low) / (high - low)).clamp(0, 1)


def axis_frequencies(
    dype: Dype, *, dim: int, theta: float, tokens: int, base_tokens: int, scale: float, sigma: float
) -> tuple[torch.Tensor, float]:
    """The d/2 frequencies (float64) and the amplitude of one image axis of `tokens` tokens at noise `sigma`.

    `scale` is s, the larger of the two axes' extrapolation factors; see the module docstring.
    """
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    base = theta**-exponents
    if scale <= 1:
        return base, 1.0
    kappa = dype.kappa(sigma)
    if dype.method == "ntk":
        factor = max(1.0, (scale ** (dim / (dim - 2))) ** kappa)
        return (theta * factor) ** -exponents, 1.0
    if dype.method == "pi":
        return base / max(1.0, scale**kappa), 1.0
    linear = base / max(1.0, tokens / base_tokens)
    ntk = (theta * scale ** (dim / (dim - 2))) ** -exponents
    beta = _ramp((BETA[0] ** kappa, BETA[1] ** kappa), dim, theta, base_tokens)
    gamma = _ramp((GAMMA[0] ** kappa, GAMMA[1] ** kappa), dim, theta, base_tokens)
    frequencies = (linear * beta + ntk * (1 - beta)) * gamma + base * (1 - gamma)
    amplitude = 1 + 0.1 * math.log(scale) * sigma**dype.exponent
    return frequencies, amplitude


class DypeRope:
    """Stands in for the transformer's RopeEmbedder while one batch denoises at `rows` x `columns` tokens.

    `sigma` is set before each transformer call. The caption axis keeps the model's own table.
    """

    def __init__(self, original: Any, dype: Dype, *, rows: int, columns: int, base_tokens: int) -> None:
        self.original = original
        self.dype = dype
        self.lengths = (rows, columns)
        self.base_tokens = base_tokens
        self.scale = max(1.0, rows / base_tokens, columns / base_tokens)
        self.sigma = 1.0

    def axis(self, index: int) -> tuple[torch.Tensor, float]:
        """Frequencies and amplitude of image axis `index` (1: rows, 2: columns) at the current sigma."""
        return axis_frequencies(
            self.dype,
            dim=self.original.axes_dims[index],
            theta=float(self.original.theta),
            tokens=self.lengths[index - 1],
            base_tokens=self.base_tokens,
            scale=self.scale,
            sigma=self.sigma,
        )

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        embedded = self.original(ids)
        if self.scale <= 1:
            return embedded
        dims = self.original.axes_dims
        parts = list(embedded.split([dim // 2 for dim in dims], dim=-1))
        for index in (1, 2):
            frequencies, amplitude = self.axis(index)
            # As diffusers' precompute_freqs_cis: the angles in float64, rounded to float32, then complex64.
            # MPS has no float64, so there they are computed on the CPU.
            where = torch.device("cpu") if ids.device.type == "mps" else ids.device
            positions = ids[:, index].to(where, torch.float64)
            angles = torch.outer(positions, frequencies.to(where)).float()
            rotations = torch.polar(torch.full_like(angles, amplitude), angles)
            parts[index] = rotations.to(embedded.device, torch.complex64)
        return torch.cat(parts, dim=-1)


@contextlib.contextmanager
def extrapolating(
    transformer: nn.Module,
    dype: Dype,
    *,
    width: int,
    height: int,
    patch: int,
    sharing: tuple[nn.Module, ...] = (),
) -> Iterator[DypeRope]:
    """The transformer embeds positions with DyPE for a `width` x `height` image until the block exits.

    `patch` is the pixels per token along a side (16 for Z-Image: the VAE's 8 times the DiT's patch of 2).
    `sharing` are modules that hold the transformer's RoPE embedder too (a ControlNet, by `from_transformer`):
    they get the same one. A hook reads each call's noise level: diffusers' Z-Image pipelines pass the
    transformer (and a ControlNet) 1 - sigma.
    """
    rope = DypeRope(
        transformer.rope_embedder,
        dype,
        rows=height // patch,
        columns=width // patch,
        base_tokens=BASE_RESOLUTION // patch,
    )

    def read_sigma(module: nn.Module, args: tuple, kwargs: dict) -> None:
        timesteps = args[1] if len(args) > 1 else kwargs["t"]
        rope.sigma = min(max(1.0 - float(timesteps.flatten()[0]), 0.0), 1.0)

    modules = (transformer, *sharing)
    handles = [module.register_forward_pre_hook(read_sigma, with_kwargs=True) for module in modules]
    # The RopeEmbedder is a plain object, not a module, so it can be swapped for the batch.
    for module in modules:
        setattr(module, "rope_embedder", rope)  # noqa: B010
    try:
        yield rope
    finally:
        for module in modules:
            setattr(module, "rope_embedder", rope.original)  # noqa: B010
        for handle in handles:
            handle.remove()
