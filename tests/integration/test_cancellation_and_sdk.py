"""Cancellation stops the DiT within one step; deadlines, the async client and progress events work."""

import asyncio
import threading

import numpy as np
import pytest
import torch

from tests.conftest import cancel_after_first_step
from zimage_split.client import AsyncClient, Client, DeadlineExceeded
from zimage_split.common.errors import Cancelled, InvalidArgument
from zimage_split.dit_service.engine import GenerationJob, GenerationParams


def count_forwards(transformer: torch.nn.Module) -> tuple[list[int], object]:
    calls: list[int] = []
    handle = transformer.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def test_engine_stops_within_one_step_of_cancellation(generator) -> None:  # type: ignore[no-untyped-def]
    engine = generator.servicer.worker.engine
    calls, handle = count_forwards(engine.pipe.transformer)
    cancelled = threading.Event()

    def on_step(step: int, total: int) -> None:
        if step == 2:
            cancelled.set()

    job = GenerationJob(
        params=GenerationParams(width=64, height=64, steps=40, seed=0),
        prompt_embeds=torch.randn(5, 16),
        on_step=on_step,
        is_cancelled=cancelled.is_set,
    )
    try:
        with pytest.raises(Cancelled):
            engine.generate([job])
    finally:
        handle.remove()  # type: ignore[attr-defined]
    assert len(calls) == 2


def test_cancelling_a_call_frees_the_replica(generator) -> None:  # type: ignore[no-untyped-def]
    engine = generator.servicer.worker.engine
    calls, handle = count_forwards(engine.pipe.transformer)
    address = f"127.0.0.1:{generator.port}"

    try:
        cancel_after_first_step(address, torch.randn(5, 16))
        # The worker thread is single: once this tiny job runs, the cancelled one has returned.
        with Client(generator=address) as client:
            client.generate(embeddings=torch.randn(5, 16), steps=1, width=64, height=64, seed=0)
    finally:
        handle.remove()  # type: ignore[attr-defined]
    assert len(calls) < 100 // 2, f"{len(calls)} DiT forwards ran for a call cancelled after step 1"


def test_deadline_exceeded_is_typed(generator) -> None:  # type: ignore[no-untyped-def]
    with Client(generator=f"127.0.0.1:{generator.port}") as client, pytest.raises(DeadlineExceeded):
        client.generate(embeddings=torch.randn(5, 16), steps=100, width=512, height=512, timeout=0.3)


def test_async_client_generates_concurrently_with_progress(generator, encoder_fp32) -> None:  # type: ignore[no-untyped-def]
    steps_seen: dict[int, list[int]] = {0: [], 1: []}

    async def main() -> list:
        async with AsyncClient(
            generator=f"127.0.0.1:{generator.port}", encoder=f"127.0.0.1:{encoder_fp32.port}"
        ) as client:
            return await asyncio.gather(
                *(
                    client.generate(
                        f"async prompt {i}",
                        seed=i,
                        width=64,
                        height=64,
                        steps=3,
                        on_progress=lambda step, total, i=i: steps_seen[i].append(step),
                    )
                    for i in range(2)
                )
            )

    images = asyncio.run(main())
    assert [image.info["seed"] for image in images] == [0, 1]
    assert steps_seen == {0: [1, 2, 3], 1: [1, 2, 3]}
    timings = images[0].info["timings"]
    assert timings["total"] >= timings["denoise"] > 0 and timings["decode"] > 0
    assert images[0].info["model_id"] and images[0].info["replica"]


def test_unset_seed_is_chosen_by_the_server_and_reported(client) -> None:  # type: ignore[no-untyped-def]
    image = client.generate("pick a seed for me", width=64, height=64, steps=2)
    seed = image.info["seed"]
    again = client.generate("pick a seed for me", width=64, height=64, steps=2, seed=seed)
    assert np.array_equal(np.asarray(image), np.asarray(again))


def test_generator_reuses_cached_prompt_embeddings(client) -> None:  # type: ignore[no-untyped-def]
    before = client.encoder_info()
    client.generate("a prompt encoded only once", width=64, height=64, steps=1, seed=1)
    second = client.generate("a prompt encoded only once", width=64, height=64, steps=1, seed=2)
    after = client.encoder_info()
    assert int(after["prompts_encoded"]) - int(before.get("prompts_encoded", 0)) == 1
    assert second.info["timings"]["encode"] == 0.0


def test_shutdown_stops_a_running_job(loop_thread, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    import time

    from tests.conftest import start_generator
    from zimage_split.client import Unavailable

    server = start_generator(loop_thread, tiny_model_dir, None)
    calls, handle = count_forwards(server.servicer.worker.engine.pipe.transformer)
    started = threading.Event()
    outcome: list[BaseException] = []

    def long_request() -> None:
        with Client(generator=f"127.0.0.1:{server.port}") as client:
            try:
                client.generate(
                    embeddings=torch.randn(5, 16),
                    steps=100,
                    width=512,
                    height=512,
                    on_progress=lambda step, total: started.set(),
                )
            except BaseException as error:  # noqa: BLE001 - recorded for the assertion below
                outcome.append(error)

    thread = threading.Thread(target=long_request)
    thread.start()
    assert started.wait(60)
    begun = time.monotonic()
    loop_thread.run(server.stop(grace=0.2))
    stop_seconds = time.monotonic() - begun
    thread.join(30)
    handle.remove()  # type: ignore[attr-defined]
    assert outcome and isinstance(outcome[0], Unavailable | Cancelled), outcome
    assert len(calls) < 50, f"{len(calls)} of 100 steps ran after shutdown began"
    assert stop_seconds < 10


def test_a_retried_request_id_gets_the_same_image_without_running_again(client) -> None:  # type: ignore[no-untyped-def]
    embedding = torch.randn(5, 16)
    steps: list[int] = []
    first, again = (
        client.generate(
            embeddings=embedding,
            width=64,
            height=64,
            steps=3,
            request_id="retry-me",
            on_progress=lambda s, t: steps.append(s),
        )
        for _ in range(2)
    )
    assert steps == [1, 2, 3], "the retry streamed no progress: nothing ran again"
    assert again.info == first.info  # same seed (server-picked), same timings: the stored result
    assert np.array_equal(np.asarray(again), np.asarray(first))

    with pytest.raises(InvalidArgument, match="already used for a different request"):
        client.generate(embeddings=embedding, width=64, height=64, steps=4, request_id="retry-me")
