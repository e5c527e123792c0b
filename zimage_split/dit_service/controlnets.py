"""ControlNets a generator loads at start (`--controlnet NAME=PATH`), checked against its DiT.

PATH is a diffusers folder (config.json and safetensors weights, `ZImageControlNetModel.from_pretrained`) or
one .safetensors file in the layout of alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union releases (1.0, 2.0,
2.1), whose keys are already diffusers' names. diffusers' `from_single_file` fetches such a file's config from
the Hub; a generator may have no network, so `single_file_config` reads it off the tensors instead (see there).
safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zimage_split.common.errors import InvalidArgument

if TYPE_CHECKING:  # torch is imported where weights load, so the CLI can parse --controlnet without it
    import torch

# diffusers' ZImageControlNetPipeline default.
DEFAULT_CONTROLNET_SCALE = 0.75
# The conditioning scale a request may ask for: 0.6 to 1 is usual; far above it the hints swamp the DiT.
MAX_CONTROLNET_SCALE = 10.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# The patch embedder every Z-Image ControlNet has (patch 2, frame patch 1).
_EMBEDDER_KEY = "control_all_x_embedder.2-1.weight"


@dataclass(frozen=True)
class ControlNetSpec:
    """One `--controlnet NAME=PATH`."""

    name: str
    path: str

    @property
    def flag(self) -> str:
        return f"--controlnet {self.name}={self.path}"


@dataclass(frozen=True)
class ControlNetInfo:
    """What the front needs to know about a loaded ControlNet."""

    name: str
    # Whether it takes an inpainting mask: its control input is the control image's latents, the mask and the
    # masked image's latents (control_in_dim = 2 * latent channels + 1, the Union 2.x layout), which
    # diffusers' ZImageControlNetInpaintPipeline needs.
    takes_mask: bool
    # Main DiT blocks it adds hints to.
    control_layers: int


def parse_controlnet_flag(value: str) -> ControlNetSpec:
    """`--controlnet NAME=PATH`; raises InvalidArgument saying the form."""
    name, separator, path = value.partition("=")
    if not separator or not path:
        raise InvalidArgument(
            f"--controlnet {value!r}: give NAME=PATH, e.g. --controlnet pose=/models/controlnet-union "
            "(a diffusers folder or a .safetensors file)."
        )
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"--controlnet {value!r}: the name {name!r} must be 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit; requests name the ControlNet by it."
        )
    return ControlNetSpec(name, path)


def check_controlnet_specs(specs: tuple[ControlNetSpec, ...]) -> None:
    """Names once each, and paths that are a folder with config.json or a .safetensors file; before the
    model loads, so a typo fails at once."""
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise InvalidArgument(
                f"{spec.flag}: the name {spec.name!r} is given twice; name each ControlNet once."
            )
        seen.add(spec.name)
        path = Path(spec.path).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise InvalidArgument(
                    f"{spec.flag}: the folder has no config.json, so it is not a diffusers ControlNet folder. "
                    "Pass the folder that holds config.json, or the .safetensors file itself."
                )
        elif not path.is_file():
            raise InvalidArgument(f"{spec.flag}: no such file or folder.")
        elif path.suffix != ".safetensors":
            raise InvalidArgument(
                f"{spec.flag}: only .safetensors files are loaded (never pickled .bin/.pt/.ckpt files); "
                "convert it to safetensors."
            )


def load_controlnet(
    spec: ControlNetSpec, transformer: Any, *, device: torch.device, dtype: torch.dtype
) -> tuple[Any, ControlNetInfo]:
    """Loads the ControlNet of `spec` onto `device` in `dtype`, checked against `transformer` (the DiT).

    Returns the `ZImageControlNetModel` (not yet sharing the DiT's modules: the pipelines' constructors do that,
    through `ZImageControlNetModel.from_transformer`) and its description. Raises InvalidArgument naming the
    flag for a missing file, another layout or a ControlNet made for another DiT.
    """
    from diffusers import ZImageControlNetModel

    check_controlnet_specs((spec,))
    path = Path(spec.path).expanduser()
    dit = dict(transformer.config)
    if path.is_dir():
        config = dict(ZImageControlNetModel.load_config(str(path)))
        check_fits(spec, config, dit)
        try:
            model = ZImageControlNetModel.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
        except (OSError, ValueError, RuntimeError) as error:
            first = (str(error).strip().splitlines() or [""])[0]
            raise InvalidArgument(
                f"{spec.flag}: the folder's weights could not be loaded ({type(error).__name__}: {first}). It "
                "needs config.json beside diffusion_pytorch_model.safetensors (or its sharded index)."
            ) from None
    else:
        model = _from_single_file(spec, path, dit, dtype)
    model = model.to(device=device).eval()
    config = dict(model.config)
    return model, ControlNetInfo(
        name=spec.name,
        takes_mask=int(config["control_in_dim"]) == 2 * int(dit["in_channels"]) + 1,
        control_layers=len(config["control_layers_places"]),
    )


def single_file_config(state_dict: dict[str, torch.Tensor], dit: dict[str, Any]) -> dict[str, Any]:
    """The `ZImageControlNetModel` config of a single-file ControlNet, read off its tensors and the DiT's config.

    - dim and control_in_dim from the patch embedder `control_all_x_embedder.2-1.weight` ([dim, 4 * in_dim]);
      heads from the head size of `control_layers.0.attention.norm_q.weight`.
    - The variant as diffusers' single-file loader tells them apart: a refiner block 0 with a non-zero
      `before_proj` is 2.1 (add_control_noise_refiner "control_noise_refiner"); otherwise a control input wider
      than the latents is 2.0 ("control_layers", whose refiner keys diffusers drops); otherwise 1.0 (None).
    - The K control blocks sit evenly over the DiT's N blocks, at 0, N // K, 2 * N // K ...: the published
      configs (1.0: 6 blocks at 0, 5, ..., 25; 2.x: 15 at 0, 2, ..., 28 of 30). A file placed otherwise needs
      a diffusers folder with its own config.json.
    - Refiner hints go to the DiT's refiner blocks in order (2.x: [0, 1]).
    """
    embedder = state_dict.get(_EMBEDDER_KEY)
    if embedder is None or embedder.dim() != 2 or embedder.shape[1] % 4:
        raise ValueError(f"it has no {_EMBEDDER_KEY} of shape [dim, 4 * control channels]")
    dim, control_in_dim = int(embedder.shape[0]), int(embedder.shape[1]) // 4
    blocks = _block_numbers(state_dict, "control_layers.")
    if not blocks or 0 not in blocks:
        raise ValueError("it has no control_layers.0.* tensors")
    norm = state_dict.get("control_layers.0.attention.norm_q.weight")
    if norm is None or dim % int(norm.shape[0]):
        raise ValueError("it has no control_layers.0.attention.norm_q.weight dividing its width into heads")
    heads = dim // int(norm.shape[0])
    refiners = _block_numbers(state_dict, "control_noise_refiner.")
    before = state_dict.get("control_noise_refiner.0.before_proj.weight")
    dit_refiners = int(dit["n_refiner_layers"])
    if before is not None and bool(before.abs().max() > 0):
        mode: str | None = "control_noise_refiner"
        refiner_places = list(range(len(refiners)))
    elif control_in_dim != int(dit["in_channels"]):
        mode, refiner_places = "control_layers", list(range(dit_refiners))
    else:
        mode, refiner_places = None, []
    # More control blocks than the DiT has: one per block, which check_fits then refuses.
    count, step = len(blocks), max(1, int(dit["n_layers"]) // len(blocks))
    return {
        "control_layers_places": [index * step for index in range(count)],
        "control_refiner_layers_places": refiner_places,
        "control_in_dim": control_in_dim,
        "add_control_noise_refiner": mode,
        "all_patch_size": [2],
        "all_f_patch_size": [1],
        "dim": dim,
        "n_refiner_layers": len(refiners) or dit_refiners,
        "n_heads": heads,
        "n_kv_heads": heads,
        "norm_eps": float(dit.get("norm_eps", 1e-5)),
        "qk_norm": True,
    }


def check_fits(spec: ControlNetSpec, config: dict[str, Any], dit: dict[str, Any]) -> None:
    """A ControlNet made for this DiT: its width, heads, patch sizes and the blocks it feeds must exist here.

    (A ControlNet has no caption embedder of its own: it runs the DiT's, so the caption width always fits.)
    """
    problems = []
    for key in ("dim", "n_heads"):
        if int(config.get(key, -1)) != int(dit[key]):
            problems.append(f"{key} {config.get(key)} where the DiT has {dit[key]}")
    layers, refiners = int(dit["n_layers"]), int(dit["n_refiner_layers"])
    places = list(config.get("control_layers_places") or [])
    if not places or 0 not in places or any(not 0 <= place < layers for place in places):
        problems.append(
            f"control blocks at {places}, where the DiT has blocks 0 to {layers - 1} (block 0 needed)"
        )
    refiner_places = list(config.get("control_refiner_layers_places") or [])
    if config.get("add_control_noise_refiner") and any(not 0 <= p < refiners for p in refiner_places):
        problems.append(
            f"refiner hints at {refiner_places}, where the DiT has refiner blocks 0 to {refiners - 1}"
        )
    if not set(config.get("all_patch_size") or [2]) <= set(dit["all_patch_size"]):
        problems.append(
            f"patch sizes {config.get('all_patch_size')} where the DiT has {dit['all_patch_size']}"
        )
    control_in = int(config.get("control_in_dim") or 0)
    if control_in < int(dit["in_channels"]):
        problems.append(
            f"control_in_dim {control_in}, fewer than the DiT's {dit['in_channels']} latent channels"
        )
    if problems:
        raise InvalidArgument(
            f"{spec.flag} was made for another DiT: {'; '.join(problems)}. Use a ControlNet trained for this "
            "model (Z-Image-Turbo's are alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union)."
        )


def _from_single_file(spec: ControlNetSpec, path: Path, dit: dict[str, Any], dtype: torch.dtype) -> Any:
    from diffusers import ZImageControlNetModel
    from diffusers.loaders.single_file_utils import convert_z_image_controlnet_checkpoint_to_diffusers
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state_dict = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise InvalidArgument(f"{spec.flag}: not a readable safetensors file ({error}).") from None
    try:
        config = single_file_config(state_dict, dit)
    except ValueError as error:
        raise InvalidArgument(
            f"{spec.flag}: not a Z-Image ControlNet in the Z-Image-Turbo-Fun-Controlnet-Union layout: {error}. "
            "Pass that file, or a diffusers folder (config.json and safetensors weights)."
        ) from None
    check_fits(spec, config, dit)
    import torch

    with torch.device("meta"):  # no random init of weights the file replaces
        model = ZImageControlNetModel.from_config(config)
    converted = {
        key: tensor.to(dtype)
        for key, tensor in convert_z_image_controlnet_checkpoint_to_diffusers(state_dict, config).items()
    }
    missing, unexpected = model.load_state_dict(converted, strict=False, assign=True)
    if missing or unexpected:
        raise InvalidArgument(
            f"{spec.flag}: its tensors do not match the Z-Image ControlNet layout read off it (missing "
            f"{_some(missing)}; unexpected {_some(unexpected)}). Convert it to a diffusers folder with a "
            "config.json."
        )
    return model


def _block_numbers(state_dict: dict[str, torch.Tensor], prefix: str) -> set[int]:
    return {
        int(key.split(".")[1]) for key in state_dict if key.startswith(prefix) and key.split(".")[1].isdigit()
    }


def _some(keys: list[str]) -> str:
    return json.dumps(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "") if keys else "none"
