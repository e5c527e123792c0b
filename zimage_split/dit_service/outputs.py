"""Result files: PNG, JPEG or WebP images carrying the generation settings, or the latents as safetensors."""

from __future__ import annotations

import io
import json
import logging
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from zimage_split.common.errors import InvalidArgument
from zimage_split.common.vocabulary import FORMAT_SUFFIXES, OUTPUT_FORMATS, QUALITY_FORMATS

if TYPE_CHECKING:
    # Types only: the batch CLI writes its PNGs with this module on the base install, which has no torch.
    import torch

    from zimage_split.dit_service.dype import Dype
    from zimage_split.dit_service.skip_layer_guidance import SkipLayerGuidance

logger = logging.getLogger(__name__)

DEFAULT_QUALITY = 90
# zlib level of PNG results. Measured on a 2-core EPYC, one 1024x1024 RGB image (level: ms, MB): a photo 1: 70,
# 1.77; 3: 92, 1.71; 6 (Pillow's default): 261, 1.59. Random-weights noise takes about 100 ms at every level
# (3.15 MB, incompressible). Level 1 costs 11% more bytes (about 1.5 ms on a 1 Gbit/s link) to save 190 ms.
PNG_COMPRESS_LEVEL = 1
# Z-Image-Turbo's scheduler (FlowMatchEulerDiscreteScheduler), named the way AUTOMATIC1111 names samplers.
SAMPLER = "Euler (flow match)"
# Keys generation_metadata writes itself; `extra` may not reuse them.
STANDARD_KEYS = (
    "prompt",
    "negative_prompt",
    "prompt_key",
    "seed",
    "steps",
    "width",
    "height",
    "guidance_scale",
    "strength",
    "shift",
    "slg",
    "dype",
    "controlnet",
    "passes",
    "model",
    "loras",
    "parameters",
)
# The EXIF tags that carry the settings in JPEG and WebP files.
EXIF_IMAGE_DESCRIPTION = 0x010E
EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286
# A JPEG APP1 segment holds at most this many bytes (Pillow refuses longer EXIF).
JPEG_MAX_EXIF_BYTES = 65533
_EXTRA_KEY = re.compile(r"[A-Za-z0-9_]{1,79}")

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class OutputOptions:
    """How to write one result: its format, JPEG/WebP quality, and the (key, value) settings to embed."""

    format: str = "png"
    # Only for jpeg and webp; None means DEFAULT_QUALITY.
    quality: int | None = None
    # Written into the file unless empty (GenerateRequest.strip_metadata leaves it empty).
    metadata: Metadata = ()


def check_output(format: str, quality: int | None, *, metadata: Metadata = ()) -> OutputOptions:
    """Validates a request's output format and quality; raises InvalidArgument saying the fix.

    `format` is case-insensitive. The returned options carry the quality to use (DEFAULT_QUALITY when
    unset for jpeg/webp, None for png/latent).
    """
    name = format.strip().lower()
    if name not in OUTPUT_FORMATS:
        raise InvalidArgument(f"Unknown output format {format!r}; use one of {', '.join(OUTPUT_FORMATS)}.")
    if name not in QUALITY_FORMATS:
        if quality is not None:
            raise InvalidArgument(
                f"quality applies only to jpeg and webp output, not {name}; leave quality unset or choose "
                "jpeg or webp."
            )
        return OutputOptions(format=name, quality=None, metadata=metadata)
    if quality is None:
        quality = DEFAULT_QUALITY
    if not 1 <= quality <= 100:
        raise InvalidArgument(
            f"quality must be between 1 and 100 (got {quality}); {DEFAULT_QUALITY} is usual."
        )
    return OutputOptions(format=name, quality=quality, metadata=metadata)


def file_extension(format: str) -> str:
    """The file name extension of an output format: png, jpg, webp or safetensors (for latent)."""
    try:
        return FORMAT_SUFFIXES[format.lower()].lstrip(".")
    except KeyError:
        raise InvalidArgument(
            f"Unknown output format {format!r}; use one of {', '.join(OUTPUT_FORMATS)}."
        ) from None


