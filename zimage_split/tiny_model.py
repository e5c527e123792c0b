"""Builds a random-weight Z-Image model folder that loads exactly like Tongyi-MAI/Z-Image-Turbo.

The folder is a complete diffusers layout (model_index.json, text_encoder/, tokenizer/, transformer/,
vae/, scheduler/), so tests and the offline demo go through the same `from_pretrained` code as the
real model. Building needs no network and is deterministic for a given seed. The `full` size (the real
architecture) stores configs only: its weights are drawn on the device at load time (random_weights.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zimage_split.common import extras
from zimage_split.common.files import locked_folder, write_error

logger = logging.getLogger(__name__)

# Qwen3's template reduced to what Z-Image uses: user turns, the generation prompt, and the
# enable_thinking switch (False adds the empty think block, as the real template does).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class TinyModelSpec:
    """Sizes of a random Z-Image model. `TINY` is for tests, `BENCH` is slow enough to time on a CPU, and
    `FULL` is the real Z-Image-Turbo architecture (for timings on a GPU)."""

    text_hidden_size: int
    text_layers: int
    text_heads: int
    dit_dim: int
    dit_layers: int
    dit_refiner_layers: int
    dit_heads: int
    axes_dims: tuple[int, int, int]
    vae_channels: tuple[int, ...]
    # The defaults below are what TINY and BENCH have always had; FULL sets the real model's values.
    text_intermediate_size: int | None = None  # None: 2 * text_hidden_size
    text_kv_heads: int | None = None  # None: text_heads
    text_head_dim: int | None = None  # None: text_hidden_size // text_heads
    text_vocab_size: int | None = None  # None: the tokenizer's size
    text_max_positions: int = 4096
    text_rope_theta: float = 10000.0
    text_rms_norm_eps: float = 1e-6
    vae_layers_per_block: int = 1
    vae_sample_size: int = 32
    # False: the folder holds configs only, and the services build the random weights on their device.
    store_weights: bool = True


TINY = TinyModelSpec(
    text_hidden_size=16,
    text_layers=2,
    text_heads=2,
    dit_dim=32,
    dit_layers=2,
    dit_refiner_layers=1,
    dit_heads=2,
    axes_dims=(8, 4, 4),
    # Four blocks give the real VAE's 8x scale factor, so image sizes cost what they cost the real model.
    vae_channels=(32, 32, 32, 32),
)

# Heavy enough to time: one 8-step 256x256 image in-process takes about 1 s on a 2-core CPU (1.3 s measured:
# encode 0.3, DiT 0.6, VAE decode 0.4). Its VAE has the real 8x scale factor, so sizes cost what they cost
# the real model.
BENCH = TinyModelSpec(
    text_hidden_size=512,
    text_layers=8,
    text_heads=8,
    dit_dim=384,
    dit_layers=6,
    dit_refiner_layers=1,
    dit_heads=6,
    axes_dims=(16, 24, 24),
    vae_channels=(32, 64, 128, 128),
)

# Tongyi-MAI/Z-Image-Turbo's configs (Qwen3-4B, the 6.15B DiT, the FLUX VAE) with random weights: 31 GB
# that are never written anywhere. The tokenizer stays our byte-level one; its ids fit the real vocabulary.
FULL = TinyModelSpec(
    text_hidden_size=2560,
    text_layers=36,
    text_heads=32,
    text_kv_heads=8,
    text_head_dim=128,
    text_intermediate_size=9728,
    text_vocab_size=151936,
    text_max_positions=40960,
    text_rope_theta=1e6,
    text_rms_norm_eps=1e-6,
    dit_dim=3840,
    dit_layers=30,
    dit_refiner_layers=2,
    dit_heads=30,
    axes_dims=(32, 48, 48),
    vae_channels=(128, 256, 512, 512),
    vae_layers_per_block=2,
    vae_sample_size=1024,
    store_weights=False,
)

SPECS = {"tiny": TINY, "bench": BENCH, "full": FULL}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte-to-printable-character map, which byte-level BPE vocabularies use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def save_tokenizer(directory: Path) -> None:
    """Writes a byte-level BPE Qwen2Tokenizer with Qwen3's special tokens and chat template."""
    from transformers import Qwen2Tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {char: index for index, char in enumerate(sorted(_bytes_to_unicode().values()))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    # No merges: every byte is one token. Still a real byte-level BPE with Qwen's pre-tokenizer.
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=131072,
    )
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(directory))


