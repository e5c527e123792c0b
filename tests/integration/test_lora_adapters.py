"""LoRA adapters on the tiny model's real DiT: each format changes exactly the weights it should, by
scale * alpha / rank * B @ A, and a request without LoRA gets the base model's bytes back.

The files are written by tests/unit/test_lora_files.py's writers, so both test files agree on what each
format means.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.unit.test_lora_files import (
    WRITERS,
    Lora,
    ai_toolkit_lora,
    comfyui_lora,
    diffusers_lora,
    kohya_lora,
)
from zimage_split.common.errors import InvalidArgument, NotFound
from zimage_split.dit_service.engine import DiTEngine
from zimage_split.dit_service.lora.adapters import LoraAdapters, adapter_name_for
from zimage_split.dit_service.lora.library import LoraLibrary, LoraSpec
from zimage_split.model_source import resolve_model

CPU = torch.device("cpu")
SCALE = 0.7


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> DiTEngine:
    return DiTEngine(resolve_model(str(tiny_model_dir)), device=CPU, dtype=torch.float32)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "loras"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def pristine(engine: DiTEngine) -> bytes:
    """The image before any LoRA ever touched the DiT (the `adapters` fixture asks for it first)."""
    return image(engine)


@pytest.fixture
def adapters(engine: DiTEngine, root: Path, pristine: bytes) -> Iterator[LoraAdapters]:
    lora = LoraAdapters(engine.pipe, LoraLibrary(root), capacity=2)
    yield lora
    lora.close()


def linear_names(transformer: torch.nn.Module) -> list[str]:
    """Every linear layer of the DiT itself (not PEFT's lora_A/lora_B layers), by its unwrapped name."""
    return sorted(
        name.removesuffix(".base_layer")
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and ".lora_" not in name
    )


@torch.no_grad()
def linear_maps(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """layer(I) - layer(0) for every linear layer: its weight as it acts now, LoRA included, bias excluded."""
    maps = {}
    for name in linear_names(transformer):
        layer = transformer.get_submodule(name)
        base = getattr(layer, "base_layer", layer)
        assert isinstance(base, torch.nn.Linear)
        n_in = base.in_features
        maps[name] = (layer(torch.eye(n_in)) - layer(torch.zeros(1, n_in))).T
    return maps


@torch.inference_mode()
def image(engine: DiTEngine, seed: int = 3) -> bytes:
    """The engine's pipeline from caption embedding to decoded pixels, as bytes."""
    caption = torch.randn(6, engine.caption_dim, generator=torch.Generator().manual_seed(11))
    pixels = engine.pipe(
        prompt_embeds=[caption],
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    ).images
    return pixels.tobytes()


def adapter_layers(transformer: torch.nn.Module, adapter_name: str) -> int:
    return sum(adapter_name in getattr(module, "lora_A", {}) for module in transformer.modules())


def unwrapped(name: str) -> str:
    """A parameter's name in the unwrapped DiT."""
    return name.replace(".base_layer.", ".")


def current_name(transformer: torch.nn.Module, name: str) -> str:
    """A parameter's name now: under `base_layer` once PEFT has wrapped its layer."""
    module, _, leaf = name.rpartition(".")
    wrapped = hasattr(transformer.get_submodule(module), "base_layer")
    return f"{module}.base_layer.{leaf}" if wrapped else name


@pytest.mark.parametrize("file_format", WRITERS)
def test_each_format_changes_exactly_its_weights(
    engine: DiTEngine, adapters: LoraAdapters, root: Path, file_format: str
) -> None:
    lora = WRITERS[file_format]()
    lora.write(root / "lora.safetensors")
    transformer = engine.pipe.transformer
    parameters = {unwrapped(name): param.detach().clone() for name, param in transformer.named_parameters()}

    adapters.activate([LoraSpec("lora", SCALE)])
    changed = linear_maps(transformer)
    diffs_on = {
        name: transformer.get_parameter(current_name(transformer, name)).detach().clone()
        for name in lora.diffs
    }
    adapters.activate([])
    base = linear_maps(transformer)

    for name in base:
        if name in lora.expected:
            a, b, factor = lora.expected[name]
            torch.testing.assert_close(changed[name] - base[name], SCALE * factor * (b @ a), msg=name)
        else:
            assert torch.equal(changed[name], base[name]), f"{name} changed but the LoRA does not target it"
    assert set(lora.expected) <= set(base)
    for name, diff in lora.diffs.items():
        torch.testing.assert_close(diffs_on[name], parameters[name] + SCALE * diff, msg=name)
    # activate([]) puts every base parameter back bit for bit, the differences' targets included.
    for name, param in transformer.named_parameters():
        if ".lora_" not in name:
            assert torch.equal(param, parameters[unwrapped(name)]), name


def test_without_lora_the_image_is_the_base_models_bytes(
    engine: DiTEngine, adapters: LoraAdapters, root: Path, pristine: bytes
) -> None:
    kohya_lora().write(root / "kohya.safetensors")
    comfyui_lora().write(root / "people" / "comfy.safetensors")
    base = image(engine)

    adapters.activate([LoraSpec("kohya", 1.0)])
    kohya = image(engine)
    adapters.activate([LoraSpec("people/comfy", 1.5)])
    comfy = image(engine)
    adapters.activate([LoraSpec("kohya", 1.0), LoraSpec("people/comfy", 1.5)])
    both = image(engine)
    adapters.activate([LoraSpec("kohya", 1.0)])
    kohya_again = image(engine)
    adapters.activate([])
    base_again = image(engine)

    assert len({base, kohya, comfy, both}) == 4
    assert kohya_again == kohya
    assert base_again == base == pristine
    # A LoRA at scale 0 is the base model too, and loads nothing.
    adapters.activate([LoraSpec("kohya", 0.0)])
    assert image(engine) == base


def test_the_least_recently_used_adapter_is_evicted(
    engine: DiTEngine, adapters: LoraAdapters, root: Path
) -> None:
    for name, writer in (("a", kohya_lora), ("b", diffusers_lora), ("c", ai_toolkit_lora)):
        writer().write(root / f"{name}.safetensors")
    transformer = engine.pipe.transformer
    adapters.activate([LoraSpec("a", 1.0)])
    first = linear_maps(transformer)
    adapters.activate([LoraSpec("b", 1.0)])
    adapters.activate([LoraSpec("a", 1.0)])  # a is now the most recently used
    adapters.activate([LoraSpec("c", 1.0)])
    assert adapters.loaded == ["a", "c"]
    evicted = adapter_name_for("b")
    assert (
        evicted not in getattr(transformer, "peft_config", {}) and adapter_layers(transformer, evicted) == 0
    )

    adapters.activate([LoraSpec("b", 1.0), LoraSpec("c", 1.0)])
    assert adapters.loaded == ["b", "c"]
    adapters.activate([LoraSpec("a", 1.0)])
    assert adapters.loaded == ["c", "a"]
    again = linear_maps(transformer)
    assert all(torch.equal(first[name], again[name]) for name in first)


def test_a_file_replaced_on_disk_is_read_again(engine: DiTEngine, adapters: LoraAdapters, root: Path) -> None:
    transformer = engine.pipe.transformer
    path = ai_toolkit_lora().write(root / "style.safetensors")
    adapters.activate([LoraSpec("style", 1.0)])
    adapters.activate([])
    base = linear_maps(transformer)

    replacement = Lora()
    t = "diffusion_model.layers.1.attention.to_v"
    a, b = replacement.pair(f"{t}.lora_A.weight", f"{t}.lora_B.weight", "layers.1.attention.to_v", 2, 32, 32)
    replacement.write(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    adapters.activate([LoraSpec("style", 1.0)])
    now = linear_maps(transformer)
    torch.testing.assert_close(now["layers.1.attention.to_v"] - base["layers.1.attention.to_v"], b @ a)
    assert torch.equal(now["layers.0.attention.to_k"], base["layers.0.attention.to_k"])  # the old file's


@pytest.mark.parametrize(
    ("module", "n_in", "n_out", "match"),
    [
        ("layers.7.attention.to_q", 32, 32, "layers.7.attention.to_q is not in this DiT"),
        ("layers.0.attention.to_q", 48, 32, "takes 32 inputs, its lora_A 48"),
        ("all_x_embedder.2-1", 64, 48, "gives 32 outputs, its lora_B 48"),
    ],
)
def test_a_lora_that_does_not_fit_is_refused_and_leaves_nothing(
    engine: DiTEngine, adapters: LoraAdapters, root: Path, module: str, n_in: int, n_out: int, match: str
) -> None:
    misfit = Lora()
    t = f"diffusion_model.{module}"
    misfit.pair(f"{t}.lora_A.weight", f"{t}.lora_B.weight", module, 2, n_in, n_out)
    misfit.write(root / "misfit.safetensors")
    diffusers_lora().write(root / "good.safetensors")
    transformer = engine.pipe.transformer
    base = image(engine)

    adapters.activate([LoraSpec("good", 1.0)])
    with pytest.raises(InvalidArgument, match=match):
        adapters.activate([LoraSpec("misfit", 1.0)])
    assert adapters.loaded == ["good"]
    assert adapter_name_for("misfit") not in getattr(transformer, "peft_config", {})
    assert adapter_layers(transformer, adapter_name_for("misfit")) == 0
    # Later requests are unaffected.
    adapters.activate([])
    assert image(engine) == base
    adapters.activate([LoraSpec("good", 1.0)])
    assert image(engine) != base


def test_request_errors_say_what_to_do(engine: DiTEngine, adapters: LoraAdapters, root: Path) -> None:
    for name in "abc":
        ai_toolkit_lora().write(root / f"{name}.safetensors")
    with pytest.raises(NotFound, match="'a', 'b', 'c'"):
        adapters.activate([LoraSpec("missing", 1.0)])
    with pytest.raises(InvalidArgument, match="keeps at most 2"):
        adapters.activate([LoraSpec(name, 1.0) for name in "abc"])
    with pytest.raises(InvalidArgument, match=r"'\.\.' part"):
        adapters.activate([LoraSpec("../loras/a", 1.0)])
    assert adapters.loaded == []

    disabled = LoraAdapters(engine.pipe, LoraLibrary(None))
    disabled.activate([])
    with pytest.raises(InvalidArgument, match="without --lora-dir"):
        disabled.activate([LoraSpec("a", 1.0)])
