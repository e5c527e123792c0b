"""Through real gRPC, the generator's image equals diffusers' ZImagePipeline for the same embeddings and seed,
with and without guidance (cfg_normalization and cfg_truncation included), and is within one level of it from
a text prompt encoded by diffusers itself."""

import numpy as np
import pytest
import torch

# From a text prompt the images are not bit-identical. diffusers pads every prompt to 512 tokens and masks
# the padding; our encoder runs only the prompt's own tokens. In float32 the valid tokens' hidden states then
# differ in their last bits (about 2e-9 on the tiny model: the attention sums run over other lengths), which
# moves a pixel across a rounding boundary now and then. Measured over 96 prompts, guidance settings and
# sizes: never more than 1 level of 255, in at most 0.03% of the values. The test allows 1 level in 0.1%.
TEXT_PATH_MAX_LEVELS = 1
TEXT_PATH_MAX_CHANGED = 0.001


def reference_image(  # type: ignore[no-untyped-def]
    pipe, prompt_embeds, negative_embeds, *, seed, width, height, guidance, **cfg
):
    return pipe(
        prompt_embeds=[prompt_embeds],
        negative_prompt_embeds=[negative_embeds] if guidance > 0 else None,
        height=height,
        width=width,
        num_inference_steps=8,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        **cfg,
    ).images[0]


def pixels(image) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.asarray(image.convert("RGB")).astype(np.int16)


@pytest.mark.parametrize(("guidance", "seed"), [(0.0, 11), (4.0, 12)])
def test_uploaded_embeddings_give_the_reference_image(client, reference_pipeline, guidance, seed) -> None:  # type: ignore[no-untyped-def]
    positive, negative = reference_pipeline.encode_prompt(
        ["a red fox in deep snow"],
        device="cpu",
        do_classifier_free_guidance=True,
        negative_prompt=["blurry, dark"],
    )
    expected = reference_image(
        reference_pipeline, positive[0], negative[0], seed=seed, width=96, height=64, guidance=guidance
    )
    image = client.generate(
        embeddings=positive[0],
        negative_embeddings=negative[0] if guidance > 0 else None,
        seed=seed,
        width=96,
        height=64,
        guidance_scale=guidance,
    )
    assert image.size == (96, 64)
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    assert image.info["seed"] == seed and image.info["guidance_scale"] == pytest.approx(guidance)


def test_prompt_text_through_both_services_gives_the_reference_image(client, reference_pipeline) -> None:  # type: ignore[no-untyped-def]
    prompt, negative_prompt = "一座灯塔 at dusk", "low quality"
    embeddings = client.encode([prompt, negative_prompt])
    expected = reference_image(
        reference_pipeline,
        embeddings[0].tensor,
        embeddings[1].tensor,
        seed=5,
        width=64,
        height=64,
        guidance=3.0,
    )
    image = client.generate(
        prompt, negative_prompt=negative_prompt, seed=5, width=64, height=64, guidance_scale=3.0
    )
    assert np.array_equal(np.asarray(image), np.asarray(expected))


@pytest.mark.parametrize(
    ("prompt", "negative_prompt", "guidance", "cfg", "seed", "size"),
    [
        ("a red fox in deep snow", None, 0.0, {}, 11, (64, 64)),
        ("一座灯塔 at dusk", "low quality", 3.0, {}, 5, (96, 64)),
        ("a cat", None, 4.0, {}, 2, (128, 128)),  # guidance with diffusers' default negative prompt ""
        ("a watercolor fox", "blurry", 4.0, {"cfg_normalization": 1.0, "cfg_truncation": 0.3}, 7, (64, 64)),
        ("long " * 200, "blurry", 2.0, {}, 3, (64, 96)),  # over 512 tokens: both truncate to 512
    ],
    ids=["turbo", "guided", "default-negative", "cfg-normalized-truncated", "over-512-tokens"],
)
def test_a_text_prompt_through_both_services_gives_diffusers_own_image(  # type: ignore[no-untyped-def]
    client, reference_pipeline, prompt, negative_prompt, guidance, cfg, seed, size
) -> None:
    width, height = size
    # diffusers' own text path: its tokenizer and Qwen3, padded to 512 and masked.
    expected = reference_pipeline(
        prompt=prompt,
        negative_prompt=negative_prompt,
        height=height,
        width=width,
        num_inference_steps=8,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        **cfg,
    ).images[0]
    image = client.generate(
        prompt,
        negative_prompt=negative_prompt,
        seed=seed,
        width=width,
        height=height,
        guidance_scale=guidance,
        **cfg,
    )
    assert image.size == expected.size == (width, height)
    difference = np.abs(pixels(image) - pixels(expected))
    assert difference.max() <= TEXT_PATH_MAX_LEVELS, f"{difference.max()} levels apart"
    assert (difference > 0).mean() <= TEXT_PATH_MAX_CHANGED, f"{(difference > 0).mean():.4%} of values differ"


