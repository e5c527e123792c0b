"""The five LoRA file layouts (diffusers/PEFT, ai-toolkit, kohya, dotted, ComfyUI): detected, converted to
diffusers names, and refused, saying the fix, when they cannot work on a Z-Image DiT."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from zimage_split.common.errors import InvalidArgument

logger = logging.getLogger(__name__)

FORMATS = ("diffusers", "ai-toolkit", "kohya", "dotted", "comfyui")

# Prefixes that wrap the DiT's own module names: ComfyUI and ai-toolkit, diffusers pipelines, PEFT.
_WRAPPERS = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.")
# Text-encoder layers: the encoder runs in another service and never takes a LoRA, so these are skipped.
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder.", "text_encoders.", "lora_qwen")
# Module names of the original Z-Image code (and ComfyUI's copy of it) that diffusers renamed.
_ORIGINAL_LAYOUT = re.compile(
    r"(^|\.)attention\.(qkv|out|q_norm|k_norm)\.|^x_embedder\.|^final_layer\.|\.diff(_b)?$"
)
_ORIGINAL_NAMES = (
    (re.compile(r"^x[._]embedder$"), "all_x_embedder.2-1"),
    (re.compile(r"^final[._]layer\."), "all_final_layer.2-1."),
    (re.compile(r"\.attention\.out$"), ".attention.to_out.0"),
    (re.compile(r"\.attention\.q_norm$"), ".attention.norm_q"),
    (re.compile(r"\.attention\.k_norm$"), ".attention.norm_k"),
)
# The linear layers of ZImageTransformer2DModel (any size) that a LoRA can change.
_BLOCK = r"(?:layers|noise_refiner|context_refiner|siglip_refiner)\.\d+"
_LINEAR = re.compile(
    rf"{_BLOCK}\.(?:attention\.(?:to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123]|adaLN_modulation\.0)"
    r"|all_x_embedder\.\d+-\d+|all_final_layer\.\d+-\d+\.(?:linear|adaLN_modulation\.1)"
    r"|cap_embedder\.1|siglip_embedder\.1|t_embedder\.mlp\.[02]"
)
# 1-D parameters a ComfyUI file may change directly (`.diff`, `.diff_b`): norm weights and biases.
_DELTA = re.compile(
    rf"{_BLOCK}\.(?:attention\.norm_[qk]|attention_norm[12]|ffn_norm[12])\.weight"
    r"|(?:cap_embedder|siglip_embedder)\.0\.weight"
    rf"|(?:{_LINEAR.pattern})\.bias"
)
_PARTS = (
    (".lora_A.weight", "A"),
    (".lora_down.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_up.weight", "B"),
    (".alpha", "alpha"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
)
LORA_A, LORA_B, DIFF = ".lora_A.weight", ".lora_B.weight", ".diff"


@dataclass(frozen=True)
class ConvertedLora:
    """A LoRA file in diffusers names: `<module>.lora_A.weight` (alpha folded in) and `.lora_B.weight`, plus
    `<parameter>.diff` for norm and bias differences."""

    format: str  # one of FORMATS
    modules: dict[str, torch.Tensor]
    rank: int  # the largest rank over its layers
    module_count: int  # DiT modules it changes


def convert(
    name: str, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, load: bool
) -> ConvertedLora:
    """Detects the layout of a file's tensors and converts them. InvalidArgument, saying the fix, for files
    that cannot work on a Z-Image DiT. `load=False` (tensors on the meta device) skips the value checks."""
    _refuse_training_adapter(name, path, metadata)
    tensors = _drop_text_encoder(name, tensors)
    _refuse_other_kinds(name, tensors)
    file_format = _detect_format(tensors)
    if load:
        _refuse_non_finite(name, tensors)
    if file_format == "comfyui":
        modules = _convert_comfyui(name, tensors)
    else:
        modules = _convert_with_diffusers(name, tensors, file_format, metadata)
    modules = _split_fused_qkv(name, _rename_original(modules))
    rank, module_count = _check_layout(name, modules)
    return ConvertedLora(format=file_format, modules=modules, rank=rank, module_count=module_count)


def _refuse_training_adapter(name: str, path: Path, metadata: dict[str, str]) -> None:
    # Only the fields that name the file itself: LoRAs trained with the adapter record its path in their
    # training config, and those are fine to load.
    fields = [
        name,
        path.stem,
        *(metadata.get(key, "") for key in ("name", "ss_output_name", "modelspec.title")),
    ]
    if any("training_adapter" in re.sub(r"[\s-]+", "_", str(value).lower()) for value in fields):
        raise InvalidArgument(
            f"LoRA {shown(name)} is ai-toolkit's de-distillation training adapter: it undoes Turbo's "
            "distillation so LoRAs can be trained, and is never loaded to make images. Load the LoRA you "
            "trained with it instead, and remove this file from --lora-dir."
        )


def _drop_text_encoder(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    kept = {key: value for key, value in tensors.items() if not key.startswith(_TEXT_ENCODER_PREFIXES)}
    if len(kept) < len(tensors):
        logger.warning(
            "LoRA %s: skipping its %d text-encoder tensors; the encoder service never takes LoRAs",
            name,
            len(tensors) - len(kept),
        )
    return kept


def _refuse_other_kinds(name: str, tensors: dict[str, torch.Tensor]) -> None:
    keys = list(tensors)
    if any(marker in key for key in keys for marker in (".lokr_", ".hada_", ".lora_mid.", ".oft_")):
        raise InvalidArgument(
            f"LoRA {shown(name)} is a LyCORIS adapter (LoKr, LoHa, LoCon or OFT), and only plain LoRA "
            "files are supported; re-export it as a LoRA (lora_A/lora_B or lora_down/lora_up layers)."
        )
    if any("dora_scale" in key or "lora_magnitude_vector" in key for key in keys):
        raise InvalidArgument(
            f"LoRA {shown(name)} is a DoRA, which is not supported; re-export it as a plain LoRA."
        )
    layer_suffixes = tuple(suffix for suffix, part in _PARTS if part != "alpha") + (
        ".lora.down.weight",
        ".lora_A.default.weight",
    )
    if not any(key.endswith(layer_suffixes) for key in keys):
        raise InvalidArgument(
            f"LoRA {shown(name)} holds no LoRA layers (keys such as 'layers.0.attention.to_q.lora_A.weight' "
            f"or '...lora_down.weight'; it has {_few(keys)}). Is it a full model checkpoint or an embedding? "
            "Put only LoRA files in --lora-dir."
        )


def _refuse_non_finite(name: str, tensors: dict[str, torch.Tensor]) -> None:
    bad = [key for key, value in tensors.items() if value.is_floating_point() and not value.isfinite().all()]
    if bad:
        raise InvalidArgument(
            f"LoRA {shown(name)} has NaN or infinite values in {_few(bad)}; the file is corrupt or its "
            "training diverged. Re-download it or use an earlier checkpoint."
        )


def _strip_wrapper(key: str) -> str:
    for prefix in _WRAPPERS:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _detect_format(tensors: dict[str, torch.Tensor]) -> str:
    keys = list(tensors)
    if any(key.startswith("lora_unet_") for key in keys):
        return "kohya"
    if any(".lora.down.weight" in key or ".lora.up.weight" in key for key in keys):
        return "dotted"
    if any(_ORIGINAL_LAYOUT.search(_strip_wrapper(key)) for key in keys):
        return "comfyui"
    if any(key.startswith(("diffusion_model.", "model.diffusion_model.")) for key in keys):
        return "ai-toolkit"
    return "diffusers"


def _alpha_factor(name: str, module: str, alpha: torch.Tensor | None, down: torch.Tensor) -> float:
    if alpha is None:
        return 1.0
    if alpha.numel() != 1 or not math.isfinite(float(alpha.reshape(-1)[0])):
        raise InvalidArgument(f"LoRA {shown(name)} has a bad alpha for {module!r}; re-export the file.")
    return float(alpha.reshape(-1)[0]) / down.shape[0]


def _convert_with_diffusers(
    name: str, tensors: dict[str, torch.Tensor], file_format: str, metadata: dict[str, str]
) -> dict[str, torch.Tensor]:
    """Formats 1-4 through diffusers' own converter, with the inputs it mishandles fixed first."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_z_image_lora_to_diffusers

    if file_format != "kohya":
        # The converter strips only `diffusion_model.`: with an alpha, `transformer.` keys come back as
        # `transformer.transformer.` and would load nowhere.
        tensors = {_strip_wrapper(key): value for key, value in tensors.items()}
    if file_format == "dotted":
        # It renames `to.q.lora.down` to `to_q` but then looks for the alpha as `to_q.alpha` too.
        tensors = {
            re.sub(r"\.to\.(q|k|v|out\.0)\.", r".to_\1.", key): value for key, value in tensors.items()
        }
    has_alpha = any(key.endswith(".alpha") for key in tensors)
    try:
        converted = _convert_non_diffusers_z_image_lora_to_diffusers(dict(tensors))
    except (KeyError, ValueError, RuntimeError) as error:
        raise InvalidArgument(
            f"LoRA {shown(name)} looks like a {file_format} file but its keys do not form LoRA pairs "
            f"({first_line(error)}); re-export it from its trainer."
        ) from None
    modules = {key.removeprefix("transformer."): value for key, value in converted.items()}
    if not has_alpha and file_format == "diffusers" and "lora_adapter_metadata" in metadata:
        modules = _apply_peft_alphas(name, modules, metadata["lora_adapter_metadata"])
    return modules


