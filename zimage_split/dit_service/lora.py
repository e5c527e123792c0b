"""Per-request LoRA for the generator: files under --lora-dir, read with safetensors only, converted to
diffusers names, and switched on the DiT as cached PEFT adapters without reloading the base model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zimage_split.common.errors import InvalidArgument, NotFound, ResourceExhausted, ZSplitError

logger = logging.getLogger(__name__)

MAX_LORA_SCALE = 8.0
MAX_LORAS_PER_REQUEST = 8
FORMATS = ("diffusers", "ai-toolkit", "kohya", "dotted", "comfyui")
SUFFIX = ".safetensors"
_MAX_NAME_CHARS = 512

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
_A, _B, _DIFF = ".lora_A.weight", ".lora_B.weight", ".diff"


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA a request asks for: its name under --lora-dir (no `.safetensors`, `/` between folders, as
    in "style" or "people/alice") and its scale (1.0: as trained; 0: off; negative: inverted)."""

    name: str
    scale: float = 1.0


@dataclass(frozen=True)
class LoraFile:
    """What `zsplit lora list` shows about one file under --lora-dir."""

    name: str
    path: Path
    byte_length: int
    format: str  # one of FORMATS, or "" when the file could not be read
    rank: int  # the largest rank over its layers
    module_count: int  # DiT modules it changes
    error: str = ""  # why it cannot be loaded; "" when it can


def check_specs(specs: Iterable[LoraSpec]) -> tuple[LoraSpec, ...]:
    """Returns the specs with canonical names and float scales; InvalidArgument (saying the fix) for empty
    or repeated names, scales that are not finite or exceed MAX_LORA_SCALE, or too many LoRAs."""
    checked: list[LoraSpec] = []
    seen: set[str] = set()
    for spec in specs:
        if not isinstance(spec.name, str) or not spec.name.strip():
            raise InvalidArgument(
                "A LoRA name is empty; name a file under the generator's --lora-dir without .safetensors "
                "(`zsplit lora list` shows them)."
            )
        name = spec.name.removesuffix(SUFFIX)
        scale = spec.scale
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not math.isfinite(scale)
            or abs(scale) > MAX_LORA_SCALE
        ):
            raise InvalidArgument(
                f"LoRA {_shown(name)} has scale {scale!r}; use a number from -{MAX_LORA_SCALE:g} to "
                f"{MAX_LORA_SCALE:g} (1.0 applies it as trained, 0 turns it off)."
            )
        if name in seen:
            raise InvalidArgument(
                f"LoRA {_shown(name)} is named twice; name it once with the sum of the scales."
            )
        seen.add(name)
        checked.append(LoraSpec(name, float(scale)))
    if len(checked) > MAX_LORAS_PER_REQUEST:
        raise InvalidArgument(
            f"A request may use at most {MAX_LORAS_PER_REQUEST} LoRAs (got {len(checked)}); drop some."
        )
    return tuple(checked)