def text_encoder_config(spec: TinyModelSpec, tokenizer: Any) -> Any:
    """The Qwen3Config of `spec`'s text encoder (a transformers `Qwen3Config`)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        hidden_size=spec.text_hidden_size,
        intermediate_size=spec.text_intermediate_size or spec.text_hidden_size * 2,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads or spec.text_heads,
        head_dim=spec.text_head_dim or spec.text_hidden_size // spec.text_heads,
        vocab_size=spec.text_vocab_size or len(tokenizer),
        max_position_embeddings=spec.text_max_positions,
        rope_theta=spec.text_rope_theta,
        rms_norm_eps=spec.text_rms_norm_eps,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )


def transformer_kwargs(spec: TinyModelSpec) -> dict[str, Any]:
    """`ZImageTransformer2DModel(**kwargs)` for `spec`."""
    return {
        "all_patch_size": (2,),
        "all_f_patch_size": (1,),
        "in_channels": 16,
        "dim": spec.dit_dim,
        "n_layers": spec.dit_layers,
        "n_refiner_layers": spec.dit_refiner_layers,
        "n_heads": spec.dit_heads,
        "n_kv_heads": spec.dit_heads,
        "norm_eps": 1e-5,
        "qk_norm": True,
        "cap_feat_dim": spec.text_hidden_size,
        "rope_theta": 256.0,
        "t_scale": 1000.0,
        "axes_dims": list(spec.axes_dims),
        "axes_lens": [1536, 512, 512],
    }


def vae_kwargs(spec: TinyModelSpec) -> dict[str, Any]:
    """`AutoencoderKL(**kwargs)` for `spec`: the FLUX VAE's layout (no quant convs, Z-Image's factors)."""
    channels = list(spec.vae_channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": channels,
        "layers_per_block": spec.vae_layers_per_block,
        "latent_channels": 16,
        "norm_num_groups": 32,
        "sample_size": spec.vae_sample_size,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "force_upcast": True,
    }


def _save_model(model_class: Any, kwargs: dict[str, Any], directory: Path, seed: int, weights: bool) -> None:
    import torch

    if weights:
        torch.manual_seed(seed)
        model_class(**kwargs).save_pretrained(str(directory))
    else:
        with torch.device("meta"):  # no memory and no init: only the config is written
            model_class(**kwargs).save_config(str(directory))


def _build_into(root: Path, spec: TinyModelSpec, seed: int, weights: bool) -> None:
    # Every component is built with its library, diffusers among them: an encoder-only install can serve a
    # random model someone built already, but not build one.
    extras.require("generator", what="Building a random model (--model tiny, bench or full)")
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen3Model

    from zimage_split.random_weights import write_marker

    save_tokenizer(root / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))

    text_config = text_encoder_config(spec, tokenizer)
    if weights:
        torch.manual_seed(seed)
        Qwen3Model(text_config).save_pretrained(str(root / "text_encoder"))
    else:
        # What the model's save_pretrained records, so both kinds of folder have the same configs.
        text_config.architectures = ["Qwen3Model"]
        text_config.dtype = torch.float32
        text_config.save_pretrained(str(root / "text_encoder"))
    _save_model(ZImageTransformer2DModel, transformer_kwargs(spec), root / "transformer", seed + 1, weights)
    _save_model(AutoencoderKL, vae_kwargs(spec), root / "vae", seed + 2, weights)

    FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, use_dynamic_shifting=False, shift=3.0
    ).save_pretrained(str(root / "scheduler"))

    model_index = {
        "_class_name": "ZImagePipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3Model"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    if not weights:
        write_marker(root, seed)


def build_tiny_model(
    directory: str | os.PathLike[str],
    *,
    size: str = "tiny",
    seed: int = 0,
    store_weights: bool | None = None,
) -> Path:
    """Builds the random model into `directory` (which must not exist yet) and returns its path.

    `store_weights=False` writes configs only, plus `random_weights.json` with the seed: the services
    then draw the weights on their own device when they load it (see random_weights.py). That is always
    so for `full`, whose weights would take 31 GB; by default `tiny` and `bench` store theirs.

    The folder appears atomically: it is built beside the target and renamed into place, so an
    interrupted build never leaves a half-written model behind.
    """
    if size not in SPECS:
        raise ValueError(f"Unknown tiny model size {size!r}; choose one of {sorted(SPECS)}.")
    spec = SPECS[size]
    weights = spec.store_weights if store_weights is None else store_weights
    if weights and not spec.store_weights:
        raise ValueError(
            f"The {size} model's random weights are not written to disk; they are built on the device at load time."
        )
    target = Path(directory).expanduser().resolve()
    if target.exists():
        raise FileExistsError(f"{target} already exists; remove it or pick another directory.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _build_into(staging, spec, seed, weights)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def cached_tiny_model(size: str = "tiny") -> Path:
    """Returns the cached random model of this size, building it on first use (`full`: configs only).

    Processes started together on a fresh cache (an encoder and a generator) build it once: the first
    takes a lock on the cache folder and builds, the others wait for it and find the model. A folder
    that cannot be written is a typed error naming it (FAILED_PRECONDITION, PERMISSION_DENIED, ...).
    """
    cache_home = os.environ.get("ZSPLIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "zimage-split"
    )
    # Named after the spec, so a changed spec builds a new folder instead of reusing a stale one.
    spec_hash = hashlib.sha256(repr(SPECS[size]).encode()).hexdigest()[:12]
    path = Path(cache_home) / f"{size}-{spec_hash}"
    if (path / "model_index.json").exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with locked_folder(path.parent):
            if not (path / "model_index.json").exists():  # built while this process waited
                _remove_abandoned_builds(path)
                _build_unless_another_did(path, size)
    except OSError as error:
        raise write_error(
            error,
            path,
            f"building the {size} model",
            "Point ZSPLIT_CACHE (or XDG_CACHE_HOME) at a folder this user can write.",
        ) from error
    return path


def _remove_abandoned_builds(path: Path) -> None:
    """Removes what builds of `path` that were killed left (their staging folders, `.NAME.*`): with the
    cache's lock held, no other build of it is running, and a `bench` build leaves 160 MB behind."""
    for staging in path.parent.glob(f".{path.name}.*"):
        if staging.is_dir():
            logger.info("Removing %s, left by a build of the %s model that was stopped.", staging, path.name)
            shutil.rmtree(staging, ignore_errors=True)


