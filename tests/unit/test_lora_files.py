"""LoRA files under --lora-dir: names that stay inside it, listing, the five formats' conversion, refusals.

No model here: files are real safetensors written by the tests. Loading them into the tiny DiT is in
tests/integration/test_lora_adapters.py, which builds its files with the writers below.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from zimage_split.common.errors import InvalidArgument, NotFound
from zimage_split.dit_service.lora.library import (
    MAX_LORA_SCALE,
    MAX_LORAS_PER_REQUEST,
    LoraLibrary,
    LoraSpec,
    check_specs,
)

# Layer sizes of the tiny model's DiT (tiny_model.TINY): dim 32, 2 heads of 16, feed-forward 85.
DIM, HEAD, FF, PATCH_IN, CAPTION, ADALN_OUT = 32, 16, 85, 64, 16, 128


@dataclass
class Lora:
    """A LoRA file's tensors and what the DiT must get from it, in diffusers names."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    # module -> (lora_A, lora_B, alpha / rank): the module's weight must change by scale * factor * B @ A.
    expected: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    # parameter -> difference: the parameter must change by scale * difference.
    diffs: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] | None = None

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(len(self.tensors) + 7)

    def random(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator) * 0.3

    def pair(
        self,
        down: str,
        up: str,
        module: str,
        rank: int,
        n_in: int,
        n_out: int,
        alpha: tuple[str, float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds lora_A [rank, n_in] under `down` and lora_B [n_out, rank] under `up`, and `alpha`'s key."""
        a, b = self.random(rank, n_in), self.random(n_out, rank)
        self.tensors[down], self.tensors[up] = a, b
        if alpha is not None:
            self.tensors[alpha[0]] = torch.tensor(alpha[1])
        self.expected[module] = (a, b, alpha[1] / rank if alpha else 1.0)
        return a, b

    def rank(self) -> int:
        return max(a.shape[0] for a, _, _ in self.expected.values())

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors, str(path), metadata=self.metadata)
        return path


def diffusers_lora() -> Lora:
    lora = Lora()
    t = "transformer.layers.0.attention.to_q"
    lora.pair(
        f"{t}.lora_A.weight",
        f"{t}.lora_B.weight",
        "layers.0.attention.to_q",
        4,
        DIM,
        DIM,
        (f"{t}.alpha", 2.0),
    )
    t = "transformer.layers.1.feed_forward.w2"
    lora.pair(
        f"{t}.lora_A.weight",
        f"{t}.lora_B.weight",
        "layers.1.feed_forward.w2",
        4,
        FF,
        DIM,
        (f"{t}.alpha", 8.0),
    )
    t = "transformer.context_refiner.0.attention.to_v"
    lora.pair(f"{t}.lora_A.weight", f"{t}.lora_B.weight", "context_refiner.0.attention.to_v", 2, DIM, DIM)
    return lora


def ai_toolkit_lora() -> Lora:
    lora = Lora()
    for module, rank, n_in, n_out in (
        ("layers.0.attention.to_k", 4, DIM, DIM),
        ("layers.1.attention.to_out.0", 4, DIM, DIM),
        ("all_final_layer.2-1.linear", 2, DIM, PATCH_IN),
        ("noise_refiner.0.adaLN_modulation.0", 3, DIM, ADALN_OUT),
    ):
        t = f"diffusion_model.{module}"
        lora.pair(f"{t}.lora_A.weight", f"{t}.lora_B.weight", module, rank, n_in, n_out)
    return lora


def kohya_lora() -> Lora:
    lora = Lora()
    for kohya, module, rank, n_in, n_out, alpha in (
        ("layers_1_attention_to_out_0", "layers.1.attention.to_out.0", 2, DIM, DIM, 3.0),
        ("context_refiner_0_feed_forward_w1", "context_refiner.0.feed_forward.w1", 4, DIM, FF, 1.0),
        ("noise_refiner_0_adaLN_modulation_0", "noise_refiner.0.adaLN_modulation.0", 4, DIM, ADALN_OUT, 4.0),
        ("all_x_embedder_2-1", "all_x_embedder.2-1", 2, PATCH_IN, DIM, 1.0),
        (
            "all_final_layer_2-1_adaLN_modulation_1",
            "all_final_layer.2-1.adaLN_modulation.1",
            2,
            DIM,
            DIM,
            2.0,
        ),
        ("cap_embedder_1", "cap_embedder.1", 2, CAPTION, DIM, 2.0),
        ("t_embedder_mlp_2", "t_embedder.mlp.2", 2, 1024, DIM, 6.0),
        # Original Z-Image names: diffusers' converter leaves the first as `final.layer.linear`.
        ("final_layer_linear", "all_final_layer.2-1.linear", 2, DIM, PATCH_IN, 1.0),
        ("layers_0_attention_out", "layers.0.attention.to_out.0", 2, DIM, DIM, 1.0),
    ):
        t = f"lora_unet_{kohya}"
        lora.pair(
            f"{t}.lora_down.weight", f"{t}.lora_up.weight", module, rank, n_in, n_out, (f"{t}.alpha", alpha)
        )
    # musubi's fused attention: q, k and v stacked on lora_up's rows, one shared lora_down.
    t = "lora_unet_layers_0_attention_qkv"
    a, b = lora.pair(
        f"{t}.lora_down.weight", f"{t}.lora_up.weight", "qkv", 4, DIM, 3 * DIM, (f"{t}.alpha", 8.0)
    )
    del lora.expected["qkv"]
    for index, projection in enumerate("qkv"):
        lora.expected[f"layers.0.attention.to_{projection}"] = (a, b[index * DIM : (index + 1) * DIM], 2.0)
    return lora


def dotted_lora() -> Lora:
    lora = Lora()
    p = "diffusion_model.layers.0.attention"
    lora.pair(
        f"{p}.to.q.lora.down.weight",
        f"{p}.to.q.lora.up.weight",
        "layers.0.attention.to_q",
        4,
        DIM,
        DIM,
        (f"{p}.to.q.alpha", 2.0),
    )
    for projection in "kv":
        t = f"{p}.to.{projection}"
        lora.pair(
            f"{t}.lora.down.weight", f"{t}.lora.up.weight", f"layers.0.attention.to_{projection}", 4, DIM, DIM
        )
    # A redundant fused copy next to the split keys: it must be ignored, not added on top.
    lora.tensors[f"{p}.qkv.lora.down.weight"] = lora.random(4, DIM)
    lora.tensors[f"{p}.qkv.lora.up.weight"] = lora.random(3 * DIM, 4)
    p = "diffusion_model.layers.1"
    lora.pair(
        f"{p}.attention.out.lora.down.weight",
        f"{p}.attention.out.lora.up.weight",
        "layers.1.attention.to_out.0",
        2,
        DIM,
        DIM,
        (f"{p}.attention.out.alpha", 1.0),
    )
    lora.pair(
        f"{p}.feed_forward.w3.lora.down.weight",
        f"{p}.feed_forward.w3.lora.up.weight",
        "layers.1.feed_forward.w3",
        4,
        DIM,
        FF,
    )
    return lora


def comfyui_lora() -> Lora:
    lora = Lora()
    p = "diffusion_model.layers.0.attention"
    a, b = lora.pair(
        f"{p}.qkv.lora_A.weight", f"{p}.qkv.lora_B.weight", "qkv", 4, DIM, 3 * DIM, (f"{p}.qkv.alpha", 2.0)
    )
    del lora.expected["qkv"]
    for index, projection in enumerate("qkv"):
        lora.expected[f"layers.0.attention.to_{projection}"] = (a, b[index * DIM : (index + 1) * DIM], 0.5)
    # A block-diagonal fused qkv (separate q, k and v LoRAs of rank 2 packed into rank 6) in a refiner.
    p = "diffusion_model.noise_refiner.0.attention"
    a, b = lora.random(6, DIM), torch.zeros(3 * DIM, 6)
    for index in range(3):
        b[index * DIM : (index + 1) * DIM, 2 * index : 2 * index + 2] = lora.random(DIM, 2)
    lora.tensors.update(
        {f"{p}.qkv.lora_A.weight": a, f"{p}.qkv.lora_B.weight": b, f"{p}.qkv.alpha": torch.tensor(3.0)}
    )
    for index, projection in enumerate("qkv"):
        lora.expected[f"noise_refiner.0.attention.to_{projection}"] = (
            a,
            b[index * DIM : (index + 1) * DIM],
            0.5,
        )
    p = "diffusion_model.layers.1.attention.out"
    lora.pair(
        f"{p}.lora_A.weight",
        f"{p}.lora_B.weight",
        "layers.1.attention.to_out.0",
        2,
        DIM,
        DIM,
        (f"{p}.alpha", 4.0),
    )
    p = "diffusion_model.x_embedder"
    lora.pair(f"{p}.lora_A.weight", f"{p}.lora_B.weight", "all_x_embedder.2-1", 2, PATCH_IN, DIM)
    p = "diffusion_model.final_layer"
    lora.pair(
        f"{p}.linear.lora_down.weight",
        f"{p}.linear.lora_up.weight",
        "all_final_layer.2-1.linear",
        2,
        DIM,
        PATCH_IN,
        (f"{p}.linear.alpha", 1.0),
    )
    lora.pair(
        f"{p}.adaLN_modulation.1.lora_A.weight",
        f"{p}.adaLN_modulation.1.lora_B.weight",
        "all_final_layer.2-1.adaLN_modulation.1",
        2,
        DIM,
        DIM,
    )
    # Extracted LoRAs carry the norms and biases they changed as plain differences.
    for original, parameter, size in (
        ("layers.0.attention.q_norm.diff", "layers.0.attention.norm_q.weight", HEAD),
        ("layers.0.attention.k_norm.diff", "layers.0.attention.norm_k.weight", HEAD),
        ("x_embedder.diff_b", "all_x_embedder.2-1.bias", DIM),
    ):
        lora.tensors[f"diffusion_model.{original}"] = lora.diffs[parameter] = lora.random(size)
    return lora


WRITERS: dict[str, Callable[[], Lora]] = {
    "diffusers": diffusers_lora,
    "ai-toolkit": ai_toolkit_lora,
    "kohya": kohya_lora,
    "dotted": dotted_lora,
    "comfyui": comfyui_lora,
}


def products(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """module -> lora_B @ lora_A of a converted state dict (the weight change at scale 1)."""
    return {
        key.removeprefix("transformer.").removesuffix(".lora_A.weight"): state_dict[
            key.replace(".lora_A.", ".lora_B.")
        ].float()
        @ value.float()
        for key, value in state_dict.items()
        if key.endswith(".lora_A.weight")
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "loras"
    folder.mkdir()
    return folder


# --- request specs -------------------------------------------------------------------------------------


def test_specs_are_canonical() -> None:
    specs = check_specs([LoraSpec("style.safetensors", 1), LoraSpec("people/alice", -0.5)])
    assert specs == (LoraSpec("style", 1.0), LoraSpec("people/alice", -0.5))
    assert isinstance(specs[0].scale, float)
    assert check_specs([]) == ()


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ([LoraSpec("", 1.0)], "empty"),
        ([LoraSpec("  ", 1.0)], "empty"),
        ([LoraSpec("a"), LoraSpec("a.safetensors")], "named twice"),
        ([LoraSpec("a", math.nan)], "scale"),
        ([LoraSpec("a", math.inf)], "scale"),
        ([LoraSpec("a", MAX_LORA_SCALE + 0.5)], "scale"),
        ([LoraSpec("a", -MAX_LORA_SCALE - 0.5)], "scale"),
        ([LoraSpec("a", True)], "scale"),
        ([LoraSpec(f"l{i}") for i in range(MAX_LORAS_PER_REQUEST + 1)], "at most"),
    ],
)
def test_bad_specs_are_refused(specs: list[LoraSpec], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_specs(specs)


def test_the_largest_scale_is_allowed() -> None:
    assert check_specs([LoraSpec("a", -MAX_LORA_SCALE), LoraSpec("b", MAX_LORA_SCALE)])[1].scale == 8.0


# --- names stay inside --lora-dir ----------------------------------------------------------------------


def test_without_lora_dir_everything_says_how_to_turn_it_on() -> None:
    library = LoraLibrary(None)
    assert not library.enabled
    for call in (library.list, lambda: library.resolve("style"), lambda: library.read("style")):
        with pytest.raises(InvalidArgument, match="--lora-dir"):
            call()


def test_lora_dir_must_be_a_folder(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="not a folder"):
        LoraLibrary(tmp_path / "missing")


@pytest.mark.parametrize(
    "name",
    ["../x", "/etc/passwd", "a/../../x", "..", "a/./b", "a//b", "a\\..\\b", "x\x00y", "", "a/"],
)
def test_names_that_could_leave_the_folder_are_refused(root: Path, name: str) -> None:
    ai_toolkit_lora().write(root.parent / "x.safetensors")  # what `../x` would reach
    with pytest.raises(InvalidArgument):
        LoraLibrary(root).resolve(name)


def test_a_symlink_out_of_the_folder_is_refused(root: Path, tmp_path: Path) -> None:
    outside = ai_toolkit_lora().write(tmp_path / "elsewhere" / "secret.safetensors")
    (root / "link.safetensors").symlink_to(outside)
    (root / "linked_folder").symlink_to(outside.parent, target_is_directory=True)
    library = LoraLibrary(root)
    for name in ("link", "linked_folder/secret"):
        with pytest.raises(InvalidArgument, match="outside --lora-dir"):
            library.resolve(name)
    (listed,) = library.list()
    assert listed.name == "link" and "outside --lora-dir" in listed.error


def test_a_symlink_inside_the_folder_is_fine(root: Path) -> None:
    target = ai_toolkit_lora().write(root / "real" / "style.safetensors")
    (root / "alias.safetensors").symlink_to(target)
    assert LoraLibrary(root).resolve("alias") == target.resolve()


def test_an_unknown_name_is_not_found_and_lists_some_names(root: Path) -> None:
    ai_toolkit_lora().write(root / "people" / "alice.safetensors")
    ai_toolkit_lora().write(root / "style.safetensors")
    with pytest.raises(NotFound, match="'people/alice', 'style'"):
        LoraLibrary(root).resolve("styel")
    empty = root / "empty"
    empty.mkdir()
    with pytest.raises(NotFound, match="no .safetensors files"):
        LoraLibrary(empty).resolve("style")


# --- listing ---------------------------------------------------------------------------------------------


def test_listing_shows_every_file_and_why_a_bad_one_cannot_load(root: Path) -> None:
    kohya_lora().write(root / "b_kohya.safetensors")
    comfyui_lora().write(root / "people" / "alice.safetensors")
    (root / "a_corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    truncated = (root / "b_kohya.safetensors").read_bytes()[:200]
    (root / "c_truncated.safetensors").write_bytes(truncated)
    (root / "notes.txt").write_text("not a LoRA")
    listed = {file.name: file for file in LoraLibrary(root).list()}
    assert list(listed) == ["a_corrupt", "b_kohya", "c_truncated", "people/alice"]
    assert "cannot be read as a .safetensors file" in listed["a_corrupt"].error
    assert "cannot be read as a .safetensors file" in listed["c_truncated"].error
    kohya = listed["b_kohya"]
    assert (kohya.error, kohya.format, kohya.rank) == ("", "kohya", 4)
    assert kohya.byte_length == (root / "b_kohya.safetensors").stat().st_size
    # Nine modules plus the fused qkv's three.
    assert kohya.module_count == 12
    alice = listed["people/alice"]
    assert (alice.error, alice.format, alice.rank, alice.path) == (
        "",
        "comfyui",
        6,
        root / "people" / "alice.safetensors",
    )
    # 3 + 3 from the fused qkvs, out, x_embedder, two final-layer linears, norm_q and norm_k.
    assert alice.module_count == 12


@pytest.mark.parametrize("file_format", WRITERS)
def test_listing_agrees_with_reading(root: Path, file_format: str) -> None:
    WRITERS[file_format]().write(root / "lora.safetensors")
    library = LoraLibrary(root)
    (listed,) = library.list()
    _, read = library.read("lora")
    assert listed == read and listed.error == ""


# --- the five formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize("file_format", WRITERS)
def test_each_format_converts_to_diffusers_names_with_alpha_folded(root: Path, file_format: str) -> None:
    lora = WRITERS[file_format]()
    lora.write(root / "lora.safetensors")
    state_dict, info = LoraLibrary(root).read("lora")
    assert info.format == file_format
    assert info.rank == lora.rank() and info.error == ""
    got = products(state_dict)
    assert set(got) == set(lora.expected)
    for module, (a, b, factor) in lora.expected.items():
        torch.testing.assert_close(got[module], factor * (b @ a), msg=module)
    diffs = {
        k.removeprefix("transformer.").removesuffix(".diff"): v
        for k, v in state_dict.items()
        if k.endswith(".diff")
    }
    assert diffs.keys() == lora.diffs.keys()
    for parameter, diff in lora.diffs.items():
        assert torch.equal(diffs[parameter], diff)


def test_peft_metadata_alphas_are_applied(root: Path) -> None:
    """diffusers' save_lora_weights keeps lora_alpha in the file's metadata rather than in `.alpha` keys."""
    lora = Lora()
    for module in ("layers.0.attention.to_q", "layers.1.attention.to_k"):
        t = f"transformer.{module}"
        lora.pair(f"{t}.lora_A.weight", f"{t}.lora_B.weight", module, 4, DIM, DIM)
    config = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"layers.1.attention.to_k": 2}}
    lora.metadata = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    lora.write(root / "lora.safetensors")
    got = products(LoraLibrary(root).read("lora")[0])
    for module, factor in (("layers.0.attention.to_q", 2.0), ("layers.1.attention.to_k", 0.5)):
        a, b, _ = lora.expected[module]
        torch.testing.assert_close(got[module], factor * (b @ a))


def test_peft_keys_without_a_prefix_and_with_default_are_understood(root: Path) -> None:
    lora = Lora()
    lora.pair(
        "base_model.model.layers.0.attention.to_q.lora_A.default.weight",
        "base_model.model.layers.0.attention.to_q.lora_B.default.weight",
        "layers.0.attention.to_q",
        2,
        DIM,
        DIM,
    )
    lora.write(root / "peft.safetensors")
    state_dict, info = LoraLibrary(root).read("peft")
    assert info.format == "diffusers"
    assert set(state_dict) == {
        "transformer.layers.0.attention.to_q.lora_A.weight",
        "transformer.layers.0.attention.to_q.lora_B.weight",
    }


def test_text_encoder_layers_are_skipped(root: Path) -> None:
    lora = kohya_lora()
    lora.tensors["lora_te_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(2, 8)
    lora.tensors["lora_te_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(8, 2)
    lora.write(root / "with_te.safetensors")
    state_dict, info = LoraLibrary(root).read("with_te")
    assert info.module_count == 12 and not any("self_attn" in key for key in state_dict)


# --- refusals ------------------------------------------------------------------------------------------


def refused(
    root: Path,
    tensors: dict[str, torch.Tensor],
    match: str,
    *,
    file: str = "lora",
    metadata: dict[str, str] | None = None,
) -> None:
    save_file(tensors, str(root / f"{file}.safetensors"), metadata=metadata)
    library = LoraLibrary(root)
    with pytest.raises(InvalidArgument, match=match):
        library.read(file)


def test_not_a_safetensors_file(root: Path) -> None:
    (root / "pickle.safetensors").write_bytes(b"\x80\x04\x95" + os.urandom(64))
    (root / "empty.safetensors").write_bytes(b"")
    for name in ("pickle", "empty"):
        with pytest.raises(InvalidArgument, match="cannot be read as a .safetensors file"):
            LoraLibrary(root).read(name)


def test_a_full_checkpoint_has_no_lora_layers(root: Path) -> None:
    refused(root, {"layers.0.attention.qkv.weight": torch.zeros(96, 32)}, "holds no LoRA layers")


@pytest.mark.parametrize(
    "keys",
    [
        # FLUX in diffusers names, SDXL in kohya names, FLUX in its original names (a fused qkv too).
        (
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight",
        ),
        (
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
        ),
        (
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight",
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight",
        ),
    ],
)
def test_a_lora_for_another_model_is_refused(root: Path, keys: tuple[str, str]) -> None:
    refused(root, {keys[0]: torch.zeros(2, 32), keys[1]: torch.zeros(96, 2)}, "another model")


def test_a_lora_on_a_norm_is_refused(root: Path) -> None:
    t = "diffusion_model.layers.0.attention.norm_q"
    refused(
        root,
        {f"{t}.lora_A.weight": torch.zeros(2, 16), f"{t}.lora_B.weight": torch.zeros(16, 2)},
        "another model",
    )


def test_non_finite_values_are_refused_on_read(root: Path) -> None:
    lora = ai_toolkit_lora()
    lora.tensors["diffusion_model.layers.0.attention.to_k.lora_B.weight"][3, 1] = math.nan
    lora.write(root / "nan.safetensors")
    with pytest.raises(
        InvalidArgument, match="NaN or infinite values in 'diffusion_model.layers.0.attention.to_k"
    ):
        LoraLibrary(root).read("nan")


@pytest.mark.parametrize(
    ("file", "metadata"),
    [
        ("zimage_turbo_training_adapter_v2", None),
        ("helper", {"name": "zimage_turbo_training_adapter"}),
        ("helper", {"modelspec.title": "Z-Image Turbo Training Adapter"}),
    ],
)
def test_the_training_adapter_is_refused(root: Path, file: str, metadata: dict[str, str] | None) -> None:
    tensors = ai_toolkit_lora().tensors
    refused(root, tensors, "training adapter.*never loaded to make images", file=file, metadata=metadata)
    (listed,) = LoraLibrary(root).list()
    assert "training adapter" in listed.error


def test_a_lora_trained_with_the_training_adapter_loads(root: Path) -> None:
    """ai-toolkit records the adapter's path in the training config of every LoRA trained with it."""
    config = {
        "config": {"model": {"assistant_lora_path": "ostris/zimage_turbo_training_adapter/v2.safetensors"}}
    }
    lora = ai_toolkit_lora()
    lora.metadata = {"name": "my_style", "training_info": json.dumps(config)}
    lora.write(root / "my_style.safetensors")
    assert LoraLibrary(root).read("my_style")[1].error == ""


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ({"diffusion_model.layers.0.attention.to_q.lokr_w1": torch.zeros(4, 4)}, "LyCORIS"),
        (
            {
                "transformer.layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 32),
                "transformer.layers.0.attention.to_q.lora_B.weight": torch.zeros(32, 2),
                "transformer.layers.0.attention.to_q.lora_magnitude_vector": torch.zeros(32),
            },
            "DoRA",
        ),
        ({"diffusion_model.layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 32)}, "pair"),
        (
            {"diffusion_model.layers.0.attention.qkv.lora_A.weight": torch.zeros(2, 32)},
            "half of the LoRA pair",
        ),
        (
            {
                "diffusion_model.layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 32),
                "diffusion_model.layers.0.attention.to_q.lora_B.weight": torch.zeros(32, 3),
            },
            "broken pair",
        ),
        ({"diffusion_model.layers.0.attention.qkv.diff": torch.zeros(96, 32)}, "full-weight differences"),
    ],
)
def test_files_that_are_not_plain_lora_are_refused(
    root: Path, tensors: dict[str, torch.Tensor], match: str
) -> None:
    refused(root, tensors, match)
