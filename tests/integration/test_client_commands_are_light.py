"""The CLI's client commands, against a real generator, run without torch, diffusers or transformers:
a client host needs none of them to ask for an image."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from tests.unit.test_cli_imports import heavy_modules_imported


def test_generate_against_a_generator_loads_no_model_library(generator, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    address = f"127.0.0.1:{generator.port}"
    argv = ["generate", "a lighthouse", "--generator", address, "--width", "64", "--height", "64"]
    assert heavy_modules_imported(argv + ["--steps", "2", "--seed", "3", "-o", "out.png"], cwd=tmp_path) == []
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == (64, 64)
        assert image.info["seed"] == "3"


def test_lora_list_against_a_generator_loads_no_model_library(generator) -> None:  # type: ignore[no-untyped-def]
    assert heavy_modules_imported(["lora", "list", "--generator", f"127.0.0.1:{generator.port}"]) == []
