"""The metrics port seen from another host (Linux network namespaces, tests/netns.py): it refuses connections
from elsewhere unless it was bound where they arrive, and then asks for its token."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests import netns
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(300)

TOKEN = "metrics-token-ns"
# Fresh namespaces: fixed ports cannot clash with anything.
LOOPBACK_METRICS_SERVICE, BOUND_METRICS_SERVICE = 50051, 50052
LOOPBACK_METRICS, BOUND_METRICS = 9090, 9091
# Run inside a namespace: the status of GET http://ADDRESS/metrics, or the error's name.
FETCH = """
import sys, urllib.error, urllib.request
headers = {"Authorization": "Bearer " + sys.argv[2]} if len(sys.argv) > 2 else {}
try:
    with urllib.request.urlopen(urllib.request.Request(sys.argv[1], headers=headers), timeout=5) as reply:
        print(reply.status)
except urllib.error.HTTPError as error:
    print(error.code)
except urllib.error.URLError as error:
    print(type(error.reason).__name__)
"""


def fetch_from(host: netns.Host | None, url: str, token: str | None = None) -> str:
    argv = [sys.executable, "-c", FETCH, url, *([token] if token else [])]
    result = subprocess.run(
        host.command(argv) if host else argv, capture_output=True, text=True, timeout=30, check=True
    )
    return result.stdout.strip()


def serving(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(autouse=True, scope="module")
def network_namespaces() -> None:
    netns.require()


@pytest.fixture(scope="module")
def hosts(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[netns.Host, netns.Host]]:
    """Host `svc` runs two encoders: one with its metrics on loopback (the service itself on 0.0.0.0), one
    with its metrics on the service's own address (the default) and a token. Host `other` is a neighbour."""
    folder = tmp_path_factory.mktemp("metrics-ns")
    tokens = folder / "metrics.tokens"
    tokens.write_text(f"{TOKEN}\n")
    with netns.host_network() as network:
        service, other = network.add_host("svc"), network.add_host("other")
        common = [
            sys.executable,
            "-m",
            "zimage_split.cli",
            "serve",
            "encoder",
            "--model",
            str(tiny_model_dir),
        ]
        common += ["--device", "cpu", "--dtype", "float32", "--insecure"]
        flags = {
            LOOPBACK_METRICS_SERVICE: ["--host", "0.0.0.0", "--metrics-port", str(LOOPBACK_METRICS)],
            BOUND_METRICS_SERVICE: ["--host", service.address, "--metrics-port", str(BOUND_METRICS)],
        }
        flags[LOOPBACK_METRICS_SERVICE] += ["--metrics-host", "127.0.0.1"]
        flags[BOUND_METRICS_SERVICE] += ["--metrics-auth-token-file", str(tokens)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        processes = []
        try:
            for port, extra in flags.items():
                log = (folder / f"encoder-{port}.log").open("w")
                processes.append(
                    service.start(
                        [*common, "--port", str(port), *extra], stdout=log, stderr=subprocess.STDOUT, env=env
                    )
                )
            for port, process in zip(flags, processes, strict=True):
                wait_for(
                    lambda port=port, process=process: (
                        process.poll() is not None or serving(f"{service.address}:{port}")
                    ),
                    180,
                    f"the encoder on port {port} to serve",
                )
                assert process.poll() is None, (folder / f"encoder-{port}.log").read_text()
            yield service, other
        finally:
            for process in processes:
                netns.stop_group(process)


def test_metrics_on_loopback_are_refused_from_another_host(hosts: tuple[netns.Host, netns.Host]) -> None:
    service, other = hosts
    url = f"http://{service.address}:{LOOPBACK_METRICS}/metrics"
    assert fetch_from(other, url) == "ConnectionRefusedError"
    assert fetch_from(None, url) == "ConnectionRefusedError"  # nor from the root namespace
    # On the service's own host they answer.
    assert fetch_from(service, f"http://127.0.0.1:{LOOPBACK_METRICS}/metrics") == "200"
    # The service port itself, on 0.0.0.0, is reachable from the neighbour: the refusal is the metrics' bind.
    assert serving(f"{service.address}:{LOOPBACK_METRICS_SERVICE}")


def test_metrics_bound_on_the_service_address_ask_the_neighbour_for_the_token(
    hosts: tuple[netns.Host, netns.Host],
) -> None:
    service, other = hosts
    url = f"http://{service.address}:{BOUND_METRICS}/metrics"
    assert fetch_from(other, url) == "401"
    assert fetch_from(other, url, "wrong") == "401"
    assert fetch_from(other, url, TOKEN) == "200"
    # Bound to the service's address (its --host), not to loopback.
    assert fetch_from(service, f"http://127.0.0.1:{BOUND_METRICS}/metrics", TOKEN) == "ConnectionRefusedError"
