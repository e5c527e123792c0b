"""A host typed without its port gets the service's default port, wherever addresses are read: gRPC would
dial 443 (the HTTPS port) instead."""

from __future__ import annotations

import pytest

from zimage_split.cli import parse_settings
from zimage_split.cli.serve import generator_config
from zimage_split.client import AsyncClient, Client
from zimage_split.common.addresses import host_of, with_default_port
from zimage_split.common.encoder_pool import parse_encoder_addresses
from zimage_split.common.errors import InvalidArgument
from zimage_split.dit_service.config import GeneratorConfig


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("localhost", "localhost:7"),
        (" gpu-box.internal ", "gpu-box.internal:7"),
        ("10.0.0.5", "10.0.0.5:7"),
        ("[::1]", "[::1]:7"),
        ("::1", "[::1]:7"),
        ("dns:encoders.internal", "dns:encoders.internal:7"),
        # Already with a port, or a gRPC target of another kind: as typed.
        ("localhost:50061", "localhost:50061"),
        ("[::1]:50061", "[::1]:50061"),
        ("dns:encoders.internal:50061", "dns:encoders.internal:50061"),
        ("dns:///encoders.internal", "dns:///encoders.internal"),
        ("unix:/run/zsplit.sock", "unix:/run/zsplit.sock"),
    ],
)
def test_a_host_alone_gets_the_default_port(typed: str, expected: str) -> None:
    assert with_default_port(typed, 7) == expected


@pytest.mark.parametrize(
    ("address", "host"),
    [("127.0.0.1:50051", "127.0.0.1"), ("localhost", "localhost"), ("[::1]:1", "::1"), ("::1", "::1")],
)
def test_the_host_of_an_address(address: str, host: str) -> None:
    assert host_of(address) == host


def test_the_sdk_dials_the_generators_and_the_encoders_default_ports() -> None:
    client = AsyncClient(generator="localhost", encoder="localhost,10.0.0.5:50061,dns:encoders.internal")
    assert client.generator_address == "localhost:50052"
    assert client.encoder_pool is not None
    assert client.encoder_pool.entries == ("localhost:50051", "10.0.0.5:50061", "dns:encoders.internal:50051")
    assert client.encoder_address == "localhost:50051,10.0.0.5:50061,dns:encoders.internal:50051"
    with Client(generator="::1") as blocking:
        assert blocking._async.generator_address == "[::1]:50052"


def test_encoder_lists_and_the_generator_config_add_the_encoders_port() -> None:
    assert parse_encoder_addresses("a:1,b") == ("a:1", "b:50051")
    assert GeneratorConfig(model="tiny", encoder="localhost").encoder == "localhost:50051"
    # A bare host and the same host with the default port are one encoder, named twice.
    with pytest.raises(InvalidArgument, match="twice"):
        parse_encoder_addresses("a,a:50051")


def test_the_cli_reads_bare_hosts_with_the_default_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZSPLIT_ENCODER", raising=False)
    args = parse_settings(["serve", "generator", "--model", "tiny", "--insecure", "--encoder", "localhost"])
    assert generator_config(args).encoder == "localhost:50051"