class LoraLibrary:
    """The LoRA files of one generator: every *.safetensors under `root` (--lora-dir), named by its path
    relative to `root` without the suffix. `root=None` means LoRA is off (no --lora-dir).

    Names never reach outside `root`: absolute paths, `..`, backslashes and symlinks that resolve
    elsewhere are refused. Files are read with safetensors only (no pickle).
    """

    def __init__(self, root: str | os.PathLike[str] | None) -> None:
        self.root: Path | None = None
        if root is None:
            return
        path = Path(root).expanduser()
        if not path.is_dir():
            raise InvalidArgument(
                f"--lora-dir {str(root)!r} is not a folder; create it and put LoRA .safetensors files in it, "
                "or start the generator without --lora-dir."
            )
        self.root = path.resolve()

    @property
    def enabled(self) -> bool:
        """Whether the generator was started with --lora-dir."""
        return self.root is not None

    def resolve(self, name: str) -> Path:
        """The file behind a LoRA name. InvalidArgument for names that could reach outside --lora-dir (or
        when LoRA is off), NotFound (listing some names) for a name with no file."""
        root = self._root()
        name = _checked_name(name)
        path = root / f"{name}{SUFFIX}"
        resolved = path.resolve()
        if not resolved.is_relative_to(root):
            raise InvalidArgument(
                f"LoRA {_shown(name)} resolves outside --lora-dir (a symlink to {str(resolved)!r}?); "
                "copy the file into --lora-dir instead of linking it."
            )
        if not resolved.is_file():
            names = sorted(found for found, _ in self._files())
            available = ", ".join(repr(n) for n in names[:8]) + (" ..." if len(names) > 8 else "")
            raise NotFound(
                f"No LoRA {_shown(name)} in --lora-dir {str(root)!r}. "
                + (f"Available: {available}." if names else "It holds no .safetensors files yet.")
                + " Names are file paths relative to --lora-dir without .safetensors."
            )
        return resolved

    def read(self, name: str) -> tuple[dict[str, torch.Tensor], LoraFile]:
        """Reads and converts a LoRA: a state dict with diffusers/PEFT keys (`transformer.<module>.lora_A.weight`
        and `lora_B`, alpha folded into lora_A, fused qkv split), plus `transformer.<parameter>.diff` for the
        norm and bias differences a ComfyUI file may hold. InvalidArgument, saying the fix, for files that
        cannot work on a Z-Image DiT."""
        return self._read(name, self.resolve(name), load=True)

    def _root(self) -> Path:
        if self.root is None:
            raise InvalidArgument(
                "This generator was started without --lora-dir, so it has no LoRAs; restart it with "
                "--lora-dir FOLDER (a folder of .safetensors LoRA files) or send the request without LoRAs."
            )
        return self.root

    def _files(self) -> Iterator[tuple[str, Path]]:
        root = self._root()
        for folder, subfolders, files in os.walk(root):
            subfolders.sort()
            for file in sorted(files):
                if file.endswith(SUFFIX) and len(file) > len(SUFFIX):
                    path = Path(folder, file)
                    yield path.relative_to(root).as_posix()[: -len(SUFFIX)], path

    def _read(self, name: str, path: Path, *, load: bool) -> tuple[dict[str, torch.Tensor], LoraFile]:
        """`load=False` reads only the header (shapes, alphas, metadata): enough for `list`."""
        tensors, metadata = _open(name, path, load=load)
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
        info = LoraFile(
            name=name,
            path=path,
            byte_length=path.stat().st_size,
            format=file_format,
            rank=rank,
            module_count=module_count,
        )
        return {f"transformer.{key}": value for key, value in modules.items()}, info

    # Last in the class: after this, `list` in the class body would name the method.
    def list(self) -> list[LoraFile]:
        """Every *.safetensors under --lora-dir (recursive), sorted by name. Reads headers only; a file
        that cannot be loaded is listed with `error` saying why, never raised."""
        root = self._root()
        files = []
        for name, path in self._files():
            try:
                if not path.resolve().is_relative_to(root):
                    raise InvalidArgument("It is a symlink to a file outside --lora-dir; copy the file in.")
                files.append(self._read(name, path, load=False)[1])
            except Exception as error:
                message = (
                    error.message if isinstance(error, ZSplitError) else f"{type(error).__name__}: {error}"
                )
                try:
                    size = path.stat().st_size
                except OSError:
                    size = 0
                files.append(LoraFile(name, path, size, "", 0, 0, message))
        return sorted(files, key=lambda file: file.name)


@dataclass
class _Adapter:
    name: str
    # The PEFT adapter's name, or None for a file that only holds norm and bias differences.
    adapter_name: str | None
    # (resolved path, size, mtime_ns, inode): a file replaced on disk gets a new key and is read again.
    key: tuple[str, int, int, int]
    deltas: dict[str, torch.Tensor]


