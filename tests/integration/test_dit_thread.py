"""The in-process worker's DiT thread: result files are written off it, and a GPU out of memory is
RESOURCE_EXHAUSTED (reason out-of-memory) after which the service goes on serving."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from tests.conftest import start_generator
from zimage_split._proto.generator.v1 import generator_pb2, generator_pb2_grpc
from zimage_split.client import Client
from zimage_split.common.errors import OUT_OF_MEMORY
from zimage_split.common.interceptors import REASON_KEY
from zimage_split.dit_service import worker as worker_module
from zimage_split.dit_service.engine import GenerationJob, GenerationParams, RenderedImage, write_file
from zimage_split.dit_service.outputs import OutputOptions


@pytest.fixture(scope="module")
def server(loop_thread, tiny_model_dir: Path) -> Iterator:  # type: ignore[no-untyped-def]
    generator = start_generator(loop_thread, tiny_model_dir, None)
    yield generator
    loop_thread.run(generator.stop(grace=0))


def embedding(seed: int) -> torch.Tensor:
    return torch.randn(6, 16, generator=torch.Generator().manual_seed(seed))


def generate(address: str, key: str, seed: int) -> list[generator_pb2.GenerateResponse]:
    request = generator_pb2.GenerateRequest(
        prompt=generator_pb2.Conditioning(embedding_key=key), width=64, height=64, steps=2, seed=seed
    )
    with grpc.insecure_channel(address) as channel:
        return list(generator_pb2_grpc.GeneratorServiceStub(channel).Generate(request, timeout=60))


def test_files_are_written_off_the_dit_thread_with_the_bytes_generate_gives(server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    threads: list[str] = []

    def recording_write_file(rendered: RenderedImage):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return write_file(rendered)

    monkeypatch.setattr(worker_module, "write_file", recording_write_file)
    address = f"127.0.0.1:{server.port}"
    with Client(generator=address, timeout=60) as client:
        tensor = embedding(3)
        image = client.generate(embeddings=tensor, seed=5, width=64, height=64, steps=2, strip_metadata=True)
    assert len(threads) == 1 and threads[0].startswith("dit-files")
    engine = server.servicer.worker.engine
    (direct,) = engine.generate(
        [
            GenerationJob(
                GenerationParams(width=64, height=64, steps=2, seed=5), tensor, output=OutputOptions()
            )
        ]
    )
    assert image.info["file_bytes"] == direct.data


def test_out_of_memory_is_resource_exhausted_and_the_next_request_runs(server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A CUDA out-of-memory error cannot happen on a CPU: the DiT call raises torch's own error instead."""
    engine = server.servicer.worker.engine
    address = f"127.0.0.1:{server.port}"
    with Client(generator=address, timeout=60) as client:
        key = client.upload(embedding(4))
    real_denoise = engine._denoise
    failures = []

    def denoise_out_of_memory(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not failures:
            failures.append(1)
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 6.00 GiB. GPU 0 has 1 GiB free."
            )
        return real_denoise(*args, **kwargs)

    monkeypatch.setattr(engine, "_denoise", denoise_out_of_memory)
    with pytest.raises(grpc.RpcError) as raised:
        generate(address, key, seed=1)
    error = raised.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert dict(error.trailing_metadata() or ())[REASON_KEY] == OUT_OF_MEMORY
    details = error.details() or ""
    assert "ran out of memory" in details and "64x64" in details and "Tried to allocate 6.00 GiB" in details
    assert "smaller size" in details and "--vae-tiling on" in details
    images = [event.image for event in generate(address, key, seed=1) if event.WhichOneof("event") == "image"]
    assert len(images) == 1 and images[0].byte_length > 0


def test_the_engine_is_built_warmed_up_and_run_on_one_thread(tiny_model_dir: Path) -> None:
    """OpenMP keeps a thread team per calling thread; loading on one thread and running on another leaves
    two teams competing for the cores."""
    import asyncio

    from zimage_split.dit_service.config import EngineOptions
    from zimage_split.model_source import resolve_model

    threads: dict[str, str] = {}

    def build():  # type: ignore[no-untyped-def]
        threads["build"] = threading.current_thread().name
        options = EngineOptions(warm_up_side=64, warm_up_guidance=False)
        engine = options.start_engine(resolve_model(str(tiny_model_dir)), torch.device("cpu"), torch.float32)
        render = engine.render

        def recording_render(*args, **kwargs):  # type: ignore[no-untyped-def]
            threads["render"] = threading.current_thread().name
            return render(*args, **kwargs)

        engine.render = recording_render  # type: ignore[method-assign]
        return engine

    async def one_image() -> None:
        worker = await worker_module.LocalWorker.start(build)
        try:
            job = GenerationJob(GenerationParams(width=64, height=64, steps=2, seed=1), embedding(1))
            await worker.run(job)
        finally:
            worker.close()

    asyncio.run(one_image())
    assert threads["build"] == threads["render"] and threads["build"].startswith("dit")
    assert threads["build"] != threading.current_thread().name


def test_a_cancelled_job_counts_until_the_dit_thread_is_done_with_it(tiny_model_dir: Path) -> None:
    """The queue limit counts what the DiT thread still has to do: a cancelled call's job runs on to the
    engine's next check between steps, and used to stop counting the moment its caller gave up."""
    import asyncio

    from zimage_split.dit_service.config import EngineOptions
    from zimage_split.model_source import resolve_model

    def build():  # type: ignore[no-untyped-def]
        options = EngineOptions(warm_up_side=64, warm_up_guidance=False)
        return options.start_engine(resolve_model(str(tiny_model_dir)), torch.device("cpu"), torch.float32)

    async def cancel_mid_job() -> tuple[int, int, int]:
        worker = await worker_module.LocalWorker.start(build)
        step_started, release = threading.Event(), threading.Event()
        stopped = threading.Event()

        def on_step(step: int, total: int, replica: str = "") -> None:
            step_started.set()
            release.wait(30)  # hold the DiT thread inside the job until the test has looked

        job = GenerationJob(
            GenerationParams(width=64, height=64, steps=4, seed=1),
            embedding(1),
            on_step=on_step,
            is_cancelled=stopped.is_set,
        )
        task = asyncio.create_task(worker.run(job))
        try:
            assert await asyncio.to_thread(step_started.wait, 30)
            while_running = worker.outstanding
            stopped.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            after_cancel = worker.outstanding  # the DiT thread is still inside the job
            release.set()
            await asyncio.get_running_loop().run_in_executor(worker._executor, lambda: None)
            await asyncio.sleep(0)  # the release is handed to this loop from the DiT thread
            return while_running, after_cancel, worker.outstanding
        finally:
            release.set()
            worker.close()

    while_running, after_cancel, after_the_thread = asyncio.run(cancel_mid_job())
    assert (while_running, after_cancel, after_the_thread) == (1, 1, 0)
