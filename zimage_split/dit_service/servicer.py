"""gRPC face of the generator: converts messages, resolves embeddings and images, streams progress and files."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import math
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

from grpc import aio
from PIL import Image

from zimage_split._proto.generator.v1 import generator_pb2, generator_pb2_grpc
from zimage_split.common import wire
from zimage_split.common.errors import InvalidArgument, NotFound
from zimage_split.common.lru import ByteBoundedLRU
from zimage_split.common.metrics import ServiceMetrics
from zimage_split.common.vocabulary import (
    DEFAULT_LONG_PROMPT_MODE,
    DEFAULT_OUTPUT_FORMAT,
    GENERATOR_LONG_PROMPT_MODE,
    OUTPUT_FORMAT,
)
from zimage_split.dit_service.controlnets import DEFAULT_CONTROLNET_SCALE
from zimage_split.dit_service.dype import Dype
from zimage_split.dit_service.embedding_store import (
    Embedding,
    EmbeddingStore,
    Prompt,
    TextEncoding,
    TextPrompt,
    UploadedPrompt,
)
from zimage_split.dit_service.engine import GenerationJob, GenerationParams
from zimage_split.dit_service.init_images import ImageStore
from zimage_split.dit_service.lora.library import LoraLibrary, LoraSpec, check_specs
from zimage_split.dit_service.outputs import OutputOptions, check_output, generation_metadata
from zimage_split.dit_service.skip_layer_guidance import SkipLayerGuidance
from zimage_split.dit_service.validation import (
    Limits,
    check_control_image_size,
    validate_controlnet,
    validate_dype,
    validate_params,
    validate_skip_layer_guidance,
)
from zimage_split.dit_service.worker import Worker, WorkerResult

_DONE = object()
# diffusers' defaults: ZImageImg2ImgPipeline strength=0.6, ZImageInpaintPipeline strength=1.0.
DEFAULT_STRENGTH = 0.6
DEFAULT_INPAINT_STRENGTH = 1.0
# Multi-pass requests: at most this many passes.
MAX_PASSES = 4


def dype_to_proto(dype: Dype | None) -> generator_pb2.Dype | None:
    if dype is None:
        return None
    return generator_pb2.Dype(method=dype.method, scale=dype.scale, exponent=dype.exponent)


def slg_to_proto(slg: SkipLayerGuidance | None) -> generator_pb2.SkipLayerGuidance | None:
    if slg is None:
        return None
    return generator_pb2.SkipLayerGuidance(scale=slg.scale, layers=slg.layers, start=slg.start, stop=slg.stop)


@dataclass(frozen=True)
class StartImages:
    """A request's img2img start image (at the output size once validated) and inpainting mask, if any, and
    its ControlNet's control image (also at the output size once validated) with its key."""

    image: Image.Image | None = None
    mask: Image.Image | None = None
    strength: float | None = None
    control: Image.Image | None = None
    control_key: str = ""
    controlnet_scale: float = 0.0


@dataclass(frozen=True)
class PassPlan:
    """One pass of a multi-pass image: its size, its steps and, after the first, its img2img strength."""

    scale: float
    width: int
    height: int
    steps: int
    strength: float | None


@dataclass(frozen=True)
class GenerateJob:
    """A GenerateRequest once validated, in plain values: everything Generate runs."""

    request_id: str
    # The first image's parameters; image i has seed + i.
    params: GenerationParams
    prompt: Prompt
    # None when the request uses no guidance, which leaves the negative prompt unused.
    negative: Prompt | None
    encoding: TextEncoding
    start: StartImages
    output: OutputOptions
    image_count: int
    strip_metadata: bool
    # Multi-pass: every pass, the last at the request's size; empty for a one-pass request.
    passes: tuple[PassPlan, ...] = ()
    return_intermediate: bool = False

    def pass_params(self, params: GenerationParams) -> list[GenerationParams]:
        """An image's parameters for each of its passes (one for a one-pass request)."""
        return [
            dataclasses.replace(
                params, width=plan.width, height=plan.height, steps=plan.steps, strength=plan.strength
            )
            for plan in self.passes
        ] or [params]

    @property
    def steps_per_image(self) -> int:
        return sum(params.steps_run for params in self.pass_params(self.params))


@dataclass(frozen=True)
class Conditioning:
    """A job's prompt and negative prompt, resolved to embeddings."""

    positive: Embedding
    negative: Embedding | None

    @property
    def encode_seconds(self) -> float:
        """Seconds spent fetching them from the encoder (they are fetched concurrently)."""
        return max(self.positive.encode_seconds, self.negative.encode_seconds if self.negative else 0.0)