class LoraAdapters:
    """The LoRAs loaded on one DiT: up to `capacity` cached as PEFT adapters (least recently used evicted),
    switched per request by `activate` without touching or copying the base weights.

    Thread-confined: call it only from the engine's worker thread, before each batch.
    """

    def __init__(self, pipe: Any, library: LoraLibrary, *, capacity: int = 8) -> None:
        if capacity < 1:
            raise InvalidArgument(f"The LoRA cache needs room for at least 1 adapter (got {capacity}).")
        self.pipe = pipe
        self.library = library
        self.capacity = capacity
        self._cache: OrderedDict[str, _Adapter] = OrderedDict()
        # What the transformer computes now: ((name, key, scale), ...); () is the base model, None unknown.
        self._state: tuple[tuple[str, tuple[str, int, int, int], float], ...] | None = ()
        # Parameters changed by `.diff` deltas: the parameter and its original value, restored exactly.
        self._originals: dict[str, tuple[torch.nn.Parameter, torch.Tensor]] = {}
        self._wrapped = False

    @property
    def loaded(self) -> list[str]:
        """Names of the cached LoRAs, least recently used first."""
        return [*self._cache]

    def activate(self, specs: Sequence[LoraSpec]) -> None:
        """Makes the transformer compute exactly the base model plus `specs` at their scales.

        `activate([])` gives the base model's exact output. LoRAs not cached yet are read and loaded
        (evicting the least recently used); a file changed on disk is read again. A failed load leaves no
        adapter behind, and the next call starts from a clean state.
        """
        specs = check_specs(specs)
        paths = [self.library.resolve(spec.name) for spec in specs]
        wanted = [(spec, path) for spec, path in zip(specs, paths, strict=True) if spec.scale != 0]
        if len(wanted) > self.capacity:
            raise InvalidArgument(
                f"The request uses {len(wanted)} LoRAs but this generator keeps at most {self.capacity} "
                "loaded; use fewer, or restart it with a larger LoRA cache."
            )
        keys = [_file_key(path) for _, path in wanted]
        state = tuple((spec.name, key, spec.scale) for (spec, _), key in zip(wanted, keys, strict=True))
        for spec, _ in wanted:
            if spec.name in self._cache:
                self._cache.move_to_end(spec.name)
        if state == self._state:
            return
        with torch.inference_mode(False), torch.no_grad():
            self._restore_deltas()
            self._state = None
            transformer = self.pipe.transformer
            if not wanted:
                if self._wrapped:
                    transformer.disable_lora()
                self._state = ()
                return
            adapters = [
                self._cached(spec.name, path, key, {s.name for s, _ in wanted})
                for (spec, path), key in zip(wanted, keys, strict=True)
            ]
            scales = [spec.scale for spec, _ in wanted]
            names = [adapter.adapter_name for adapter in adapters if adapter.adapter_name]
            if names:
                transformer.enable_lora()
                weights = [
                    scale for adapter, scale in zip(adapters, scales, strict=True) if adapter.adapter_name
                ]
                transformer.set_adapters(names, weights)
            elif self._wrapped:
                transformer.disable_lora()
            self._apply_deltas(adapters, scales)
            self._state = state

    def close(self) -> None:
        """Deletes every cached adapter and restores the base weights."""
        with torch.inference_mode(False), torch.no_grad():
            self._restore_deltas()
            for name in [*self._cache]:
                self._drop(name)
            self._state = ()

    def _cached(self, name: str, path: Path, key: tuple[str, int, int, int], keep: set[str]) -> _Adapter:
        adapter = self._cache.get(name)
        if adapter is not None and adapter.key != key:
            logger.info("LoRA %s changed on disk; reading it again", name)
            self._drop(name)
            adapter = None
        if adapter is None:
            while len(self._cache) >= self.capacity:
                evicted = next(cached for cached in self._cache if cached not in keep)
                logger.info("Evicting LoRA %s (cache of %d)", evicted, self.capacity)
                self._drop(evicted)
            adapter = self._load(name, path, key)
            self._cache[name] = adapter
        self._cache.move_to_end(name)
        return adapter

    def _load(self, name: str, path: Path, key: tuple[str, int, int, int]) -> _Adapter:
        started = time.perf_counter()
        state_dict, info = self.library._read(name, path, load=True)
        transformer = self.pipe.transformer
        modules = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
        _check_against_model(name, transformer, modules)
        device, dtype = transformer.device, transformer.dtype
        lora = {
            f"transformer.{k}": v.to(device=device, dtype=dtype)
            for k, v in modules.items()
            if not k.endswith(_DIFF)
        }
        deltas = {
            k.removesuffix(_DIFF): v.to(device=device, dtype=torch.float32)
            for k, v in modules.items()
            if k.endswith(_DIFF)
        }
        adapter_name = adapter_name_for(name) if lora else None
        if adapter_name is not None:
            # A leftover of the same name (another LoraAdapters on this pipe) would make PEFT refuse.
            self._delete_peft(adapter_name)
            self._wrapped = True
            try:
                with warnings.catch_warnings():
                    # PEFT warns on every adapter after the first; several adapters is the point here.
                    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                    transformer.load_lora_adapter(
                        lora, prefix="transformer", adapter_name=adapter_name, low_cpu_mem_usage=True
                    )
            except BaseException as error:
                self._delete_peft(adapter_name)
                if isinstance(error, torch.cuda.OutOfMemoryError):
                    raise ResourceExhausted(
                        f"Not enough device memory to load LoRA {_shown(name)}; use fewer or smaller LoRAs, "
                        "or a smaller LoRA cache."
                    ) from error
                if isinstance(error, (ValueError, KeyError, TypeError, RuntimeError)):
                    raise InvalidArgument(
                        f"LoRA {_shown(name)} could not be loaded into the DiT ({_first_line(error)}); "
                        "check that it was trained for Z-Image-Turbo."
                    ) from error
                raise
        logger.info(
            "Loaded LoRA %s (%s, rank %d, %d modules) in %.2f s",
            name,
            info.format,
            info.rank,
            info.module_count,
            time.perf_counter() - started,
        )
        return _Adapter(name=name, adapter_name=adapter_name, key=key, deltas=deltas)

    def _drop(self, name: str) -> None:
        adapter = self._cache.pop(name)
        if adapter.adapter_name is not None:
            self._delete_peft(adapter.adapter_name)

    def _delete_peft(self, adapter_name: str) -> None:
        # delete_adapters clears the layers of every module, even when peft_config never got the name, and
        # does nothing where there are none.
        self.pipe.transformer.delete_adapters(adapter_name)

    def _apply_deltas(self, adapters: Sequence[_Adapter], scales: Sequence[float]) -> None:
        totals: dict[str, torch.Tensor] = {}
        for adapter, scale in zip(adapters, scales, strict=True):
            for name, delta in adapter.deltas.items():
                totals[name] = totals[name] + scale * delta if name in totals else scale * delta
        for name, total in totals.items():
            parameter = _parameter(self.pipe.transformer, name)
            if parameter is None:  # checked at load time; only a replaced transformer gets here
                raise InvalidArgument(f"The DiT has no parameter {name} for a LoRA difference.")
            original = parameter.detach().clone()
            self._originals[name] = (parameter, original)
            parameter.copy_((original.float() + total).to(parameter.dtype))

    def _restore_deltas(self) -> None:
        for parameter, original in self._originals.values():
            parameter.copy_(original)
        self._originals.clear()