def generation_metadata(
    *,
    prompt: str | None,
    negative_prompt: str | None,
    seed: int,
    steps: int,
    width: int,
    height: int,
    guidance_scale: float,
    model: str,
    loras: Sequence[tuple[str, float]],
    strength: float | None = None,
    shift: float | None = None,
    skip_layer_guidance: SkipLayerGuidance | None = None,
    dype: Dype | None = None,
    controlnet: tuple[str, float] | None = None,
    passes: Sequence[tuple[float, int, float | None]] = (),
    prompt_key: str = "",
    extra: Mapping[str, str] | None = None,
) -> Metadata:
    """The (key, value) settings an image file carries, ending with an AUTOMATIC1111-style `parameters`.

    Pass prompt=None when the prompt was an uploaded embedding (its text is unknown) and give its
    `prompt_key`; negative_prompt=None, strength=None (text-to-image), shift=None (the model's own schedule
    shift) and controlnet=None (else its name and conditioning scale) leave those keys out. `extra` adds keys of 1-79 letters, digits or underscores that are not among
    STANDARD_KEYS.
    """
    items: dict[str, str] = {}
    if prompt is not None:
        items["prompt"] = prompt
    if negative_prompt is not None:
        items["negative_prompt"] = negative_prompt
    if prompt_key:
        items["prompt_key"] = prompt_key
    items.update(
        seed=str(seed),
        steps=str(steps),
        width=str(width),
        height=str(height),
        guidance_scale=_number(guidance_scale),
    )
    if strength is not None:
        items["strength"] = _number(strength)
    if shift is not None:
        items["shift"] = _number(shift)
    if skip_layer_guidance is not None:
        slg = skip_layer_guidance
        items["slg"] = json.dumps(
            {
                "scale": _float(slg.scale),
                "layers": list(slg.layers),
                "start": _float(slg.start),
                "stop": _float(slg.stop),
            }
        )
    if dype is not None:
        items["dype"] = json.dumps(
            {"method": dype.method, "scale": _float(dype.scale), "exponent": _float(dype.exponent)}
        )
    if controlnet is not None:
        items["controlnet"] = json.dumps(
            {"name": controlnet[0], "scale": _float(controlnet[1])}, ensure_ascii=False
        )
    if passes:
        items["passes"] = json.dumps(
            [
                {"scale": _float(scale), "steps": steps}
                | ({} if pass_strength is None else {"strength": _float(pass_strength)})
                for scale, steps, pass_strength in passes
            ]
        )
    items["model"] = model
    items["loras"] = json.dumps(
        [{"name": name, "scale": _float(scale)} for name, scale in loras], ensure_ascii=False
    )
    for key, value in (extra or {}).items():
        if key in STANDARD_KEYS or not _EXTRA_KEY.fullmatch(key):
            raise ValueError(
                f"Extra metadata key {key!r} must be 1-79 letters, digits or underscores, not one of "
                f"{', '.join(STANDARD_KEYS)}."
            )
        items[key] = value
    items["parameters"] = parameters_text(items)
    return tuple(items.items())


def with_prompt(items: Mapping[str, str], prompt: str) -> Metadata:
    """The settings `items` (as read_metadata returns them) of an image made from an uploaded embedding, with
    the prompt's text, which only the caller knew, put first and into `parameters`."""
    settings = {"prompt": prompt} | {k: v for k, v in items.items() if k not in ("prompt", "parameters")}
    settings["parameters"] = parameters_text(settings)
    return tuple(settings.items())


def parameters_text(items: Mapping[str, str]) -> str:
    """The AUTOMATIC1111 infotext of the settings in `items` (as generation_metadata writes them).

    Three lines: the prompt ("" when unknown), "Negative prompt: ..." when there is one, and the
    settings as "Key: value" pairs, where values holding a comma are JSON-quoted (as AUTOMATIC1111 does).
    """
    loras = json.loads(items.get("loras", "[]"))
    settings = [
        ("Steps", items.get("steps")),
        ("Sampler", SAMPLER),
        ("CFG scale", items.get("guidance_scale")),
        ("Seed", items.get("seed")),
        ("Size", f"{items['width']}x{items['height']}" if "width" in items and "height" in items else None),
        ("Model", items.get("model")),
        ("Denoising strength", items.get("strength")),
        ("Shift", items.get("shift")),
        *_slg_settings(items.get("slg")),
        ("DyPE", _dype_setting(items.get("dype"))),
        *_controlnet_settings(items.get("controlnet")),
        ("Passes", _passes_setting(items.get("passes"))),
        ("Lora", ", ".join(f"{lora['name']}:{lora['scale']:g}" for lora in loras)),
        ("Prompt key", items.get("prompt_key")),
    ]
    lines = [items.get("prompt", "")]
    if items.get("negative_prompt"):
        lines.append(f"Negative prompt: {items['negative_prompt']}")
    lines.append(", ".join(f"{name}: {_quote(value)}" for name, value in settings if value))
    return "\n".join(lines)


