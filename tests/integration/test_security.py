"""TLS, mutual TLS and bearer tokens on real servers: the right credentials work, wrong ones are refused."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import start_encoder, start_generator
from zimage_split.certs import write_dev_certificates
from zimage_split.client import Client, ClientSecurity, Unauthenticated, Unavailable
from zimage_split.common.errors import InvalidArgument
from zimage_split.common.security import ServerSecurity

TOKEN = "correct horse battery staple"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    write_dev_certificates(folder, ["localhost", "127.0.0.1"])
    return folder


@pytest.fixture(scope="module")
def secure_services(loop_thread, tiny_model_dir, certs):  # type: ignore[no-untyped-def]
    """An encoder with TLS and a token; a generator with mutual TLS and a token that uses both towards it."""
    encoder = start_encoder(
        loop_thread,
        tiny_model_dir,
        dtype="float32",
        security=ServerSecurity(
            cert_file=str(certs / "encoder.crt"), key_file=str(certs / "encoder.key"), tokens=(TOKEN,)
        ),
    )
    generator = start_generator(
        loop_thread,
        tiny_model_dir,
        encoder.port,
        security=ServerSecurity(
            cert_file=str(certs / "generator.crt"),
            key_file=str(certs / "generator.key"),
            client_ca_file=str(certs / "ca.crt"),
            tokens=("another token", TOKEN),
        ),
        encoder_security=ClientSecurity(ca_file=str(certs / "ca.crt"), token=TOKEN),
    )
    yield encoder.port, generator.port
    loop_thread.run(generator.stop(grace=0))
    loop_thread.run(encoder.stop(grace=0))


def client_for(port: int, certs: Path, **security: object) -> Client:
    return Client(generator=f"localhost:{port}", security=ClientSecurity(**security), timeout=30)  # type: ignore[arg-type]


def test_the_right_credentials_generate_from_text_through_both_services(secure_services, certs) -> None:  # type: ignore[no-untyped-def]
    _, generator = secure_services
    good = {
        "ca_file": str(certs / "ca.crt"),
        "cert_file": str(certs / "client.crt"),
        "key_file": str(certs / "client.key"),
        "token": TOKEN,
    }
    with client_for(generator, certs, **good) as client:
        image = client.generate("a fox over TLS", seed=1, width=64, height=64, steps=2)
    assert image.size == (64, 64) and image.info["timings"]["encode"] > 0  # the generator reached the encoder


@pytest.mark.parametrize("token", [None, "wrong token", TOKEN + " "])
def test_a_missing_or_wrong_token_is_unauthenticated(secure_services, certs, token) -> None:  # type: ignore[no-untyped-def]
    _, generator = secure_services
    security = {
        "ca_file": str(certs / "ca.crt"),
        "cert_file": str(certs / "client.crt"),
        "key_file": str(certs / "client.key"),
    }
    with (
        client_for(generator, certs, **security, token=token) as client,
        pytest.raises(Unauthenticated, match="bearer token"),
    ):
        client.generator_info()


def test_tls_failures_never_reach_the_service(secure_services, certs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    encoder, generator = secure_services
    client_cert = {
        "cert_file": str(certs / "client.crt"),
        "key_file": str(certs / "client.key"),
        "token": TOKEN,
    }
    # No CA: the system's roots do not trust the development CA.
    with client_for(generator, certs, **client_cert) as client, pytest.raises(Unavailable):
        client.generator_info()
    # Another CA.
    other = tmp_path / "other"
    write_dev_certificates(other, ["localhost"])
    with (
        client_for(generator, certs, ca_file=str(other / "ca.crt"), **client_cert) as client,
        pytest.raises(Unavailable),
    ):
        client.generator_info()
    # Mutual TLS: the generator wants a client certificate.
    with (
        client_for(generator, certs, ca_file=str(certs / "ca.crt"), token=TOKEN) as client,
        pytest.raises(Unavailable),
    ):
        client.generator_info()
    # Plaintext against TLS.
    with (
        Client(generator=None, encoder=f"127.0.0.1:{encoder}", timeout=10) as client,
        pytest.raises(Unavailable),
    ):
        client.encoder_info()


def test_health_needs_tls_but_no_token(secure_services, certs) -> None:  # type: ignore[no-untyped-def]
    encoder, _ = secure_services
    credentials = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.crt").read_bytes())
    with grpc.secure_channel(f"localhost:{encoder}", credentials) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_generator_with_the_wrong_encoder_token_refuses_to_start(
    loop_thread, tiny_model_dir, secure_services, certs
) -> None:  # type: ignore[no-untyped-def]
    encoder, _ = secure_services
    with pytest.raises(InvalidArgument, match="encoder-auth-token-file"):
        start_generator(
            loop_thread,
            tiny_model_dir,
            encoder,
            encoder_security=ClientSecurity(ca_file=str(certs / "ca.crt"), token="nope"),
        )


def test_plaintext_is_never_a_silent_default() -> None:
    with pytest.raises(InvalidArgument, match="--insecure"):
        ServerSecurity()
    with pytest.raises(InvalidArgument, match="both --tls-cert and --tls-key"):
        ServerSecurity(cert_file="a.crt")
    assert "token" not in repr(ClientSecurity(token=TOKEN)).replace("token=", "") and TOKEN not in repr(
        ClientSecurity(token=TOKEN)
    )


def test_a_rotated_token_file_is_read_again_without_dropping_a_call_in_flight(
    loop_thread, tiny_model_dir, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Rotation: the file is rewritten in place while a long call made with the old token runs."""
    import asyncio

    import torch

    from zimage_split.client import AsyncClient

    token_file = tmp_path / "tokens"
    token_file.write_text("# rotated monthly\nold-token\n")
    generator = start_generator(
        loop_thread,
        tiny_model_dir,
        None,
        security=ServerSecurity(insecure=True, token_file=str(token_file)),
    )
    address = f"127.0.0.1:{generator.port}"

    def client(token: str) -> AsyncClient:
        return AsyncClient(generator=address, security=ClientSecurity.plaintext(token), timeout=120)

    async def rotate_during_a_long_call() -> None:
        async with client("old-token") as old, client("new-token") as new:
            await old.generator_info()
            with pytest.raises(Unauthenticated):
                await new.generator_info()
            first_step = asyncio.Event()
            steps: list[int] = []

            def on_progress(step: int, total: int) -> None:
                steps.append(step)
                first_step.set()

            long_call = asyncio.ensure_future(
                old.generate(
                    embeddings=torch.randn(5, 16), steps=100, width=512, height=512, on_progress=on_progress
                )
            )
            await asyncio.wait_for(first_step.wait(), 60)
            token_file.write_text("new-token\n")  # in place: same inode, new size and mtime
            with pytest.raises(Unauthenticated, match="bearer token"):
                await old.generator_info()
            await new.generator_info()
            in_flight = generator.running.gate.in_flight
            assert not long_call.done() and in_flight == 1, "the long call was running all along"
            image = await long_call
            assert image.size == (512, 512) and steps[-1] == 100

            # Replaced by a rename (a new inode) back to the old token; a broken file keeps the last tokens.
            (tmp_path / "tokens.new").write_text("old-token\n")
            (tmp_path / "tokens.new").rename(token_file)
            await old.generator_info()
            with pytest.raises(Unauthenticated):
                await new.generator_info()
            token_file.write_text("# nothing yet\n")
            await old.generator_info()
            token_file.unlink()
            await old.generator_info()
            token_file.write_text("new-token\n")
            await new.generator_info()
            with pytest.raises(Unauthenticated):
                await old.generator_info()

    try:
        asyncio.run(rotate_during_a_long_call())
    finally:
        loop_thread.run(generator.stop(grace=0))
