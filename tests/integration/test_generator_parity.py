"""Through real gRPC, the generator's image equals diffusers' ZImagePipeline for the same embeddings and seed."""

import numpy as np
import pytest
import torch


def reference_image(pipe, prompt_embeds, negative_embeds, *, seed, width, height, guidance):  # type: ignore[no-untyped-def]
    return pipe(
        prompt_embeds=[prompt_embeds],
        negative_prompt_embeds=[negative_embeds] if guidance > 0 else None,
        height=height,
        width=width,
        num_inference_steps=8,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]


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


def test_a_different_seed_gives_a_different_image(client) -> None:  # type: ignore[no-untyped-def]
    first = client.generate("a cat", seed=1, width=64, height=64)
    again = client.generate("a cat", seed=1, width=64, height=64)
    other = client.generate("a cat", seed=2, width=64, height=64)
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))
