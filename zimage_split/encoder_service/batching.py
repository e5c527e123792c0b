"""Collects concurrent encode requests into one forward pass (dynamic micro-batching)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    """Runs `run_batch(items)` on one worker thread, over up to `max_batch_size` queued items.

    After the first item arrives it waits at most `max_wait_seconds` for more, so a lone request pays
    little latency while a burst shares one forward pass. `on_batch(queue_seconds, run_seconds)`, when
    given, hears of each batch run: how long each item waited, and how long the batch ran. `executor`, when
    given, is the single thread to run batches on (the one that loaded the model); else one of its own.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[Item]], list[Result]],
        *,
        max_batch_size: int,
        max_wait_seconds: float,
        on_batch: Callable[[list[float], float], None] | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 (got {max_batch_size}).")
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._max_wait_seconds = max_wait_seconds
        self._on_batch = on_batch
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future[Result], float]] = asyncio.Queue()
        # Given one, it must have a single thread (devices.torch_thread); its owner shuts it down.
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")
        self._worker: asyncio.Task[None] | None = None
        self.batches_run = 0

    @property
    def queued(self) -> int:
        """Items waiting for a batch."""
        return self._queue.qsize()

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._owns_executor:
            self._executor.shutdown(wait=True)

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future, time.perf_counter()))
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = time.monotonic() + self._max_wait_seconds
            while len(batch) < self._max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    batch.append(
                        self._queue.get_nowait()
                        if remaining <= 0
                        else await asyncio.wait_for(self._queue.get(), remaining)
                    )
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
            live = [(item, future, queued) for item, future, queued in batch if not future.cancelled()]
            if not live:
                continue
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(
                    self._executor, self._run_batch, [item for item, _, _ in live]
                )
            except Exception as error:
                for _, future, _ in live:
                    if not future.done():
                        future.set_exception(error)
                continue
            self.batches_run += 1
            if self._on_batch is not None:
                self._on_batch([started - queued for _, _, queued in live], time.perf_counter() - started)
            for (_, future, _), result in zip(live, results, strict=True):
                if not future.done():
                    future.set_result(result)
