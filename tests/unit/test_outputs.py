import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load

from zimage_split.common.errors import InvalidArgument
from zimage_split.dit_service.outputs import (
    DEFAULT_QUALITY,
    PNG_COMPRESS_LEVEL,
    OutputOptions,
    check_output,
    encode_image,
    encode_latents,
    file_extension,
    generation_metadata,
    read_metadata,
)


def noisy_image(size: int = 64) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def metadata(**overrides):
    settings = dict(
        prompt="ein Fuchs im Schnee, 雪の中の狐",
        negative_prompt="blurry",
        seed=42,
        steps=8,
        width=64,
        height=64,
        guidance_scale=0.0,
        model="Tongyi-MAI/Z-Image-Turbo",
        loras=[("style", 0.8), ("people/alice", 1.0)],
    )
    settings.update(overrides)
    return generation_metadata(**settings)


def test_generation_metadata_keys_and_parameters_line() -> None:
    items = dict(metadata(strength=0.6000000238418579))
    assert items["seed"] == "42" and items["guidance_scale"] == "0" and items["strength"] == "0.6"
    assert json.loads(items["loras"]) == [
        {"name": "style", "scale": 0.8},
        {"name": "people/alice", "scale": 1.0},
    ]
    assert items["parameters"] == (
        "ein Fuchs im Schnee, 雪の中の狐\n"
        "Negative prompt: blurry\n"
        "Steps: 8, Sampler: Euler (flow match), CFG scale: 0, Seed: 42, Size: 64x64, "
        'Model: Tongyi-MAI/Z-Image-Turbo, Denoising strength: 0.6, Lora: "style:0.8, people/alice:1"'
    )
    assert list(items)[-1] == "parameters"


def test_unknown_values_are_left_out() -> None:
    items = dict(metadata(prompt=None, negative_prompt=None, loras=[], prompt_key="abc123"))
    assert "prompt" not in items and "negative_prompt" not in items and "strength" not in items
    assert items["prompt_key"] == "abc123" and items["loras"] == "[]"
    first, settings = items["parameters"].split("\n")
    assert first == "" and "Prompt key: abc123" in settings and "Lora" not in settings


def test_extra_keys_cannot_replace_standard_ones() -> None:
    assert dict(metadata(extra={"request_id": "r1"}))["request_id"] == "r1"
    with pytest.raises(ValueError, match="seed"):
        metadata(extra={"seed": "1"})
    with pytest.raises(ValueError):
        metadata(extra={"bad key": "1"})


def test_png_metadata_round_trips_with_non_ascii_text() -> None:
    items = metadata()
    data = encode_image(noisy_image(), OutputOptions(metadata=items))
    assert read_metadata(data) == dict(items)
    with Image.open(io.BytesIO(data)) as image:
        assert np.array_equal(np.asarray(image), np.asarray(noisy_image()))


def test_png_is_deterministic() -> None:
    options = OutputOptions(metadata=metadata())
    assert encode_image(noisy_image(), options) == encode_image(noisy_image(), options)