def adapter_name_for(name: str) -> str:
    """The PEFT adapter name of a LoRA name: PEFT wants a plain identifier, names may hold `/` and `.`."""
    return "lora_" + hashlib.sha256(name.encode()).hexdigest()[:16]


def _shown(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:77] + "...")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _few(items: Iterable[str], count: int = 3) -> str:
    items = sorted(items)
    shown = ", ".join(repr(item) for item in items[:count])
    return shown + (f" and {len(items) - count} more" if len(items) > count else "")


def _checked_name(name: str) -> str:
    how = (
        "LoRA names are paths relative to --lora-dir without .safetensors, such as 'style' or 'people/alice'."
    )
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"A LoRA name is empty. {how}")
    name = name.removesuffix(SUFFIX)
    if len(name) > _MAX_NAME_CHARS:
        raise InvalidArgument(f"LoRA name {_shown(name)} is longer than {_MAX_NAME_CHARS} characters. {how}")
    if "\x00" in name:
        raise InvalidArgument(f"LoRA name {_shown(name)} contains a NUL character. {how}")
    if "\\" in name:
        raise InvalidArgument(f"LoRA name {_shown(name)} contains '\\'; separate folders with '/'. {how}")
    if name.startswith("/"):
        raise InvalidArgument(f"LoRA name {_shown(name)} is an absolute path. {how}")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise InvalidArgument(f"LoRA name {_shown(name)} has an empty, '.' or '..' part. {how}")
    return name


def _file_key(path: Path) -> tuple[str, int, int, int]:
    stat = path.stat()
    return (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)


