"""Runs DiTEngine jobs one at a time on a dedicated thread, with a bounded queue (the in-process worker).

Result files are written on other threads, so the DiT starts the next job while the last image's PNG encodes.

`RayWorkerPool` (ray_pool.py) has the same contract, `Worker`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from zimage_split import devices
from zimage_split.common.errors import BUSY, Cancelled, ResourceExhausted
from zimage_split.dit_service.engine import (
    DiTEngine,
    EngineInfo,
    GeneratedImage,
    GenerationJob,
    RenderedImage,
    write_file,
)

# Threads writing result files. Pillow's encoders release the GIL, so two encode beside the DiT thread; more
# would only matter if images came out faster than one file per PNG encode time.
FILE_WRITERS = 2


class Worker(Protocol):
    """What the servicer needs from whatever runs the engine: in this process, or Ray replicas."""

    info: EngineInfo

    async def run(self, job: GenerationJob, *, request_id: str = "") -> WorkerResult: ...

    @property
    def outstanding(self) -> int:
        """Jobs accepted and not finished."""
        ...

    def replica_count(self) -> int:
        """Model replicas serving now (may block briefly; metrics call it from their own thread)."""
        ...

    @property
    def failed_starts(self) -> int:
        """Replicas that failed to start since this worker began serving (Ray; 0 in-process)."""
        ...

    def loaded_loras(self) -> frozenset[str]:
        """Names of the LoRAs held loaded as adapters now, as far as this worker can tell."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class WorkerResult:
    image: GeneratedImage
    queue_seconds: float
    replica: str
    # How many requests shared the denoising loop that made this image.
    batch_size: int = 1


class LocalWorker:
    """One model replica in this process; with Ray, each replica holds a DiTEngine of its own (ray_replica.py)."""

    def __init__(
        self, engine: DiTEngine, *, max_queue: int = 32, torch_thread: ThreadPoolExecutor | None = None
    ) -> None:
        """`torch_thread` is the single thread that built `engine` (see `start`); jobs then run on it too."""
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 (got {max_queue}).")
        self.engine = engine
        self.info: EngineInfo = engine.info
        self.max_queue = max_queue
        self.name = f"{socket.gethostname()}/pid{os.getpid()}/{engine.device}"
        self._executor = torch_thread or devices.torch_thread("dit")
        self._file_writers = ThreadPoolExecutor(max_workers=FILE_WRITERS, thread_name_prefix="dit-files")
        self._outstanding = 0
        self._recent_seconds = 1.0

    @classmethod
    async def start(cls, build: Callable[[], DiTEngine], *, max_queue: int = 32) -> LocalWorker:
        """Builds the engine (load, warm-up, compile) on the thread that will then run every job."""
        thread, engine = await devices.build_on_torch_thread("dit", build)
        return cls(engine, max_queue=max_queue, torch_thread=thread)

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def replica_count(self) -> int:
        return 1

    @property
    def failed_starts(self) -> int:
        return 0

    def loaded_loras(self) -> frozenset[str]:
        return frozenset(self.engine.loras.loaded)

    def _render(self, job: GenerationJob, submitted: float) -> tuple[RenderedImage, float]:
        queue_seconds = time.perf_counter() - submitted
        started = time.perf_counter()
        image = self.engine.render([job])[0]
        self._recent_seconds = time.perf_counter() - started
        if image is None:  # cancelled during decode
            raise Cancelled("The request was cancelled.")
        return image, queue_seconds

    async def run(self, job: GenerationJob, *, request_id: str = "") -> WorkerResult:
        if self._outstanding >= self.max_queue:
            raise ResourceExhausted(
                f"The generator queue is full ({self._outstanding} requests waiting or running); retry later.",
                retry_after_seconds=self._recent_seconds * self._outstanding,
                reason=BUSY,
            )
        loop = asyncio.get_running_loop()
        # A job counts until the DiT thread is done with it, not until its caller stops waiting: a cancelled
        # call's job runs on to its next step check, and the queue limit must see it meanwhile.
        self._outstanding += 1
        render = self._executor.submit(self._render, job, time.perf_counter())
        render.add_done_callback(lambda _: self._call_soon(loop, self._release))
        rendered, queue_seconds = await asyncio.wrap_future(render)
        self._outstanding += 1
        try:
            image: GeneratedImage = await loop.run_in_executor(self._file_writers, write_file, rendered)
        finally:
            self._outstanding -= 1
        return WorkerResult(image=image, queue_seconds=queue_seconds, replica=self.name)

    def _release(self) -> None:
        self._outstanding -= 1

    @staticmethod
    def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed first: nothing is left to count
            loop.call_soon_threadsafe(callback)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._file_writers.shutdown(wait=True, cancel_futures=True)
