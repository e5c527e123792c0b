"""Finds a model: `tiny`/`bench`/`full` (built locally), a local diffusers folder, or a Hugging Face hub id."""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from zimage_split.common.errors import NotFound

if TYPE_CHECKING:
    import torch
    from diffusers import ZImagePipeline

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"
# How long resolve_model waits for the hub to answer before calling it unreachable.
HUB_PROBE_SECONDS = 5.0

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ModelSource:
    """Where to load from (`location`) and the identity reported to clients and hashed into keys.

    `random_weights_seed` is set for folders that hold configs only (`full`, or any folder with
    `random_weights.json`): every model is then built from its config on the device, with random weights
    drawn from this seed, instead of being read from files.
    """

    location: str
    model_id: str
    random_weights_seed: int | None = None


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

    `tiny`, `bench` and `full` are the built-in random models (`full`: the real architecture, configs
    only). They answer to their model ids too ("zimage-split/tiny"), so a model id read back from an
    embeddings file resolves.
    """
    from zimage_split.random_weights import read_marker

    size = model.removeprefix("zimage-split/")
    if size in ("tiny", "bench", "full"):
        from zimage_split.tiny_model import cached_tiny_model

        path = cached_tiny_model(size)
        return ModelSource(
            location=str(path), model_id=f"zimage-split/{size}", random_weights_seed=read_marker(path)
        )
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").exists():
            raise NotFound(
                f"{path} is not a diffusers model folder (no model_index.json). {how_to_get(model)}"
            )
        try:
            seed = read_marker(path)
        except ValueError as error:
            raise NotFound(f"{path}: {error}") from error
        return ModelSource(
            location=str(path.resolve()), model_id=str(path.resolve()), random_weights_seed=seed
        )
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise NotFound(f"No model folder at {model!r}. {how_to_get(model)}")
    return hub_model(model)


def on_this_host(source: ModelSource) -> ModelSource:
    """`source` as the generator front resolved it, made good for this host (a Ray replica's, maybe another).

    A random preset (`tiny`, `bench`, `full`) is built in this host's own cache, as the front built it in
    its own: the path the front got need not exist here. A local folder must be at the same path on every
    host; where it is not, the error names this host and the fix. A hub id is resolved by huggingface_hub
    here, as on the front.
    """
    import socket

    preset = source.model_id.removeprefix("zimage-split/")
    if source.model_id != preset and preset in ("tiny", "bench", "full"):
        return resolve_model(source.model_id)
    folder = Path(source.location)
    if folder.is_absolute() and not (folder / "model_index.json").is_file():
        host = socket.gethostname()
        raise NotFound(
            f"The model folder {folder} (the generator front's --model) is not on host {host}: every Ray "
            f"host needs the model at the same path. Copy it there (e.g. `rsync -a {folder}/ "
            f"{host}:{folder}/`) or mount the same storage at that path, then restart the generator."
        )
    return source


def hub_model(repo_id: str) -> ModelSource:
    """A hub id, loaded through huggingface_hub. When the hub cannot be reached it loads from the local
    cache if the cache holds the model, and otherwise fails at once, saying how to get the model: left to
    huggingface_hub, each file would be retried for about 20 s first."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:  # the cache only, which fails fast by itself
        return ModelSource(location=repo_id, model_id=repo_id)
    reason = hub_unreachable(constants.ENDPOINT)
    if reason is None:
        return ModelSource(location=repo_id, model_id=repo_id)
    cached = try_to_load_from_cache(repo_id, "model_index.json")
    if isinstance(cached, str):
        folder = Path(cached).parent
        logger.warning(
            "The Hugging Face hub at %s cannot be reached (%s); loading %s from the local cache, %s.",
            constants.ENDPOINT,
            reason,
            repo_id,
            folder,
        )
        return ModelSource(location=str(folder), model_id=repo_id)
    raise NotFound(
        f"Cannot reach the Hugging Face hub at {constants.ENDPOINT} ({reason}) to download {repo_id!r}, and "
        f"the local cache ({constants.HF_HUB_CACHE}) does not hold it. {how_to_get(repo_id)}"
    )


def hub_unreachable(endpoint: str) -> str | None:
    """Why `endpoint` cannot be reached (refused, no route, no name, no answer in HUB_PROBE_SECONDS), or
    None when it answers at all, whatever the HTTP status."""
    request = urllib.request.Request(endpoint, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=HUB_PROBE_SECONDS):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as error:
        return str(getattr(error, "reason", None) or error)


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


def load_model(
    source: ModelSource, component: str, model_class: Any, *, device: torch.device, dtype: torch.dtype
) -> Any:
    """Loads one model (`transformer`, `vae`, `text_encoder`) of `source` in `dtype`.

    From files, `model_class.from_pretrained` (safetensors only) loads it on the CPU, and the caller moves
    it to `device`. For a random-weights source it is built from its config directly on `device`, with
    the weights every process builds for that seed, device and dtype. `model_class` is a diffusers model
    class or transformers' `AutoModel`.
    """
    seed = source.random_weights_seed
    if seed is None:
        return load_component(
            source,
            component,
            lambda loc, sub: model_class.from_pretrained(
                loc, subfolder=sub, dtype=dtype, use_safetensors=True
            ),
        )
    from zimage_split.random_weights import build_random_model, load_config

    return load_component(
        source,
        component,
        lambda loc, sub: build_random_model(
            model_class,
            load_config(model_class, loc, sub),
            seed=seed,
            component=component,
            device=device,
            dtype=dtype,
        ),
    )


def reference_pipeline(
    source: ModelSource,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    text_encoder_dtype: torch.dtype | None = None,
) -> ZImagePipeline:
    """diffusers' own, complete `ZImagePipeline` for `source` on `device`: the reference to time and compare
    the services against.

    Text encoder, tokenizer, transformer, VAE and scheduler load the way the services load them
    (`load_model`): from the folder or hub id, or, for a random-weights source such as `full`, built on
    `device` with the same weights the encoder and generator services build for the same seed, device and
    dtype. Models are in `dtype`, the text encoder in `text_encoder_dtype` (default: `dtype`); it keeps all
    its layers, since the pipeline runs them all and takes `hidden_states[-2]`. Progress bars are off.
    Example: `reference_pipeline(resolve_model("full"), device="cuda", dtype=torch.bfloat16)`.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import AutoModel, AutoTokenizer

    device = torch.device(device)
    tokenizer = load_component(
        source, "tokenizer", lambda loc, sub: AutoTokenizer.from_pretrained(loc, subfolder=sub)
    )
    scheduler = load_component(
        source,
        "scheduler",
        lambda loc, sub: FlowMatchEulerDiscreteScheduler.from_pretrained(loc, subfolder=sub),
    )
    text_encoder = load_model(
        source, "text_encoder", AutoModel, device=device, dtype=text_encoder_dtype or dtype
    )
    transformer = load_model(source, "transformer", ZImageTransformer2DModel, device=device, dtype=dtype)
    vae = load_model(source, "vae", AutoencoderKL, device=device, dtype=dtype)
    pipe = ZImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