def _apply_peft_alphas(name: str, modules: dict[str, torch.Tensor], raw: str) -> dict[str, torch.Tensor]:
    """diffusers' `save_lora_weights` keeps lora_alpha in the metadata, not in `.alpha` tensors."""
    try:
        config = {key.removeprefix("transformer."): value for key, value in json.loads(raw).items()}
        lora_alpha = config.get("lora_alpha")
        alpha_pattern = dict(config.get("alpha_pattern") or {})
        rslora = bool(config.get("use_rslora"))
    except (ValueError, AttributeError, TypeError):
        raise InvalidArgument(
            f"LoRA {shown(name)} has unreadable lora_adapter_metadata; re-save it with diffusers."
        ) from None
    if config.get("use_dora"):
        raise InvalidArgument(f"LoRA {shown(name)} is a DoRA, which is not supported; use a plain LoRA.")
    scaled = dict(modules)
    for key, down in modules.items():
        if not key.endswith(LORA_A):
            continue
        module = key.removesuffix(LORA_A)
        alpha = lora_alpha
        for pattern, value in alpha_pattern.items():
            bare = pattern.lstrip("^")
            if module == bare or module.endswith("." + bare):
                alpha = value
        if alpha is None:
            continue
        rank = down.shape[0]
        scaled[key] = down * (float(alpha) / (math.sqrt(rank) if rslora else rank))
    return scaled


