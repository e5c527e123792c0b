"""The unit of work of a generator: load the DiT, VAE and scheduler once, then turn embeddings into images.

Runs diffusers' own ZImagePipeline (built with text_encoder=None), so an image equals the reference for the
same embeddings and seed. No gRPC here: the servicer and the Ray workers both drive this class.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from zimage_split.common.errors import Cancelled, InvalidArgument
from zimage_split.model_source import ModelSource, load_component


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

    @property
    def batch_key(self) -> tuple[int, int, int, float, float, float]:
        return (
            self.width,
            self.height,
            self.steps,
            self.guidance_scale,
            self.cfg_normalization,
            self.cfg_truncation,
        )

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > 0


@dataclass
class GenerationJob:
    """One image to make. Callbacks are called from the worker thread."""

    params: GenerationParams
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    on_step: Callable[..., None] | None = None  # on_step(step, total, replica="")
    is_cancelled: Callable[[], bool] = field(default=lambda: False)


@dataclass(frozen=True)
class GeneratedImage:
    png: bytes
    width: int
    height: int
    denoise_seconds: float
    decode_seconds: float


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


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


class _AllCancelled(Exception):
    pass


class DiTEngine:
    """Holds `transformer/`, `vae/` and `scheduler/` only; the text encoder is never loaded."""

    def __init__(self, source: ModelSource, *, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers import (
            AutoencoderKL,
            FlowMatchEulerDiscreteScheduler,
            ZImagePipeline,
            ZImageTransformer2DModel,
        )

        self.model_id = source.model_id
        self.device = device
        self.dtype = dtype
        transformer = load_component(
            source,
            "transformer",
            lambda loc, sub: ZImageTransformer2DModel.from_pretrained(
                loc, subfolder=sub, dtype=dtype, use_safetensors=True
            ),
        )
        vae = load_component(
            source,
            "vae",
            lambda loc, sub: AutoencoderKL.from_pretrained(
                loc, subfolder=sub, dtype=dtype, use_safetensors=True
            ),
        )
        scheduler = load_component(
            source,
            "scheduler",
            lambda loc, sub: FlowMatchEulerDiscreteScheduler.from_pretrained(loc, subfolder=sub),
        )
        self.pipe = ZImagePipeline(
            scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
        ).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.caption_dim = int(transformer.config.cap_feat_dim)
        # Caption tokens take RoPE positions on the first axis, after a small reserve (1504 for the real model).
        self.max_caption_tokens = int(transformer.config.axes_lens[0]) - 32
        self.size_multiple = self.pipe.vae_scale_factor * 2

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
        )

    def warm_up(self) -> None:
        """One smallest-size, one-step image, so the first real request does not pay for lazy init."""
        job = GenerationJob(
            params=GenerationParams(width=64, height=64, steps=1, seed=0),
            prompt_embeds=torch.zeros(4, self.caption_dim),
        )
        self.generate([job])

    def _embeds(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, dtype=self.pipe.transformer.dtype)

    @torch.inference_mode()
    def generate(self, jobs: Sequence[GenerationJob]) -> list[GeneratedImage | None]:
        """Makes one image per job in one batched denoising loop; cancelled jobs come back as None.

        All jobs must share `params.batch_key`. Each keeps its own seed: its latents come from
        `torch.Generator("cpu").manual_seed(seed)`, exactly as diffusers draws them.
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

        def on_step_end(pipe: object, step: int, timestep: object, callback_kwargs: dict) -> dict:
            for job in jobs:
                if job.on_step is not None and not job.is_cancelled():
                    job.on_step(step + 1, params.steps)
            if all(job.is_cancelled() for job in jobs):
                raise _AllCancelled
            return {}

        if all(job.is_cancelled() for job in jobs):
            raise Cancelled("The request was cancelled before it started.")
        started = time.perf_counter()
        try:
            latents = self.pipe(
                prompt_embeds=[self._embeds(job.prompt_embeds) for job in jobs],
                negative_prompt_embeds=(
                    [self._embeds(job.negative_prompt_embeds) for job in jobs]  # type: ignore[arg-type]
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
        except _AllCancelled:
            raise Cancelled("The request was cancelled; work stopped after the current step.") from None
        denoise_seconds = time.perf_counter() - started

        results: list[GeneratedImage | None] = []
        for index, job in enumerate(jobs):
            if job.is_cancelled():
                results.append(None)
                continue
            started = time.perf_counter()
            png = encode_png(self.decode(latents[index : index + 1])[0])
            results.append(
                GeneratedImage(
                    png=png,
                    width=params.width,
                    height=params.height,
                    denoise_seconds=denoise_seconds,
                    decode_seconds=time.perf_counter() - started,
                )
            )
        return results

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """ZImagePipeline's own decode step, one image at a time so results do not depend on batching."""
        vae = self.pipe.vae
        latents = latents.to(vae.dtype)
        latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pil")
