"""A client that asks an older generator for something it cannot know gets an error, not a quietly different
image. A proxy in front of a real generator plays the older one: it drops the fields that generator would
not know from the request, and they come back unset in its replies, as they would."""

from collections.abc import AsyncIterator

import numpy as np
import pytest
from grpc import aio

from zimage_split._proto.generator.v1 import generator_pb2, generator_pb2_grpc
from zimage_split.client import Client, FailedPrecondition


class OlderGenerator(generator_pb2_grpc.GeneratorServiceServicer):
    """A generator from before GenerateRequest.shift, .dype and .controlnet: it skips the unknown fields and
    reports none of them; image uploads it knew, and passes them on."""

    def __init__(self, generator_address: str) -> None:
        self.channel = aio.insecure_channel(generator_address)
        self.generator = generator_pb2_grpc.GeneratorServiceStub(self.channel)

    async def Generate(  # noqa: N802 - the gRPC method name
        self, request: generator_pb2.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[generator_pb2.GenerateResponse]:
        for name in ("shift", "dype", "controlnet"):
            request.ClearField(name)
        async for response in self.generator.Generate(request, timeout=60):
            if response.WhichOneof("event") == "image":
                for name in ("shift", "dype", "controlnet"):
                    response.image.ClearField(name)
            yield response

    async def UploadImage(  # noqa: N802 - the gRPC method name
        self, request_iterator: AsyncIterator[generator_pb2.UploadImageRequest], context: aio.ServicerContext
    ) -> generator_pb2.UploadImageResponse:
        return await self.generator.UploadImage(request_iterator, timeout=60)


@pytest.fixture
def older_generator(loop_thread, generator):  # type: ignore[no-untyped-def]
    async def start() -> tuple[aio.Server, OlderGenerator, int]:
        server = aio.server()
        servicer = OlderGenerator(f"127.0.0.1:{generator.port}")
        generator_pb2_grpc.add_GeneratorServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, servicer, port

    server, servicer, port = loop_thread.run(start())
    yield f"127.0.0.1:{port}"

    async def stop() -> None:
        await server.stop(0)
        await servicer.channel.close()

    loop_thread.run(stop())


def test_a_shift_an_older_generator_would_ignore_is_an_error(older_generator, generator) -> None:  # type: ignore[no-untyped-def]
    with Client(generator=older_generator, timeout=60) as client:
        with pytest.raises(FailedPrecondition, match="ignored `shift`: it is older than per-request"):
            client.generate("a cat", seed=1, width=64, height=64, steps=2, shift=1.5)
        plain = client.generate("a cat", seed=1, width=64, height=64, steps=2)  # asks nothing it lacks
    with Client(generator=f"127.0.0.1:{generator.port}", timeout=60) as client:
        direct = client.generate("a cat", seed=1, width=64, height=64, steps=2)
    assert np.array_equal(np.asarray(plain), np.asarray(direct))


def test_dype_an_older_generator_would_ignore_is_an_error(older_generator) -> None:  # type: ignore[no-untyped-def]
    with (
        Client(generator=older_generator, timeout=60) as client,
        pytest.raises(FailedPrecondition, match="ignored DyPE: it is older than per-request position"),
    ):
        client.generate("a cat", seed=1, width=64, height=64, steps=1, dype=True)


def test_a_controlnet_an_older_generator_would_ignore_is_an_error(older_generator) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    with (
        Client(generator=older_generator, timeout=60) as client,
        pytest.raises(FailedPrecondition, match="ignored `controlnet`: it is older than ControlNet requests"),
    ):
        client.generate(
            "a cat",
            seed=1,
            width=64,
            height=64,
            steps=2,
            controlnet="pose",
            control_image=Image.new("RGB", (64, 64)),
        )