@dataclass(frozen=True)
class CompletedImages:
    """A finished Generate, kept so that a retry with the same request_id gets the same images back."""

    fingerprint: str
    images: tuple[tuple[generator_pb2.ImageHeader, bytes], ...]

    @property
    def size(self) -> int:
        return sum(len(data) + header.ByteSize() for header, data in self.images)


def request_fingerprint(request: generator_pb2.GenerateRequest) -> str:
    """Identifies what was asked, apart from the request_id itself."""
    unnamed = generator_pb2.GenerateRequest()
    unnamed.CopyFrom(request)
    unnamed.request_id = ""
    return hashlib.sha256(unnamed.SerializeToString(deterministic=True)).hexdigest()


def _prompt(message: generator_pb2.Conditioning, what: str, limits: Limits) -> Prompt:
    kind = message.WhichOneof("source")
    if kind is None:
        raise InvalidArgument(f"{what} is empty; set its `text` or an `embedding_key` from UploadEmbedding.")
    if kind == "embedding_key":
        return UploadedPrompt(message.embedding_key)
    if (size := len(message.text.encode("utf-8", errors="surrogatepass"))) > limits.max_prompt_bytes:
        raise InvalidArgument(
            f"{what}.text is {size} bytes of UTF-8; this generator takes at most {limits.max_prompt_bytes} "
            "(--max-prompt-bytes). Shorten it: only the first max_sequence_length tokens are used anyway."
        )
    return TextPrompt(message.text)


class _ImageRuns:
    """One Generate's images running on the worker, and their step reports merged into one stream.

    Each image is a worker job of its own, so replicas (and Ray's batching) share them out. An image of a
    multi-pass request is one job per pass, in turn: each pass after the first starts from the one before,
    decoded from its PNG and resized (Lanczos) as an uploaded start image is, so it equals the same calls
    made by hand.
    """

    def __init__(self, worker: Worker, jobs: Sequence[Sequence[GenerationJob]], request_id: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._worker = worker
        self._events: asyncio.Queue[tuple[int, int, str] | object] = asyncio.Queue()
        self.cancelled = threading.Event()
        self._steps_done = [0] * len(jobs)
        self._tasks: list[asyncio.Future[list[WorkerResult]]] = []
        for index, passes in enumerate(jobs):
            job_id = f"{request_id}#{index}" if request_id and len(jobs) > 1 else request_id
            task = asyncio.ensure_future(self._run_passes(index, passes, job_id))
            task.add_done_callback(lambda _: self._events.put_nowait(_DONE))
            self._tasks.append(task)

    async def _run_passes(
        self, index: int, passes: Sequence[GenerationJob], job_id: str
    ) -> list[WorkerResult]:
        results: list[WorkerResult] = []
        done_steps = 0
        for number, job in enumerate(passes):
            init_image = job.init_image
            if results:
                with Image.open(io.BytesIO(results[-1].image.data)) as previous:
                    init_image = _fit(previous.convert("RGB"), job.params.width, job.params.height)
            run = dataclasses.replace(
                job,
                init_image=init_image,
                on_step=self._step_reporter(index, done_steps),
                is_cancelled=self.cancelled.is_set,
            )
            pass_id = f"{job_id}/pass{number}" if job_id and len(passes) > 1 else job_id
            results.append(await self._worker.run(run, request_id=pass_id))
            done_steps += job.params.steps_run
        return results

    def _step_reporter(self, index: int, steps_before: int) -> Callable[..., None]:
        # Called on the worker's thread (or by the Ray pool) after each step of image `index`.
        def on_step(step: int, total: int, replica: str = "") -> None:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (index, steps_before + step, replica))

        return on_step

    async def steps(self) -> AsyncIterator[tuple[int, str]]:
        """After each denoising step of any image: the steps done over all images, and the replica that
        reported. Ends when every image is done; a failed image fails it at once."""
        finished = 0
        while finished < len(self._tasks):
            event = await self._events.get()
            if event is _DONE:
                finished += 1
                if failed := next(
                    (t for t in self._tasks if t.done() and not t.cancelled() and t.exception()), None
                ):
                    await failed
                continue
            index, step, replica = cast(tuple[int, int, str], event)
            self._steps_done[index] = step
            yield sum(self._steps_done), replica

    async def results(self) -> list[list[WorkerResult]]:
        """Per image, the result of each pass."""
        return [await task for task in self._tasks]

    def stop(self) -> None:
        """Stops the images still running before their next step (on client cancel, deadline or error)."""
        self.cancelled.set()
        for task in self._tasks:
            task.cancel()  # a no-op once done; a Ray worker passes it on to the replica
            # Nobody awaits an abandoned job; retrieve its outcome so asyncio does not log it as lost.
            task.add_done_callback(lambda done: done.cancelled() or done.exception())