def test_png_without_metadata_is_a_plain_pillow_save() -> None:
    image = noisy_image()
    plain = io.BytesIO()
    image.save(plain, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    data = encode_image(image, OutputOptions())
    assert data == plain.getvalue()
    assert read_metadata(data) == {}


@pytest.mark.parametrize("format", ["jpeg", "webp"])
def test_lossy_quality_changes_the_size(format: str) -> None:
    image = noisy_image(128)
    low = encode_image(image, OutputOptions(format=format, quality=20))
    high = encode_image(image, OutputOptions(format=format, quality=95))
    default = encode_image(image, OutputOptions(format=format))
    assert len(low) < len(high)
    assert default == encode_image(image, OutputOptions(format=format, quality=DEFAULT_QUALITY))
    with Image.open(io.BytesIO(low)) as decoded:
        assert decoded.format == format.upper() and decoded.size == (128, 128)


@pytest.mark.parametrize("format", ["jpeg", "webp"])
def test_lossy_metadata_round_trips_through_exif(format: str) -> None:
    items = metadata(strength=0.5, extra={"request_id": "r-1"})
    data = encode_image(noisy_image(), OutputOptions(format=format, quality=80, metadata=items))
    assert read_metadata(data) == dict(items)
    assert data == encode_image(noisy_image(), OutputOptions(format=format, quality=80, metadata=items))


@pytest.mark.parametrize("format", ["png", "jpeg", "webp"])
def test_stripped_files_carry_no_metadata(format: str) -> None:
    data = encode_image(noisy_image(), check_output(format, None))
    assert read_metadata(data) == {}
    with Image.open(io.BytesIO(data)) as image:
        assert not image.getexif() and not image.info.get("exif")
        assert not getattr(image, "text", {})


def test_jpeg_of_an_rgba_image_is_rgb() -> None:
    image = noisy_image().convert("RGBA")
    data = encode_image(image, OutputOptions(format="jpeg"))
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.mode == "RGB"


def test_jpeg_shortens_prompts_that_overflow_exif() -> None:
    items = metadata(prompt="狐" * 40_000)
    data = encode_image(noisy_image(), OutputOptions(format="jpeg", metadata=items))
    read = read_metadata(data)
    assert read["prompts_truncated"] == "true" and read["seed"] == "42"
    assert read["prompt"].startswith("狐" * 1000) and read["prompt"].endswith("…")
    assert read["parameters"].startswith(read["prompt"] + "\n")
    # WebP has no such limit.
    webp = encode_image(noisy_image(), OutputOptions(format="webp", metadata=items))
    assert read_metadata(webp) == dict(items)


def test_latents_round_trip_through_safetensors() -> None:
    latents = torch.randn(1, 16, 8, 6, dtype=torch.bfloat16)
    items = metadata()
    data = encode_latents(latents, items)
    loaded = load(data)
    assert list(loaded) == ["latents"]
    assert loaded["latents"].dtype == torch.float32 and loaded["latents"].shape == (1, 16, 8, 6)
    assert torch.equal(loaded["latents"], latents.float())
    assert read_metadata(data) == dict(items)
    assert encode_latents(latents, items) == data
    assert torch.equal(load(encode_latents(latents[0], {}))["latents"], latents.float())
    assert read_metadata(encode_latents(latents, ())) == {}


def test_latents_file_opens_with_safetensors_safe_open(tmp_path) -> None:
    path = tmp_path / "latents.safetensors"
    path.write_bytes(encode_latents(torch.ones(1, 4, 2, 2), {"seed": "7"}))
    with safe_open(str(path), framework="pt") as file:
        assert file.metadata() == {"seed": "7"}
        assert torch.equal(file.get_tensor("latents"), torch.ones(1, 4, 2, 2))


def test_latents_of_a_batch_are_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        encode_latents(torch.zeros(2, 16, 4, 4), ())


def test_check_output() -> None:
    assert check_output("PNG", None) == OutputOptions("png", None)
    assert check_output("jpeg", None).quality == DEFAULT_QUALITY
    assert check_output("webp", 1).quality == 1
    assert check_output("latent", None).format == "latent"
    with pytest.raises(InvalidArgument, match="png, jpeg, webp, latent"):
        check_output("gif", None)
    for quality in (0, 101):
        with pytest.raises(InvalidArgument, match="between 1 and 100"):
            check_output("jpeg", quality)
    for format in ("png", "latent"):
        with pytest.raises(InvalidArgument, match="only to jpeg and webp"):
            check_output(format, 90)


def test_file_extensions_and_bad_inputs() -> None:
    extensions = {f: file_extension(f) for f in ("png", "jpeg", "webp", "latent")}
    assert extensions == {"png": "png", "jpeg": "jpg", "webp": "webp", "latent": "safetensors"}
    with pytest.raises(InvalidArgument):
        file_extension("gif")
    with pytest.raises(InvalidArgument, match="encode_latents"):
        encode_image(noisy_image(), OutputOptions(format="latent"))
    with pytest.raises(InvalidArgument):
        read_metadata(b"GIF89a....")
