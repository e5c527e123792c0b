"""The unit of work of a generator: load the DiT, VAE and scheduler once, then turn embeddings into images.

Runs diffusers' own ZImagePipeline, ZImageImg2ImgPipeline and ZImageInpaintPipeline, and per loaded ControlNet
ZImageControlNetPipeline and ZImageControlNetInpaintPipeline (built with text_encoder=None, sharing one
transformer, VAE and scheduler), so an image equals the reference for the same embeddings, seed and images. No gRPC here: the servicer and the Ray workers both drive this class.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image

from zimage_split.common.errors import OUT_OF_MEMORY, Cancelled, InvalidArgument, ResourceExhausted
from zimage_split.devices import release_cached_memory, synchronized_clock
from zimage_split.dit_service.attention import check_backend, choose_attention
from zimage_split.dit_service.config import VAE_TILING_MODES
from zimage_split.dit_service.controlnets import ControlNetInfo, ControlNetSpec, load_controlnet
from zimage_split.dit_service.dype import Dype, extrapolating
from zimage_split.dit_service.lora.adapters import LoraAdapters
from zimage_split.dit_service.lora.library import LoraLibrary, LoraSpec
from zimage_split.dit_service.outputs import OutputOptions, encode_image, encode_latents
from zimage_split.dit_service.skip_layer_guidance import SkipLayerGuidance, guiding
from zimage_split.model_source import ModelSource, load_component, load_model

logger = logging.getLogger(__name__)

# `--vae-tiling auto` decodes in tiles from this many pixels (2048x2048, the default --max-pixels) up: an
# untiled decode of the real VAE at 2048x2048 needs several GiB of activations, more than a 16 GB card has
# left beside the DiT. Below it, the decode is diffusers' own, untiled.
TILED_DECODE_FROM_PIXELS = 2048 * 2048
# Tile side in pixels, with diffusers' 25% overlap. The real VAE's own default (its sample_size); set here
# because a VAE's sample_size may be anything (32 in the tiny model, which would mean thousands of tiles).
VAE_TILE_PIXELS = 1024


@dataclass(frozen=True)
class GenerationParams:
    """Validated parameters of one image. Requests that share all but `seed` can share a batch."""

    width: int = 1024
    height: int = 1024
    steps: int = 8
    guidance_scale: float = 0.0
    cfg_normalization: float = 0.0
    cfg_truncation: float = 1.0
    seed: int = 0
    # img2img or inpainting strength; None for text-to-image.
    strength: float | None = None
    # Whether the job has a mask (inpainting); needs `strength`.
    inpaint: bool = False
    # LoRA adapters for this image; a batch runs with one set of adapters.
    loras: tuple[LoraSpec, ...] = ()
    # The schedule's shift (FlowMatchEulerDiscreteScheduler.set_shift); None: the model's scheduler config.
    shift: float | None = None
    # Skip Layer Guidance; None: off.
    skip_layer_guidance: SkipLayerGuidance | None = None
    # DyPE position extrapolation for images over 1024 pixels a side; None: the model's own RoPE.
    dype: Dype | None = None
    # The loaded ControlNet to run (its --controlnet name) and its conditioning scale; None: no ControlNet.
    # With `inpaint` (and no strength: that pipeline always runs every step) the ControlNet inpaint pipeline.
    controlnet: str | None = None
    controlnet_scale: float = 0.0

    @property
    def batch_key(self) -> tuple:
        return (
            self.width,
            self.height,
            self.steps,
            self.guidance_scale,
            self.cfg_normalization,
            self.cfg_truncation,
            self.strength,
            self.inpaint,
            self.loras,
            self.shift,
            self.skip_layer_guidance,
            self.dype,
            self.controlnet,
            self.controlnet_scale,
        )

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > 0

    @property
    def steps_run(self) -> int:
        """Denoising steps that run: `steps`, or what diffusers' img2img `get_timesteps` keeps for `strength`."""
        if self.strength is None:
            return self.steps
        start = int(max(self.steps - min(self.steps * self.strength, self.steps), 0))
        return self.steps - start