def _build_unless_another_did(path: Path, size: str) -> None:
    try:
        build_tiny_model(path, size=size)
    except OSError:
        # A process that does not share our lock (an older zsplit, a file system without flock) renamed
        # the same build into place first: FileExistsError before our build, or ENOTEMPTY from our rename
        # onto its folder. Its model is the same as ours.
        if not (path / "model_index.json").exists():
            raise


# The ControlNet layouts build_tiny_controlnet writes, as alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union
# releases have them: 1.0 (control image only), 2.0 and 2.1 (also mask and masked image: inpainting; 2.1 with
# hints into the refiner blocks too).
CONTROLNET_LAYOUTS = ("1.0", "2.0", "2.1")


def controlnet_kwargs(spec: TinyModelSpec, layout: str = "2.1") -> dict[str, Any]:
    """`ZImageControlNetModel(**kwargs)` for `spec`'s DiT: control blocks on every other DiT block (both of the
    tiny DiT's two), placed as the published configs place theirs (0, 2, ..., 28 of the real 30)."""
    if layout not in CONTROLNET_LAYOUTS:
        raise ValueError(
            f"Unknown ControlNet layout {layout!r}; choose one of {', '.join(CONTROLNET_LAYOUTS)}."
        )
    count = spec.dit_layers if spec.dit_layers <= 2 else spec.dit_layers // 2
    latent_channels = transformer_kwargs(spec)["in_channels"]
    refiners = list(range(spec.dit_refiner_layers))
    mode = {"1.0": None, "2.0": "control_layers", "2.1": "control_noise_refiner"}[layout]
    return {
        "control_layers_places": [index * (spec.dit_layers // count) for index in range(count)],
        "control_refiner_layers_places": [] if mode is None else refiners,
        "control_in_dim": latent_channels if layout == "1.0" else 2 * latent_channels + 1,
        "add_control_noise_refiner": mode,
        "all_patch_size": (2,),
        "all_f_patch_size": (1,),
        "dim": spec.dit_dim,
        "n_refiner_layers": spec.dit_refiner_layers,
        "n_heads": spec.dit_heads,
        "n_kv_heads": spec.dit_heads,
        "norm_eps": 1e-5,
        "qk_norm": True,
    }


def build_tiny_controlnet(
    path: str | os.PathLike[str], *, size: str = "tiny", seed: int = 0, layout: str = "2.1"
) -> Path:
    """Writes a random-weight Z-Image ControlNet for the `size` model to `path` and returns it.

    A path ending in .safetensors gets one file in the Union release layout (`--controlnet NAME=FILE` reads
    its config off the tensors); any other path a diffusers folder (config.json and safetensors). Deterministic
    for a seed. The projections a real ControlNet starts at zero (before_proj, after_proj) are drawn at random
    too, so that the control image changes the result.
    """
    import torch
    from diffusers import ZImageControlNetModel
    from safetensors.torch import save_file

    if size not in SPECS or not SPECS[size].store_weights:
        raise ValueError(f"A random ControlNet is written for the tiny or bench model, not {size!r}.")
    target = Path(path).expanduser().resolve()
    if target.exists():
        raise FileExistsError(f"{target} already exists; remove it or pick another path.")
    torch.manual_seed(seed)
    model = ZImageControlNetModel(**controlnet_kwargs(SPECS[size], layout))
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.05)
    if target.suffix == ".safetensors":
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(target))
    else:
        model.save_pretrained(str(target))
    return target