@pytest.mark.parametrize(
    ("normalization", "truncation"),
    [(1.0, 1.0), (0.0, 0.3), (1.2, 0.5), (0.0, 0.0)],
)
def test_cfg_normalization_and_truncation_give_the_reference_image(  # type: ignore[no-untyped-def]
    client, reference_pipeline, normalization, truncation
) -> None:
    positive, negative = reference_pipeline.encode_prompt(
        ["a lighthouse on a cliff"],
        device="cpu",
        do_classifier_free_guidance=True,
        negative_prompt=["blurry, dark"],
    )
    cfg = {"cfg_normalization": normalization, "cfg_truncation": truncation}
    shape = {"seed": 21, "width": 64, "height": 64, "guidance": 4.0}
    expected = reference_image(reference_pipeline, positive[0], negative[0], **shape, **cfg)
    # The settings change diffusers' image here, so an engine that ignored them would fail.
    default = reference_image(reference_pipeline, positive[0], negative[0], **shape)
    assert not np.array_equal(np.asarray(expected), np.asarray(default))
    image = client.generate(
        embeddings=positive[0],
        negative_embeddings=negative[0],
        seed=21,
        width=64,
        height=64,
        guidance_scale=4.0,
        **cfg,
    )
    assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_a_different_seed_gives_a_different_image(client) -> None:  # type: ignore[no-untyped-def]
    first = client.generate("a cat", seed=1, width=64, height=64)
    again = client.generate("a cat", seed=1, width=64, height=64)
    other = client.generate("a cat", seed=2, width=64, height=64)
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))


def shifted(pipe, shift: float):  # type: ignore[no-untyped-def]
    """diffusers' pipeline on the same modules, with a scheduler whose config names `shift`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=shift)
    reference = ZImagePipeline(**{**pipe.components, "scheduler": scheduler})
    reference.set_progress_bar_config(disable=True)
    return reference


@pytest.mark.parametrize(("shift", "guidance"), [(1.0, 0.0), (6.5, 0.0), (2.0, 4.0)])
def test_a_schedule_shift_gives_diffusers_image_with_that_shift(  # type: ignore[no-untyped-def]
    client, reference_pipeline, shift, guidance
) -> None:
    positive, negative = reference_pipeline.encode_prompt(
        ["a lighthouse on a cliff"], device="cpu", do_classifier_free_guidance=True, negative_prompt=["dark"]
    )
    shape = {"seed": 8, "width": 64, "height": 64, "guidance": guidance}
    expected = reference_image(shifted(reference_pipeline, shift), positive[0], negative[0], **shape)
    # The shift changes diffusers' image, so an engine that ignored it would fail.
    default = reference_image(reference_pipeline, positive[0], negative[0], **shape)
    assert not np.array_equal(np.asarray(expected), np.asarray(default))
    image = client.generate(
        embeddings=positive[0],
        negative_embeddings=negative[0] if guidance > 0 else None,
        seed=8,
        width=64,
        height=64,
        guidance_scale=guidance,
        shift=shift,
    )
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    assert image.info["shift"] == pytest.approx(shift)
    assert f"Shift: {shift:g}," in image.text["parameters"] and image.text["shift"] == f"{shift:g}"
    # The next request without a shift runs the model's own again: the scheduler is shared state.
    again = client.generate(embeddings=positive[0], seed=8, width=64, height=64)
    assert np.array_equal(
        np.asarray(again),
        np.asarray(reference_image(reference_pipeline, positive[0], None, **shape | {"guidance": 0.0})),
    )


def test_the_models_own_shift_named_or_not_gives_the_same_file(client) -> None:  # type: ignore[no-untyped-def]
    assert client.generator_info()["default_shift"] == 3.0
    unset = client.generate("a cat", seed=4, width=64, height=64)
    named = client.generate("a cat", seed=4, width=64, height=64, shift=3.0)
    assert unset.info["file_bytes"] == named.info["file_bytes"]
    assert unset.info["shift"] == named.info["shift"] == 3.0
    assert "shift" not in unset.text and "Shift:" not in unset.text["parameters"]