@dataclass
class GenerationJob:
    """One image to make. Callbacks are called from the worker thread."""

    params: GenerationParams
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    on_step: Callable[..., None] | None = None  # on_step(step, total, replica="")
    is_cancelled: Callable[[], bool] = field(default=lambda: False)
    # img2img / inpainting start image (RGB, already width x height) and mask ("L", white = repaint).
    init_image: Image.Image | None = None
    mask_image: Image.Image | None = None
    # The ControlNet's control image (RGB, already width x height); with `params.controlnet` only.
    control_image: Image.Image | None = None
    # The file to make of the result; does not affect batching.
    output: OutputOptions = OutputOptions()


@dataclass(frozen=True)
class GeneratedImage:
    # The result file: an image in `format`, or a safetensors file of latents ("safetensors").
    data: bytes
    format: str
    width: int
    height: int
    denoise_seconds: float
    decode_seconds: float
    # Whether the VAE decoded this image in overlapping tiles (--vae-tiling).
    vae_tiled: bool = False
    # Writing the file (PNG, JPEG, WebP or safetensors encoding), after `decode_seconds` and off the DiT thread.
    file_seconds: float = 0.0


@dataclass(frozen=True)
class RenderedImage:
    """One image out of the DiT and VAE whose file is not written yet: `write_file` does that, on any thread,
    so the DiT can start its next batch meanwhile."""

    output: OutputOptions
    width: int
    height: int
    denoise_seconds: float
    decode_seconds: float
    vae_tiled: bool = False
    # The decoded image, or for output format "latent" the latents ([1, C, h, w], float32, on the CPU).
    picture: Image.Image | None = None
    latents: torch.Tensor | None = None


def write_file(rendered: RenderedImage) -> GeneratedImage:
    """The result file of a rendered image. Thread-safe, and the same bytes on any thread (outputs.py)."""
    started = time.perf_counter()
    if rendered.latents is not None:
        data, kind = encode_latents(rendered.latents, rendered.output.metadata), "safetensors"
    elif rendered.picture is not None:
        data, kind = encode_image(rendered.picture, rendered.output), rendered.output.format
    else:
        raise ValueError("A RenderedImage holds either a picture or latents.")
    return GeneratedImage(
        data=data,
        format=kind,
        width=rendered.width,
        height=rendered.height,
        denoise_seconds=rendered.denoise_seconds,
        decode_seconds=rendered.decode_seconds,
        vae_tiled=rendered.vae_tiled,
        file_seconds=time.perf_counter() - started,
    )


def out_of_memory(
    device: torch.device, params: GenerationParams, count: int, detail: str
) -> ResourceExhausted:
    """The error for a request the device had no memory for, after handing the allocator's cache back."""
    release_cached_memory(device)
    return ResourceExhausted(
        f"The generator's {device} ran out of memory making {count} image(s) of {params.width}x"
        f"{params.height} ({detail}). Ask for a smaller size or fewer images per request; on the server, "
        "--vae-tiling on, a lower --max-batch-size or fewer replicas per GPU (--gpus-per-replica) leave more "
        "memory per image.",
        reason=OUT_OF_MEMORY,
    )


def decodes_tiled(vae_tiling: str, width: int, height: int) -> bool:
    """Whether --vae-tiling `vae_tiling` decodes a width x height image in tiles (a single tile is not)."""
    if vae_tiling == "off" or max(width, height) <= VAE_TILE_PIXELS:
        return False
    return vae_tiling == "on" or width * height >= TILED_DECODE_FROM_PIXELS


def check_engine_options(
    device: torch.device, dtype: torch.dtype, *, attention: str, compile: bool, vae_tiling: str
) -> None:
    """Raises InvalidArgument, saying the fix, for options that cannot work here; needs no model."""
    if vae_tiling not in VAE_TILING_MODES:
        raise InvalidArgument(f"Unknown --vae-tiling {vae_tiling!r}; use auto, on or off.")
    check_backend(attention, device, dtype)
    if compile:
        check_compiler(device)


