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
