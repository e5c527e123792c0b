"""Embedding streams to the client are checked end to end: a flipped byte or a cut stream from the encoder is
DATA_LOSS. A real encoder serves the stream; a proxy in front of it damages it, which a working encoder
never does."""

import hashlib
from collections.abc import AsyncIterator, Callable

import pytest
from grpc import aio

from zimage_split._proto.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from zimage_split.client import Client, DataLoss

Damage = Callable[[list[encoder_pb2.EncodeResponse]], list[encoder_pb2.EncodeResponse]]
# Long enough for several chunks: the tiny model's tokenizer makes one token per byte.
PROMPT = "a lighthouse on a cliff at dusk " * 8


class DamagingProxy(encoder_pb2_grpc.EncoderServiceServicer):
    """Forwards Info and Encode to a real encoder, damaging Encode's responses with `damage` on the way."""

    def __init__(self, encoder_address: str, damage: Damage) -> None:
        self.channel = aio.insecure_channel(encoder_address)
        self.encoder = encoder_pb2_grpc.EncoderServiceStub(self.channel)
        self.damage = damage

    async def Encode(  # noqa: N802 - the gRPC method name
        self, request: encoder_pb2.EncodeRequest, context: aio.ServicerContext
    ) -> AsyncIterator[encoder_pb2.EncodeResponse]:
        responses = [response async for response in self.encoder.Encode(request, timeout=30)]
        for response in self.damage(responses):
            yield response

    async def Info(  # noqa: N802 - the gRPC method name
        self, request: encoder_pb2.InfoRequest, context: aio.ServicerContext
    ) -> encoder_pb2.InfoResponse:
        return await self.encoder.Info(request, timeout=30)


def chunk_indices(responses: list[encoder_pb2.EncodeResponse]) -> list[int]:
    return [index for index, response in enumerate(responses) if response.WhichOneof("item") == "chunk"]


def flip_a_byte(responses: list[encoder_pb2.EncodeResponse]) -> list[encoder_pb2.EncodeResponse]:
    last = responses[chunk_indices(responses)[-1]]
    data = bytearray(last.chunk)
    data[len(data) // 2] ^= 0x10
    last.chunk = bytes(data)
    return responses


def drop_the_last_chunk(responses: list[encoder_pb2.EncodeResponse]) -> list[encoder_pb2.EncodeResponse]:
    del responses[chunk_indices(responses)[-1]]
    return responses


def send_sha256_only(responses: list[encoder_pb2.EncodeResponse]) -> list[encoder_pb2.EncodeResponse]:
    """What an encoder from before BLAKE3 sends."""
    header = responses[0].header.tensor
    header.ClearField("blake3")
    header.sha256 = hashlib.sha256(b"".join(responses[i].chunk for i in chunk_indices(responses))).hexdigest()
    return responses


@pytest.fixture
def proxy(loop_thread, encoder_fp32):  # type: ignore[no-untyped-def]
    """Starts a damaging proxy in front of the session's encoder; returns a function of the damage."""
    servers: list[tuple[aio.Server, DamagingProxy]] = []

    async def start(damage: Damage) -> int:
        server = aio.server()
        servicer = DamagingProxy(f"127.0.0.1:{encoder_fp32.port}", damage)
        encoder_pb2_grpc.add_EncoderServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append((server, servicer))
        return port

    yield lambda damage: loop_thread.run(start(damage))

    async def stop() -> None:
        for server, servicer in servers:
            await server.stop(0)
            await servicer.channel.close()

    loop_thread.run(stop())


def encode_through(port: int) -> None:
    with Client(encoder=f"127.0.0.1:{port}", timeout=30) as client:
        client.encode(PROMPT)


def test_the_undamaged_stream_passes_the_proxy(proxy, encoder_fp32) -> None:  # type: ignore[no-untyped-def]
    port = proxy(lambda responses: responses)
    with Client(encoder=f"127.0.0.1:{port}", timeout=30) as client:
        through = client.encode(PROMPT)[0]
    with Client(encoder=f"127.0.0.1:{encoder_fp32.port}", timeout=30) as client:
        direct = client.encode(PROMPT)[0]
    assert through.tensor.equal(direct.tensor) and through.tensor.numel() * 4 > 2 * 1024


def test_a_flipped_byte_from_the_encoder_is_data_loss(proxy) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DataLoss, match="do not match their BLAKE3: the data was corrupted"):
        encode_through(proxy(flip_a_byte))


def test_a_stream_cut_short_by_the_encoder_is_data_loss(proxy) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DataLoss, match="the transfer was cut short"):
        encode_through(proxy(drop_the_last_chunk))


def test_an_older_encoders_sha256_header_is_accepted_and_checked(proxy) -> None:  # type: ignore[no-untyped-def]
    encode_through(proxy(send_sha256_only))
    with pytest.raises(DataLoss, match="do not match their sha256"):
        encode_through(proxy(lambda responses: flip_a_byte(send_sha256_only(responses))))


def test_a_stream_without_a_checksum_is_data_loss(proxy) -> None:  # type: ignore[no-untyped-def]
    def no_checksum(responses: list[encoder_pb2.EncodeResponse]) -> list[encoder_pb2.EncodeResponse]:
        responses[0].header.tensor.ClearField("blake3")
        return responses

    with pytest.raises(DataLoss, match="malformed embedding: Tensor header carries no checksum"):
        encode_through(proxy(no_checksum))


def test_a_flipped_byte_from_the_encoder_reaches_a_generator_client_as_data_loss(
    proxy, loop_thread, tiny_model_dir
) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import start_generator

    generator = start_generator(loop_thread, tiny_model_dir, proxy(flip_a_byte), cache_bytes=0)
    try:
        with (
            Client(generator=f"127.0.0.1:{generator.port}", timeout=60) as client,
            pytest.raises(DataLoss, match="do not match their BLAKE3") as caught,
        ):
            client.generate(PROMPT, seed=0, width=64, height=64, steps=1)
        assert caught.value.code == "DATA_LOSS"
    finally:
        loop_thread.run(generator.stop(grace=0))