def check_compiler(device: torch.device) -> None:
    """torch.compile's inductor needs a C++ compiler for CPU code and Triton for CUDA code."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise InvalidArgument(
                "--compile on CUDA needs Triton (`pip install triton`, usually installed with torch); "
                "start without --compile."
            )
    elif device.type == "cpu":
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception as error:
            raise InvalidArgument(
                f"--compile on CPU needs a C++ compiler (g++, or the one the CXX variable names), and none "
                f"was found ({error}). Install one or start without --compile."
            ) from None


@dataclass(frozen=True)
class EngineInfo:
    """What the front needs to know about a loaded engine, without holding it (it may be in a Ray replica)."""

    model_id: str
    caption_dim: int
    max_caption_tokens: int
    size_multiple: int
    dtype: torch.dtype
    device: str
    parameter_count: int
    components: tuple[str, ...]
    # The schedule shift of a request that sets none: the model's scheduler config (3.0 for Turbo).
    default_shift: float
    # The DiT's main transformer blocks (30 for Z-Image): Skip Layer Guidance names blocks 0 to this - 1.
    dit_layers: int
    # The attention kernel for batches that need no padding mask (others run native); see attention.py.
    attention_backend: str = "native"
    compiled: bool = False
    vae_tiling: str = "auto"
    loras_enabled: bool = False
    lora_cache_size: int = 0
    # Why the DiT computes in `dtype` (`--dtype auto` decides by device and CPU features).
    dtype_reason: str = ""
    # The ControlNets loaded at start (--controlnet), in the order given.
    controlnets: tuple[ControlNetInfo, ...] = ()


class _AllCancelled(Exception):
    pass


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Host tensors go to a CUDA device through pinned memory, so the copy is queued on the stream instead
    of blocking this thread, and are cast there; elsewhere a plain copy (pin_memory needs an accelerator).
    """
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True).to(dtype)
    return tensor.to(device, dtype=dtype)