def encode_image(image: Image.Image, options: OutputOptions) -> bytes:
    """Encodes `image` as options.format (png, jpeg or webp) with options.metadata embedded.

    Deterministic: the same image and options give the same bytes, on any thread. PNG with no metadata is
    exactly Pillow's plain `save(format="PNG", compress_level=PNG_COMPRESS_LEVEL)`. PNG keeps each key as a text chunk (iTXt, UTF-8, when the value is
    not ASCII). JPEG and WebP keep `parameters` in EXIF UserComment (where AUTOMATIC1111 tools look) and
    the other keys as JSON in EXIF ImageDescription; a JPEG whose EXIF would pass the format's 64 KiB
    limit gets its prompts shortened, with the key "prompts_truncated" set.
    """
    buffer = io.BytesIO()
    if options.format == "png":
        if options.metadata:
            image.save(
                buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, pnginfo=_png_info(options.metadata)
            )
        else:
            image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        return buffer.getvalue()
    if options.format not in QUALITY_FORMATS:
        raise InvalidArgument(
            f"encode_image writes png, jpeg or webp, not {options.format!r}; latents go through encode_latents."
        )
    quality = DEFAULT_QUALITY if options.quality is None else options.quality
    kwargs: dict[str, object] = {"quality": quality}
    if options.metadata:
        limit = JPEG_MAX_EXIF_BYTES if options.format == "jpeg" else None
        exif = _exif_bytes(dict(options.metadata), limit)
        if exif:
            kwargs["exif"] = exif
    if options.format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", **kwargs)
    else:
        image.save(buffer, format="WEBP", **kwargs)
    return buffer.getvalue()


def encode_latents(latents: torch.Tensor, metadata: Iterable[tuple[str, str]] | Mapping[str, str]) -> bytes:
    """A safetensors file holding `latents` ([C, h, w] or [1, C, h, w]) as one float32 tensor "latents"
    of shape [1, C, h, w], with `metadata` as the header's string metadata.

    Written here rather than by safetensors.torch.save, whose metadata order changes from one process to
    the next: the same latents must give the same bytes (and sha256).
    """
    import torch

    tensor = latents.detach().to("cpu", torch.float32)
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 4 or tensor.shape[0] != 1:
        raise ValueError(f"Latents must have shape [C, h, w] or [1, C, h, w] (got {list(latents.shape)}).")
    data = tensor.contiguous().numpy().astype("<f4").tobytes()
    items = dict(metadata.items() if isinstance(metadata, Mapping) else metadata)
    header: dict[str, object] = {}
    if items:
        header["__metadata__"] = items
    header["latents"] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [0, len(data)]}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    # Pad with spaces so the tensor data starts 8-byte aligned, as safetensors itself does.
    encoded += b" " * (-(8 + len(encoded)) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data


def read_metadata(data: bytes) -> dict[str, str]:
    """The settings a result file carries: PNG text chunks, JPEG/WebP EXIF, or safetensors metadata.

    Returns {} for a file written without metadata; raises InvalidArgument for other kinds of file.
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        with Image.open(io.BytesIO(data)) as image:
            return {key: str(value) for key, value in image.text.items()}  # type: ignore[attr-defined]
    if data.startswith(b"\xff\xd8") or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        with Image.open(io.BytesIO(data)) as image:
            return _from_exif(image.getexif())
    if len(data) >= 10 and data[8:9] == b"{":
        (length,) = struct.unpack("<Q", data[:8])
        try:
            header = json.loads(data[8 : 8 + length])
        except ValueError:
            header = None
        if isinstance(header, dict):
            return dict(header.get("__metadata__") or {})
    raise InvalidArgument("Not a PNG, JPEG, WebP or safetensors file; pass the bytes of a generated result.")


def _passes_setting(recorded: str | None) -> str | None:
    """ "0.5:8, 1:8:0.6": each pass's scale, steps and (after the first) strength, as `zsplit --pass` takes them."""
    if not recorded:
        return None
    return ", ".join(
        ":".join(
            [f"{spec['scale']:g}", str(spec["steps"])]
            + ([f"{spec['strength']:g}"] if "strength" in spec else [])
        )
        for spec in json.loads(recorded)
    )


def _dype_setting(recorded: str | None) -> str | None:
    if not recorded:
        return None
    dype = json.loads(recorded)
    return f"{dype['method']} scale {dype['scale']:g} exponent {dype['exponent']:g}"


def _slg_settings(recorded: str | None) -> list[tuple[str, str | None]]:
    if not recorded:
        return []
    slg = json.loads(recorded)
    return [
        ("SLG scale", f"{slg['scale']:g}"),
        ("SLG layers", ",".join(map(str, slg["layers"]))),
        ("SLG steps", f"{slg['start']:g}-{slg['stop']:g}"),
    ]


def _controlnet_settings(recorded: str | None) -> list[tuple[str, str | None]]:
    if not recorded:
        return []
    controlnet = json.loads(recorded)
    return [("ControlNet", controlnet["name"]), ("ControlNet scale", f"{controlnet['scale']:g}")]


def _float(value: float) -> float:
    """`value` as the number its 7 significant digits say (a float32 from the proto: 0.05, not 0.0500000007)."""
    return float(_number(value))


def _number(value: float) -> str:
    # 7 significant digits print a float32 from the proto as the value the caller typed (0.6, not 0.6000000238).
    return f"{value:.7g}"


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ',"\n') else value