def _open(name: str, path: Path, *, load: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors (on the meta device when not `load`, except the tiny alphas) and metadata."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = dict(file.metadata() or {})
            tensors = {}
            for key in file.keys():  # noqa: SIM118 (safe_open is not iterable)
                if load or key.endswith(".alpha"):
                    tensors[key] = file.get_tensor(key)
                else:
                    tensors[key] = torch.empty(file.get_slice(key).get_shape(), device="meta")
    except Exception as error:
        raise InvalidArgument(
            f"LoRA {_shown(name)} cannot be read as a .safetensors file ({_first_line(error)}). Re-download "
            "or re-export it; files in other formats (.ckpt, .pt) must be converted to safetensors first."
        ) from None
    return tensors, metadata


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
            f"LoRA {_shown(name)} is ai-toolkit's de-distillation training adapter: it undoes Turbo's "
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
            f"LoRA {_shown(name)} is a LyCORIS adapter (LoKr, LoHa, LoCon or OFT), and only plain LoRA "
            "files are supported; re-export it as a LoRA (lora_A/lora_B or lora_down/lora_up layers)."
        )
    if any("dora_scale" in key or "lora_magnitude_vector" in key for key in keys):
        raise InvalidArgument(
            f"LoRA {_shown(name)} is a DoRA, which is not supported; re-export it as a plain LoRA."
        )
    layer_suffixes = tuple(suffix for suffix, part in _PARTS if part != "alpha") + (
        ".lora.down.weight",
        ".lora_A.default.weight",
    )
    if not any(key.endswith(layer_suffixes) for key in keys):
        raise InvalidArgument(
            f"LoRA {_shown(name)} holds no LoRA layers (keys such as 'layers.0.attention.to_q.lora_A.weight' "
            f"or '...lora_down.weight'; it has {_few(keys)}). Is it a full model checkpoint or an embedding? "
            "Put only LoRA files in --lora-dir."
        )


def _refuse_non_finite(name: str, tensors: dict[str, torch.Tensor]) -> None:
    bad = [key for key, value in tensors.items() if value.is_floating_point() and not value.isfinite().all()]
    if bad:
        raise InvalidArgument(
            f"LoRA {_shown(name)} has NaN or infinite values in {_few(bad)}; the file is corrupt or its "
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
        raise InvalidArgument(f"LoRA {_shown(name)} has a bad alpha for {module!r}; re-export the file.")
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
            f"LoRA {_shown(name)} looks like a {file_format} file but its keys do not form LoRA pairs "
            f"({_first_line(error)}); re-export it from its trainer."
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
            f"LoRA {_shown(name)} has unreadable lora_adapter_metadata; re-save it with diffusers."
        ) from None
    if config.get("use_dora"):
        raise InvalidArgument(f"LoRA {_shown(name)} is a DoRA, which is not supported; use a plain LoRA.")
    scaled = dict(modules)
    for key, down in modules.items():
        if not key.endswith(_A):
            continue
        module = key.removesuffix(_A)
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
            f"LoRA {_shown(name)} has keys that are neither LoRA layers nor differences: {_few(unknown)}; "
            "re-export it as a LoRA."
        )
    modules: dict[str, torch.Tensor] = {}
    for module, parts in groups.items():
        if "diff" in parts:
            modules[f"{module}.weight{_DIFF}"] = parts["diff"]
        if "diff_b" in parts:
            modules[f"{module}.bias{_DIFF}"] = parts["diff_b"]
        if "A" not in parts and "B" not in parts:
            continue
        if "A" not in parts or "B" not in parts:
            raise InvalidArgument(
                f"LoRA {_shown(name)} has only half of the LoRA pair of {module!r}; the file is incomplete."
            )
        down = parts["A"].float() * _alpha_factor(name, module, parts.get("alpha"), parts["A"])
        modules[f"{module}{_A}"] = down
        modules[f"{module}{_B}"] = parts["B"].float()
    return modules


