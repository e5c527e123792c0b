"""ControlNet per request on the tiny model with a tiny random ControlNet: through real gRPC the image equals
diffusers' ZImageControlNetPipeline (and ZImageControlNetInpaintPipeline with a mask) for the same embeddings,
seed and images; a single-file ControlNet gives what its diffusers folder gives; batches equal single images;
bad ControlNets fail at start and bad requests get clear errors."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import start_generator
from tests.pictures import mask_image, noise_image, png
from zimage_split.client import Client, InvalidArgument, NotFound
from zimage_split.common.errors import InvalidArgument as ServerInvalidArgument
from zimage_split.dit_service.controlnets import ControlNetSpec, check_controlnet_specs, parse_controlnet_flag
from zimage_split.dit_service.engine import GenerationJob, GenerationParams
from zimage_split.tiny_model import build_tiny_controlnet

SIZE = 64
STEPS = 4


def embedding(tokens: int, seed: int) -> torch.Tensor:
    """A prompt embedding for the tiny model (caption width 16)."""
    return torch.randn(tokens, 16, generator=torch.Generator().manual_seed(seed))


def pixels(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def controlnet_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("controlnets")
    return {
        # The same weights (seed 5) as a diffusers folder and as one Union-layout file.
        "union": build_tiny_controlnet(root / "union", seed=5),
        "file": build_tiny_controlnet(root / "union.safetensors", seed=5),
        "v1": build_tiny_controlnet(root / "v1.safetensors", seed=6, layout="1.0"),
    }


@pytest.fixture(scope="module")
def controlnet_generator(loop_thread, tiny_model_dir, controlnet_paths, encoder_fp32):  # type: ignore[no-untyped-def]
    specs = tuple(ControlNetSpec(name, str(path)) for name, path in controlnet_paths.items())
    server = start_generator(loop_thread, tiny_model_dir, encoder_fp32.port, controlnets=specs)
    yield server
    loop_thread.run(server.stop(grace=0))


@pytest.fixture
def client(controlnet_generator):  # type: ignore[no-untyped-def]
    with Client(generator=f"127.0.0.1:{controlnet_generator.port}", timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def references(tiny_model_dir: Path, controlnet_paths: dict[str, Path]):  # type: ignore[no-untyped-def]
    """diffusers' own ControlNet pipelines on the same model folder and the ControlNet's folder."""
    from diffusers import ZImageControlNetInpaintPipeline, ZImageControlNetModel, ZImageControlNetPipeline

    controlnet = ZImageControlNetModel.from_pretrained(str(controlnet_paths["union"]))
    plain = ZImageControlNetPipeline.from_pretrained(str(tiny_model_dir), controlnet=controlnet)
    inpaint = ZImageControlNetInpaintPipeline(**plain.components)
    for pipe in (plain, inpaint):
        pipe.set_progress_bar_config(disable=True)
    return plain, inpaint


@pytest.mark.parametrize(("guidance", "scale"), [(0.0, 0.6), (3.0, None)], ids=["turbo", "cfg-default-scale"])
def test_controlnet_equals_diffusers(client, references, guidance, scale) -> None:  # type: ignore[no-untyped-def]
    positive, negative = embedding(9, 1), embedding(4, 2)
    control = noise_image(seed=3)
    expected = references[0](
        prompt_embeds=[positive],
        negative_prompt_embeds=[negative] if guidance else None,
        control_image=control,
        controlnet_conditioning_scale=0.75 if scale is None else scale,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(11),
    ).images[0]
    request = {
        "embeddings": positive,
        "negative_embeddings": negative if guidance else None,
        "seed": 11,
        "steps": STEPS,
        "guidance_scale": guidance,
    }
    # No width or height: the control image's size.
    image = client.generate(**request, controlnet="union", control_image=png(control), controlnet_scale=scale)
    assert image.size == (SIZE, SIZE)
    assert np.array_equal(pixels(image), np.asarray(expected))
    plain = client.generate(**request, width=SIZE, height=SIZE)
    assert not np.array_equal(pixels(plain), pixels(image))  # the ControlNet mattered, so the test can fail
    used = 0.75 if scale is None else scale
    assert image.info["controlnet"] == {"name": "union", "scale": pytest.approx(used)}
    assert plain.info["controlnet"] is None and "ControlNet" not in plain.text["parameters"]
    assert f"ControlNet: union, ControlNet scale: {used:g}" in image.text["parameters"]


def test_controlnet_inpainting_equals_diffusers(client, references) -> None:  # type: ignore[no-untyped-def]
    positive = embedding(7, 4)
    start, mask, control = noise_image(seed=8), mask_image(), noise_image(seed=9)
    expected = references[1](
        prompt_embeds=[positive],
        image=start,
        mask_image=mask,
        control_image=control,
        controlnet_conditioning_scale=0.9,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(12),
    ).images[0]
    image = client.generate(
        embeddings=positive,
        init_image=png(start),
        mask=png(mask),
        controlnet="union",
        control_image=control,
        controlnet_scale=0.9,
        seed=12,
        steps=STEPS,
    )
    assert np.array_equal(pixels(image), np.asarray(expected))
    assert image.info["steps_run"] == STEPS and image.info["strength"] == 0


def test_a_single_file_controlnet_gives_what_its_folder_gives(client) -> None:  # type: ignore[no-untyped-def]
    request = {"embeddings": embedding(5, 6), "control_image": noise_image(seed=4), "seed": 2, "steps": STEPS}
    folder = client.generate(**request, controlnet="union")
    single = client.generate(**request, controlnet="file")
    assert np.array_equal(pixels(folder), pixels(single))
    info = {entry["name"]: entry for entry in client.generator_info()["controlnets"]}
    assert list(info) == ["union", "file", "v1"]
    assert info["union"]["takes_mask"] and info["file"]["takes_mask"] and not info["v1"].get("takes_mask")


def test_a_request_naming_no_controlnet_is_unchanged(client, reference_pipeline) -> None:  # type: ignore[no-untyped-def]
    positive = embedding(8, 7)
    expected = reference_pipeline(
        prompt_embeds=[positive],
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]
    image = client.generate(embeddings=positive, seed=5, width=SIZE, height=SIZE, steps=STEPS)
    assert np.array_equal(pixels(image), np.asarray(expected))


@pytest.mark.parametrize("inpaint", [False, True], ids=["controlnet", "controlnet-inpaint"])
def test_batched_controlnet_images_equal_single_ones(controlnet_generator, inpaint) -> None:  # type: ignore[no-untyped-def]
    engine = controlnet_generator.servicer.worker.engine
    params = GenerationParams(
        width=SIZE, height=SIZE, steps=STEPS, controlnet="union", controlnet_scale=0.8, inpaint=inpaint
    )
    jobs = [
        GenerationJob(
            dataclasses.replace(params, seed=seed),
            embedding(5 + 3 * seed, seed),
            control_image=noise_image(seed=20 + seed),
            init_image=noise_image(seed=30 + seed) if inpaint else None,
            mask_image=mask_image() if inpaint else None,
        )
        for seed in range(3)
    ]
    batched = [pixels(Image.open(io.BytesIO(image.data))) for image in engine.generate(jobs)]  # type: ignore[union-attr]
    alone = [pixels(Image.open(io.BytesIO(engine.generate([job])[0].data))) for job in jobs]  # type: ignore[union-attr]
    # As for every batch on the CPU (docs/ARCHITECTURE.md, Batching): the batched DiT forward takes other
    # kernel paths, so a pixel may move by 1/255; most are byte-identical.
    differences = [
        int(np.abs(b.astype(int) - a.astype(int)).max()) for b, a in zip(batched, alone, strict=True)
    ]
    assert max(differences) <= 1, differences
    assert len({image.tobytes() for image in alone}) == 3


def test_bad_controlnet_requests(client) -> None:  # type: ignore[no-untyped-def]
    base = {"embeddings": embedding(5, 1), "seed": 1, "steps": 2}
    control = noise_image()
    with pytest.raises(
        NotFound, match=r"No ControlNet 'pose' on this generator. Loaded: 'union', 'file', 'v1'"
    ):
        client.generate(**base, controlnet="pose", control_image=control)
    with pytest.raises(
        InvalidArgument, match=r"control image is 64x64, another shape than the 128x64 requested"
    ):
        client.generate(**base, width=128, height=64, controlnet="union", control_image=control)
    with pytest.raises(InvalidArgument, match=r"conditioning_scale must be between 0 and 10 \(got -0.5\)"):
        client.generate(**base, controlnet="union", control_image=control, controlnet_scale=-0.5)
    with pytest.raises(InvalidArgument, match=r"'v1' takes no inpainting mask"):
        client.generate(**base, controlnet="v1", control_image=control, init_image=control, mask=mask_image())
    with pytest.raises(InvalidArgument, match=r"only with a mask .*no Z-Image ControlNet img2img pipeline"):
        client.generate(**base, controlnet="union", control_image=control, init_image=control)
    with pytest.raises(InvalidArgument, match=r"strength does not apply with a ControlNet"):
        client.generate(
            **base,
            controlnet="union",
            control_image=control,
            init_image=control,
            mask=mask_image(),
            strength=0.5,
        )
    with pytest.raises(InvalidArgument, match=r"Skip Layer Guidance does not combine with a ControlNet"):
        client.generate(**base, controlnet="union", control_image=control, slg_scale=2.0, slg_layers=[1])
    with pytest.raises(InvalidArgument, match=r"passes do not take a ControlNet"):
        client.generate(
            **base, controlnet="union", control_image=control, passes=[{"scale": 0.5}, {"scale": 1}]
        )
    with pytest.raises(InvalidArgument, match=r"Pass `controlnet` \(its name\) and `control_image` together"):
        client.generate(**base, controlnet="union")
    # A control image of another size but the same shape is resized, as start images are.
    resized = client.generate(
        **base, width=SIZE, height=SIZE, controlnet="union", control_image=noise_image(96, 96)
    )
    assert resized.size == (SIZE, SIZE)


def test_bad_controlnets_fail_at_start(tmp_path: Path, loop_thread, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ServerInvalidArgument, match=r"give NAME=PATH"):
        parse_controlnet_flag("just-a-path")
    with pytest.raises(ServerInvalidArgument, match=r"the name 'a b' must be"):
        parse_controlnet_flag("a b=/x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"x")
    for flag, message in [
        (f"a={tmp_path / 'missing'}", "no such file or folder"),
        (f"a={tmp_path / 'empty'}", "has no config.json"),
        (f"a={tmp_path / 'weights.bin'}", r"only .safetensors files are loaded \(never pickled"),
    ]:
        with pytest.raises(ServerInvalidArgument, match=message):
            check_controlnet_specs((parse_controlnet_flag(flag),))
    folder = build_tiny_controlnet(tmp_path / "cn")
    with pytest.raises(ServerInvalidArgument, match=r"the name 'a' is given twice"):
        check_controlnet_specs((ControlNetSpec("a", str(folder)), ControlNetSpec("a", str(folder))))

    from safetensors.torch import save_file

    save_file({"layers.0.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    bench = build_tiny_controlnet(tmp_path / "bench.safetensors", size="bench")
    for path, message in [
        (
            tmp_path / "other.safetensors",
            r"not a Z-Image ControlNet in the Z-Image-Turbo-Fun-Controlnet-Union layout",
        ),
        (bench, r"was made for another DiT: dim 384 where the DiT has 32"),
    ]:
        with pytest.raises(ServerInvalidArgument, match=message):
            start_generator(loop_thread, tiny_model_dir, None, controlnets=(ControlNetSpec("cn", str(path)),))


def test_the_http_gateway_takes_a_controlnet(controlnet_generator, client) -> None:  # type: ignore[no-untyped-def]
    import base64

    import openai

    from tests.integration.test_http_gateway import decode, openai_api, serve
    from zimage_split.http_gateway import create_app

    control = png(noise_image(seed=13))
    extra = {"seed": 3, "steps": 2, "controlnet": "union", "controlnet_scale": 0.5}
    for url in serve(create_app(f"127.0.0.1:{controlnet_generator.port}", tokens=("t",), timeout=60)):
        api = openai_api(url, token="t")
        encoded = "data:image/png;base64," + base64.b64encode(control).decode()
        result = api.images.generate(
            prompt="a lighthouse", size="64x64", extra_body=extra | {"control_image": encoded}
        )
        image = decode(result.data[0])
        direct = client.generate(
            "a lighthouse",
            width=64,
            height=64,
            seed=3,
            steps=2,
            controlnet="union",
            control_image=control,
            controlnet_scale=0.5,
        )
        assert np.array_equal(pixels(image), pixels(direct))
        assert image.text["controlnet"] == '{"name": "union", "scale": 0.5}'
        with pytest.raises(
            openai.BadRequestError, match="control_image must be a PNG, JPEG or WebP file in base64"
        ):
            api.images.generate(
                prompt="a cat", size="64x64", extra_body=extra | {"control_image": "not base64!"}
            )
        with pytest.raises(openai.NotFoundError, match="No ControlNet 'pose'"):
            api.images.generate(
                prompt="a cat",
                size="64x64",
                extra_body=extra
                | {"controlnet": "pose", "control_image": base64.b64encode(control).decode()},
            )