def _png_info(metadata: Metadata) -> PngInfo:
    info = PngInfo()
    for key, value in metadata:
        # tEXt is Latin-1 only, and many readers decode it as UTF-8 anyway: anything not ASCII goes in iTXt.
        if value.isascii():
            info.add_text(key, value)
        else:
            info.add_itxt(key, value)
    return info


def _exif_bytes(items: dict[str, str], limit: int | None) -> bytes:
    exif = _exif(items).tobytes()
    if limit is None or len(exif) <= limit:
        return exif
    # Too long for a JPEG: keep the settings and as much of the prompts as fits.
    keep = max(len(items.get("prompt", "")), len(items.get("negative_prompt", "")))
    while keep > 0:
        keep //= 2
        shortened = dict(items, prompts_truncated="true")
        for key in ("prompt", "negative_prompt"):
            if len(items.get(key, "")) > keep:
                shortened[key] = items[key][:keep] + "…"
        if "parameters" in items:
            shortened["parameters"] = parameters_text(shortened)
        exif = _exif(shortened).tobytes()
        if len(exif) <= limit:
            return exif
    logger.warning("Image metadata does not fit in JPEG EXIF even without the prompts; writing none.")
    return b""


def _exif(items: Mapping[str, str]) -> Image.Exif:
    exif = Image.Exif()
    # ensure_ascii: EXIF ImageDescription is an ASCII field, and \u escapes make any prompt fit losslessly.
    exif[EXIF_IMAGE_DESCRIPTION] = json.dumps({k: v for k, v in items.items() if k != "parameters"})
    if "parameters" in items:
        exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = _user_comment(items["parameters"])
    return exif


def _user_comment(text: str) -> bytes:
    # EXIF UserComment starts with an 8-byte character code; UNICODE is UCS-2, big-endian as piexif (and
    # so AUTOMATIC1111) writes and reads it.
    if text.isascii():
        return b"ASCII\0\0\0" + text.encode("ascii")
    return b"UNICODE\0" + text.encode("utf-16-be")


def _from_exif(exif: Image.Exif) -> dict[str, str]:
    items: dict[str, str] = {}
    description = exif.get(EXIF_IMAGE_DESCRIPTION)
    if isinstance(description, str):
        try:
            decoded = json.loads(description)
        except ValueError:
            decoded = None
        if isinstance(decoded, dict):
            items.update({str(k): str(v) for k, v in decoded.items()})
    comment = exif.get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
    if isinstance(comment, bytes):
        code, text = comment[:8], comment[8:]
        if code == b"UNICODE\0":
            items["parameters"] = text.decode("utf-16-be", "replace")
        elif code in (b"ASCII\0\0\0", b"\0" * 8):
            items["parameters"] = text.decode("utf-8", "replace")
    return items
