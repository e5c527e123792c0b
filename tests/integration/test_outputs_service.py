"""Result files through a real generator: PNG metadata, JPEG and WebP, latents, and the CLI's choices."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_split.client import InvalidArgument, Latents
from zimage_split.dit_service.outputs import read_metadata


def test_png_metadata_round_trips(client, generator) -> None:  # type: ignore[no-untyped-def]
    image = client.generate("一只猫 on a sofa", seed=12, width=64, height=96, steps=3)
    assert image.info["format"] == "png"
    metadata = read_metadata(image.info["file_bytes"])
    assert metadata["prompt"] == "一只猫 on a sofa"
    assert (metadata["seed"], metadata["steps"], metadata["width"], metadata["height"]) == (
        "12",
        "3",
        "64",
        "96",
    )
    assert metadata["model"] == generator.servicer.info.model_id
    assert json.loads(metadata["loras"]) == []
    assert "Seed: 12" in metadata["parameters"]
    # The metadata rides in the file only: the pixels are those of a plain request.
    plain = client.generate("一只猫 on a sofa", seed=12, width=64, height=96, steps=3, strip_metadata=True)
    assert read_metadata(plain.info["file_bytes"]) == {}
    assert np.array_equal(np.asarray(plain), np.asarray(image))


def test_jpeg_and_webp_with_quality(client) -> None:  # type: ignore[no-untyped-def]
    sizes = {}
    for output_format in ("jpeg", "webp"):
        for quality in (20, 95):
            image = client.generate(
                "a harbour", seed=1, width=128, height=128, output_format=output_format, quality=quality
            )
            data = image.info["file_bytes"]
            assert Image.open(io.BytesIO(data)).format == output_format.upper()
            assert read_metadata(data)["prompt"] == "a harbour"
            sizes[output_format, quality] = len(data)
        assert sizes[output_format, 20] < sizes[output_format, 95]
    with pytest.raises(InvalidArgument, match="quality"):
        client.generate("a harbour", width=64, height=64, quality=90)  # PNG takes none
    with pytest.raises(InvalidArgument, match="quality"):
        client.generate("a harbour", width=64, height=64, output_format="jpeg", quality=0)
    with pytest.raises(InvalidArgument, match="output_format"):
        client.generate("a harbour", width=64, height=64, output_format="gif")


def test_latent_output_equals_the_pipelines_latents(client, reference_pipeline) -> None:  # type: ignore[no-untyped-def]
    from safetensors import safe_open

    positive, _ = reference_pipeline.encode_prompt(
        ["a lake"], device="cpu", do_classifier_free_guidance=False
    )
    expected = reference_pipeline(
        prompt_embeds=[positive[0]],
        height=64,
        width=96,
        num_inference_steps=8,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="latent",
    ).images
    result = client.generate(embeddings=positive[0], seed=7, width=96, height=64, output_format="latent")
    assert isinstance(result, Latents)
    assert result.tensor.dtype == torch.float32 and result.tensor.shape == expected.shape
    assert torch.equal(result.tensor, expected.float())
    assert result.info["format"] == "safetensors" and not result.info["vae_tiled"]
    with safe_open_bytes(result.info["file_bytes"]) as path, safe_open(path, "pt") as opened:
        assert opened.metadata()["seed"] == "7"


class safe_open_bytes:
    """safetensors' safe_open reads files: put the bytes in one for the duration."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __enter__(self) -> str:
        import tempfile

        self.file = tempfile.NamedTemporaryFile(suffix=".safetensors")
        self.file.write(self.data)
        self.file.flush()
        return self.file.name

    def __exit__(self, *exc_info: object) -> None:
        self.file.close()


def test_num_images_take_consecutive_seeds(client) -> None:  # type: ignore[no-untyped-def]
    images = client.generate_images("a kite", seed=100, width=64, height=64, num_images=3)
    assert [image.info["seed"] for image in images] == [100, 101, 102]
    assert [read_metadata(image.info["file_bytes"])["seed"] for image in images] == ["100", "101", "102"]
    alone = client.generate("a kite", seed=101, width=64, height=64)
    assert np.array_equal(np.asarray(images[1]), np.asarray(alone))


def test_cli_writes_the_generators_file(client, generator, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from zimage_split.cli import main

    address = f"127.0.0.1:{generator.port}"
    common = ["--generator", address, "--insecure", "--width", "64", "--height", "64", "--seed", "3"]
    assert main(["generate", "a barn", "-o", str(tmp_path / "barn.jpg"), "--quality", "80", *common]) == 0
    data = (tmp_path / "barn.jpg").read_bytes()
    assert Image.open(io.BytesIO(data)).format == "JPEG" and read_metadata(data)["prompt"] == "a barn"
    assert main(["generate", "a barn", "-o", str(tmp_path / "barn.png"), "--template", "photo", *common]) == 0
    prompt = read_metadata((tmp_path / "barn.png").read_bytes())["prompt"]
    assert "a barn" in prompt and prompt != "a barn"
    assert main(["generate", "a barn", "-o", str(tmp_path / "barn.safetensors"), *common]) == 0
    assert (tmp_path / "barn.safetensors").stat().st_size > 0
    assert main(["generate", "a barn", "-o", str(tmp_path / "barn.gif"), *common]) == 2
    assert main(["generate", "a barn", "-o", str(tmp_path / "x.png"), "--format", "jpeg", *common]) == 2
    assert main(["generate", "a barn", "--template", "no-such-template", *common]) == 2


def test_the_image_says_how_a_long_prompt_was_shortened(client) -> None:  # type: ignore[no-untyped-def]
    prompt = "a very long prompt about a harbour at night with boats and lanterns " * 3
    for mode in ("truncate", "interpolate", "pool"):
        image = client.generate(
            prompt, seed=1, width=64, height=64, max_sequence_length=24, long_prompt_mode=mode
        )
        assert image.info["prompt_token_count"] == 24
        assert image.info["prompt_source_token_count"] > 24
        assert image.info["prompt_shortened_by"] == mode
    # The tiny model's tokenizer is byte-level: the chat template alone is about 40 tokens.
    short = client.generate(
        "a boat", seed=1, width=64, height=64, max_sequence_length=100, long_prompt_mode="pool"
    )
    assert short.info["prompt_shortened_by"] == ""
    assert short.info["prompt_token_count"] == short.info["prompt_source_token_count"] < 100
    with pytest.raises(InvalidArgument, match="1504"):
        client.generate("a boat", width=64, height=64, max_sequence_length=1505)
    with pytest.raises(InvalidArgument, match="long_prompt_mode"):
        client.generate("a boat", width=64, height=64, long_prompt_mode="squash")
