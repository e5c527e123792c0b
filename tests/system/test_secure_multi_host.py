"""The whole system on four hosts with TLS and bearer tokens: encoder, Ray head + front, Ray worker, client.

Hosts are Linux network namespaces on one bridge (tests/netns.py). A runs the encoder; B the Ray head and
the generator front; C joins the Ray cluster and runs its own replica (each Ray node declares one logical
GPU, as in test_multi_host_ray.py); D runs the client, which only ever speaks TLS with a token.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from tests import netns
from tests.system.test_multi_host_ray import TEMP_DIR_PREFIX as RAY_TEMP_DIR_PREFIX
from tests.system.test_multi_host_ray import (
    RayCluster,
    cluster_env,
    node_ip,
    processes_mentioning,
    tail,
    wait_until_serving,
)
from zimage_split.certs import write_dev_certificates

ZSPLIT = [sys.executable, "-m", "zimage_split.cli"]

# Runs on host D. Prints one JSON line: the outcome of each kind of call it was asked to make.
CLIENT = r"""
import json, sys
from zimage_split.client import Client, ClientSecurity, ZSplitError
generator, certs, token, count, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])

def attempt(security, n):
    try:
        with Client(generator=generator, security=security, timeout=120) as client:
            images = [client.generate(f"a lighthouse number {i}", seed=seed + i, width=64, height=64, steps=2)
                      for i in range(n)]
        return {"ok": [image.info["replica"] for image in images]}
    except ZSplitError as error:
        return {"error": error.code, "message": error.message[:300]}

good = ClientSecurity(ca_file=f"{certs}/ca.crt", token=token)
result = {"good": attempt(good, count)}
if seed == 0:
    result["wrong_token"] = attempt(ClientSecurity(ca_file=f"{certs}/ca.crt", token="wrong-token"), 1)
    result["no_ca"] = attempt(ClientSecurity(token=token), 1)
print(json.dumps(result))
"""


def run_client(client_host: netns.Host, front: str, certs: Path, token: str, count: int, seed: int) -> dict:
    result = subprocess.run(
        client_host.command([sys.executable, "-c", CLIENT, front, str(certs), token, str(count), str(seed)]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(autouse=True, scope="module")
def network_namespaces() -> None:
    netns.require()


@pytest.mark.timeout(900)
def test_four_hosts_with_tls_and_tokens(tiny_model_dir: Path, tmp_path: Path) -> None:
    logs, certs = tmp_path / "logs", tmp_path / "certs"
    logs.mkdir()
    token = secrets.token_urlsafe(24)
    (tmp_path / "token").write_text(token + "\n")
    processes: list[subprocess.Popen[bytes]] = []
    with netns.host_network() as network:
        cluster = RayCluster(network, logs, cluster_env())
        try:
            encoder_host = network.add_host("a")
            head = cluster.add_node("b")
            worker = cluster.add_node("c")
            client_host = network.add_host("d")
            write_dev_certificates(certs, [encoder_host.address, head.address])
            trust = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.crt").read_bytes())

            tls = ["--tls-key", "--tls-cert"]
            encoder_log = logs / "encoder.log"
            with encoder_log.open("w") as output:
                encoder = encoder_host.start(
                    [*ZSPLIT, "serve", "encoder", "--model", str(tiny_model_dir), "--host", "0.0.0.0",
                     "--device", "cpu", "--dtype", "float32", tls[1], str(certs / "encoder.crt"),
                     tls[0], str(certs / "encoder.key"), "--auth-token-file", str(tmp_path / "token")],
                    stdout=output, stderr=subprocess.STDOUT, env=cluster.env,
                )  # fmt: skip
            processes.append(encoder)
            wait_until_serving(f"{encoder_host.address}:50051", encoder, encoder_log, 120, trust)

            front_log = logs / "front.log"
            with front_log.open("w") as output:
                front = head.start(
                    [*ZSPLIT, "serve", "generator", "--model", str(tiny_model_dir), "--host", "0.0.0.0",
                     "--ray-address", cluster.address, "--replicas", "auto",
                     tls[1], str(certs / "generator.crt"), tls[0], str(certs / "generator.key"),
                     "--auth-token-file", str(tmp_path / "token"),
                     "--encoder", f"{encoder_host.address}:50051", "--encoder-tls-ca", str(certs / "ca.crt"),
                     "--encoder-auth-token-file", str(tmp_path / "token")],
                    stdout=output, stderr=subprocess.STDOUT, env=cluster.env,
                )  # fmt: skip
            processes.append(front)
            front_address = f"{head.address}:50052"
            wait_until_serving(front_address, front, front_log, 240, trust)

            started = time.monotonic()
            # From D: text prompts, encoded on A, denoised on B and C; bad credentials refused.
            first = run_client(client_host, front_address, certs, token, 12, 0)
            assert "ok" in first["good"], first
            by_host = Counter(node_ip(replica) for replica in first["good"]["ok"])
            assert set(by_host) == {head.address, worker.address}, by_host
            assert first["wrong_token"]["error"] == "UNAUTHENTICATED", first
            assert first["no_ca"]["error"] == "UNAVAILABLE", first  # the TLS handshake fails

            # C's link goes down: requests still complete, on B.
            netns.ip("link", "set", f"{network.prefix}-{worker.name}", "down")
            print(f"services up and first burst: {time.monotonic() - started:.0f}s")
            cut_at = time.monotonic()
            cut = run_client(client_host, front_address, certs, token, 6, 100)
            print(f"6 images with C cut off: {time.monotonic() - cut_at:.0f}s")
            assert "ok" in cut["good"], f"{cut}\n{tail(front_log)}"
            assert {node_ip(replica) for replica in cut["good"]["ok"]} == {head.address}, cut

            # The link comes back: C serves again. A node the cluster declared dead during the outage exits
            # when it reconnects; its supervisor (systemd's Restart=always in deploy/) starts it again.
            netns.ip("link", "set", f"{network.prefix}-{worker.name}", "up")
            worker_node = dict(cluster.nodes)[worker]
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker_node.wait(timeout=60)
            if worker_node.poll() is not None:
                cluster.start_node(worker)
            deadline, back = time.monotonic() + 180, Counter[str]()
            while worker.address not in back and time.monotonic() < deadline:
                again = run_client(client_host, front_address, certs, token, 8, 200)
                assert "ok" in again["good"], again
                back.update(node_ip(replica) for replica in again["good"]["ok"])
            assert worker.address in back, f"C never served again: {back}\n{tail(front_log)}"
            print(f"C serving again after: {time.monotonic() - cut_at:.0f}s from the cut")
        finally:
            for process in reversed(processes):
                netns.stop_group(process, timeout=60)
            cluster.stop()
    assert network.leftovers() == [], "every namespace and interface is removed"
    assert processes_mentioning(RAY_TEMP_DIR_PREFIX) == [], "no Ray process outlives its node"
