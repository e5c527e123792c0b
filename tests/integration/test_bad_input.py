"""Every bad request gets the right status code and a message that says the fix; the server keeps serving."""

import hashlib
import math

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from zimage_split._proto.generator.v1 import generator_pb2, generator_pb2_grpc
from zimage_split._proto.tensor.v1 import tensor_pb2
from zimage_split.client import Client, InvalidArgument, NotFound, Unavailable, ZSplitError
from zimage_split.common import wire


@pytest.fixture
def stub(generator):  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(f"127.0.0.1:{generator.port}") as channel:
        yield generator_pb2_grpc.GeneratorServiceStub(channel), health_pb2_grpc.HealthStub(channel)


def assert_still_serving(stub, client) -> None:  # type: ignore[no-untyped-def]
    _, health = stub
    assert (
        health.Check(health_pb2.HealthCheckRequest(service="")).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    assert client.generate("still alive", seed=0, width=64, height=64, steps=1).size == (64, 64)


def generate_error(stub, **fields) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    generator, _ = stub
    fields.setdefault("prompt", generator_pb2.Conditioning(text="a cat"))
    request = generator_pb2.GenerateRequest(**fields)
    with pytest.raises(grpc.RpcError) as caught:
        list(generator.Generate(request, timeout=30))
    return caught.value


@pytest.mark.parametrize(
    ("fields", "code", "message"),
    [
        (
            {"width": 1000, "height": 64},
            "INVALID_ARGUMENT",
            "Width must be divisible by 16 (got 1000). Use 992 or 1008",
        ),
        ({"steps": 0}, "INVALID_ARGUMENT", "steps must be between 1 and 100 (got 0)"),
        ({"steps": 10_000}, "INVALID_ARGUMENT", "steps must be between 1 and 100 (got 10000)"),
        ({"width": 100_000, "height": 100_000}, "INVALID_ARGUMENT", "between 64 and 4096"),
        ({"width": 4096, "height": 4096}, "INVALID_ARGUMENT", "raise --max-pixels"),
        ({"guidance_scale": math.inf}, "INVALID_ARGUMENT", "guidance_scale must be between 0 and 30"),
        ({"model": "someone/other-model"}, "NOT_FOUND", "This generator serves"),
        (
            {"prompt": generator_pb2.Conditioning(embedding_key="0" * 64)},
            "NOT_FOUND",
            "Upload the embedding again",
        ),
        (
            {"prompt": generator_pb2.Conditioning()},
            "INVALID_ARGUMENT",
            "set its `text` or an `embedding_key`",
        ),
    ],
)
def test_bad_generate_parameters(stub, client, fields, code, message) -> None:  # type: ignore[no-untyped-def]
    error = generate_error(stub, **fields)
    assert error.code() == grpc.StatusCode[code], error.details()
    assert message in error.details()
    assert_still_serving(stub, client)


def upload(stub, messages):  # type: ignore[no-untyped-def]
    generator, _ = stub
    with pytest.raises(grpc.RpcError) as caught:
        generator.UploadEmbedding(iter(messages), timeout=30)
    return caught.value


def header_for(tensor: torch.Tensor) -> generator_pb2.UploadEmbeddingRequest:
    meta, _ = wire.describe(tensor)
    return generator_pb2.UploadEmbeddingRequest(
        header=generator_pb2.UploadHeader(tensor=wire.meta_to_proto(meta))
    )


def test_embedding_with_the_wrong_hidden_size(client, stub) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument, match="hidden size 32, but this generator's DiT takes 16"):
        client.generate(embeddings=torch.randn(7, 32), seed=0, width=64, height=64)
    assert_still_serving(stub, client)


def test_embedding_with_a_nan(client, stub) -> None:  # type: ignore[no-untyped-def]
    tensor = torch.randn(7, 16)
    tensor[3, 3] = math.nan
    with pytest.raises(InvalidArgument, match="NaN"):
        client.generate(embeddings=tensor, seed=0, width=64, height=64)
    assert_still_serving(stub, client)


@pytest.mark.parametrize("dtype_code", [tensor_pb2.DTYPE_UNSPECIFIED, 99])
def test_embedding_with_the_wrong_dtype(stub, client, dtype_code) -> None:  # type: ignore[no-untyped-def]
    tensor = torch.randn(4, 16)
    message = header_for(tensor)
    message.header.tensor.dtype = dtype_code
    _, payload = wire.describe(tensor)
    error = upload(stub, [message, generator_pb2.UploadEmbeddingRequest(chunk=bytes(payload))])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "send bfloat16, float16 or float32" in error.details()
    assert_still_serving(stub, client)


def test_embedding_with_mismatched_dtype_and_byte_count(stub, client) -> None:  # type: ignore[no-untyped-def]
    tensor = torch.randn(4, 16)  # float32 bytes announced as float16
    message = header_for(tensor)
    message.header.tensor.dtype = tensor_pb2.DTYPE_FLOAT16
    error = upload(stub, [message])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 128" in error.details()
    assert_still_serving(stub, client)


def test_truncated_chunk_stream(stub, client) -> None:  # type: ignore[no-untyped-def]
    tensor = torch.randn(300, 16)
    _, payload = wire.describe(tensor)
    chunks = list(wire.iter_chunks(payload, chunk_bytes=4096))
    messages = [header_for(tensor)] + [generator_pb2.UploadEmbeddingRequest(chunk=c) for c in chunks[:-1]]
    error = upload(stub, messages)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cut short. Send it again" in error.details()
    assert_still_serving(stub, client)


