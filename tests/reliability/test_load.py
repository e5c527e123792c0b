"""Load: 64 concurrent clients against real service processes for a bounded time; and per-connection
stream limits.

Every call must succeed or get RESOURCE_EXHAUSTED (the generator's queue is full); nothing may hang, and
the services' memory must level off.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from grpc_health.v1 import health_pb2

from tests.conftest import LoopThread, start_generator
from tests.reliability.conftest import Figures
from tests.reliability.processes import ProcessStats, ServiceProcess, health_status
from zimage_split.client import AsyncClient, Client
from zimage_split.common.errors import ResourceExhausted, ZSplitError
from zimage_split.common.server import TransportLimits

pytestmark = pytest.mark.timeout(600)

CLIENTS = 64
# Seconds of load; ZSPLIT_LOAD_SECONDS raises it for a longer soak.
LOAD_SECONDS = float(os.environ.get("ZSPLIT_LOAD_SECONDS", "20"))
SECTION = "Load"
MIB = 1 << 20


class Sampler:
    """Samples the processes' /proc stats every `interval` seconds on a thread."""

    def __init__(self, processes: dict[str, ServiceProcess], interval: float = 0.5) -> None:
        self.processes = processes
        self.interval = interval
        self.samples: dict[str, list[tuple[float, ProcessStats]]] = {name: [] for name in processes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, process in self.processes.items():
                self.samples[name].append((time.monotonic(), process.stats()))
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak_rss(self, name: str, since: float = 0.0, until: float = float("inf")) -> int:
        return max(stats.rss_bytes for at, stats in self.samples[name] if since <= at <= until)


async def one_client(index: int, address: str, until: float, outcomes: dict[str, list[Any]]) -> None:
    rng = random.Random(index)
    async with AsyncClient(generator=address, timeout=120, busy_retries=0) as client:
        while time.monotonic() < until:
            began = time.perf_counter()
            try:
                await client.generate(
                    f"load prompt {index % 8}", steps=2, width=64, height=64, seed=rng.randrange(1 << 31)
                )
            except ResourceExhausted as busy:
                outcomes["busy"].append(time.perf_counter() - began)
                # What a well-behaved client does: wait the hint the server sent (bounded), then retry.
                await asyncio.sleep(min(busy.retry_after_seconds or 0.1, 0.5) * rng.uniform(0.5, 1.5))
                continue
            except ZSplitError as error:
                outcomes["failed"].append(f"{error.code}: {error.message}")
                continue
            outcomes["latency"].append(time.perf_counter() - began)


def test_64_clients_get_images_or_resource_exhausted(tiny_model_dir: Path, figures: Figures) -> None:
    encoder = ServiceProcess("encoder", tiny_model_dir, "--dtype", "float32").wait_serving()
    generator = ServiceProcess(
        "generator", tiny_model_dir, "--encoder", encoder.address, "--max-queue", "16"
    ).wait_serving()
    processes = {"generator": generator, "encoder": encoder}
    try:
        with Client(generator=generator.address, timeout=60) as warm:
            for index in range(8):  # every prompt once, so the run measures serving, not first encodes
                warm.generate(f"load prompt {index}", steps=2, width=64, height=64, seed=0)
        before = {name: process.stats() for name, process in processes.items()}
        outcomes: dict[str, list[Any]] = {"latency": [], "busy": [], "failed": []}

        async def run() -> None:
            until = time.monotonic() + LOAD_SECONDS
            clients = [one_client(i, generator.address, until, outcomes) for i in range(CLIENTS)]
            # No deadlock: every client is done shortly after the load window (one call's worth).
            await asyncio.wait_for(asyncio.gather(*clients), LOAD_SECONDS + 120)

        with Sampler(processes) as sampler:
            began = time.monotonic()
            asyncio.run(run())
            wall = time.monotonic() - began
        half = began + wall / 2
        after = {name: process.stats() for name, process in processes.items()}
        assert health_status(generator.port) == health_pb2.HealthCheckResponse.SERVING
        with Client(generator=generator.address, timeout=60) as probe:
            assert probe.generate("after the load", steps=1, width=64, height=64).size == (64, 64)
    finally:
        generator.stop()
        encoder.stop()

    assert not outcomes["failed"], outcomes["failed"][:5]
    latencies = sorted(outcomes["latency"])
    assert len(latencies) >= CLIENTS, f"only {len(latencies)} images in {wall:.0f} s"
    for name in processes:
        first_half, second_half = sampler.peak_rss(name, until=half), sampler.peak_rss(name, since=half)
        # Bounded: the second half of the run does not climb past the first by more than a few MiB.
        assert second_half < first_half + 64 * MIB, (name, first_half / MIB, second_half / MIB)
        figures.record(
            SECTION,
            f"{name} RSS: before, peak, after",
            f"{before[name].rss_bytes / MIB:.0f} / {sampler.peak_rss(name) / MIB:.0f} / "
            f"{after[name].rss_bytes / MIB:.0f} MiB",
        )
        figures.record(
            SECTION,
            f"{name} threads and open fds: before → after",
            f"{before[name].threads} → {after[name].threads}, {before[name].open_fds} → {after[name].open_fds}",
        )
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    calls = len(latencies) + len(outcomes["busy"])
    figures.record(SECTION, "clients, seconds of load", f"{CLIENTS} clients, {wall:.1f} s")
    figures.record(SECTION, "request", "text prompt (8 distinct), 64×64, 2 steps, tiny model, --max-queue 16")
    figures.record(
        SECTION,
        "calls: images / RESOURCE_EXHAUSTED / other errors",
        f"{len(latencies)} / {len(outcomes['busy'])} / 0",
    )
    figures.record(SECTION, "throughput", round(len(latencies) / wall, 1), "images/s")
    figures.record(
        SECTION,
        "latency p50 / p99 (successful calls)",
        f"{statistics.median(latencies):.3f} / {p99:.3f}",
        "s",
    )
    figures.record(
        SECTION,
        "RESOURCE_EXHAUSTED answered in (median)",
        round(statistics.median(outcomes["busy"]), 4) if outcomes["busy"] else "n/a",
        "s",
    )
    assert calls > 0


def test_streams_over_the_per_connection_limit_wait_their_turn(
    tiny_model_dir: Path, loop_thread: LoopThread, figures: Figures
) -> None:
    server = start_generator(
        loop_thread, tiny_model_dir, None, transport=TransportLimits(max_streams_per_connection=1)
    )
    gate = server.running.gate
    embedding = torch.randn(5, 16)
    most_in_flight: list[int] = []

    async def calls(share_a_connection: bool) -> int:
        most = 0
        clients = [
            AsyncClient(generator=f"127.0.0.1:{server.port}") for _ in range(1 if share_a_connection else 3)
        ]
        try:
            for client in clients:
                await client.upload(embedding)
            tasks = [
                asyncio.ensure_future(
                    clients[i % len(clients)].generate(
                        embeddings=embedding, steps=15, width=256, height=256, seed=i
                    )
                )
                for i in range(3)
            ]
            while not all(task.done() for task in tasks):
                most = max(most, gate.in_flight)
                await asyncio.sleep(0.005)
            for task in tasks:
                assert task.result().size == (256, 256)
        finally:
            for client in clients:
                await client.close()
        return most

    try:
        most_in_flight.append(asyncio.run(calls(share_a_connection=True)))
        most_in_flight.append(asyncio.run(calls(share_a_connection=False)))
    finally:
        loop_thread.run(server.stop(grace=0))
    assert most_in_flight[0] == 1, most_in_flight
    assert most_in_flight[1] == 3, most_in_flight
    figures.record(
        "Limits",
        "--max-streams-per-connection 1: most calls in flight, 3 calls on one connection / on three",
        f"{most_in_flight[0]} / {most_in_flight[1]}",
    )
