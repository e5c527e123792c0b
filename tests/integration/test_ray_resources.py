"""Ray replicas against what a real local Ray cluster has: logical GPUs (`num_gpus=2` on this CPU host, as
`ray start --num-gpus` gives), too few CPUs, resources another job holds; and the thread a replica's engine
runs on."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from zimage_split.client import AsyncClient
from zimage_split.common.errors import DeadlineExceeded, InvalidArgument, Unavailable
from zimage_split.dit_service.config import GeneratorConfig, RayOptions
from zimage_split.dit_service.server import start_generator_server

# Refusals come before any replica (or Serve itself) starts: well under the seconds a replica takes to load.
PROMPT_SECONDS = 5.0


def local_ray(**resources: float) -> None:
    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False, **resources)


def config(model: Path, ray_options: RayOptions, device: str = "auto") -> GeneratorConfig:
    return GeneratorConfig(
        model=str(model), encoder=None, port=0, device=device, dtype="float32", ray=ray_options
    )


def start(loop_thread: Any, model: Path, ray_options: RayOptions, device: str = "auto") -> Any:  # type: ignore[misc]
    return loop_thread.run(start_generator_server(config(model, ray_options, device)), timeout=300)


def failure_of(
    loop_thread: Any, model: Path, ray_options: RayOptions, device: str = "auto"
) -> tuple[Exception, float]:
    started = time.monotonic()
    with pytest.raises(Exception) as raised:  # noqa: PT011 - each test checks the type and message
        start(loop_thread, model, ray_options, device)
    return raised.value, time.monotonic() - started


def test_gpu_replicas_on_a_cluster_without_gpus_fail_at_once(loop_thread, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    local_ray(num_cpus=2, num_gpus=0)
    try:
        error, seconds = failure_of(loop_thread, tiny_model_dir, RayOptions(replicas=1), device="cuda")
    finally:
        ray.shutdown()
    assert isinstance(error, Unavailable), error
    assert "asks Ray for 1 replica x (1 GPU + 1 CPU, on one node each)" in str(error)
    assert "the Ray cluster has no GPUs" in str(error) and "Pass --device cpu" in str(error)
    assert seconds < PROMPT_SECONDS


@pytest.fixture(scope="module")
def two_logical_gpus() -> Iterator[None]:
    """A local Ray node with 2 CPUs and 2 GPUs that exist only for Ray's scheduling (no CUDA here)."""
    local_ray(num_cpus=2, num_gpus=2)
    yield
    ray.shutdown()


def test_more_replicas_than_gpus_fail_at_once(two_logical_gpus, loop_thread, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    error, seconds = failure_of(loop_thread, tiny_model_dir, RayOptions(replicas=3, cpus_per_replica=0.5))
    assert isinstance(error, Unavailable), error
    assert "asks Ray for 3 replicas x (1 GPU + 0.5 CPUs, on one node each)" in str(error)
    assert "can hold only 2" in str(error) and ": 2 GPUs, 2 CPUs)" in str(error)
    assert "pass --replicas 2 (or --replicas auto: one per GPU) or add nodes" in str(error)
    assert seconds < PROMPT_SECONDS


def test_more_cpus_than_the_cluster_has_fail_at_once(
    two_logical_gpus, loop_thread, tiny_model_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    error, seconds = failure_of(
        loop_thread, tiny_model_dir, RayOptions(replicas=3, cpus_per_replica=1), device="cpu"
    )
    assert isinstance(error, Unavailable), error
    assert "asks Ray for 3 replicas x (1 CPU, on one node each)" in str(error)
    assert "pass --replicas 2, lower --cpus-per-replica or add nodes" in str(error)
    assert seconds < PROMPT_SECONDS


def test_replicas_pending_for_resources_fail_at_the_deadline(
    two_logical_gpus, loop_thread, tiny_model_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    """Another job holds the cluster's CPUs (as a node that left would take them): the cluster could hold the
    replica, so the check lets it through, and the deadline ends the wait."""

    @ray.remote(num_cpus=2)
    class OtherJob:
        def ready(self) -> bool:
            return True

    other = OtherJob.remote()  # type: ignore[attr-defined]
    ray.get(other.ready.remote())
    try:
        options = RayOptions(replicas=1, cpus_per_replica=1, start_timeout_s=3)
        error, seconds = failure_of(loop_thread, tiny_model_dir, options, device="cpu")
    finally:
        ray.kill(other)
    assert isinstance(error, DeadlineExceeded), error
    assert "0 of 1 Ray replicas were ready after 3 s (--replica-start-timeout)" in str(error)
    assert "the cluster has 2 of 2 GPUs and 0 of 2 CPUs free" in str(error)
    # Serve's own start-up adds a few seconds on a busy 2-core machine; the wait itself ends at 3 s.
    assert seconds < 3 + 30
    from ray import serve

    assert "zsplit-generator" not in serve.status().applications, "the pending replica is not left behind"


def test_a_cuda_replica_where_cuda_is_missing_fails_with_our_error(
    two_logical_gpus, loop_thread, tiny_model_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    if torch.cuda.is_available():  # a skip that stays: the refusal exists only where CUDA is missing
        pytest.skip("this host has CUDA")
    error, _ = failure_of(
        loop_thread, tiny_model_dir, RayOptions(replicas=1, cpus_per_replica=0.5), device="cuda"
    )
    assert isinstance(error, InvalidArgument), error
    assert "CUDA is not available on this host" in str(error)


def test_each_replica_gets_its_own_gpu_and_one_engine_thread(
    two_logical_gpus, loop_thread, tiny_model_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    server = start(loop_thread, tiny_model_dir, RayOptions(replicas=2, cpus_per_replica=0.5, torch_threads=2))
    try:

        async def burst() -> None:
            async with AsyncClient(generator=f"127.0.0.1:{server.port}", timeout=120) as client:
                await asyncio.gather(
                    *(
                        client.generate(embeddings=torch.randn(5, 16), seed=i, width=64, height=64, steps=2)
                        for i in range(6)
                    )
                )

        asyncio.run(burst())
        states = asyncio.run(server.servicer.worker.replica_states())
    finally:
        loop_thread.run(server.stop(grace=0), timeout=120)
    assert len(states) == 2
    assert sorted(gpu for state in states for gpu in state["gpu_ids"]) == ["0", "1"]
    for state in states:
        (gpu,) = state["gpu_ids"]
        # Ray hid the other GPU; with no CUDA here, `auto` computes on the CPU.
        assert state["cuda_visible_devices"] == gpu
        assert state["device"] == "cpu" and state["replica"].endswith(f"/cpu/gpu{gpu}")
        assert state["torch_threads"] == 2
    served = [state for state in states if state["generate_threads"]]
    assert served, "no replica generated anything"
    for state in served:
        assert state["generate_threads"] == [state["build_thread"]], state
