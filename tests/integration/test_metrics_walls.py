"""Metrics behind the same walls as the service: the service's TLS certificate, a bearer token (read again
when its file changes), and `--metrics-port 0` (or unset) opening nothing."""

from __future__ import annotations

import os
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LoopThread, start_encoder, wait_for
from tests.reliability.processes import ZSPLIT, ServiceProcess, free_port
from zimage_split.certs import write_dev_certificates
from zimage_split.common.security import ServerSecurity

pytestmark = pytest.mark.timeout(300)

TOKEN = "metrics-token-1"


def fetch(url: str, *, token: str | None = None, ca: Path | None = None) -> tuple[int, str]:
    """The status and body of a GET (an HTTP error status too, not an exception)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=10, context=context
        ) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def listening_ports(pid: int) -> set[int]:
    """The TCP ports a process listens on, from /proc (its socket inodes matched against /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        for line in (table.read_text() if table.exists() else "").splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    write_dev_certificates(folder, ["localhost", "127.0.0.1"])
    return folder


@pytest.fixture(scope="module")
def tls_encoder(
    loop_thread: LoopThread, tiny_model_dir: Path, certs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[int, Path]]:  # type: ignore[no-untyped-def]
    tokens = tmp_path_factory.mktemp("tokens") / "metrics.tokens"
    tokens.write_text(f"# scrapers\n{TOKEN}\n")
    port = free_port()
    encoder = start_encoder(
        loop_thread,
        tiny_model_dir,
        dtype="float32",
        security=ServerSecurity(cert_file=str(certs / "encoder.crt"), key_file=str(certs / "encoder.key")),
        metrics_port=port,
        metrics_token_file=str(tokens),
    )
    try:
        yield port, tokens
    finally:
        loop_thread.run(encoder.stop(grace=0))


def test_the_metrics_of_a_tls_service_are_https_with_its_certificate(tls_encoder, certs: Path) -> None:  # type: ignore[no-untyped-def]
    port, _ = tls_encoder
    status, body = fetch(f"https://127.0.0.1:{port}/metrics", token=TOKEN, ca=certs / "ca.crt")
    assert status == 200 and "zsplit_cache_hits" in body
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP to a TLS port
        fetch(f"http://127.0.0.1:{port}/metrics", token=TOKEN)
    other = certs / "other"
    write_dev_certificates(other, ["127.0.0.1"])
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        fetch(f"https://127.0.0.1:{port}/metrics", token=TOKEN, ca=other / "ca.crt")


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x"], ids=["missing", "wrong", "longer"])
def test_a_scrape_without_the_token_gets_401(tls_encoder, certs: Path, token: str | None) -> None:  # type: ignore[no-untyped-def]
    port, _ = tls_encoder
    status, body = fetch(f"https://127.0.0.1:{port}/metrics", token=token, ca=certs / "ca.crt")
    assert status == 401
    assert "zsplit_" not in body and "Bearer" in body


def test_a_new_token_file_takes_effect_without_a_restart(tls_encoder, certs: Path) -> None:  # type: ignore[no-untyped-def]
    port, tokens = tls_encoder
    url, ca = f"https://127.0.0.1:{port}/metrics", certs / "ca.crt"
    rotated = tokens.with_suffix(".new")
    rotated.write_text("metrics-token-2\n")
    rotated.replace(tokens)
    try:
        assert fetch(url, token="metrics-token-2", ca=ca)[0] == 200
        assert fetch(url, token=TOKEN, ca=ca)[0] == 401
    finally:
        tokens.write_text(f"{TOKEN}\n")


def test_metrics_port_0_opens_nothing(tiny_model_dir: Path) -> None:
    with ServiceProcess("encoder", tiny_model_dir, "--dtype", "float32", "--metrics-port", "0") as server:
        server.wait_serving()
        assert listening_ports(server.pid) == {server.port}
        assert "Prometheus metrics on" not in server.log_text()


def test_the_http_gateway_guards_its_metrics_too(tmp_path: Path) -> None:
    tokens = tmp_path / "metrics.tokens"
    tokens.write_text(f"{TOKEN}\n")
    port, metrics_port = free_port(), free_port()
    gateway = subprocess.Popen(
        # Nothing listens on the generator's port: the gateway connects on the first request only.
        [
            *ZSPLIT,
            "serve",
            "http",
            "--generator",
            f"127.0.0.1:{free_port()}",
            "--insecure",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--metrics-auth-token-file",
            str(tokens),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            lambda: gateway.poll() is not None or metrics_port in listening_ports(gateway.pid),
            60,
            "the gateway's metrics port to open",
        )
        assert gateway.poll() is None, gateway.communicate()[0].decode(errors="replace")
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        assert fetch(url)[0] == 401
        status, body = fetch(url, token=TOKEN)
        assert status == 200 and "zsplit_requests" in body
    finally:
        gateway.terminate()
        gateway.communicate(timeout=30)
