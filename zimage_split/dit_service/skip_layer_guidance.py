"""Skip Layer Guidance (SLG): steer each prediction away from the DiT's own prediction with some blocks left out.

On the steps where it is active, the DiT runs once more on the positive prompts with the blocks `layers`
skipped (each returns its input), and every prediction of the step moves by

    delta = scale * (pred_positive - pred_skipped)

so without guidance the step's prediction is pred + scale * (pred - pred_skipped), the formula of
StabilityAI's SD3.5 reference (github.com/Stability-AI/sd3.5, `skip_layer_cfg`) and of llm-dit for Z-Image.
With guidance the same delta is added to the positive and the negative prediction, which leaves their
difference alone: the guided prediction is then diffusers' CFG of the two plus delta, again as SD3.5 does.
SLG is active on step i (0-based) of n when start <= i / n < stop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# llm-dit's defaults for Z-Image: the middle blocks 7-12 of the 30, from 5% to 50% of the steps.
DEFAULT_LAYERS = (7, 8, 9, 10, 11, 12)
DEFAULT_START = 0.05
DEFAULT_STOP = 0.5


@dataclass(frozen=True)
class SkipLayerGuidance:
    scale: float
    layers: tuple[int, ...] = DEFAULT_LAYERS
    start: float = DEFAULT_START
    stop: float = DEFAULT_STOP

    def active(self, step: int, steps: int) -> bool:
        return self.start <= step / steps < self.stop

    def active_steps(self, steps: int) -> int:
        return sum(self.active(step, steps) for step in range(steps))


class _Skipped(nn.Module):
    """Stands in for a skipped block: the hidden states pass through unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@contextlib.contextmanager
def blocks_skipped(transformer: nn.Module, layers: tuple[int, ...]) -> Iterator[None]:
    """The transformer's main blocks `layers` pass their input through until the block exits."""
    blocks: nn.ModuleList = transformer.layers  # type: ignore[assignment]
    kept = {index: blocks[index] for index in layers}
    try:
        for index in layers:
            blocks[index] = _Skipped()
        yield
    finally:
        for index, block in kept.items():
            blocks[index] = block


@contextlib.contextmanager
def guiding(
    transformer: nn.Module, guidance: SkipLayerGuidance, *, batch_size: int, steps: int
) -> Iterator[None]:
    """Applies `guidance` to the transformer's calls during one denoising loop of `steps` steps.

    diffusers' Z-Image pipelines call the transformer once per step, positives first: the `batch_size`
    positive entries, then as many negatives when the step runs CFG. The hook counts those calls.
    """
    step = 0
    skipping = False

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple | None:
        nonlocal step, skipping
        if skipping:  # the extra pass itself
            return None
        current, step = step, step + 1
        if not guidance.active(current, steps):
            return None
        latents, timesteps, captions = args[0], args[1], args[2]
        skipping = True
        try:
            with blocks_skipped(module, guidance.layers):
                skipped = module(
                    latents[:batch_size], timesteps[:batch_size], captions[:batch_size], *args[3:], **kwargs
                )[0]
        finally:
            skipping = False
        predictions = [prediction.float() for prediction in output[0]]
        deltas = [guidance.scale * (predictions[j] - skipped[j].float()) for j in range(batch_size)]
        guided = [prediction + deltas[j % batch_size] for j, prediction in enumerate(predictions)]
        return (guided, *output[1:])

    # Prepended, so that any other hook on the transformer sees the guided prediction.
    handle = transformer.register_forward_hook(hook, with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()
