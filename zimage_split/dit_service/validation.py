"""Checks every generation parameter and embedding before any DiT work, with errors that say the fix."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from zimage_split.common.errors import InvalidArgument, NotFound
from zimage_split.common.vocabulary import DYPE_METHODS
from zimage_split.dit_service import dype as dype_defaults
from zimage_split.dit_service.config import Limits
from zimage_split.dit_service.controlnets import (
    DEFAULT_CONTROLNET_SCALE,
    MAX_CONTROLNET_SCALE,
    ControlNetInfo,
)
from zimage_split.dit_service.dype import Dype
from zimage_split.dit_service.engine import GenerationParams
from zimage_split.dit_service.skip_layer_guidance import (
    DEFAULT_LAYERS,
    DEFAULT_START,
    DEFAULT_STOP,
    SkipLayerGuidance,
)

DEFAULTS = GenerationParams()
# The schedule shift a request may ask for. 1 leaves the sigmas as they are; below 0.1 every step is nearly
# noise-free and above 20 nearly pure noise, so nothing useful lies outside.
SHIFT_RANGE = (0.1, 20.0)


def validate_params(
    limits: Limits,
    *,
    width: int | None,
    height: int | None,
    steps: int | None,
    guidance_scale: float | None,
    cfg_normalization: float,
    cfg_truncation: float | None,
    seed: int,
    shift: float | None = None,
) -> GenerationParams:
    """Returns the request's parameters with Turbo defaults filled in, or raises InvalidArgument."""
    width = DEFAULTS.width if width is None else width
    height = DEFAULTS.height if height is None else height
    for name, value in (("width", width), ("height", height)):
        if value % limits.size_multiple:
            lower = max(limits.size_multiple, value - value % limits.size_multiple)
            raise InvalidArgument(
                f"{name.capitalize()} must be divisible by {limits.size_multiple} (got {value}). "
                f"Use {lower} or {lower + limits.size_multiple}."
            )
        if not limits.min_side <= value <= limits.max_side:
            raise InvalidArgument(
                f"{name.capitalize()} must be between {limits.min_side} and {limits.max_side} pixels (got {value})."
            )
    if width * height > limits.max_pixels:
        raise InvalidArgument(
            f"{width}x{height} is {width * height} pixels, over this server's limit of {limits.max_pixels} "
            f"(about {math.isqrt(limits.max_pixels)}² ); ask for a smaller image or raise --max-pixels."
        )
    steps = DEFAULTS.steps if steps is None else steps
    if not 1 <= steps <= limits.max_steps:
        raise InvalidArgument(
            f"steps must be between 1 and {limits.max_steps} (got {steps}); Z-Image-Turbo is made for 8."
        )
    guidance_scale = DEFAULTS.guidance_scale if guidance_scale is None else guidance_scale
    if not (math.isfinite(guidance_scale) and 0 <= guidance_scale <= limits.max_guidance_scale):
        raise InvalidArgument(
            f"guidance_scale must be between 0 and {limits.max_guidance_scale} (got {guidance_scale}); "
            "Turbo uses 0 (no guidance)."
        )
    if not (math.isfinite(cfg_normalization) and cfg_normalization >= 0):
        raise InvalidArgument(f"cfg_normalization must be >= 0 (got {cfg_normalization}); 0 turns it off.")
    cfg_truncation = DEFAULTS.cfg_truncation if cfg_truncation is None else cfg_truncation
    if not (math.isfinite(cfg_truncation) and 0 <= cfg_truncation <= 1):
        raise InvalidArgument(
            f"cfg_truncation must be between 0 and 1 (got {cfg_truncation}); 1 never truncates."
        )
    if shift is not None and not (math.isfinite(shift) and SHIFT_RANGE[0] <= shift <= SHIFT_RANGE[1]):
        raise InvalidArgument(
            f"shift must be between {SHIFT_RANGE[0]:g} and {SHIFT_RANGE[1]:g} (got {shift}); leave it unset for "
            "the model's own (3 for Turbo)."
        )
    return GenerationParams(
        width=width,
        height=height,
        steps=steps,
        guidance_scale=float(guidance_scale),
        cfg_normalization=float(cfg_normalization),
        cfg_truncation=float(cfg_truncation),
        seed=seed,
        shift=None if shift is None else float(shift),
    )