def test_corrupted_chunk_is_data_loss(stub, client) -> None:  # type: ignore[no-untyped-def]
    tensor = torch.randn(4, 16)
    message = header_for(tensor)
    message.header.tensor.blake3 = hashlib.sha256(b"something else").hexdigest()
    _, payload = wire.describe(tensor)
    error = upload(stub, [message, generator_pb2.UploadEmbeddingRequest(chunk=bytes(payload))])
    assert error.code() == grpc.StatusCode.DATA_LOSS
    assert_still_serving(stub, client)


@pytest.mark.parametrize("legacy", [False, True], ids=["blake3", "sha256-only-header"])
def test_a_flipped_byte_in_an_upload_is_data_loss(stub, client, legacy: bool) -> None:  # type: ignore[no-untyped-def]
    tensor = torch.randn(300, 16)
    message = header_for(tensor)
    _, payload = wire.describe(tensor)
    if legacy:  # what a client from before BLAKE3 sends
        message.header.tensor.ClearField("blake3")
        message.header.tensor.sha256 = hashlib.sha256(payload).hexdigest()
    data = bytearray(payload)
    data[9000] ^= 0x04  # in the third 4 KiB chunk
    chunks = [generator_pb2.UploadEmbeddingRequest(chunk=c) for c in wire.iter_chunks(data, chunk_bytes=4096)]
    error = upload(stub, [message, *chunks])
    assert error.code() == grpc.StatusCode.DATA_LOSS
    assert f"do not match their {'sha256' if legacy else 'BLAKE3'}: the data was corrupted" in error.details()
    assert_still_serving(stub, client)


def test_an_upload_from_an_older_client_with_sha256_only_gets_the_blake3_key(stub, client) -> None:  # type: ignore[no-untyped-def]
    tensor = torch.randn(6, 16)
    meta, payload = wire.describe(tensor)
    message = header_for(tensor)
    message.header.tensor.ClearField("blake3")
    message.header.tensor.sha256 = hashlib.sha256(payload).hexdigest()
    generator, _ = stub
    reply = generator.UploadEmbedding(
        iter([message, generator_pb2.UploadEmbeddingRequest(chunk=bytes(payload))]), timeout=30
    )
    assert reply.embedding_key == wire.embedding_key(meta) and reply.embedding_key.startswith("b3-")
    key_before_blake3 = hashlib.sha256(f"float32|[6, 16]|{hashlib.sha256(payload).hexdigest()}".encode())
    error = generate_error(
        stub, prompt=generator_pb2.Conditioning(embedding_key=key_before_blake3.hexdigest()), steps=1
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND and "Upload the embedding again" in error.details()


def test_an_upload_header_without_a_checksum_is_invalid(stub, client) -> None:  # type: ignore[no-untyped-def]
    tensor = torch.randn(4, 16)
    message = header_for(tensor)
    message.header.tensor.ClearField("blake3")
    _, payload = wire.describe(tensor)
    error = upload(stub, [message, generator_pb2.UploadEmbeddingRequest(chunk=bytes(payload))])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no checksum; send the payload's hex BLAKE3 in TensorHeader.blake3" in error.details()
    assert_still_serving(stub, client)


def test_unknown_model_path_is_not_found(loop_thread, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import start_generator

    with pytest.raises(NotFound, match="No model folder at .*--model tiny"):
        start_generator(loop_thread, tmp_path / "no-such-model", None)
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(NotFound, match="no model_index.json"):
        start_generator(loop_thread, tmp_path / "not-a-model", None)


def test_hub_id_that_cannot_be_fetched_says_how_to_download(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    import torch as _torch

    from zimage_split.dit_service.engine import DiTEngine
    from zimage_split.model_source import resolve_model

    with pytest.raises(NotFound, match="hf download Tongyi-MAI/Z-Image-Turbo.*--model tiny"):
        DiTEngine(
            resolve_model("Tongyi-MAI/Z-Image-Turbo"), device=_torch.device("cpu"), dtype=_torch.float32
        )


def test_encoder_down_is_unavailable_with_a_hint(loop_thread, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import start_generator

    server = start_generator(loop_thread, tiny_model_dir, None)  # no encoder configured
    try:
        with Client(generator=f"127.0.0.1:{server.port}", timeout=30) as client:
            with pytest.raises(Unavailable, match="--encoder HOST:PORT"):
                client.generate("needs an encoder", width=64, height=64)
            # Uploaded embeddings still work without an encoder.
            image = client.generate(embeddings=torch.randn(5, 16), seed=1, width=64, height=64, steps=2)
            assert image.size == (64, 64)
    finally:
        loop_thread.run(server.stop(grace=0))


def test_typed_errors_share_one_base_class() -> None:
    for cls in (InvalidArgument, NotFound, Unavailable):
        assert issubclass(cls, ZSplitError)


def test_pickled_weights_are_never_loaded(tiny_model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from safetensors.torch import load_file

    from zimage_split.encoder_service.engine import TextEncoder
    from zimage_split.model_source import resolve_model

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "text_encoder" / "model.safetensors"
    torch.save(load_file(str(weights)), folder / "text_encoder" / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(NotFound, match="safetensors weights only"):
        TextEncoder(resolve_model(str(folder)), device=torch.device("cpu"), dtype=torch.float32)
