"""The generator over a Ray cluster of several hosts: one DiT + VAE replica per GPU, on every host.

Each host is a Linux network namespace (tests/netns.py) running its own `ray start` node with one logical
GPU: `--num-gpus 1` is a Ray resource standing for one GPU per host. These machines have no real GPU, so
each replica's `--device auto` resolves to the CPU, but Ray places replicas by that resource exactly as it
would on GPU hosts. Each test starts the generator front with `--replicas auto` and never reconfigures it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from tests import netns
from zimage_split.client import AsyncClient

RAY = str(Path(sys.executable).with_name("ray"))
RAY_PORT = 6379
FRONT_PORT = 50052
# Ray's unix sockets live under the temp dir and their paths must stay under 108 bytes: keep it short.
TEMP_DIR_PREFIX = f"/tmp/zsr-{os.getpid()}-"


def cluster_env() -> dict[str, str]:
    """The environment of every node and front, without this machine's own RAY_* and ZSPLIT_* settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "ZSPLIT_"))}
    return {
        **env,
        "HF_HUB_OFFLINE": "1",
        # A head that finds ~/.ray/auth_token turns token auth on, but `ray start --address` uses a token
        # only in token mode: one explicit token everywhere makes the test independent of this machine.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        # A node drains for 30 s on SIGTERM by default; the test stops the front first, so nothing is left.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def wait_for_line(log: Path, text: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise AssertionError(f"{process.args!r} exited with {process.returncode}:\n{tail(log)}")
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {log}:\n{tail(log)}")


def wait_until_serving(
    address: str,
    process: subprocess.Popen[bytes],
    log: Path,
    timeout: float,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Polls gRPC health (over TLS with `credentials`; health needs no token)."""
    deadline = time.monotonic() + timeout
    channel_to = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel_to as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"{process.args!r} exited with {process.returncode}:\n{tail(log)}")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise AssertionError(f"{address} never reported SERVING:\n{tail(log)}")


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, NotADirectoryError, PermissionError, ProcessLookupError):
            continue
        if text in command:
            found.append(f"{entry.name}: {command[:200]}")
    return found


def node_ip(replica: str) -> str:
    """The Ray node IP in a replica name, HOSTNAME/NODE_IP/pidPID/DEVICE/gpuN."""
    return replica.split("/")[1]


@dataclass
class RayCluster:
    """One Ray node per simulated host; the first is the head. Nodes may join while the front runs."""

    network: netns.HostNetwork
    logs: Path
    env: dict[str, str]
    nodes: list[tuple[netns.Host, subprocess.Popen[bytes]]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.nodes[0][0].address}:{RAY_PORT}"

    def add_node(self, name: str) -> netns.Host:
        return self.start_node(self.network.add_host(name))

    def start_node(self, host: netns.Host, env: dict[str, str] | None = None) -> netns.Host:
        """Starts a Ray node on `host` (again, after its node stopped, as a supervisor such as systemd would),
        with the cluster's environment or `env` (which its replicas inherit)."""
        name = host.name
        if self.nodes and self.nodes[0][0] != host:
            role = [f"--address={self.address}"]
        else:
            role = ["--head", f"--port={RAY_PORT}", "--include-dashboard=false"]
        argv = [
            RAY,
            "start",
            "--block",
            *role,
            f"--node-ip-address={host.address}",
            "--num-cpus=1",
            "--num-gpus=1",
            f"--object-store-memory={100 << 20}",
            f"--temp-dir={TEMP_DIR_PREFIX}{name}",
            "--disable-usage-stats",
        ]
        starts = sum(1 for known, _ in self.nodes if known == host)
        log = self.logs / f"ray-{name}{f'-{starts + 1}' if starts else ''}.log"
        with log.open("w") as output:
            process = host.start(argv, stdout=output, stderr=subprocess.STDOUT, env=env or self.env)
        self.nodes = [(known, running) for known, running in self.nodes if known != host] + [(host, process)]
        # `ray start` prints this once the GCS lists the node, so its GPU counts from then on.
        wait_for_line(log, "Ray runtime started", process, timeout=90)
        return host

    def stop(self) -> None:
        for host, process in reversed(self.nodes):
            netns.stop_group(process)
            shutil.rmtree(f"{TEMP_DIR_PREFIX}{host.name}", ignore_errors=True)


def start_front(
    cluster: RayCluster, host: netns.Host, model: Path | str, env: dict[str, str] | None = None, *flags: str
) -> Front:
    """`zsplit serve generator --replicas auto` inside `host`: a Ray driver must run on a node of the cluster."""
    argv = [
        sys.executable,
        "-m",
        "zimage_split.cli",
        "serve",
        "generator",
        "--model",
        str(model),
        "--encoder",
        "none",
        "--ray-address",
        cluster.address,
        "--replicas",
        "auto",
        "--host",
        "0.0.0.0",
        "--insecure",  # plaintext gRPC: the bridge is private to this test
        "--port",
        str(FRONT_PORT),
        *flags,
    ]
    log = cluster.logs / f"front-{len(cluster.nodes)}-hosts-{time.monotonic_ns()}.log"
    with log.open("w") as output:
        process = host.start(argv, stdout=output, stderr=subprocess.STDOUT, env=env or cluster.env)
    return Front(host, process, log)


@dataclass
class Front:
    host: netns.Host
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def address(self) -> str:
        return f"{self.host.address}:{FRONT_PORT}"


@contextmanager
def serving_front(cluster: RayCluster, model: Path) -> Iterator[Front]:
    """A generator front on the head host, stopped with SIGTERM afterwards; it must exit with 0."""
    front = start_front(cluster, cluster.nodes[0][0], model)
    try:
        wait_until_serving(front.address, front.process, front.log, timeout=180)
        yield front
    finally:
        code = netns.stop_group(front.process, timeout=60)
    assert code == 0, f"the front exits with {code} on SIGTERM, not 0:\n{tail(front.log)}"


@pytest.fixture(autouse=True, scope="module")
def network_namespaces() -> None:
    netns.require()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """A Ray cluster of one GPU host, h0 (the head); tests add hosts h1, h2... to it.

    The tests share it to save the nodes' start-up; in file order, the first starts on h0 alone.
    """
    with netns.host_network() as network:
        cluster = RayCluster(network, tmp_path_factory.mktemp("multi-host"), cluster_env())
        try:
            cluster.add_node("h0")
            yield cluster
        finally:
            cluster.stop()
    assert network.leftovers() == [], "every namespace and interface is removed"
    assert processes_mentioning(TEMP_DIR_PREFIX) == [], "no Ray process outlives its node"


def burst(address: str, count: int) -> list[Image.Image]:
    async def run() -> list[Image.Image]:
        async with AsyncClient(generator=address, timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.generate(embeddings=torch.randn(6, 16), seed=i, width=64, height=64, steps=2)
                    for i in range(count)
                )
            )

    return asyncio.run(run())


def join_under_load(
    cluster: RayCluster, front: Front, *, clients: int, timeout: float
) -> tuple[str, Counter[str]]:
    """Keeps `clients` requests in flight while a new GPU host joins, until that host has made an image.

    Returns the new host's IP and how many images each host made.
    """
    by_host: Counter[str] = Counter()

    async def run() -> str:
        joined: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        served_by_new_host = asyncio.Event()

        async def keep_asking(client: AsyncClient, embedding: torch.Tensor, seed: int) -> None:
            while not served_by_new_host.is_set():
                # Many steps per request: the replicas' work, not the front's, makes the load.
                image = await client.generate(embeddings=embedding, seed=seed, width=64, height=64, steps=16)
                assert image.size == (64, 64)
                host = node_ip(image.info["replica"])
                by_host[host] += 1
                if joined.done() and host == joined.result():
                    served_by_new_host.set()

        async with AsyncClient(generator=front.address, timeout=120) as client:
            tasks = [
                asyncio.ensure_future(keep_asking(client, torch.randn(6, 16), seed))
                for seed in range(clients)
            ]
            new_host = await asyncio.to_thread(cluster.add_node, f"h{len(cluster.nodes)}")
            joined.set_result(new_host.address)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(served_by_new_host.wait(), timeout)
            served_by_new_host.set()
            await asyncio.gather(*tasks)
        return new_host.address

    new_ip = asyncio.run(run())
    return new_ip, by_host


def test_a_gpu_host_that_joins_gets_a_replica_under_load(cluster: RayCluster, tiny_model_dir: Path) -> None:
    with serving_front(cluster, tiny_model_dir) as front:
        # Serve aims at 4 requests in flight per replica (--max-batch-size); twice that per running replica
        # makes it want more replicas than the cluster has GPUs, so it adds one as soon as a GPU joins.
        new_ip, by_host = join_under_load(cluster, front, clients=8 * len(cluster.nodes), timeout=90)
    assert by_host[new_ip] > 0, f"images per host: {by_host}\n{tail(front.log)}"
    assert set(by_host) <= {host.address for host, _ in cluster.nodes}, f"images per host: {by_host}"


def test_replicas_auto_puts_one_replica_on_every_gpu_host(cluster: RayCluster, tiny_model_dir: Path) -> None:
    if len(cluster.nodes) < 2:
        cluster.add_node("h1")
    with serving_front(cluster, tiny_model_dir) as front:
        images = burst(front.address, 16)
    assert [image.size for image in images] == [(64, 64)] * 16
    by_host = Counter(node_ip(image.info["replica"]) for image in images)
    assert set(by_host) == {host.address for host, _ in cluster.nodes}, f"images per host: {by_host}"