def validate_embedding(tensor: torch.Tensor, *, caption_dim: int, max_tokens: int, what: str) -> torch.Tensor:
    """An embedding must be [tokens, caption_dim] with 1..max_tokens rows and only finite values."""
    if tensor.dim() != 2:
        raise InvalidArgument(f"{what} must have shape [tokens, {caption_dim}] (got {list(tensor.shape)}).")
    tokens, hidden = tensor.shape
    if hidden != caption_dim:
        raise InvalidArgument(
            f"{what} has hidden size {hidden}, but this generator's DiT takes {caption_dim}: it was made by "
            "a different text encoder. Encode with the encoder that matches this model."
        )
    if not 1 <= tokens <= max_tokens:
        raise InvalidArgument(f"{what} has {tokens} tokens; send between 1 and {max_tokens}.")
    if not all_finite(tensor):
        raise InvalidArgument(f"{what} contains NaN or infinite values; re-encode the prompt.")
    return tensor


# Per float dtype: the integer type of the same width, the mask that drops the sign bit, and the smallest
# magnitude pattern whose exponent bits are all ones (infinity; every NaN is above it).
_NON_FINITE_PATTERNS = {
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000),
}


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, like `torch.isfinite(tensor).all()` but one pass and no bool tensor.

    A float is NaN or infinite exactly when its exponent bits are all ones, so with the sign bit masked off
    its bit pattern is at least infinity's. On the CPU this runs in numpy on one thread: torch's reductions
    run on its intra-op thread pool, which on a busy host waits milliseconds for a core (a 2.6 MB embedding
    took 5 to 12 ms instead of 0.1 while gRPC's threads were busy), and is called on the event loop here.
    """
    if tensor.numel() == 0:  # aminmax refuses empty tensors; they hold no bad values
        return True
    pattern = _NON_FINITE_PATTERNS.get(tensor.dtype)
    if pattern is not None and tensor.device.type == "cpu":
        int_dtype, magnitude_mask, infinity = pattern
        bits = tensor.detach().contiguous().view(int_dtype).numpy()
        return int((bits & magnitude_mask).max()) < infinity
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


# The Skip Layer Guidance scale a request may ask for: 2 to 4 is usual, and far above it the prediction is
# mostly the difference between the two passes.
MAX_SLG_SCALE = 20.0


def validate_skip_layer_guidance(
    *,
    scale: float,
    layers: Sequence[int],
    start: float | None,
    stop: float | None,
    dit_layers: int,
) -> SkipLayerGuidance | None:
    """A request's Skip Layer Guidance, or None when its scale is 0 (off); raises InvalidArgument saying the fix.

    Unset layers, start and stop take llm-dit's defaults (blocks 7-12, from 5% to 50% of the steps).
    """
    if not (math.isfinite(scale) and 0 <= scale <= MAX_SLG_SCALE):
        raise InvalidArgument(
            f"slg_scale must be between 0 and {MAX_SLG_SCALE:g} (got {scale}); 0 turns Skip Layer Guidance "
            "off, 2 to 4 is usual."
        )
    if scale == 0:
        if layers or start is not None or stop is not None:
            raise InvalidArgument(
                "slg_layers, slg_start and slg_stop need slg_scale > 0 (Skip Layer Guidance is off at 0)."
            )
        return None
    chosen = tuple(layers) or DEFAULT_LAYERS
    outside = [layer for layer in chosen if not 0 <= layer < dit_layers]
    if outside and not layers:
        raise InvalidArgument(
            f"The default slg_layers ({DEFAULT_LAYERS[0]}-{DEFAULT_LAYERS[-1]}, for Z-Image's 30 blocks) are not "
            f"all in this DiT, which has blocks 0 to {dit_layers - 1}; name slg_layers in that range."
        )
    if outside:
        raise InvalidArgument(
            f"slg_layers names {', '.join(map(str, outside))}, but this DiT has blocks 0 to {dit_layers - 1}; "
            "name blocks in that range."
        )
    if len(set(chosen)) != len(chosen):
        raise InvalidArgument(f"slg_layers {list(chosen)} names a block twice; name each block once.")
    start = DEFAULT_START if start is None else start
    stop = DEFAULT_STOP if stop is None else stop
    for name, value in (("slg_start", start), ("slg_stop", stop)):
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise InvalidArgument(f"{name} must be between 0 and 1, a fraction of the steps (got {value}).")
    if start >= stop:
        raise InvalidArgument(
            f"slg_start ({start:g}) must be below slg_stop ({stop:g}): SLG runs on the steps from start to stop."
        )
    return SkipLayerGuidance(
        scale=float(scale), layers=tuple(sorted(chosen)), start=float(start), stop=float(stop)
    )


# DyPE's scale and exponent: ComfyUI-DyPE offers 0 to 8 for the scale; past 10 either one makes the schedule a
# step function.
MAX_DYPE_SETTING = 10.0


def validate_dype(*, method: str, scale: float | None, exponent: float | None) -> Dype:
    """A request's DyPE settings with defaults filled in; raises InvalidArgument saying the fix."""
    method = method or dype_defaults.DEFAULT_METHOD
    if method not in DYPE_METHODS:
        raise InvalidArgument(f"Unknown dype method {method!r}; use one of {', '.join(DYPE_METHODS)}.")
    scale = dype_defaults.DEFAULT_SCALE if scale is None else scale
    exponent = dype_defaults.DEFAULT_EXPONENT if exponent is None else exponent
    for name, value, default in (
        ("dype_scale", scale, dype_defaults.DEFAULT_SCALE),
        ("dype_exponent", exponent, dype_defaults.DEFAULT_EXPONENT),
    ):
        if not (math.isfinite(value) and 0 <= value <= MAX_DYPE_SETTING):
            raise InvalidArgument(
                f"{name} must be between 0 and {MAX_DYPE_SETTING:g} (got {value}); the default is {default:g}."
            )
    return Dype(method=method, scale=float(scale), exponent=float(exponent))


def validate_controlnet(name: str, scale: float | None, loaded: Sequence[ControlNetInfo]) -> ControlNetInfo:
    """The loaded ControlNet a request names (NotFound listing the loaded ones), with a scale from 0 to
    MAX_CONTROLNET_SCALE (InvalidArgument); returns its description."""
    if scale is not None and not (math.isfinite(scale) and 0 <= scale <= MAX_CONTROLNET_SCALE):
        raise InvalidArgument(
            f"controlnet.conditioning_scale must be between 0 and {MAX_CONTROLNET_SCALE:g} (got {scale}); 0.6 to "
            f"1 is usual, unset is {DEFAULT_CONTROLNET_SCALE:g}."
        )
    for described in loaded:
        if described.name == name:
            return described
    names = ", ".join(repr(described.name) for described in loaded)
    raise NotFound(
        f"No ControlNet {name!r} on this generator. "
        + (
            f"Loaded: {names}."
            if loaded
            else "It loaded none: start it with --controlnet NAME=PATH (a diffusers folder or .safetensors file)."
        )
    )


def check_control_image_size(size: tuple[int, int], width: int, height: int, multiple: int) -> None:
    """A control image is resized to the output's width x height (as a start image is), so its aspect ratio must
    be the output's, within what rounding the output to multiples of `multiple` pixels can change: a pose or
    depth map stretched to another shape would steer the image wrongly. Raises InvalidArgument saying the fix."""
    image_width, image_height = size
    if (
        abs(image_height * width / image_width - height) < multiple
        and abs(image_width * height / image_height - width) < multiple
    ):
        return
    raise InvalidArgument(
        f"The control image is {image_width}x{image_height}, another shape than the {width}x{height} requested; "
        f"crop it to that aspect ratio, or ask for a size of its own shape (leave width and height unset to get "
        "its size)."
    )
