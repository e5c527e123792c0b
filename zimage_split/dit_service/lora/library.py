"""The LoRA files of a generator: every *.safetensors under --lora-dir, named by its relative path, with
names that never reach outside the folder; read with safetensors only and converted by `formats`."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from zimage_split.common.errors import InvalidArgument, NotFound, ZSplitError
from zimage_split.dit_service.lora.formats import convert, first_line, shown

MAX_LORA_SCALE = 8.0
MAX_LORAS_PER_REQUEST = 8
SUFFIX = ".safetensors"
_MAX_NAME_CHARS = 512


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
    format: str  # one of formats.FORMATS, or "" when the file could not be read
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
                f"LoRA {shown(name)} has scale {scale!r}; use a number from -{MAX_LORA_SCALE:g} to "
                f"{MAX_LORA_SCALE:g} (1.0 applies it as trained, 0 turns it off)."
            )
        if name in seen:
            raise InvalidArgument(
                f"LoRA {shown(name)} is named twice; name it once with the sum of the scales."
            )
        seen.add(name)
        checked.append(LoraSpec(name, float(scale)))
    if len(checked) > MAX_LORAS_PER_REQUEST:
        raise InvalidArgument(
            f"A request may use at most {MAX_LORAS_PER_REQUEST} LoRAs (got {len(checked)}); drop some."
        )
    return tuple(checked)


def check_lora_dir(root: str | os.PathLike[str]) -> Path:
    """The --lora-dir folder, resolved; InvalidArgument, saying the fix, when it is not a folder."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise InvalidArgument(
            f"--lora-dir {str(root)!r} is not a folder; create it and put LoRA .safetensors files in it, "
            "or start the generator without --lora-dir."
        )
    return path.resolve()


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
        self.root = check_lora_dir(root)

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
                f"LoRA {shown(name)} resolves outside --lora-dir (a symlink to {str(resolved)!r}?); "
                "copy the file into --lora-dir instead of linking it."
            )
        if not resolved.is_file():
            names = sorted(found for found, _ in self._files())
            available = ", ".join(repr(n) for n in names[:8]) + (" ..." if len(names) > 8 else "")
            raise NotFound(
                f"No LoRA {shown(name)} in --lora-dir {str(root)!r}. "
                + (f"Available: {available}." if names else "It holds no .safetensors files yet.")
                + " Names are file paths relative to --lora-dir without .safetensors."
            )
        return resolved

    def read(self, name: str, path: Path | None = None) -> tuple[dict[str, torch.Tensor], LoraFile]:
        """Reads and converts a LoRA: a state dict with diffusers/PEFT keys (`transformer.<module>.lora_A.weight`
        and `lora_B`, alpha folded into lora_A, fused qkv split), plus `transformer.<parameter>.diff` for the
        norm and bias differences a ComfyUI file may hold. InvalidArgument, saying the fix, for files that
        cannot work on a Z-Image DiT. `path`, when given, is what `resolve(name)` already returned."""
        return self._read(name, path or self.resolve(name), load=True)

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
        converted = convert(name, path, tensors, metadata, load=load)
        info = LoraFile(
            name=name,
            path=path,
            byte_length=path.stat().st_size,
            format=converted.format,
            rank=converted.rank,
            module_count=converted.module_count,
        )
        return {f"transformer.{key}": value for key, value in converted.modules.items()}, info

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


def _checked_name(name: str) -> str:
    how = (
        "LoRA names are paths relative to --lora-dir without .safetensors, such as 'style' or 'people/alice'."
    )
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"A LoRA name is empty. {how}")
    name = name.removesuffix(SUFFIX)
    if len(name) > _MAX_NAME_CHARS:
        raise InvalidArgument(f"LoRA name {shown(name)} is longer than {_MAX_NAME_CHARS} characters. {how}")
    if "\x00" in name:
        raise InvalidArgument(f"LoRA name {shown(name)} contains a NUL character. {how}")
    if "\\" in name:
        raise InvalidArgument(f"LoRA name {shown(name)} contains '\\'; separate folders with '/'. {how}")
    if name.startswith("/"):
        raise InvalidArgument(f"LoRA name {shown(name)} is an absolute path. {how}")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise InvalidArgument(f"LoRA name {shown(name)} has an empty, '.' or '..' part. {how}")
    return name


def file_key(path: Path) -> tuple[str, int, int, int]:
    """(resolved path, size, mtime_ns, inode): changes when the file is replaced on disk."""
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
            f"LoRA {shown(name)} cannot be read as a .safetensors file ({first_line(error)}). Re-download "
            "or re-export it; files in other formats (.ckpt, .pt) must be converted to safetensors first."
        ) from None
    return tensors, metadata
