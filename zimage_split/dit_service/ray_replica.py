"""One DiT + VAE replica as a Ray Serve deployment: compatible requests share one batched denoising loop.

Each replica process loads a DiTEngine once. `generate(job)` streams progress events and then the image;
`@serve.batch` gathers concurrent calls, which are grouped by `GenerationParams.batch_key` and run group
after group. No gRPC here: the generator's grpc.aio front calls this through a DeploymentHandle.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray import serve

from zimage_split.common.errors import InvalidArgument
from zimage_split.common.server import injected_load_delay_seconds
from zimage_split.dit_service.config import EngineOptions
from zimage_split.dit_service.engine import (
    DiTEngine,
    EngineInfo,
    GeneratedImage,
    GenerationJob,
    GenerationParams,
)
from zimage_split.dit_service.outputs import OutputOptions
from zimage_split.dit_service.replica_starts import report_failure
from zimage_split.model_source import ModelSource, on_this_host


@dataclass(frozen=True)
class ReplicaJob:
    """What travels from the front to a replica. Embeddings are ObjectRefs, put once in the object store."""

    request_id: str
    params: GenerationParams
    prompt_embeds: Any  # ray.ObjectRef[torch.Tensor] or a tensor
    negative_prompt_embeds: Any = None
    # img2img / inpainting images, the ControlNet's control image and the result file's options (see
    # GenerationJob).
    init_image: Any = None
    mask_image: Any = None
    control_image: Any = None
    output: OutputOptions = OutputOptions()


@dataclass(frozen=True)
class ReplicaProgress:
    step: int
    total: int
    replica: str


@dataclass(frozen=True)
class ReplicaImage:
    image: GeneratedImage
    replica: str
    queue_seconds: float
    batch_size: int


async def _resolve(value: Any) -> torch.Tensor | None:
    if value is None or isinstance(value, torch.Tensor):
        return value
    return await value  # an ObjectRef: fetched from the object store, shared by every replica


def replica_device(requested: str, gpu_ids: Sequence[str]) -> torch.device:
    """The torch device of a replica Ray reserved `gpu_ids` for.

    Ray has set CUDA_VISIBLE_DEVICES to those GPUs, so in the replica its GPU is `cuda` (cuda:0) whatever its
    physical id; a `cuda:N` from the front would name another process's view. Without a reserved GPU the
    replica never takes one by itself: Ray leaves CUDA_VISIBLE_DEVICES alone then, and every GPU of the host
    would be visible, reserved or not.
    """
    from zimage_split.devices import pick_device

    if requested.startswith("cuda") and not gpu_ids:
        raise InvalidArgument(
            f"--device {requested}: Ray reserved no GPU for this replica; use --device auto or cpu, or run "
            "the replicas on hosts whose GPUs Ray sees (`ray status`)."
        )
    if requested.startswith("cuda"):
        return pick_device("cuda")
    if requested == "auto" and not gpu_ids:
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    # auto with a GPU: cuda, or the CPU on a host whose Ray node only claims a GPU (`ray start --num-gpus`).
    return pick_device(requested)


class DiTReplica:
    """The Serve deployment class; `build_deployment` sets its resources and batching."""

    def __init__(
        self,
        source: ModelSource,
        device: str,
        dtype: str,
        torch_threads: int,
        max_batch_size: int,
        max_batch_wait_seconds: float,
        engine: EngineOptions,
    ) -> None:
        from zimage_split.devices import torch_thread

        # Serve runs this constructor on one thread and the methods' blocking work on a pool of others: one
        # thread of our own builds, warms up and runs the engine (devices.torch_thread says why).
        self._engine_thread = torch_thread("dit-engine")
        self.gpu_ids = [str(gpu) for gpu in ray.get_gpu_ids()]
        self.build_thread = 0
        self.torch_threads = 0
        self.generate_threads: set[int] = set()
        # Hosts can share a hostname (containers, cloned VMs); the Ray node IP tells them apart, and the GPU
        # ids are the physical GPUs Ray reserved (the replica sees them as cuda:0...).
        node_ip = ray.util.get_node_ip_address()
        gpus = f"/gpu{','.join(self.gpu_ids)}" if self.gpu_ids else ""
        where = f"{socket.gethostname()}/{node_ip}/pid{os.getpid()}"
        # Serve routes no request to a replica before its constructor returns: with --compile, the replica
        # has compiled its graphs before it serves.
        # Tests only: a slow load, as a large model's on a slow disk.
        time.sleep(injected_load_delay_seconds())
        try:
            self.engine = self._engine_thread.submit(
                self._start_engine, source, device, dtype, torch_threads, engine
            ).result()
        except Exception as error:
            report_failure(where + gpus, error)
            raise
        self.device = str(self.engine.info.device)
        self.name = f"{where}/{self.device}{gpus}"
        # Kept by the engine's thread as it works, not by the callers' stream, which Serve may close first.
        self.steps_run = 0
        self.images_running = 0
        self.batches_run = 0
        self._run_batch.set_max_batch_size(max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(max_batch_wait_seconds)

    def _start_engine(
        self, source: ModelSource, device: str, dtype: str, torch_threads: int, engine: EngineOptions
    ) -> DiTEngine:
        from zimage_split.devices import choose_dtype

        self.build_thread = threading.get_ident()
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.torch_threads = torch.get_num_threads()
        resolved = replica_device(device, self.gpu_ids)
        # Each replica decides `auto` by its own host's device and CPU features.
        chosen = choose_dtype(dtype, resolved)
        return engine.start_engine(on_this_host(source), resolved, chosen.dtype, chosen.reason)

    def _generate(self, jobs: list[GenerationJob]) -> list[GeneratedImage | None]:
        self.generate_threads.add(threading.get_ident())
        self.images_running += len(jobs)
        try:
            return self.engine.generate(jobs)
        finally:
            self.images_running -= len(jobs)

    def __del__(self) -> None:
        # Serve calls this when it stops the replica; a batch still running finishes on its own thread.
        if hasattr(self, "_engine_thread"):
            self._engine_thread.shutdown(wait=False, cancel_futures=True)

    def info(self) -> tuple[EngineInfo, dict[str, Any]]:
        return self.engine.info, {
            "replica": self.name,
            "pid": os.getpid(),
            "device": self.device,
            "gpu_ids": self.gpu_ids,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "torch_threads": self.torch_threads,
            "build_thread": self.build_thread,
            "generate_threads": sorted(self.generate_threads),
            "steps_run": self.steps_run,
            "images_running": self.images_running,
            "batches_run": self.batches_run,
        }

    async def generate(self, job: ReplicaJob) -> AsyncIterator[ReplicaProgress | ReplicaImage]:
        cancelled = threading.Event()
        try:
            async for event in self._run_batch(job, cancelled, time.perf_counter()):
                if event is not None:
                    yield event
        finally:
            # Serve raises CancelledError here when the caller cancels: the engine stops after this step.
            cancelled.set()

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _run_batch(
        self, jobs: list[ReplicaJob], flags: list[threading.Event], received: list[float]
    ) -> AsyncIterator[list[ReplicaProgress | ReplicaImage | None]]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, job in enumerate(jobs):
            groups[job.params.batch_key].append(index)
        for indices in groups.values():
            async for event in self._run_group(jobs, flags, received, indices):
                yield event

    async def _run_group(
        self, jobs: list[ReplicaJob], flags: list[threading.Event], received: list[float], indices: list[int]
    ) -> AsyncIterator[list[ReplicaProgress | ReplicaImage | None]]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, int, int] | None] = asyncio.Queue()

        def reporter(index: int):  # type: ignore[no-untyped-def]
            def on_step(step: int, total: int) -> None:  # on the engine's thread
                if index == indices[0]:
                    self.steps_run += 1
                loop.call_soon_threadsafe(events.put_nowait, (index, step, total))

            return on_step

        engine_jobs = [
            GenerationJob(
                params=jobs[i].params,
                prompt_embeds=await _resolve(jobs[i].prompt_embeds),  # type: ignore[arg-type]
                negative_prompt_embeds=await _resolve(jobs[i].negative_prompt_embeds),
                on_step=reporter(i),
                is_cancelled=flags[i].is_set,
                init_image=jobs[i].init_image,
                mask_image=jobs[i].mask_image,
                control_image=jobs[i].control_image,
                output=jobs[i].output,
            )
            for i in indices
        ]
        started = time.perf_counter()
        task = loop.run_in_executor(self._engine_thread, self._generate, engine_jobs)
        task.add_done_callback(lambda _: events.put_nowait(None))
        while (event := await events.get()) is not None:
            index, step, total = event
            out: list[ReplicaProgress | ReplicaImage | None] = [None] * len(jobs)
            out[index] = ReplicaProgress(step, total, self.name)
            yield out
        try:
            images = await task
        except Exception:
            if all(flags[i].is_set() for i in indices):
                return  # every caller of this group is gone
            raise
        self.batches_run += 1
        results: list[ReplicaProgress | ReplicaImage | None] = [None] * len(jobs)
        for i, image in zip(indices, images, strict=True):
            if image is not None:
                results[i] = ReplicaImage(image, self.name, started - received[i], len(indices))
        yield results


def build_deployment(
    source: ModelSource,
    *,
    device: str,
    dtype: str,
    replicas: int | None,
    gpu_count: int,
    gpus_per_replica: float,
    cpus_per_replica: float,
    torch_threads: int,
    max_batch_size: int,
    max_batch_wait_seconds: float,
    max_queue: int,
    engine: EngineOptions,
) -> serve.Application:
    """A bound Serve application: `replicas` fixed, or None for one per GPU, scaling with the cluster."""
    if replicas is None:
        # One replica per GPU now; under load Serve adds replicas wherever a GPU is free, so a GPU host
        # that joins the cluster later gets one too, with no config change. Serve waits 30 s of steady
        # overload by default before adding one; a free GPU should not idle that long while requests
        # queue, so 5 s. Scaling down stays slow (Serve's 600 s), so bursts do not reload the model.
        scaling: dict[str, Any] = {
            "autoscaling_config": {
                "min_replicas": max(1, gpu_count),
                "initial_replicas": max(1, gpu_count),
                "max_replicas": 1024,
                "target_ongoing_requests": max_batch_size,
                "upscale_delay_s": 5,
            }
        }
    else:
        scaling = {"num_replicas": replicas}
    deployment = serve.deployment(
        DiTReplica,
        name="DiTReplica",
        ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica},
        max_ongoing_requests=max_batch_size * 2,
        max_queued_requests=max_queue,
        health_check_period_s=2,
        graceful_shutdown_timeout_s=5,
        **scaling,
    )
    return deployment.bind(
        source, device, dtype, torch_threads, max_batch_size, max_batch_wait_seconds, engine
    )
