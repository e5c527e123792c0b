"""Shared fixtures: the tiny model, and real gRPC servers on free loopback ports."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

T = TypeVar("T")

# CI sets these to 1 (.ci/run): a test that would skip for want of root or of a browser fails instead.
REQUIRE_ROOT = "ZSPLIT_REQUIRE_ROOT"
REQUIRE_BROWSER = "ZSPLIT_REQUIRE_BROWSER"


def skip_or_fail(reason: str, required_by: str) -> NoReturn:
    """Skips the test for `reason`, or fails it where the variable `required_by` is 1: there the test
    must run, and a skip would hide that it did not."""
    if os.environ.get(required_by) == "1":
        pytest.fail(f"{required_by}=1, but {reason}.", pytrace=False)
    pytest.skip(reason)


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> float:
    """Polls until `condition()` is true; returns the seconds it took, or fails after `timeout` seconds.

    Tests wait for what they need to be true, never for a fixed time that a busy machine may outlast.
    """
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - started


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from zimage_split.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


class LoopThread:
    """An asyncio loop on a background thread, so sync tests can host grpc.aio servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


def start_encoder(loop_thread: LoopThread, model: Path, **overrides: Any):  # type: ignore[no-untyped-def]
    from zimage_split.encoder_service.config import EncoderConfig
    from zimage_split.encoder_service.server import start_encoder_server

    # A fixed dtype: `auto` depends on the CPU's features, and a test must not.
    config = EncoderConfig(model=str(model), device="cpu", **({"dtype": "bfloat16", "port": 0} | overrides))
    return loop_thread.run(start_encoder_server(config))


# Keywords of start_generator that go to the generator's EngineOptions.
ENGINE_FIELDS = ("attention", "compile", "vae_tiling", "lora_dir", "lora_cache", "controlnets")


def start_generator(loop_thread: LoopThread, model: Path, encoder_port: int | None, **overrides: Any):  # type: ignore[no-untyped-def]
    from zimage_split.dit_service.config import EngineOptions, GeneratorConfig
    from zimage_split.dit_service.server import start_generator_server

    encoder = f"127.0.0.1:{encoder_port}" if encoder_port else None
    engine = {name: overrides.pop(name) for name in ENGINE_FIELDS if name in overrides}
    overrides = {"dtype": "float32", "port": 0} | overrides  # `auto` depends on the CPU's features
    config = GeneratorConfig(
        model=str(model), encoder=encoder, device="cpu", engine=EngineOptions(**engine), **overrides
    )
    return loop_thread.run(start_generator_server(config))


@pytest.fixture(scope="session")
def encoder_fp32(loop_thread: LoopThread, tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    server = start_encoder(loop_thread, tiny_model_dir, dtype="float32")
    yield server
    loop_thread.run(server.stop(grace=0))


@pytest.fixture(scope="session")
def generator(loop_thread: LoopThread, tiny_model_dir: Path, encoder_fp32):  # type: ignore[no-untyped-def]
    server = start_generator(loop_thread, tiny_model_dir, encoder_fp32.port)
    yield server
    loop_thread.run(server.stop(grace=0))


@pytest.fixture
def client(generator, encoder_fp32):  # type: ignore[no-untyped-def]
    from zimage_split.client import Client

    with Client(
        generator=f"127.0.0.1:{generator.port}", encoder=f"127.0.0.1:{encoder_fp32.port}", timeout=60
    ) as c:
        yield c


@pytest.fixture(scope="session")
def reference_pipeline(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    """diffusers' own ZImagePipeline on the same folder: the reference our images must equal."""
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(str(tiny_model_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cancel_after_first_step(address: str, embedding: Any) -> None:
    """Starts a 100-step 512x512 generation, cancels the call on its first progress event, and checks it."""
    from zimage_split.client import AsyncClient

    async def run() -> None:
        first_step = asyncio.Event()
        async with AsyncClient(generator=address) as client:
            task = asyncio.ensure_future(
                client.generate(
                    embeddings=embedding,
                    steps=100,
                    width=512,
                    height=512,
                    seed=0,
                    on_progress=lambda step, total: first_step.set(),
                )
            )
            await asyncio.wait_for(first_step.wait(), 60)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(run())