def _rename_original(modules: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Z-Image names to diffusers' (x_embedder, final_layer, attention.out, q_norm, k_norm). A key
    renamed onto one the file also has under the diffusers name is a duplicate and is dropped."""

    def renamed(key: str) -> str:
        for suffix in (_A, _B, ".weight" + _DIFF, ".bias" + _DIFF):
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
    fused = re.compile(rf"(.*\.attention)\.qkv({re.escape(_A)}|{re.escape(_B)})$")
    result = {key: value for key, value in modules.items() if not fused.match(key)}
    for block in sorted({match[1] for key in modules if (match := fused.match(key))}):
        if any(f"{block}.to_{p}{_A}" in modules for p in "qkv"):
            continue
        down, up = modules.get(f"{block}.qkv{_A}"), modules.get(f"{block}.qkv{_B}")
        if down is None or up is None or up.ndim != 2 or up.shape[0] % 3:
            raise InvalidArgument(
                f"LoRA {_shown(name)} has a fused {block}.qkv layer without both halves of its pair, or whose "
                "lora_B does not stack three projections; the file is incomplete or not for Z-Image."
            )
        for projection, rows in zip("qkv", up.chunk(3, dim=0), strict=True):
            result[f"{block}.to_{projection}{_A}"] = down.clone()
            result[f"{block}.to_{projection}{_B}"] = rows.contiguous()
    return result


def _check_layout(name: str, modules: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Checks names and pairing against the Z-Image DiT's layout (any size); returns (rank, module count)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    deltas: dict[str, torch.Tensor] = {}
    strange = []
    for key, value in modules.items():
        if key.endswith((_A, _B)):
            pairs.setdefault(key[: -len(_A)], {})[key[-len(_A) :]] = value
        elif key.endswith(_DIFF):
            deltas[key.removesuffix(_DIFF)] = value
        else:
            strange.append(key)
    full = [parameter for parameter, delta in deltas.items() if delta.ndim != 1]
    if full:
        raise InvalidArgument(
            f"LoRA {_shown(name)} holds full-weight differences ({_few(full)}), which cannot be switched per "
            "request; extract a LoRA from it at some rank, or merge it into the model."
        )
    foreign = (
        strange
        + [m for m in pairs if not _LINEAR.fullmatch(m)]
        + [p for p in deltas if not _DELTA.fullmatch(p)]
    )
    if foreign:
        raise InvalidArgument(
            f"LoRA {_shown(name)} changes {len(foreign)} modules the Z-Image DiT does not have "
            f"({_few(foreign)}): it was made for another model (FLUX, SDXL, Qwen-Image...). Use a LoRA "
            "trained for Z-Image-Turbo."
        )
    if not pairs and not deltas:
        raise InvalidArgument(f"LoRA {_shown(name)} holds no LoRA layers for the DiT; use a Z-Image LoRA.")
    for module, pair in pairs.items():
        down, up = pair.get(_A), pair.get(_B)
        if down is None or up is None or down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise InvalidArgument(
                f"LoRA {_shown(name)} has a broken pair for {module!r} (lora_A {_shape(down)}, lora_B "
                f"{_shape(up)}; they must be [rank, in] and [out, rank]). Re-export the file."
            )
    rank = max((pair[_A].shape[0] for pair in pairs.values()), default=0)
    changed = set(pairs) | {parameter.rsplit(".", 1)[0] for parameter in deltas}
    return rank, len(changed)


def _shape(tensor: torch.Tensor | None) -> str:
    return "missing" if tensor is None else str(list(tensor.shape))


def _module(transformer: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        module = transformer.get_submodule(path)
    except AttributeError:
        return None
    # A layer another adapter already wrapped: PEFT keeps the original as `base_layer`.
    return getattr(module, "base_layer", module)


def _parameter(transformer: torch.nn.Module, name: str) -> torch.nn.Parameter | None:
    path, _, leaf = name.rpartition(".")
    module = _module(transformer, path)
    parameter = getattr(module, leaf, None) if module is not None else None
    return parameter if isinstance(parameter, torch.nn.Parameter) else None


def _check_against_model(name: str, transformer: torch.nn.Module, modules: dict[str, torch.Tensor]) -> None:
    problems = []
    for key, value in modules.items():
        if key.endswith(_DIFF):
            parameter = _parameter(transformer, key.removesuffix(_DIFF))
            if parameter is None:
                problems.append(f"{key.removesuffix(_DIFF)} is not in this DiT")
            elif parameter.shape != value.shape:
                problems.append(
                    f"{key.removesuffix(_DIFF)} is {list(parameter.shape)}, the difference {list(value.shape)}"
                )
            continue
        module_name = key[: -len(_A)]
        layer = _module(transformer, module_name)
        if layer is None:
            problems.append(f"{module_name} is not in this DiT")
        elif not isinstance(layer, torch.nn.Linear):
            problems.append(f"{module_name} is a {type(layer).__name__}, not a linear layer")
        elif key.endswith(_A) and value.shape[1] != layer.in_features:
            problems.append(f"{module_name} takes {layer.in_features} inputs, its lora_A {value.shape[1]}")
        elif key.endswith(_B) and value.shape[0] != layer.out_features:
            problems.append(f"{module_name} gives {layer.out_features} outputs, its lora_B {value.shape[0]}")
    if problems:
        unique = sorted(set(problems))
        raise InvalidArgument(
            f"LoRA {_shown(name)} does not fit this DiT: {'; '.join(unique[:3])}"
            + (f" (and {len(unique) - 3} more)" if len(unique) > 3 else "")
            + ". It was made for another model or another Z-Image size; use one trained for this model."
        )
