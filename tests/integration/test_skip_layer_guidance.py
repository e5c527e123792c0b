"""Skip Layer Guidance on the tiny model's real DiT: at every step, the prediction the scheduler gets is the
formula computed with a copy of the transformer that has the skipped blocks removed, and through gRPC the
option reaches the image and its metadata."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from zimage_split.client import InvalidArgument
from zimage_split.dit_service.engine import DiTEngine, GenerationJob, GenerationParams
from zimage_split.dit_service.skip_layer_guidance import SkipLayerGuidance, _Skipped
from zimage_split.model_source import resolve_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> DiTEngine:
    return DiTEngine(resolve_model(str(tiny_model_dir)), device=CPU, dtype=torch.float32)


def embedding(tokens: int, seed: int, width: int = 16) -> torch.Tensor:
    """A prompt embedding for the tests' tiny model (caption width 16)."""
    return torch.randn(tokens, width, generator=torch.Generator().manual_seed(seed))


def without_blocks(transformer: nn.Module, layers: tuple[int, ...]) -> nn.Module:
    removed = copy.deepcopy(transformer)
    removed.layers = nn.ModuleList(block for index, block in enumerate(removed.layers) if index not in layers)
    return removed


@pytest.mark.parametrize("guidance", [0.0, 3.0], ids=["turbo", "cfg"])
def test_every_step_gets_the_formula_computed_with_the_blocks_removed(
    engine: DiTEngine, guidance: float
) -> None:
    slg = SkipLayerGuidance(scale=2.5, layers=(1,), start=0.0, stop=0.5)
    steps, batch = 6, 2
    transformer = engine.pipe.transformer
    plain, removed = copy.deepcopy(transformer), without_blocks(transformer, slg.layers)
    calls: list[tuple[tuple, dict, list[torch.Tensor]]] = []

    def capture(module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
        if not isinstance(module.layers[1], _Skipped):  # not SLG's own extra pass
            calls.append((args, kwargs, [prediction.clone() for prediction in output[0]]))

    jobs = [
        GenerationJob(
            GenerationParams(
                width=64, height=64, steps=steps, seed=seed, guidance_scale=guidance, skip_layer_guidance=slg
            ),
            embedding(7 + seed, seed),
            negative_prompt_embeds=embedding(3, 10 + seed) if guidance else None,
        )
        for seed in range(batch)
    ]
    handle = transformer.register_forward_hook(capture, with_kwargs=True)
    try:
        engine.generate(jobs)
    finally:
        handle.remove()

    assert len(calls) == steps
    active = [step for step in range(steps) if slg.active(step, steps)]
    assert active == [0, 1, 2]
    for step, (args, kwargs, guided) in enumerate(calls):
        latents, timesteps, captions = args[:3]
        assert len(guided) == (2 * batch if guidance else batch)
        # The same call as the pipeline's (positives and negatives together), so the same bits.
        predictions = plain(latents, timesteps, captions, **kwargs)[0]
        if step not in active:
            assert all(torch.equal(g, p) for g, p in zip(guided, predictions, strict=True))
            continue
        skipped = removed(latents[:batch], timesteps[:batch], captions[:batch], **kwargs)[0]
        deltas = [slg.scale * (predictions[j].float() - skipped[j].float()) for j in range(batch)]
        for index, (g, p) in enumerate(zip(guided, predictions, strict=True)):
            assert torch.equal(g, p.float() + deltas[index % batch]), f"step {step}, entry {index}"
        assert all(delta.abs().max() > 0 for delta in deltas)  # the blocks mattered, so the test can fail
    assert all(
        isinstance(block, nn.Module) and not isinstance(block, _Skipped) for block in transformer.layers
    )


def test_skip_layer_guidance_through_grpc(client: Any) -> None:
    tensor = embedding(9, 1)
    plain = client.generate(embeddings=tensor, seed=3, width=64, height=64, steps=4)
    guided = client.generate(
        embeddings=tensor, seed=3, width=64, height=64, steps=4, slg_scale=3.0, slg_layers=[1], slg_start=0.0
    )
    assert not np.array_equal(np.asarray(plain), np.asarray(guided))
    assert guided.info["skip_layer_guidance"]["layers"] == [1]
    assert guided.info["skip_layer_guidance"]["scale"] == 3.0
    assert plain.info["skip_layer_guidance"] is None and "slg" not in plain.text
    assert "SLG scale: 3, SLG layers: 1, SLG steps: 0-0.5" in guided.text["parameters"]
    assert client.generator_info()["dit_layers"] == 2
    # Z-Image's default blocks 7-12 are not in the tiny DiT: the request must name its own.
    with pytest.raises(InvalidArgument, match=r"default slg_layers \(7-12, .*blocks 0 to 1; name slg_layers"):
        client.generate(embeddings=tensor, seed=3, width=64, height=64, steps=4, slg_scale=3.0)
