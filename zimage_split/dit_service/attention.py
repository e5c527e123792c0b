"""Which attention kernel the DiT runs (`--attention`): checked before the model loads, timed for `auto`.

The kernels are diffusers' own attention backends, selected per pipeline call with `diffusers.attention_backend`.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from zimage_split.common.errors import InvalidArgument
from zimage_split.dit_service.config import ATTENTION_BACKENDS

logger = logging.getLogger(__name__)

# Kernels that need a CUDA GPU and a package of their own, with how to get it.
GPU_ONLY = {
    "flash": "`pip install flash-attn --no-build-isolation` (FlashAttention 2; Ampere or newer)",
    "_flash_3": "FlashAttention 3 (`flash_attn_interface`, built from the hopper/ folder of "
    "Dao-AILab/flash-attention; Hopper GPUs)",
    "sage": "`pip install sageattention`",
}
# What `auto` may pick, fastest first when equal. Not sage: it quantises Q and K to int8 (and P.V to fp8 on
# some GPUs), so its images drift from diffusers' beyond bf16 rounding; it must be asked for by name.
AUTO_CANDIDATES = ("_flash_3", "flash", "native")
# The shape `auto` times: Z-Image at 1024x1024 (4096 image tokens and a short caption), 30 heads of 128.
TIMED_SHAPE = (1, 4128, 30, 128)
# Z-Image pads every caption to a multiple of this many tokens (diffusers' SEQ_MULTI_OF).
CAPTION_MULTIPLE = 32
# A candidate must be this much faster than native to be picked: native is diffusers' reference path.
MARGIN = 0.05


@dataclass(frozen=True)
class AttentionChoice:
    """The kernel for batches whose sequences share one length, and the one for batches that need a mask.

    diffusers' flash and sage kernels take no attention mask, and Z-Image masks the padding of a batch whose
    captions pad to different lengths (guidance with a negative prompt of another length, or a Ray batch
    of different prompts); such a call runs native attention (SDPA) instead.
    """

    backend: str = "native"
    masked: str = "native"
    # How `auto` decided: each candidate's median seconds on TIMED_SHAPE, or why it was left out.
    trials: dict[str, float | str] = field(default_factory=dict)

    def for_captions(self, caption_lengths: Iterable[int]) -> str:
        return self.masked if needs_padding_mask(caption_lengths) else self.backend

    @contextlib.contextmanager
    def applied(self, caption_lengths: Iterable[int]) -> Iterator[str]:
        """Runs the block with this choice's kernel for a DiT call over these captions; yields its name.

        diffusers keeps the active backend process-wide, so two engines in one process with different
        choices must not run at the same time (each generator process has one engine).
        """
        from diffusers import attention_backend

        name = self.for_captions(caption_lengths)
        with attention_backend(name):
            yield name


def needs_padding_mask(caption_lengths: Iterable[int]) -> bool:
    """True when the DiT pads this batch behind an attention mask: its captions pad to different lengths.

    Images in a batch share one size, so only the captions (padded to multiples of 32 tokens) can differ.
    """
    return len({-(-length // CAPTION_MULTIPLE) for length in caption_lengths}) > 1


def check_backend(name: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raises InvalidArgument, saying how to fix it, when `name` cannot run on `device` in `dtype`."""
    if name not in ATTENTION_BACKENDS:
        raise InvalidArgument(f"Unknown --attention {name!r}; use {', '.join(ATTENTION_BACKENDS)}.")
    if name in ("auto", "native"):
        return
    if device.type != "cuda":
        raise InvalidArgument(
            f"--attention {name} needs a CUDA GPU (this generator runs on {device}) and {GPU_ONLY[name]}; "
            "use --attention native or auto."
        )
    if dtype not in (torch.bfloat16, torch.float16):
        raise InvalidArgument(
            f"--attention {name} computes in bfloat16 or float16, not {str(dtype).removeprefix('torch.')}; "
            "use --dtype auto (bfloat16 on CUDA) or --attention native."
        )
    if name == "_flash_3" and torch.cuda.get_device_capability(device)[0] != 9:
        major, minor = torch.cuda.get_device_capability(device)
        raise InvalidArgument(
            f"--attention _flash_3 needs a Hopper GPU (compute capability 9.x); {device} is {major}.{minor}. "
            "Use --attention flash, native or auto."
        )
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
    )

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except RuntimeError as error:
        raise InvalidArgument(
            f"--attention {name} cannot run here: {error} It needs {GPU_ONLY[name]}; "
            "use --attention native or auto."
        ) from None


