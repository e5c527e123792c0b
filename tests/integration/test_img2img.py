"""Through real gRPC, img2img and inpainting equal diffusers' ZImageImg2ImgPipeline and ZImageInpaintPipeline
for the same embeddings, start image, mask, strength and seed; bad uploads get clear errors."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.pictures import mask_image, png
from tests.pictures import noise_image as start_image
from zimage_split.client import InvalidArgument


@pytest.fixture(scope="module")
def pipelines(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline

    img2img = ZImageImg2ImgPipeline.from_pretrained(str(tiny_model_dir))
    inpaint = ZImageInpaintPipeline.from_pretrained(str(tiny_model_dir))
    for pipe in (img2img, inpaint):
        pipe.set_progress_bar_config(disable=True)
    return img2img, inpaint


def embeddings(pipe, prompt: str, negative: str):  # type: ignore[no-untyped-def]
    positive, negatives = pipe.encode_prompt(
        [prompt], device="cpu", do_classifier_free_guidance=True, negative_prompt=[negative]
    )
    return positive[0], negatives[0]


@pytest.mark.parametrize(("strength", "guidance", "seed"), [(0.6, 0.0, 3), (0.9, 3.0, 4), (0.3, 0.0, 5)])
def test_img2img_equals_diffusers(client, pipelines, strength, guidance, seed) -> None:  # type: ignore[no-untyped-def]
    img2img, _ = pipelines
    positive, negative = embeddings(img2img, "a fox in snow", "blurry")
    start = start_image(96, 64, seed=seed)
    expected = img2img(
        image=start,
        strength=strength,
        prompt_embeds=[positive],
        negative_prompt_embeds=[negative] if guidance > 0 else None,
        num_inference_steps=8,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    image = client.generate(
        embeddings=positive,
        negative_embeddings=negative if guidance > 0 else None,
        init_image=png(start),
        strength=strength,
        seed=seed,
        guidance_scale=guidance,
    )
    # No width or height: the start image's size, as in diffusers.
    assert image.size == (96, 64)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
    steps_run = 8 - int(8 - 8 * strength)  # diffusers' get_timesteps
    assert image.info["steps_run"] == steps_run and image.info["strength"] == pytest.approx(strength)


def test_inpainting_equals_diffusers(client, pipelines) -> None:  # type: ignore[no-untyped-def]
    _, inpaint = pipelines
    positive, _ = embeddings(inpaint, "a red door", "")
    start, mask = start_image(seed=9), mask_image()
    expected = inpaint(
        image=start,
        mask_image=mask,
        strength=1.0,
        prompt_embeds=[positive],
        num_inference_steps=8,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(21),
    ).images[0]
    image = client.generate(embeddings=positive, init_image=start, mask=png(mask), seed=21)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
    assert image.info["strength"] == pytest.approx(1.0)  # inpainting's default, as diffusers'
    # Outside the mask the start image shows through; inside it was repainted.
    keep = np.asarray(mask) == 0
    ours, original = np.asarray(image.convert("RGB")).astype(int), np.asarray(start).astype(int)
    assert np.abs(ours - original)[keep].mean() < np.abs(ours - original)[~keep].mean()


@pytest.mark.parametrize("strength", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_inpainting_at_each_strength_equals_diffusers(client, pipelines, strength, guidance) -> None:  # type: ignore[no-untyped-def]
    _, inpaint = pipelines
    positive, negative = embeddings(inpaint, "a red door", "blurry")
    seed = int(strength * 10) + int(guidance)
    start, mask = start_image(96, 64, seed=seed), mask_image(96, 64)
    expected = inpaint(
        image=start,
        mask_image=mask,
        strength=strength,
        prompt_embeds=[positive],
        negative_prompt_embeds=[negative] if guidance > 0 else None,
        num_inference_steps=8,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    image = client.generate(
        embeddings=positive,
        negative_embeddings=negative if guidance > 0 else None,
        init_image=png(start),
        mask=png(mask),
        strength=strength,
        seed=seed,
        guidance_scale=guidance,
    )
    assert image.size == (96, 64)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
    assert image.info["steps_run"] == 8 - int(8 - 8 * strength)
    assert image.info["strength"] == pytest.approx(strength)


def test_num_images_give_the_reference_for_each_seed(client, pipelines) -> None:  # type: ignore[no-untyped-def]
    img2img, _ = pipelines
    positive, _ = embeddings(img2img, "a lighthouse", "")
    start = start_image(seed=2)
    images = client.generate_images(embeddings=positive, init_image=start, seed=40, num_images=2)
    for index, image in enumerate(images):
        expected = img2img(
            image=start,
            prompt_embeds=[positive],
            num_inference_steps=8,
            guidance_scale=0.0,
            generator=torch.Generator("cpu").manual_seed(40 + index),
        ).images[0]
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))


def test_a_start_image_of_another_size_is_resized_to_the_request(client) -> None:  # type: ignore[no-untyped-def]
    image = client.generate("a cat", init_image=start_image(100, 70), width=64, height=96, seed=1)
    assert image.size == (64, 96)
    # Unset sizes round the image's own size down to a multiple of 16.
    image = client.generate("a cat", init_image=start_image(100, 70), seed=1)
    assert image.size == (96, 64)


def test_bad_start_images_are_refused_clearly(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument, match="strength"):
        client.generate("a cat", init_image=start_image(), strength=0.0)
    with pytest.raises(InvalidArgument, match="strength"):
        client.generate("a cat", init_image=start_image(), strength=1.5)
    with pytest.raises(InvalidArgument):
        client.upload_image(b"not an image at all")
    buffer = io.BytesIO()
    start_image().save(buffer, format="GIF")
    with pytest.raises(InvalidArgument, match="(?i)gif"):
        client.upload_image(buffer.getvalue())
    with pytest.raises(InvalidArgument, match="init_image"):
        client.generate("a cat", mask=mask_image())


def test_keys_that_are_gone_or_of_the_wrong_kind(client) -> None:  # type: ignore[no-untyped-def]
    from zimage_split._proto.generator.v1 import generator_pb2

    mask_key = client.upload_image(png(mask_image()), mask=True)
    image_key = client.upload_image(png(start_image()))
    assert image_key != mask_key
    assert client.upload_image(png(start_image())) == image_key  # content-addressed
    stub = client._async._generator()

    async def generate(request):  # type: ignore[no-untyped-def]
        return [response async for response in stub.Generate(request, timeout=30)]

    def request(image_key: str, mask_key: str = ""):  # type: ignore[no-untyped-def]
        return generator_pb2.GenerateRequest(
            prompt=generator_pb2.Conditioning(text="a cat"),
            width=64,
            height=64,
            init_image=generator_pb2.InitImage(image_key=image_key, mask_key=mask_key),
        )

    import grpc

    for bad, code in (
        (request("img-" + "0" * 64), grpc.StatusCode.NOT_FOUND),
        (request(mask_key), grpc.StatusCode.INVALID_ARGUMENT),
        (request(image_key, image_key), grpc.StatusCode.INVALID_ARGUMENT),
        (request(""), grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            client._run(generate(bad))
        assert failure.value.code() == code, failure.value.details()
        assert failure.value.details()


def test_lost_uploads_are_uploaded_again(client, generator) -> None:  # type: ignore[no-untyped-def]
    start = start_image(seed=31)
    first = client.generate("a cat", init_image=start, seed=3)
    from zimage_split.dit_service.init_images import ImageStore

    generator.servicer.images = ImageStore()  # the upload is gone, as after an eviction or a restart
    again = client.generate("a cat", init_image=start, seed=3)
    assert np.array_equal(np.asarray(first), np.asarray(again))
