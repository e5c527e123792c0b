"""A configs-only folder (as `full` is): both services build random weights from the seed, serve images, and
build exactly the weights `reference_pipeline` builds in another place."""

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import start_encoder, start_generator
from zimage_split import model_source
from zimage_split.client import Client
from zimage_split.model_source import resolve_model
from zimage_split.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def random_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-random", store_weights=False, seed=5)


@pytest.fixture(scope="module")
def random_client(loop_thread, random_tiny_dir):  # type: ignore[no-untyped-def]
    encoder = start_encoder(loop_thread, random_tiny_dir, dtype="float32")
    generator = start_generator(loop_thread, random_tiny_dir, encoder.port)
    try:
        with Client(
            generator=f"127.0.0.1:{generator.port}", encoder=f"127.0.0.1:{encoder.port}", timeout=60
        ) as client:
            yield client
    finally:
        loop_thread.run(generator.stop(grace=0))
        loop_thread.run(encoder.stop(grace=0))


def test_services_make_images_from_random_weights(random_client, random_tiny_dir) -> None:  # type: ignore[no-untyped-def]
    assert not list(random_tiny_dir.rglob("*.safetensors"))
    embedding = random_client.encode(["a lighthouse at dusk"])[0]
    assert torch.isfinite(embedding.tensor).all() and embedding.tensor.std() > 0
    image = random_client.generate("a lighthouse at dusk", seed=3, width=64, height=64, steps=2)
    pixels = np.asarray(image)
    assert image.size == (64, 64) and pixels.std() > 0  # noise, but an image
    again = random_client.generate("a lighthouse at dusk", seed=3, width=64, height=64, steps=2)
    assert np.array_equal(np.asarray(again), pixels)
    info = random_client.generator_info()
    assert info["model_id"] == str(random_tiny_dir)


def test_reference_pipeline_builds_the_services_weights(random_client, random_tiny_dir) -> None:  # type: ignore[no-untyped-def]
    """An independent build from the same seed (the benchmark's reference pipeline) equals the services."""
    source = resolve_model(str(random_tiny_dir))
    assert source.random_weights_seed == 5
    pipe = model_source.reference_pipeline(source, device="cpu", dtype=torch.float32)
    prompt = "一只猫 on a mat"
    embedding = random_client.encode([prompt])[0].tensor
    with torch.no_grad():
        expected_embedding = pipe.encode_prompt([prompt], device="cpu", do_classifier_free_guidance=False)[0][
            0
        ]
    # Not bit-identical: diffusers pads to 512 tokens, and other shapes change the kernels' last bits.
    assert (embedding - expected_embedding).abs().max().item() <= 1e-5
    expected = pipe(
        prompt_embeds=[embedding],
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(9),
    ).images[0]
    image = random_client.generate(prompt, seed=9, width=64, height=64, steps=2)
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    # A different seed is a different model.
    other = model_source.reference_pipeline(
        resolve_model(str(build_tiny_model(random_tiny_dir.parent / "seed-6", store_weights=False, seed=6))),
        device="cpu",
        dtype=torch.float32,
    )
    assert not torch.equal(
        other.transformer.layers[0].feed_forward.w1.weight, pipe.transformer.layers[0].feed_forward.w1.weight
    )


def test_reference_pipeline_of_a_weights_folder_equals_from_pretrained(
    tiny_model_dir, reference_pipeline
) -> None:  # type: ignore[no-untyped-def]
    from tests.unit.test_tiny_model import weights_digest

    ours = model_source.reference_pipeline(
        resolve_model(str(tiny_model_dir)), device="cpu", dtype=torch.float32
    )
    for name in ("text_encoder", "transformer", "vae"):
        assert weights_digest(getattr(ours, name)) == weights_digest(getattr(reference_pipeline, name)), name