def _attend(name: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    return dispatch_attention_fn(query, key, value, backend=AttentionBackendName(name))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_qkv(
    shape: tuple[int, int, int, int], device: torch.device, dtype: torch.dtype, seed: int
) -> list[torch.Tensor]:
    generator = torch.Generator("cpu").manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(device, dtype) for _ in range(3)]


def smoke_test(name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One small attention call with `name` ([batch, tokens, heads, head_dim], as Z-Image calls it)."""
    query, key, value = _random_qkv((2, 256, 4, 128), device, dtype, seed=0)
    with torch.inference_mode():
        out = _attend(name, query, key, value)
        _synchronize(device)
    if out.shape != query.shape or not torch.isfinite(out).all():
        raise InvalidArgument(
            f"--attention {name} returned {'a wrong shape' if out.shape != query.shape else 'NaN or inf'} "
            "on a test call; use --attention native or auto."
        )
    return out


def time_backends(
    names: Iterable[str],
    device: torch.device,
    dtype: torch.dtype,
    *,
    shape: tuple[int, int, int, int] = TIMED_SHAPE,
    repeats: int = 5,
) -> tuple[str, dict[str, float | str]]:
    """Checks each backend against native on a small call, times those that agree on `shape`, and returns
    the fastest (native unless another is MARGIN faster) with every trial's median seconds or failure.
    """
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    reference = smoke_test("native", device, dtype)
    trials: dict[str, float | str] = {}
    query, key, value = _random_qkv(shape, device, dtype, seed=1)
    for name in names:
        try:
            error = (smoke_test(name, device, dtype).float() - reference.float()).abs().max().item()
            if error > tolerance:
                trials[name] = f"differs from native by up to {error:.3g} (more than {tolerance})"
                continue
            seconds = []
            with torch.inference_mode():
                for index in range(repeats + 2):  # the first two calls load kernels and tune
                    _synchronize(device)
                    started = time.perf_counter()
                    _attend(name, query, key, value)
                    _synchronize(device)
                    if index >= 2:
                        seconds.append(time.perf_counter() - started)
            trials[name] = statistics.median(seconds)
        except Exception as error:  # a kernel that fails on this GPU is left out, not fatal
            trials[name] = (
                f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            )
    timed = {name: value for name, value in trials.items() if isinstance(value, float)}
    if not timed:
        return "native", trials
    best = min(timed, key=timed.__getitem__)
    if "native" in timed and best != "native" and timed[best] > timed["native"] * (1 - MARGIN):
        best = "native"
    return best, trials


def choose_attention(requested: str, device: torch.device, dtype: torch.dtype) -> AttentionChoice:
    """Resolves --attention for this device and dtype, or raises InvalidArgument saying how to fix it.

    `auto` is native off CUDA; on CUDA it times every installed candidate that agrees with native.
    """
    check_backend(requested, device, dtype)
    if requested == "native":
        return AttentionChoice()
    if requested != "auto":
        smoke_test(requested, device, dtype)
        return AttentionChoice(backend=requested)
    if device.type != "cuda":
        return AttentionChoice(trials={"native": "the only backend off CUDA"})
    usable: list[str] = []
    trials: dict[str, float | str] = {}
    for name in AUTO_CANDIDATES:
        try:
            check_backend(name, device, dtype)
            usable.append(name)
        except InvalidArgument as error:
            trials[name] = error.message
    best, timed = time_backends(usable, device, dtype) if usable != ["native"] else ("native", {})
    trials.update(timed)
    logger.info(
        "--attention auto picked %s on %s (median seconds per call, or why not: %s)", best, device, trials
    )
    return AttentionChoice(backend=best, trials=trials)