class DiTEngine:
    """Holds `transformer/`, `vae/` and `scheduler/` only; the text encoder is never loaded.

    `attention` is --attention (auto, native, flash, _flash_3, sage), `compile` turns on regional
    torch.compile of the transformer blocks (compiled by `warm_up`), `vae_tiling` is --vae-tiling (auto, on,
    off), `lora_dir` the folder of LoRA files requests may name (None: no LoRA), of which `lora_cache` stay
    loaded, and `controlnets` the ControlNets requests may name. Options that cannot work on `device` raise
    InvalidArgument before any weights load.
    """

    def __init__(
        self,
        source: ModelSource,
        *,
        device: torch.device,
        dtype: torch.dtype,
        attention: str = "auto",
        compile: bool = False,
        vae_tiling: str = "auto",
        lora_dir: str | None = None,
        lora_cache: int = 8,
        dtype_reason: str = "",
        controlnets: Sequence[ControlNetSpec] = (),
    ) -> None:
        from diffusers import (
            AutoencoderKL,
            FlowMatchEulerDiscreteScheduler,
            ZImageControlNetInpaintPipeline,
            ZImageControlNetPipeline,
            ZImageImg2ImgPipeline,
            ZImageInpaintPipeline,
            ZImagePipeline,
            ZImageTransformer2DModel,
        )

        self.model_id = source.model_id
        self.device = device
        self.dtype = dtype
        self.dtype_reason = dtype_reason
        check_engine_options(device, dtype, attention=attention, compile=compile, vae_tiling=vae_tiling)
        self.attention = choose_attention(attention, device, dtype)
        self.compiled = compile
        self.vae_tiling = vae_tiling
        logger.info("DiT attention on %s: %s", device, self.attention.backend)
        # From safetensors files, or for a random-weights source (`full`) built on the device directly.
        transformer = load_model(source, "transformer", ZImageTransformer2DModel, device=device, dtype=dtype)
        vae = load_model(source, "vae", AutoencoderKL, device=device, dtype=dtype)
        scheduler = load_component(
            source,
            "scheduler",
            lambda loc, sub: FlowMatchEulerDiscreteScheduler.from_pretrained(loc, subfolder=sub),
        )
        self.pipe = ZImagePipeline(
            scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
        ).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        # The same modules (no copies) behind diffusers' img2img and inpainting pipelines.
        self.img2img_pipe = ZImageImg2ImgPipeline(**self.pipe.components)
        self.inpaint_pipe = ZImageInpaintPipeline(**self.pipe.components)
        for pipe in (self.img2img_pipe, self.inpaint_pipe):
            pipe.set_progress_bar_config(disable=True)
        # Per ControlNet, its pipeline and (for one that takes a mask) its inpainting pipeline, both on the same
        # modules; the ControlNet itself borrows the DiT's embedders and refiners (from_transformer).
        self.controlnets: dict[str, tuple[ControlNetInfo, Any, Any]] = {}
        for spec in controlnets:
            model, described = load_controlnet(spec, transformer, device=device, dtype=dtype)
            plain = ZImageControlNetPipeline(**self.pipe.components, controlnet=model)
            inpaint = (
                ZImageControlNetInpaintPipeline(**self.pipe.components, controlnet=model)
                if described.takes_mask
                else None
            )
            for pipe in (plain, inpaint):
                if pipe is not None:
                    pipe.set_progress_bar_config(disable=True)
            self.controlnets[spec.name] = (described, plain, inpaint)
            logger.info("ControlNet %s loaded from %s", spec.name, spec.path)
        self.lora_library = LoraLibrary(lora_dir)
        self.loras = LoraAdapters(self.pipe, self.lora_library, capacity=lora_cache)
        self.lora_cache = lora_cache
        self.caption_dim = int(transformer.config.cap_feat_dim)
        # Caption tokens take RoPE positions on the first axis, after a small reserve (1504 for the real model).
        self.max_caption_tokens = int(transformer.config.axes_lens[0]) - 32
        self.default_shift = float(scheduler.shift)
        self.size_multiple = self.pipe.vae_scale_factor * 2
        # enable_tiling() takes no sizes; these are the attributes AutoencoderKL's tiled decode reads.
        vae.tile_sample_min_size = VAE_TILE_PIXELS
        vae.tile_latent_min_size = VAE_TILE_PIXELS // self.pipe.vae_scale_factor
        vae.tile_overlap_factor = 0.25
        if compile:
            self._compile()

    @property
    def info(self) -> EngineInfo:
        modules = (self.pipe.transformer, self.pipe.vae)
        return EngineInfo(
            model_id=self.model_id,
            caption_dim=self.caption_dim,
            max_caption_tokens=self.max_caption_tokens,
            size_multiple=self.size_multiple,
            dtype=self.dtype,
            device=str(self.device),
            parameter_count=sum(p.numel() for module in modules for p in module.parameters()),
            components=tuple(name for name, module in self.pipe.components.items() if module is not None),
            default_shift=self.default_shift,
            dit_layers=len(self.pipe.transformer.layers),
            attention_backend=self.attention.backend,
            compiled=self.compiled,
            vae_tiling=self.vae_tiling,
            loras_enabled=self.lora_library.enabled,
            lora_cache_size=self.lora_cache if self.lora_library.enabled else 0,
            dtype_reason=self.dtype_reason,
            controlnets=tuple(described for described, _, _ in self.controlnets.values()),
        )

    def _compile(self) -> None:
        """Regional torch.compile: each transformer block kind is compiled once and reused by every layer.

        Compilation itself happens in `warm_up`. dynamic=True makes the graphs shape-generic: captions pad to
        32..1536 tokens, so the token count changes between requests even at one image size.
        """
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        # A graph per block kind x batch of 1 or more x padding mask or not: more than dynamo's default of 8,
        # past which it would quietly run the blocks uncompiled.
        setattr(config, limit, max(getattr(config, limit), 64))
        self.pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=True)

    def warm_up(self, side: int = 1024, *, guidance: bool = True) -> None:
        """Pays for lazy initialisation, and with --compile for compilation, before the first request.

        Always one 64x64 one-step image. Compiled, also one step at `side` x `side` (the largest size the
        server expects) and, with `guidance`, guided steps whose negative caption pads to another length
        (a masked batch of 2) and to the same length (an unmasked one): the graphs requests need.
        """
        started = time.perf_counter()
        zeros = lambda tokens: torch.zeros(tokens, self.caption_dim)  # noqa: E731
        small = GenerationParams(width=64, height=64, steps=1, seed=0)
        try:
            self.generate([GenerationJob(params=small, prompt_embeds=zeros(4))])
            if self.compiled:
                self._denoise([GenerationJob(replace(small, width=side, height=side), zeros(40))])
                for negative_tokens in (40, 5) if guidance else ():
                    guided = replace(small, guidance_scale=2.0)
                    self._denoise([GenerationJob(guided, zeros(4), zeros(negative_tokens))])
        except Exception as error:
            if not self.compiled:
                raise
            first_line = (str(error).strip().splitlines() or [""])[0]
            raise InvalidArgument(
                f"--compile: torch.compile could not compile the DiT on {self.device} "
                f"({type(error).__name__}: {first_line}). On CPU it needs a working C++ compiler, on CUDA "
                "Triton; start without --compile."
            ) from error
        logger.info(
            "Warm-up took %.1f s%s",
            time.perf_counter() - started,
            f" (compiled at 64x64 and {side}x{side}{', guided' if guidance else ''})"
            if self.compiled
            else "",
        )

    def _embeds(self, tensor: torch.Tensor) -> torch.Tensor:
        return to_device(tensor, self.device, self.pipe.transformer.dtype)

    def decodes_tiled(self, width: int, height: int) -> bool:
        """Whether `decode` splits a width x height image into tiles."""
        return decodes_tiled(self.vae_tiling, width, height)

    def generate(self, jobs: Sequence[GenerationJob]) -> list[GeneratedImage | None]:
        """Makes one image file per job in one batched denoising loop; cancelled jobs come back as None.

        `render` and then `write_file` for each image, on this thread. All jobs must share
        `params.batch_key`. Each keeps its own seed: its latents come from
        `torch.Generator("cpu").manual_seed(seed)`, exactly as diffusers draws them.
        """
        return [None if image is None else write_file(image) for image in self.render(jobs)]

    @torch.inference_mode()
    def render(self, jobs: Sequence[GenerationJob]) -> list[RenderedImage | None]:
        """`generate` without writing the files: denoise, then VAE-decode each image (cancelled: None).

        The device's memory running out becomes ResourceExhausted (reason out-of-memory), with the cache
        handed back so that the next request can run.
        """
        if not jobs:
            return []
        params = jobs[0].params
        if any(job.params.batch_key != params.batch_key for job in jobs):
            raise InvalidArgument("A batch mixes sizes, steps or guidance; batch only compatible requests.")
        for job in jobs:
            if params.uses_guidance and job.negative_prompt_embeds is None:
                raise InvalidArgument(
                    "Guidance is on but a job has no negative embedding; pass one ('' encoded)."
                )
            # The ControlNet inpaint pipeline takes a start image but no strength.
            starts = params.strength is not None or (params.controlnet is not None and params.inpaint)
            if starts != (job.init_image is not None) or params.inpaint != (job.mask_image is not None):
                raise InvalidArgument("A job's start image and mask do not match its strength and inpaint.")
            if (params.controlnet is not None) != (job.control_image is not None):
                raise InvalidArgument("A job's control image does not match its ControlNet.")
        if params.controlnet is not None:
            self._controlnet_pipe(params)  # an unknown name fails before any work
        if all(job.is_cancelled() for job in jobs):
            raise Cancelled("The request was cancelled before it started.")
        try:
            return self._render(jobs)
        except torch.OutOfMemoryError as error:  # torch.cuda.OutOfMemoryError is this class
            detail = (str(error).strip().splitlines() or ["out of memory"])[0]
        # Out of the except block, so that the traceback no longer holds the batch's tensors.
        raise out_of_memory(self.device, params, len(jobs), detail)

    def _render(self, jobs: Sequence[GenerationJob]) -> list[RenderedImage | None]:
        params = jobs[0].params
        total_steps = params.steps_run

        def on_step_end(pipe: object, step: int, timestep: object, callback_kwargs: dict) -> dict:
            for job in jobs:
                if job.on_step is not None and not job.is_cancelled():
                    job.on_step(step + 1, total_steps)
            if all(job.is_cancelled() for job in jobs):
                raise _AllCancelled
            return {}

        started = synchronized_clock(self.device)
        try:
            latents = self._denoise(jobs, on_step_end)
        except _AllCancelled:
            raise Cancelled("The request was cancelled; work stopped after the current step.") from None
        denoised = synchronized_clock(self.device)
        denoise_seconds = denoised - started

        results: list[RenderedImage | None] = []
        for index, job in enumerate(jobs):
            if job.is_cancelled():
                results.append(None)
                continue
            started = synchronized_clock(self.device)
            latent = latents[index : index + 1]
            if job.output.format == "latent":
                picture, cpu_latents, tiled = None, latent.to("cpu", torch.float32), False
            else:
                picture, cpu_latents = self.decode(latent)[0], None
                tiled = self.decodes_tiled(params.width, params.height)
            results.append(
                RenderedImage(
                    output=job.output,
                    width=params.width,
                    height=params.height,
                    denoise_seconds=denoise_seconds,
                    decode_seconds=synchronized_clock(self.device) - started,
                    vae_tiled=tiled,
                    picture=picture,
                    latents=cpu_latents,
                )
            )
        return results

    @torch.inference_mode()
    def _denoise(
        self, jobs: Sequence[GenerationJob], on_step_end: Callable[..., dict] | None = None
    ) -> torch.Tensor:
        """The pipeline's denoising loop over jobs sharing one batch_key, with their LoRAs; returns the latents."""
        params = jobs[0].params
        prompts = [job.prompt_embeds for job in jobs]
        negatives = [job.negative_prompt_embeds for job in jobs] if params.uses_guidance else []
        # Every batch sets its adapters, so one without LoRA runs the base weights whatever ran before.
        self.loras.activate(params.loras)
        # The three pipelines share this scheduler; every batch sets its shift, as it sets its adapters.
        self.pipe.scheduler.set_shift(self.default_shift if params.shift is None else params.shift)
        if params.controlnet is not None:
            pipe = self._controlnet_pipe(params)
            start = {
                "control_image": [job.control_image for job in jobs],
                "controlnet_conditioning_scale": params.controlnet_scale,
            }
            if params.inpaint:
                start["image"] = [job.init_image for job in jobs]
                start["mask_image"] = [job.mask_image for job in jobs]
        elif params.strength is None:
            pipe, start = self.pipe, {}
        elif not params.inpaint:
            start = {"image": [job.init_image for job in jobs], "strength": params.strength}
            pipe = self.img2img_pipe
        else:
            start = {
                "image": [job.init_image for job in jobs],
                "mask_image": [job.mask_image for job in jobs],
                "strength": params.strength,
            }
            pipe = self.inpaint_pipe
        if params.strength is not None or params.controlnet is not None:
            # Start and control images are VAE-encoded tiled exactly when the result will be decoded tiled.
            self._set_vae_tiling(params.width, params.height)
        slg = params.skip_layer_guidance
        with (
            self.attention.applied(len(embeds) for embeds in [*prompts, *negatives]),  # type: ignore[arg-type]
            guiding(self.pipe.transformer, slg, batch_size=len(jobs), steps=params.steps_run)
            if slg is not None
            else contextlib.nullcontext(),
            extrapolating(
                self.pipe.transformer,
                params.dype,
                width=params.width,
                height=params.height,
                patch=self.size_multiple,
                sharing=(pipe.controlnet,) if params.controlnet is not None else (),
            )
            if params.dype is not None
            else contextlib.nullcontext(),
        ):
            return pipe(
                **start,
                prompt_embeds=[self._embeds(embeds) for embeds in prompts],
                negative_prompt_embeds=(
                    [self._embeds(embeds) for embeds in negatives]  # type: ignore[arg-type]
                    if params.uses_guidance
                    else None
                ),
                height=params.height,
                width=params.width,
                num_inference_steps=params.steps,
                guidance_scale=params.guidance_scale,
                cfg_normalization=params.cfg_normalization,
                cfg_truncation=params.cfg_truncation,
                generator=[torch.Generator("cpu").manual_seed(job.params.seed) for job in jobs],
                output_type="latent",
                callback_on_step_end=on_step_end,
            ).images

    def _controlnet_pipe(self, params: GenerationParams) -> Any:
        """The pipeline of the job's ControlNet: its inpainting one with a mask."""
        name = str(params.controlnet)
        if name not in self.controlnets:
            loaded = ", ".join(repr(known) for known in self.controlnets) or "none"
            raise InvalidArgument(f"No ControlNet {name!r} is loaded here (loaded: {loaded}).")
        described, plain, inpaint = self.controlnets[name]
        if not params.inpaint:
            return plain
        if inpaint is None:
            raise InvalidArgument(
                f"ControlNet {name!r} takes no inpainting mask (a Union 1.0 layout); use a 2.x one for inpainting."
            )
        return inpaint

    def _set_vae_tiling(self, width: int, height: int) -> None:
        if self.decodes_tiled(width, height):
            self.pipe.vae.enable_tiling()
        else:
            self.pipe.vae.disable_tiling()

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """ZImagePipeline's own decode step, one image at a time so results do not depend on batching.

        Tiled (overlapping 1024-pixel tiles, blended) when `decodes_tiled` says so.
        """
        vae = self.pipe.vae
        height, width = (side * self.pipe.vae_scale_factor for side in latents.shape[-2:])
        self._set_vae_tiling(width, height)
        latents = latents.to(vae.dtype)
        latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pil")
