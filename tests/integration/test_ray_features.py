"""Per-request options through 2 Ray replicas of the tiny model: a ControlNet (with and without a mask), the
schedule shift, Skip Layer Guidance, multi-pass and DyPE give the same files as the in-process generator, sent
together so that the replicas batch what they can."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import start_generator
from zimage_split.client import AsyncClient
from zimage_split.dit_service.config import RayOptions
from zimage_split.dit_service.controlnets import ControlNetSpec
from zimage_split.tiny_model import build_tiny_controlnet

# 128: a first pass at half the size is still 64, the smallest side.
SIDE = 128


def noise(seed: int, mode: str = "RGB") -> Image.Image:
    shape = (SIDE, SIDE, 3) if mode == "RGB" else (SIDE, SIDE)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode)


@pytest.fixture(scope="module")
def generators(loop_thread, tiny_model_dir, tmp_path_factory):  # type: ignore[no-untyped-def]
    """The same generator twice: in-process, and over 2 Ray replicas that each load the ControlNet."""
    controlnet = build_tiny_controlnet(tmp_path_factory.mktemp("ray-controlnet") / "union", seed=5)
    specs = (ControlNetSpec("union", str(controlnet)),)
    local = start_generator(loop_thread, tiny_model_dir, None, controlnets=specs)
    # The replicas compute with as many torch threads as this process: with 1 thread against 2, img2img (the
    # second pass) moved by 1/255 while everything else stayed byte-identical (docs/ARCHITECTURE.md).
    options = RayOptions(
        address="local",
        replicas=2,
        max_batch_size=4,
        max_batch_wait_ms=100,
        cpus_per_replica=0.5,
        torch_threads=torch.get_num_threads(),
    )
    ray = start_generator(loop_thread, tiny_model_dir, None, ray=options, controlnets=specs)
    yield local, ray
    loop_thread.run(ray.stop(grace=0), timeout=120)
    loop_thread.run(local.stop(grace=0))


VARIANTS: list[dict[str, Any]] = [
    {"controlnet": "union", "control_image": noise(1), "controlnet_scale": 0.6},
    {"controlnet": "union", "control_image": noise(2)},
    {"controlnet": "union", "control_image": noise(3), "init_image": noise(4), "mask": noise(5, "L")},
    {"shift": 1.5},
    {"slg_scale": 2.5, "slg_layers": [1], "slg_start": 0.0},
    {"passes": [{"scale": 0.5}, {"scale": 1, "strength": 0.5}]},
    # DyPE only acts past 1024 pixels a side; latents out, so no large VAE decode.
    {"dype": True, "width": 1088, "height": 1088, "steps": 2, "output_format": "latent"},
    {},
]


def run_all(port: int) -> list[tuple[bytes, dict[str, Any]]]:
    async def together() -> list[tuple[bytes, dict[str, Any]]]:
        prompt = torch.randn(7, 16, generator=torch.Generator().manual_seed(7))
        async with AsyncClient(generator=f"127.0.0.1:{port}", timeout=120) as client:
            images = await asyncio.gather(
                *(
                    client.generate(
                        embeddings=prompt,
                        **({"seed": 4, "width": SIDE, "height": SIDE, "steps": 3} | variant),
                    )
                    for variant in VARIANTS
                )
            )
        return [(image.info["file_bytes"], image.info) for image in images]

    return asyncio.run(together())


def test_ray_replicas_make_the_local_generators_files(generators) -> None:  # type: ignore[no-untyped-def]
    local, ray = generators
    on_ray, in_process = run_all(ray.port), run_all(local.port)
    assert [data for data, _ in on_ray] == [data for data, _ in in_process]
    assert len({data for data, _ in on_ray}) == len(VARIANTS)  # each option changed the result
    assert {info["replica"] for _, info in on_ray} != {info["replica"] for _, info in in_process}
    assert on_ray[0][1]["controlnet"] == {"name": "union", "scale": pytest.approx(0.6)}
    assert on_ray[4][1]["skip_layer_guidance"]["layers"] == [1] and on_ray[3][1]["shift"] == 1.5
    assert on_ray[6][1]["dype"] == {"method": "vision_yarn", "scale": 2.0, "exponent": 2.0}
