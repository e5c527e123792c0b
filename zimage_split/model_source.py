"""Finds a model folder: `tiny`/`bench` (built locally), a local diffusers folder, or a Hugging Face hub id."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from zimage_split.common.errors import NotFound

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"

T = TypeVar("T")


@dataclass(frozen=True)
class ModelSource:
    """Where to load from (`location`) and the identity reported to clients and hashed into keys."""

    location: str
    model_id: str


def how_to_get(model: str) -> str:
    return (
        f"Download it first, e.g. `hf download {DEFAULT_MODEL} --local-dir ./Z-Image-Turbo` and pass "
        "`--model ./Z-Image-Turbo`, or try the offline random model with `--model tiny`."
        if model == DEFAULT_MODEL
        else "Pass a diffusers-format Z-Image folder, a hub id such as "
        f"{DEFAULT_MODEL}, or `--model tiny` for the offline random model."
    )


def resolve_model(model: str) -> ModelSource:
    """Turns the user's --model value into a ModelSource, building the tiny model if asked for.

    The built-in random models answer to their model ids too ("zimage-split/tiny"), so a model id
    read back from an embeddings file resolves.
    """
    size = model.removeprefix("zimage-split/")
    if size in ("tiny", "bench"):
        from zimage_split.tiny_model import cached_tiny_model

        path = cached_tiny_model(size)
        return ModelSource(location=str(path), model_id=f"zimage-split/{size}")
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").exists():
            raise NotFound(
                f"{path} is not a diffusers model folder (no model_index.json). {how_to_get(model)}"
            )
        return ModelSource(location=str(path.resolve()), model_id=str(path.resolve()))
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise NotFound(f"No model folder at {model!r}. {how_to_get(model)}")
    return ModelSource(location=model, model_id=model)


def load_component(source: ModelSource, component: str, loader: Callable[[str, str], T]) -> T:
    """Calls `loader(location, subfolder)`, turning 'not found / cannot download' into a clear NotFound."""
    folder = Path(source.location)
    if folder.exists() and not (folder / component).is_dir():
        raise NotFound(f"{folder} has no {component}/ folder; it is not a complete Z-Image model.")
    try:
        return loader(source.location, component)
    except (OSError, ValueError) as error:
        offline = " (offline mode is on: HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") else ""
        if "safetensors" in str(error):
            offline += " (zimage-split loads .safetensors weights only, never pickled .bin files)"
        raise NotFound(
            f"Could not load {component}/ of {source.model_id!r}{offline}: {error}. {how_to_get(source.model_id)}"
        ) from error