def _convert_comfyui(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original Z-Image layout (ComfyUI): lora_A/lora_down and lora_B/lora_up pairs with an optional
    alpha, and `.diff`/`.diff_b` differences for norm weights and biases. Names are mapped afterwards."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in tensors.items():
        key = _strip_wrapper(key)
        for suffix, part in _PARTS:
            if key.endswith(suffix):
                groups.setdefault(key.removesuffix(suffix), {})[part] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise InvalidArgument(
            f"LoRA {shown(name)} has keys that are neither LoRA layers nor differences: {_few(unknown)}; "
            "re-export it as a LoRA."
        )
    modules: dict[str, torch.Tensor] = {}
    for module, parts in groups.items():
        if "diff" in parts:
            modules[f"{module}.weight{DIFF}"] = parts["diff"]
        if "diff_b" in parts:
            modules[f"{module}.bias{DIFF}"] = parts["diff_b"]
        if "A" not in parts and "B" not in parts:
            continue
        if "A" not in parts or "B" not in parts:
            raise InvalidArgument(
                f"LoRA {shown(name)} has only half of the LoRA pair of {module!r}; the file is incomplete."
            )
        down = parts["A"].float() * _alpha_factor(name, module, parts.get("alpha"), parts["A"])
        modules[f"{module}{LORA_A}"] = down
        modules[f"{module}{LORA_B}"] = parts["B"].float()
    return modules


def _rename_original(modules: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Z-Image names to diffusers' (x_embedder, final_layer, attention.out, q_norm, k_norm). A key
    renamed onto one the file also has under the diffusers name is a duplicate and is dropped."""

    def renamed(key: str) -> str:
        for suffix in (LORA_A, LORA_B, ".weight" + DIFF, ".bias" + DIFF):
            if key.endswith(suffix):
                module = key.removesuffix(suffix)
                for pattern, replacement in _ORIGINAL_NAMES:
                    module = pattern.sub(replacement, module)
                return module + suffix
        return key

    result: dict[str, torch.Tensor] = {}
    for key in sorted(modules, key=lambda key: renamed(key) != key):
        result.setdefault(renamed(key), modules[key])
    return result


def _split_fused_qkv(name: str, modules: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`attention.qkv` stacks q, k and v on dim 0 of lora_B; each gets its row block and the shared lora_A
    (a block-diagonal qkv LoRA comes out exact too). Redundant next to split to_q/to_k/to_v keys."""
    fused = re.compile(rf"(.*\.attention)\.qkv({re.escape(LORA_A)}|{re.escape(LORA_B)})$")
    result = {key: value for key, value in modules.items() if not fused.match(key)}
    for block in sorted({match[1] for key in modules if (match := fused.match(key))}):
        if any(f"{block}.to_{p}{LORA_A}" in modules for p in "qkv"):
            continue
        down, up = modules.get(f"{block}.qkv{LORA_A}"), modules.get(f"{block}.qkv{LORA_B}")
        if down is None or up is None or up.ndim != 2 or up.shape[0] % 3:
            raise InvalidArgument(
                f"LoRA {shown(name)} has a fused {block}.qkv layer without both halves of its pair, or whose "
                "lora_B does not stack three projections; the file is incomplete or not for Z-Image."
            )
        for projection, rows in zip("qkv", up.chunk(3, dim=0), strict=True):
            result[f"{block}.to_{projection}{LORA_A}"] = down.clone()
            result[f"{block}.to_{projection}{LORA_B}"] = rows.contiguous()
    return result


def _check_layout(name: str, modules: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Checks names and pairing against the Z-Image DiT's layout (any size); returns (rank, module count)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    deltas: dict[str, torch.Tensor] = {}
    strange = []
    for key, value in modules.items():
        if key.endswith((LORA_A, LORA_B)):
            pairs.setdefault(key[: -len(LORA_A)], {})[key[-len(LORA_A) :]] = value
        elif key.endswith(DIFF):
            deltas[key.removesuffix(DIFF)] = value
        else:
            strange.append(key)
    full = [parameter for parameter, delta in deltas.items() if delta.ndim != 1]
    if full:
        raise InvalidArgument(
            f"LoRA {shown(name)} holds full-weight differences ({_few(full)}), which cannot be switched per "
            "request; extract a LoRA from it at some rank, or merge it into the model."
        )
    foreign = (
        strange
        + [m for m in pairs if not _LINEAR.fullmatch(m)]
        + [p for p in deltas if not _DELTA.fullmatch(p)]
    )
    if foreign:
        raise InvalidArgument(
            f"LoRA {shown(name)} changes {len(foreign)} modules the Z-Image DiT does not have "
            f"({_few(foreign)}): it was made for another model (FLUX, SDXL, Qwen-Image...). Use a LoRA "
            "trained for Z-Image-Turbo."
        )
    if not pairs and not deltas:
        raise InvalidArgument(f"LoRA {shown(name)} holds no LoRA layers for the DiT; use a Z-Image LoRA.")
    for module, pair in pairs.items():
        down, up = pair.get(LORA_A), pair.get(LORA_B)
        if down is None or up is None or down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise InvalidArgument(
                f"LoRA {shown(name)} has a broken pair for {module!r} (lora_A {_shape(down)}, lora_B "
                f"{_shape(up)}; they must be [rank, in] and [out, rank]). Re-export the file."
            )
    rank = max((pair[LORA_A].shape[0] for pair in pairs.values()), default=0)
    changed = set(pairs) | {parameter.rsplit(".", 1)[0] for parameter in deltas}
    return rank, len(changed)


def _shape(tensor: torch.Tensor | None) -> str:
    return "missing" if tensor is None else str(list(tensor.shape))


def shown(name: str) -> str:
    """A LoRA name as error messages quote it, cut to 80 characters."""
    return repr(name if len(name) <= 80 else name[:77] + "...")


def first_line(error: BaseException) -> str:
    """The first line of an error, as a message quotes a library's error (at most 300 characters)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _few(items: Iterable[str], count: int = 3) -> str:
    items = sorted(items)
    listed = ", ".join(repr(item) for item in items[:count])
    return listed + (f" and {len(items) - count} more" if len(items) > count else "")
