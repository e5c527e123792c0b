"""Errors carry a machine-readable reason in trailing metadata, and the SDK branches on it, not on message
text: a reworded message changes nothing for retries and re-uploads."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc import aio
from PIL import Image

from tests.conftest import LoopThread, start_generator
from zimage_split._proto.generator.v1 import generator_pb2, generator_pb2_grpc
from zimage_split.client import AsyncClient, Client, NotFound, ResourceExhausted, Unavailable
from zimage_split.common.errors import BUSY, EMBEDDING_UNKNOWN, IMAGE_UNKNOWN
from zimage_split.common.interceptors import ORIGIN_KEY, REASON_KEY
from zimage_split.common.lru import ByteBoundedLRU
from zimage_split.dit_service.init_images import ImageStore

SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 7}


def address(server: Any) -> str:
    return f"127.0.0.1:{server.port}"


def failed_generate(port: int, request: generator_pb2.GenerateRequest) -> grpc.RpcError:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failure:
            list(stub.Generate(request, timeout=60))
    return failure.value


def trailing(error: grpc.RpcError) -> dict[str, str]:
    return dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]


def test_a_lost_embedding_key_is_not_found_with_reason_embedding_unknown(generator) -> None:  # type: ignore[no-untyped-def]
    request = generator_pb2.GenerateRequest(
        prompt=generator_pb2.Conditioning(embedding_key="0" * 64), width=64, height=64, steps=1
    )
    error = failed_generate(generator.port, request)
    assert error.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert trailing(error)[ORIGIN_KEY] == "NOT_FOUND"
    assert trailing(error)[REASON_KEY] == EMBEDDING_UNKNOWN


@pytest.mark.parametrize("lost", ["image", "mask"])
def test_a_lost_image_key_is_not_found_with_reason_image_unknown(client, generator, lost) -> None:  # type: ignore[no-untyped-def]
    unknown_image, unknown_mask = "img-" + "0" * 64, "mask-" + "0" * 64
    image_key = unknown_image if lost == "image" else client.upload_image(Image.new("RGB", (64, 64), "white"))
    request = generator_pb2.GenerateRequest(
        prompt=generator_pb2.Conditioning(text="a cat"),
        init_image=generator_pb2.InitImage(
            image_key=image_key, mask_key=unknown_mask if lost == "mask" else ""
        ),
        width=64,
        height=64,
        steps=1,
    )
    error = failed_generate(generator.port, request)
    assert error.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert trailing(error)[REASON_KEY] == IMAGE_UNKNOWN


def test_errors_without_a_reason_send_none(generator) -> None:  # type: ignore[no-untyped-def]
    request = generator_pb2.GenerateRequest(prompt=generator_pb2.Conditioning(text="a cat"), width=65)
    error = failed_generate(generator.port, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert ORIGIN_KEY in trailing(error) and REASON_KEY not in trailing(error)


@pytest.fixture
def one_slot_generator(loop_thread: LoopThread, tiny_model_dir: Path) -> Iterator[Any]:
    server = start_generator(loop_thread, tiny_model_dir, None, max_queue=1)
    yield server
    loop_thread.run(server.stop(grace=0))


def test_a_full_queue_is_resource_exhausted_with_reason_busy(one_slot_generator) -> None:  # type: ignore[no-untyped-def]
    target = address(one_slot_generator)

    async def refused_while_busy() -> aio.AioRpcError:
        async with AsyncClient(generator=target) as client:
            key = await client.upload(torch.randn(5, 16))
        request = generator_pb2.GenerateRequest(
            prompt=generator_pb2.Conditioning(embedding_key=key), width=512, height=512, steps=100, seed=0
        )
        async with aio.insecure_channel(target) as channel:
            stub = generator_pb2_grpc.GeneratorServiceStub(channel)
            running = stub.Generate(request, timeout=120)
            await running.read()  # the first step: the only slot is taken
            with pytest.raises(aio.AioRpcError) as refused:
                async for _ in stub.Generate(request, timeout=60):
                    pass
            running.cancel()
        return refused.value

    error = asyncio.run(refused_while_busy())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(error.trailing_metadata())[REASON_KEY] == BUSY  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raised", "reason"),
    [(ResourceExhausted, BUSY), (Unavailable, "a-reason-of-the-encoder")],
)
def test_an_encoder_error_keeps_its_reason_through_the_generator(
    client, encoder_fp32, monkeypatch, raised, reason
) -> None:  # type: ignore[no-untyped-def]
    async def refuse(prompt: Any) -> Any:
        raise raised("The encoder cannot take this prompt now.", reason=reason)

    monkeypatch.setattr(encoder_fp32.servicer, "encode_prompt", refuse)
    # A prompt no other test encodes, so the generator's cache cannot answer it.
    with pytest.raises(raised) as failure:
        client.generate(f"a reason test, {raised.__name__}", **SMALL)
    assert failure.value.reason == reason


def reworded_not_found(call: Callable[..., Any]) -> Callable[..., Any]:
    """`call` with another message on its NotFound, and the same reason."""

    def reword(error: NotFound) -> NotFound:
        return NotFound("That upload is gone; send it once more.", reason=error.reason)

    if asyncio.iscoroutinefunction(call):

        async def reworded_async(*args: Any, **kwargs: Any) -> Any:
            try:
                return await call(*args, **kwargs)
            except NotFound as error:
                raise reword(error) from None

        return reworded_async

    def reworded(*args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except NotFound as error:
            raise reword(error) from None

    return reworded


def counted(call: Callable[..., Awaitable[Any]], calls: list[object]) -> Callable[..., Awaitable[Any]]:
    async def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return await call(*args, **kwargs)

    return counting


def test_a_lost_embedding_is_uploaded_again_whatever_the_message_says(generator, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    store = generator.servicer.store
    monkeypatch.setattr(store, "from_key", reworded_not_found(store.from_key))
    uploads: list[object] = []
    monkeypatch.setattr(store, "add_upload", counted(store.add_upload, uploads))
    embedding = torch.randn(6, 16, generator=torch.Generator().manual_seed(41))
    with Client(generator=address(generator), timeout=60) as client:
        first = client.generate(embeddings=embedding, **SMALL)
        # The generator loses the upload (an eviction or a restart); the client still thinks it holds it.
        empty = ByteBoundedLRU(
            store.cache.max_bytes, lambda entry: entry.tensor.numel() * entry.tensor.element_size()
        )
        monkeypatch.setattr(store, "cache", empty)
        again = client.generate(embeddings=embedding, **SMALL)
    assert len(uploads) == 2
    assert np.array_equal(np.asarray(first), np.asarray(again))


def test_a_lost_image_is_uploaded_again_whatever_the_message_says(client, generator, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    start = Image.fromarray(np.random.default_rng(43).integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
    first = client.generate("a cat", init_image=start, seed=3, width=64, height=64, steps=2)
    images = ImageStore()  # the upload is gone, as after an eviction or a restart
    monkeypatch.setattr(images, "get", reworded_not_found(images.get))
    monkeypatch.setattr(generator.servicer, "images", images)
    again = client.generate("a cat", init_image=start, seed=3, width=64, height=64, steps=2)
    assert len(images) == 1
    assert np.array_equal(np.asarray(first), np.asarray(again))