class GeneratorServicer(generator_pb2_grpc.GeneratorServiceServicer):
    def __init__(
        self,
        worker: Worker,
        store: EmbeddingStore,
        limits: Limits,
        encoder_address: str = "",
        *,
        completed_bytes: int = 128 << 20,
        images: ImageStore | None = None,
        loras: LoraLibrary | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.worker = worker
        self.info = worker.info
        self.store = store
        self.limits = limits
        self.encoder_address = encoder_address
        self.images = images if images is not None else ImageStore()
        self.loras = loras if loras is not None else LoraLibrary(None)
        self._active: set[threading.Event] = set()
        # Images by request_id: a client that lost the response and retries gets the same image, not a new run.
        self.completed: ByteBoundedLRU[CompletedImages] = ByteBoundedLRU(
            completed_bytes, lambda done: done.size
        )
        self.metrics = metrics or ServiceMetrics("generator")
        self.metrics.watch_cache("embeddings", store.cache)
        self.metrics.watch_cache("results", self.completed)
        self.metrics.watch_cache("images", self.images)
        self.metrics.watch_queue_depth(lambda: worker.outstanding)
        self.metrics.watch_replicas(lambda: worker.replica_count())
        self.metrics.watch_replica_start_failures(lambda: worker.failed_starts)
        if store.encoder is not None and store.encoder.encoder_pool is not None:
            self.metrics.watch_encoders(store.encoder.encoder_pool.statuses)

    def cancel_all(self) -> None:
        """Stops every running job before its next step (used at shutdown, after the grace period)."""
        for cancelled in list(self._active):
            cancelled.set()

    async def Generate(
        self, request: generator_pb2.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[generator_pb2.GenerateResponse]:
        received = time.perf_counter()
        fingerprint = request_fingerprint(request) if request.request_id else ""
        if (done := self._completed_before(request.request_id, fingerprint)) is not None:
            for header, data in done.images:
                for response in _image_responses(header, data):
                    yield response
            return
        job = self.validate(request)
        # The caller's deadline also bounds the call to the encoder.
        conditioning = await self._conditioning(job, timeout=context.time_remaining())
        jobs = self._worker_jobs(job, conditioning)
        runs = _ImageRuns(self.worker, jobs, job.request_id)
        self._active.add(runs.cancelled)
        try:
            async for steps_done, replica in runs.steps():
                yield self._progress(job, steps_done, replica, received)
            results = await runs.results()
        finally:
            runs.stop()
            self._active.discard(runs.cancelled)
        images = [
            self._image(job, index, number, result, run.params, conditioning, received)
            for index, (passes, image_jobs) in enumerate(zip(results, jobs, strict=True))
            for number, (result, run) in enumerate(zip(passes, image_jobs, strict=True))
            if job.return_intermediate or number == len(passes) - 1
        ]
        if job.request_id:
            self.completed.put(job.request_id, CompletedImages(fingerprint, tuple(images)))
        for header, data in images:
            self.metrics.count_bytes("sent", "image", len(data))
            for response in _image_responses(header, data):
                yield response

    def _completed_before(self, request_id: str, fingerprint: str) -> CompletedImages | None:
        """The images an earlier call with this request_id made (a client retrying after losing them)."""
        if not request_id or (done := self.completed.get(request_id)) is None:
            return None
        if done.fingerprint != fingerprint:
            raise InvalidArgument(
                f"request_id {request_id!r} was already used for a different request; "
                "give every distinct request its own request_id."
            )
        return done

    def validate(self, request: generator_pb2.GenerateRequest) -> GenerateJob:
        """Checks a request before any work, converting it into a GenerateJob; raises the first error."""
        if request.model and request.model != self.info.model_id:
            raise NotFound(
                f"This generator serves {self.info.model_id!r}, not {request.model!r}. "
                "Send the request to a generator started with that --model, or leave `model` empty."
            )
        start = self._control_image(request, self._start_images(request))
        params = self._params(request, start)
        encoding = self._encoding(request)
        prompt = _prompt(request.prompt, "GenerateRequest.prompt", self.limits)
        negative = None
        if params.uses_guidance:
            negative = (
                _prompt(request.negative_prompt, "GenerateRequest.negative_prompt", self.limits)
                if request.HasField("negative_prompt")
                else TextPrompt("")
            )
        output = self._output(request)
        image_count = self._image_count(request, params.seed)
        passes = self._passes(request, params, start)
        if passes:  # the request's own parameters are its last pass's
            params = dataclasses.replace(params, steps=passes[-1].steps, strength=passes[-1].strength)
        if start.control is not None:
            check_control_image_size(
                start.control.size, params.width, params.height, self.limits.size_multiple
            )
        return GenerateJob(
            request_id=request.request_id,
            params=params,
            prompt=prompt,
            negative=negative,
            encoding=encoding,
            start=dataclasses.replace(
                start,
                image=_fit(start.image, params.width, params.height),
                control=_fit(start.control, params.width, params.height),
            ),
            output=output,
            image_count=image_count,
            strip_metadata=request.strip_metadata,
            passes=passes,
            return_intermediate=request.return_intermediate,
        )

    def _passes(
        self, request: generator_pb2.GenerateRequest, params: GenerationParams, start: StartImages
    ) -> tuple[PassPlan, ...]:
        if not request.passes:
            if request.return_intermediate:
                raise InvalidArgument("return_intermediate needs passes: a one-pass request has no others.")
            return ()
        if start.image is not None:
            raise InvalidArgument(
                "passes start from the prompt, not from init_image: send the img2img request without passes."
            )
        if not 2 <= len(request.passes) <= MAX_PASSES:
            raise InvalidArgument(
                f"passes takes 2 to {MAX_PASSES} passes (got {len(request.passes)}); one pass is a plain request."
            )
        plans: list[PassPlan] = []
        multiple = self.limits.size_multiple
        for index, spec in enumerate(request.passes):
            before = request.passes[index - 1].scale if index else 0.0
            if not (math.isfinite(spec.scale) and before < spec.scale <= 1):
                raise InvalidArgument(
                    f"passes[{index}].scale must be above {before:g} and at most 1 (got {spec.scale:g}): each "
                    "pass is larger than the one before, and the last is the request's size (scale 1)."
                )
            width, height = (
                max(multiple, int(side * spec.scale) // multiple * multiple)
                for side in (params.width, params.height)
            )
            if min(width, height) < self.limits.min_side:
                raise InvalidArgument(
                    f"passes[{index}] at scale {spec.scale:g} makes {width}x{height}, under the "
                    f"{self.limits.min_side}-pixel smallest side; raise its scale."
                )
            steps = spec.steps if spec.HasField("steps") else params.steps
            if not 1 <= steps <= self.limits.max_steps:
                raise InvalidArgument(
                    f"passes[{index}].steps must be between 1 and {self.limits.max_steps} (got {steps})."
                )
            strength = None
            if index == 0 and spec.HasField("strength"):
                raise InvalidArgument(
                    "passes[0].strength has nothing to act on: the first pass starts from noise. Leave it unset."
                )
            if index > 0:
                strength = _checked_strength(
                    spec.strength if spec.HasField("strength") else DEFAULT_STRENGTH,
                    f"passes[{index}].strength",
                )
            plans.append(
                PassPlan(scale=spec.scale, width=width, height=height, steps=steps, strength=strength)
            )
        if request.passes[-1].scale != 1:
            raise InvalidArgument(
                f"The last pass makes the request's size: give it scale 1 (got {request.passes[-1].scale:g})."
            )
        return tuple(plans)

    def _params(self, request: generator_pb2.GenerateRequest, start: StartImages) -> GenerationParams:
        width = request.width if request.HasField("width") else None
        height = request.height if request.HasField("height") else None
        sized_by = start.image or start.control
        if sized_by is not None and width is None and height is None:
            # img2img keeps the start image's size (as diffusers does), rounded down to the size multiple; a
            # ControlNet request without one its control image's.
            multiple = self.limits.size_multiple
            width, height = (max(multiple, side // multiple * multiple) for side in sized_by.size)
        params = validate_params(
            self.limits,
            width=width,
            height=height,
            steps=request.steps if request.HasField("steps") else None,
            guidance_scale=request.guidance_scale if request.HasField("guidance_scale") else None,
            cfg_normalization=request.cfg_normalization,
            cfg_truncation=request.cfg_truncation if request.HasField("cfg_truncation") else None,
            seed=request.seed if request.HasField("seed") else random.getrandbits(63),
            shift=request.shift if request.HasField("shift") else None,
        )
        return dataclasses.replace(
            params,
            # Unset is the model's own, filled in so that it batches with requests that name it and the
            # image's settings record it.
            shift=self.info.default_shift if params.shift is None else params.shift,
            skip_layer_guidance=self._skip_layer_guidance(request),
            dype=self._dype(request),
            strength=start.strength,
            inpaint=start.mask is not None,
            loras=self._loras(request),
            controlnet=request.controlnet.name if start.control is not None else None,
            controlnet_scale=start.controlnet_scale,
        )

    def _control_image(self, request: generator_pb2.GenerateRequest, start: StartImages) -> StartImages:
        """The request's ControlNet checked (name, scale, what it combines with) and its control image added."""
        if not request.HasField("controlnet"):
            return start
        controlnet = request.controlnet
        described = validate_controlnet(
            controlnet.name,
            controlnet.conditioning_scale if controlnet.HasField("conditioning_scale") else None,
            self.info.controlnets,
        )
        if start.image is not None and start.mask is None:
            raise InvalidArgument(
                "A ControlNet request takes an init_image only with a mask (inpainting, through diffusers' "
                "ZImageControlNetInpaintPipeline): diffusers has no Z-Image ControlNet img2img pipeline. Add "
                "init_image.mask_key, or drop init_image."
            )
        if start.mask is not None and not described.takes_mask:
            raise InvalidArgument(
                f"ControlNet {described.name!r} takes no inpainting mask (its control input is the control "
                "image alone, the Union 1.0 layout); inpaint with a Union 2.x ControlNet, or drop the mask."
            )
        if start.mask is not None and request.init_image.HasField("strength"):
            raise InvalidArgument(
                "init_image.strength does not apply with a ControlNet: its inpainting pipeline always runs every "
                "step (it repaints the masked part from noise). Leave strength unset."
            )
        if request.passes:
            raise InvalidArgument(
                "passes do not take a ControlNet yet; send the ControlNet request without passes."
            )
        if request.skip_layer_guidance.scale:
            raise InvalidArgument(
                "Skip Layer Guidance does not combine with a ControlNet yet; set slg_scale to 0 or drop the "
                "ControlNet."
            )
        if not controlnet.image_key:
            raise InvalidArgument(
                "controlnet.image_key is empty; upload the control image with UploadImage and pass its key."
            )
        control = self.images.get(controlnet.image_key, mask=False)
        scale = controlnet.conditioning_scale if controlnet.HasField("conditioning_scale") else None
        return dataclasses.replace(
            start,
            # The ControlNet inpaint pipeline has no strength: the job runs every step, as text-to-image does.
            strength=None if start.mask is not None else start.strength,
            control=control,
            control_key=controlnet.image_key,
            # The proto's float32 as the number the caller wrote (0.6, not 0.6000000238), which diffusers
            # given that number computes with.
            controlnet_scale=DEFAULT_CONTROLNET_SCALE if scale is None else float(f"{scale:.7g}"),
        )

    def _skip_layer_guidance(self, request: generator_pb2.GenerateRequest) -> SkipLayerGuidance | None:
        slg = request.skip_layer_guidance
        return validate_skip_layer_guidance(
            scale=slg.scale,
            layers=list(slg.layers),
            start=slg.start if slg.HasField("start") else None,
            stop=slg.stop if slg.HasField("stop") else None,
            dit_layers=self.info.dit_layers,
        )

    @staticmethod
    def _dype(request: generator_pb2.GenerateRequest) -> Dype | None:
        if not request.HasField("dype"):
            return None
        dype = request.dype
        return validate_dype(
            method=dype.method,
            scale=dype.scale if dype.HasField("scale") else None,
            exponent=dype.exponent if dype.HasField("exponent") else None,
        )

    def _encoding(self, request: generator_pb2.GenerateRequest) -> TextEncoding:
        limit = self.info.max_caption_tokens
        if request.HasField("max_sequence_length") and not 1 <= request.max_sequence_length <= limit:
            raise InvalidArgument(
                f"max_sequence_length must be between 1 and {limit}, this DiT's caption limit (got "
                f"{request.max_sequence_length}); default 512. For longer prompts use long_prompt_mode "
                "interpolate or pool, which fit all of the prompt into max_sequence_length tokens."
            )
        return TextEncoding(
            max_sequence_length=request.max_sequence_length
            if request.HasField("max_sequence_length")
            else None,
            long_prompt_mode=GENERATOR_LONG_PROMPT_MODE.name(
                request.long_prompt_mode, DEFAULT_LONG_PROMPT_MODE
            ),
        )

    def _loras(self, request: generator_pb2.GenerateRequest) -> tuple[LoraSpec, ...]:
        specs = check_specs(
            LoraSpec(lora.name, lora.scale if lora.HasField("scale") else 1.0) for lora in request.loras
        )
        # Unknown names and names outside --lora-dir fail here, not on a replica.
        for spec in specs:
            self.loras.resolve(spec.name)
        return specs

    def _start_images(self, request: generator_pb2.GenerateRequest) -> StartImages:
        if not request.HasField("init_image"):
            return StartImages()
        start = request.init_image
        if not start.image_key:
            raise InvalidArgument(
                "init_image.image_key is empty; upload the start image with UploadImage and pass its key."
            )
        image = self.images.get(start.image_key, mask=False)
        mask = self.images.get(start.mask_key, mask=True) if start.mask_key else None
        default = DEFAULT_INPAINT_STRENGTH if mask is not None else DEFAULT_STRENGTH
        strength = _checked_strength(
            start.strength if start.HasField("strength") else default, "init_image.strength"
        )
        return StartImages(image=image, mask=mask, strength=strength)

    def _output(self, request: generator_pb2.GenerateRequest) -> OutputOptions:
        output_format = OUTPUT_FORMAT.name(request.output_format, DEFAULT_OUTPUT_FORMAT)
        return check_output(output_format, request.quality if request.HasField("quality") else None)

    def _image_count(self, request: generator_pb2.GenerateRequest, seed: int) -> int:
        count = request.num_images if request.HasField("num_images") else 1
        if not 1 <= count <= self.limits.max_images_per_request:
            raise InvalidArgument(
                f"num_images must be between 1 and {self.limits.max_images_per_request} (got {count}); send "
                "several requests for more (this generator's --max-images-per-request)."
            )
        if seed + count - 1 > wire.MAX_SEED:
            raise InvalidArgument(
                f"seed {seed} + num_images {count} runs past the largest seed, 2**64 - 1; pick a smaller seed."
            )
        return count

    async def _conditioning(self, job: GenerateJob, timeout: float | None) -> Conditioning:
        positive, negative = await self.store.resolve_pair(job.prompt, job.negative, job.encoding, timeout)
        self._observe_fetches(positive, negative)
        return Conditioning(positive, negative)

    def _worker_jobs(self, job: GenerateJob, conditioning: Conditioning) -> list[list[GenerationJob]]:
        """Per image, one job per pass; image i has seed + i. Passes before the last are PNG, the file
        the same calls made by hand would hand on."""
        jobs = []
        for index in range(job.image_count):
            passes = job.pass_params(dataclasses.replace(job.params, seed=job.params.seed + index))
            image_jobs = []
            for number, params in enumerate(passes):
                metadata = (
                    ()
                    if job.strip_metadata
                    else self._metadata(params, job.prompt, job.negative, job.passes[: number + 1])
                )
                output = job.output if number == len(passes) - 1 else OutputOptions(format="png")
                image_jobs.append(
                    GenerationJob(
                        params=params,
                        prompt_embeds=conditioning.positive.tensor,
                        negative_prompt_embeds=conditioning.negative.tensor
                        if conditioning.negative
                        else None,
                        init_image=job.start.image,
                        mask_image=job.start.mask,
                        control_image=job.start.control,
                        output=dataclasses.replace(output, metadata=metadata),
                    )
                )
            jobs.append(image_jobs)
        return jobs

    def _progress(
        self, job: GenerateJob, steps_done: int, replica: str, received: float
    ) -> generator_pb2.GenerateResponse:
        return generator_pb2.GenerateResponse(
            progress=generator_pb2.Progress(
                step=steps_done,
                total_steps=job.steps_per_image * job.image_count,
                elapsed_seconds=time.perf_counter() - received,
                replica=replica,
            )
        )

    def _image(
        self,
        job: GenerateJob,
        index: int,
        pass_index: int,
        result: WorkerResult,
        params: GenerationParams,
        conditioning: Conditioning,
        received: float,
    ) -> tuple[generator_pb2.ImageHeader, bytes]:
        """Image `index` of the job (made with `params`, its pass `pass_index`): its header and file bytes."""
        image, positive, negative = result.image, conditioning.positive, conditioning.negative
        header = generator_pb2.ImageHeader(
            request_id=job.request_id,
            seed=params.seed,
            pass_index=pass_index,
            pass_count=len(job.passes),
            width=image.width,
            height=image.height,
            steps=params.steps,
            guidance_scale=params.guidance_scale,
            shift=params.shift,
            skip_layer_guidance=slg_to_proto(params.skip_layer_guidance),
            dype=dype_to_proto(params.dype),
            controlnet=(
                generator_pb2.ControlNetRequest(
                    name=params.controlnet,
                    image_key=job.start.control_key,
                    conditioning_scale=params.controlnet_scale,
                )
                if params.controlnet is not None
                else None
            ),
            format=image.format,
            byte_length=len(image.data),
            sha256=hashlib.sha256(image.data).hexdigest(),
            timings=generator_pb2.Timings(
                queue_seconds=result.queue_seconds,
                encode_seconds=conditioning.encode_seconds,
                denoise_seconds=image.denoise_seconds,
                # The proto's decode stage includes writing the file.
                decode_seconds=image.decode_seconds + image.file_seconds,
                total_seconds=time.perf_counter() - received,
            ),
            model_id=self.info.model_id,
            replica=result.replica,
            batch_size=result.batch_size,
            prompt_key=positive.key,
            negative_prompt_key=negative.key if negative else "",
            image_index=index,
            vae_tiled=image.vae_tiled,
            loras=[generator_pb2.LoraRequest(name=lora.name, scale=lora.scale) for lora in params.loras],
            prompt_token_count=positive.token_count,
            prompt_source_token_count=positive.source_token_count,
            prompt_shortened_by=GENERATOR_LONG_PROMPT_MODE.number(positive.shortened_by),
            strength=params.strength or 0.0,
            steps_run=params.steps_run,
        )
        self.metrics.observe_stage("queue", result.queue_seconds)
        self.metrics.observe_stage("denoise", image.denoise_seconds)
        self.metrics.observe_stage("decode", image.decode_seconds + image.file_seconds)
        return header, image.data

    def _observe_fetches(self, *embeddings: Embedding | None) -> None:
        """Stages of the embeddings fetched from the encoder for this request (cache hits took none)."""
        for embedding in embeddings:
            if embedding is None or embedding.encode_seconds == 0:
                continue
            self.metrics.observe_stage("encode", embedding.encoder_seconds)
            self.metrics.observe_stage("transfer", embedding.encode_seconds - embedding.encoder_seconds)
            tensor = embedding.tensor
            self.metrics.count_bytes("received", "embedding", tensor.numel() * tensor.element_size())

    def _metadata(
        self,
        params: GenerationParams,
        prompt: Prompt,
        negative: Prompt | None,
        passes: Sequence[PassPlan] = (),
    ) -> tuple[tuple[str, str], ...]:
        """What the result file records about how it was made (PNG text chunks, EXIF, safetensors header)."""
        return generation_metadata(
            prompt=prompt.text if isinstance(prompt, TextPrompt) else None,
            negative_prompt=negative.text if isinstance(negative, TextPrompt) else None,
            seed=params.seed,
            steps=params.steps,
            width=params.width,
            height=params.height,
            guidance_scale=params.guidance_scale,
            model=self.info.model_id,
            loras=[(lora.name, lora.scale) for lora in params.loras],
            strength=params.strength,
            # Only a shift other than the model's own, so that files made with the defaults stay as they were.
            shift=None if params.shift == self.info.default_shift else params.shift,
            skip_layer_guidance=params.skip_layer_guidance,
            dype=params.dype,
            controlnet=None if params.controlnet is None else (params.controlnet, params.controlnet_scale),
            passes=[(plan.scale, plan.steps, plan.strength) for plan in passes],
            prompt_key=prompt.embedding_key if isinstance(prompt, UploadedPrompt) else "",
        )

    async def UploadImage(
        self,
        request_iterator: AsyncIterator[generator_pb2.UploadImageRequest],
        context: aio.ServicerContext,
    ) -> generator_pb2.UploadImageResponse:
        header: generator_pb2.UploadImageHeader | None = None
        data = bytearray()
        async for message in request_iterator:
            if message.WhichOneof("item") == "header":
                if header is not None:
                    raise InvalidArgument("UploadImage takes one header; upload one image per call.")
                header = message.header
                if not 0 < header.byte_length <= self.limits.max_upload_bytes:
                    raise InvalidArgument(
                        f"An uploaded image must be 1 to {self.limits.max_upload_bytes} bytes (the header says "
                        f"{header.byte_length}); send a smaller PNG, JPEG or WebP file."
                    )
            elif header is None:
                raise InvalidArgument("UploadImage must start with a header message, then the chunks.")
            else:
                data.extend(message.chunk)
                if len(data) > header.byte_length:
                    raise InvalidArgument(
                        f"UploadImage received more than the {header.byte_length} bytes its header announced."
                    )
        if header is None:
            raise InvalidArgument("UploadImage received no header; send a header, then the chunks.")
        if len(data) != header.byte_length:
            raise InvalidArgument(
                f"UploadImage received {len(data)} of the {header.byte_length} bytes announced; upload again."
            )
        self.metrics.count_bytes("received", "upload", len(data))
        key, image = await asyncio.to_thread(
            self.images.add,
            bytes(data),
            mask=header.mask,
            max_pixels=self.limits.max_upload_pixels,
            sha256=header.sha256,
        )
        return generator_pb2.UploadImageResponse(image_key=key, width=image.width, height=image.height)

    async def ListLoras(
        self, request: generator_pb2.ListLorasRequest, context: aio.ServicerContext
    ) -> generator_pb2.ListLorasResponse:
        files = await asyncio.to_thread(self.loras.list) if self.loras.enabled else []
        loaded = self.worker.loaded_loras()
        return generator_pb2.ListLorasResponse(
            enabled=self.loras.enabled,
            loras=[
                generator_pb2.LoraFile(
                    name=file.name,
                    byte_length=file.byte_length,
                    format=file.format,
                    rank=file.rank,
                    module_count=file.module_count,
                    loaded=file.name in loaded,
                    error=file.error,
                )
                for file in files
            ],
        )

    async def UploadEmbedding(
        self,
        request_iterator: AsyncIterator[generator_pb2.UploadEmbeddingRequest | memoryview],
        context: aio.ServicerContext,
    ) -> generator_pb2.UploadEmbeddingResponse:
        """A header, then chunks; common.interceptors.ChunkMessages hands chunk messages over as memoryviews."""
        assembler: wire.TensorAssembler | None = None
        async for message in request_iterator:
            if not isinstance(message, memoryview) and message.WhichOneof("item") == "header":
                if assembler is not None:
                    raise InvalidArgument("UploadEmbedding takes one header; upload one embedding per call.")
                assembler = wire.TensorAssembler(wire.meta_from_proto(message.header.tensor))
            elif assembler is None:
                raise InvalidArgument("UploadEmbedding must start with a header message, then the chunks.")
            else:
                assembler.add(message if isinstance(message, memoryview) else message.chunk)
        if assembler is None:
            raise InvalidArgument("UploadEmbedding received no header; send a header, then the chunks.")
        tensor = assembler.finish()
        self.metrics.count_bytes("received", "embedding", tensor.numel() * tensor.element_size())
        key = await self.store.add_upload(tensor, assembler.meta)
        return generator_pb2.UploadEmbeddingResponse(embedding_key=key)

    async def Info(
        self, request: generator_pb2.InfoRequest, context: aio.ServicerContext
    ) -> generator_pb2.InfoResponse:
        cache = self.store.cache
        replicas = await asyncio.to_thread(self.worker.replica_count)  # with Ray, a call to Serve
        return generator_pb2.InfoResponse(
            replicas=replicas,
            replica_start_failures=self.worker.failed_starts,
            model_id=self.info.model_id,
            caption_dim=self.info.caption_dim,
            dtype=wire.dtype_to_proto(self.info.dtype),  # type: ignore[arg-type]
            dtype_reason=self.info.dtype_reason,
            default_shift=self.info.default_shift,
            dit_layers=self.info.dit_layers,
            controlnets=[
                generator_pb2.ControlNetInfo(
                    name=described.name,
                    takes_mask=described.takes_mask,
                    control_layers=described.control_layers,
                )
                for described in self.info.controlnets
            ],
            device=self.info.device,
            encoder_address=self.encoder_address,
            parameter_count=self.info.parameter_count,
            components=list(self.info.components),
            max_pixels=self.limits.max_pixels,
            max_steps=self.limits.max_steps,
            max_images_per_request=self.limits.max_images_per_request,
            attention_backend=self.info.attention_backend,
            compiled=self.info.compiled,
            vae_tiling=self.info.vae_tiling,
            max_sequence_length_limit=self.info.max_caption_tokens,
            loras_enabled=self.loras.enabled,
            lora_cache_size=self.info.lora_cache_size,
            embedding_cache_hits=cache.hits,
            embedding_cache_misses=cache.misses,
            embedding_cache_bytes=cache.bytes,
        )


def _image_responses(
    header: generator_pb2.ImageHeader, data: bytes
) -> Iterator[generator_pb2.GenerateResponse]:
    yield generator_pb2.GenerateResponse(image=header)
    for chunk in wire.iter_chunks(memoryview(data)):
        yield generator_pb2.GenerateResponse(image_chunk=chunk)


def _checked_strength(strength: float, what: str) -> float:
    """An img2img strength (a start image's, or a later pass's), or InvalidArgument naming `what`."""
    if not (math.isfinite(strength) and 0 < strength <= 1):
        raise InvalidArgument(
            f"{what} must be above 0 and at most 1 (got {strength:g}); 0.6 keeps the composition, 1 repaints "
            "everything."
        )
    return float(strength)


def _fit(image: Image.Image | None, width: int, height: int) -> Image.Image | None:
    """The start image at the output size. diffusers needs them equal; a different size is resized (Lanczos)
    here, so an image already at the output size reaches the pipeline untouched, as in diffusers."""
    if image is None or image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)
