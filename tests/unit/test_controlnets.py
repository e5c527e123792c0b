"""Loading ControlNets: a single file in each Union release layout gives the config and weights of the same
ControlNet saved as a diffusers folder; files made for another DiT are refused at start."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from zimage_split.common.errors import InvalidArgument
from zimage_split.dit_service.controlnets import ControlNetSpec, load_controlnet
from zimage_split.tiny_model import CONTROLNET_LAYOUTS, TINY, build_tiny_controlnet, transformer_kwargs

CPU = torch.device("cpu")
# load_controlnet reads only the DiT's config.
DIT = SimpleNamespace(config=transformer_kwargs(TINY))


def load(path: Path) -> tuple[torch.nn.Module, object]:
    return load_controlnet(ControlNetSpec("cn", str(path)), DIT, device=CPU, dtype=torch.float32)


@pytest.mark.parametrize("layout", CONTROLNET_LAYOUTS)
def test_a_single_file_loads_as_its_diffusers_folder(tmp_path: Path, layout: str) -> None:
    folder, folder_info = load(build_tiny_controlnet(tmp_path / "folder", seed=3, layout=layout))
    single, single_info = load(build_tiny_controlnet(tmp_path / "file.safetensors", seed=3, layout=layout))
    ignored = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")
    assert {k: v for k, v in folder.config.items() if k not in ignored} == dict(single.config)
    assert folder_info == single_info
    assert folder_info.takes_mask == (layout != "1.0")  # type: ignore[attr-defined]
    weights, loaded = folder.state_dict(), single.state_dict()
    assert weights.keys() == loaded.keys() and all(torch.equal(weights[k], loaded[k]) for k in weights)


def test_a_2_0_file_with_unused_refiner_blocks_loads_without_them(tmp_path: Path) -> None:
    """Union 2.0 files carry control_noise_refiner blocks whose before_proj is zero; diffusers drops them."""
    path = build_tiny_controlnet(tmp_path / "v2.safetensors", seed=4, layout="2.0")
    tensors = load_file(str(path))
    tensors["control_noise_refiner.0.before_proj.weight"] = torch.zeros(TINY.dit_dim, TINY.dit_dim)
    tensors["control_noise_refiner.0.attention.to_q.weight"] = torch.ones(TINY.dit_dim, TINY.dit_dim)
    save_file(tensors, str(path))
    model, _ = load(path)
    assert model.config["add_control_noise_refiner"] == "control_layers"
    assert not any(key.startswith("control_noise_refiner.") for key in model.state_dict())


def test_a_controlnet_for_another_dit_is_refused(tmp_path: Path) -> None:
    for path in (
        build_tiny_controlnet(tmp_path / "bench", size="bench"),
        build_tiny_controlnet(tmp_path / "bench.safetensors", size="bench"),
    ):
        with pytest.raises(InvalidArgument, match=r"was made for another DiT: dim 384 where the DiT has 32"):
            load(path)
    tensors = load_file(str(build_tiny_controlnet(tmp_path / "cut.safetensors")))
    del tensors["control_layers.1.after_proj.weight"]
    save_file(tensors, str(tmp_path / "cut.safetensors"))
    with pytest.raises(InvalidArgument, match=r"missing \[\"control_layers.1.after_proj.weight\"\]"):
        load(tmp_path / "cut.safetensors")
