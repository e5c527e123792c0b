"""Replicas on hosts of their own (network namespaces, each Ray node with its own ZSPLIT_CACHE): the random
`tiny` preset is built where each replica runs, and a replica that cannot load reaches the front's log at
once, with its host, and ends the start-up after --replica-start-failures tries instead of looping.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import netns
from tests.system.test_multi_host_ray import (
    TEMP_DIR_PREFIX,
    RayCluster,
    burst,
    cluster_env,
    node_ip,
    processes_mentioning,
    start_front,
    tail,
    wait_for_line,
    wait_until_serving,
)
from zimage_split.client import Client


@pytest.fixture(autouse=True, scope="module")
def network_namespaces() -> None:
    netns.require()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """Two GPU hosts, h0 (the head) and h1, each with its own cache folder and so its own built presets."""
    root = tmp_path_factory.mktemp("replica-starts")
    with netns.host_network() as network:
        cluster = RayCluster(network, root, cluster_env())
        try:
            for name in ("h0", "h1"):
                cluster.start_node(network.add_host(name), env=cache_env(cluster, root / f"cache-{name}"))
            yield cluster
        finally:
            cluster.stop()
    assert network.leftovers() == [], "every namespace and interface is removed"
    assert processes_mentioning(TEMP_DIR_PREFIX) == [], "no Ray process outlives its node"


def cache_env(cluster: RayCluster, cache: Path) -> dict[str, str]:
    return cluster.env | {"ZSPLIT_CACHE": str(cache)}


def host(cluster: RayCluster, name: str) -> netns.Host:
    return next(known for known, _ in cluster.nodes if known.name == name)


def test_tiny_is_built_on_each_host_that_runs_a_replica(cluster: RayCluster) -> None:
    """The front builds `tiny` in h0's cache; the replica on h1 cannot use that path, and builds its own."""
    root = cluster.logs
    front = start_front(cluster, host(cluster, "h0"), "tiny", cache_env(cluster, root / "cache-h0"))
    try:
        wait_until_serving(front.address, front.process, front.log, timeout=240)
        images = burst(front.address, 8)
    finally:
        code = netns.stop_group(front.process, timeout=60)
    assert code == 0, tail(front.log)
    assert len(images) == 8 and {node_ip(image.info["replica"]) for image in images} <= {
        known.address for known, _ in cluster.nodes
    }
    for name in ("h0", "h1"):
        built = list((root / f"cache-{name}").rglob("model_index.json"))
        assert built, f"no tiny model was built in {name}'s cache:\n{tail(front.log)}"


def metric(address: str, name: str) -> float:
    """One unlabelled-by-cache value of the front's Prometheus metrics (plain HTTP: --insecure)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(rf"^{name}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.M)
    assert found, f"{name} is not in the metrics"
    return float(found[1])


def test_a_replica_that_fails_after_the_start_up_is_logged_and_counted_while_the_others_serve(
    cluster: RayCluster,
) -> None:
    """Both replicas start; then h1's node comes back with a cache it cannot use, so Serve's new replica
    there fails to start: the front logs it at ERROR with h1's address, counts it in Info and metrics,
    and serves on with h0's replica."""
    root = cluster.logs
    h0, h1 = host(cluster, "h0"), host(cluster, "h1")
    metrics_port = 9464
    front = start_front(
        cluster, h0, "tiny", cache_env(cluster, root / "cache-h0"), "--metrics-port", str(metrics_port)
    )
    try:
        wait_until_serving(front.address, front.process, front.log, timeout=240)
        with Client(generator=front.address, timeout=60) as client:
            before = client.generator_info()
        assert int(before.get("replicas", 0)) == 2 and int(before.get("replica_start_failures", 0)) == 0, (
            before
        )
        broken = root / "cache-h1-broken-later"
        broken.write_text("not a folder")
        netns.stop_group(next(process for known, process in cluster.nodes if known == h1))
        cluster.start_node(h1, env=cache_env(cluster, broken))
        try:
            wait_for_line(front.log, f"/{h1.address}/pid", front.process, timeout=180)
        except AssertionError as error:
            raise AssertionError(f"{error}\nServe says: {serve_says(cluster)}") from None
        info: dict = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with Client(generator=front.address, timeout=60) as client:
                info = client.generator_info()
            if int(info.get("replica_start_failures", 0)) >= 1:
                break
            time.sleep(1)
        assert int(info.get("replica_start_failures", 0)) >= 1 and int(info.get("replicas", 0)) == 1, info
        assert metric(f"{h0.address}:{metrics_port}", "zsplit_replica_start_failures") >= 1
        images = burst(front.address, 2)
        assert {node_ip(image.info["replica"]) for image in images} == {h0.address}
    finally:
        code = netns.stop_group(front.process, timeout=60)
    log = front.log.read_text(errors="replace")
    assert re.search(rf"ERROR .*Replica \S*/{re.escape(h1.address)}/pid\d+\S* failed to start", log), tail(
        front.log, 80
    )
    assert "cache-h1-broken-later" in log, tail(front.log, 80)
    assert code == 0, tail(front.log, 80)


APPLICATIONS = """
import json, sys, ray
from ray import serve
ray.init(address=sys.argv[1], logging_level="ERROR")
applications = serve.status().applications
print(json.dumps({
    name: {d: [str(status.status), status.message, dict(status.replica_states)] for d, status in app.deployments.items()}
    for name, app in applications.items()
}))
"""


def serve_applications(cluster: RayCluster) -> dict[str, dict[str, list]]:
    """The Serve applications deployed in the cluster, as a driver on the head host sees them: by name,
    each deployment's status, message and replica states."""
    result = subprocess.run(
        host(cluster, "h0").command([sys.executable, "-c", APPLICATIONS, cluster.address]),
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def serve_says(cluster: RayCluster) -> str:
    """Serve's view of the deployments (status, message, replica states), for a failure's message."""
    try:
        return json.dumps(serve_applications(cluster), indent=1)
    except AssertionError as error:
        return f"(serve status failed: {error})"


def test_a_stop_while_the_replicas_start_removes_the_serve_application(cluster: RayCluster) -> None:
    """SIGTERM while h1's replica is still loading (slowed on purpose): the front exits 0 and removes its
    Serve application first, so no replica goes on loading, and holding a GPU, without a front."""
    root = cluster.logs
    h1 = host(cluster, "h1")
    netns.stop_group(next(process for known, process in cluster.nodes if known == h1))
    slow = cache_env(cluster, root / "cache-h1") | {"ZSPLIT_TEST_LOAD_DELAY_SECONDS": "600"}
    cluster.start_node(h1, env=slow)
    front = start_front(cluster, host(cluster, "h0"), "tiny", cache_env(cluster, root / "cache-h0"))
    try:
        wait_for_line(
            front.log, "Deploying Ray Serve application zsplit-generator", front.process, timeout=180
        )
        time.sleep(3)  # the replicas are placed and loading
        front.process.send_signal(signal.SIGTERM)
        code = front.process.wait(timeout=90)
    finally:
        netns.stop_group(front.process, timeout=30)
    assert code == 0, tail(front.log, 80)
    assert "Shutdown signal while loading the model" in front.log.read_text(), tail(front.log, 80)
    assert "zsplit-generator" not in serve_applications(cluster), tail(front.log, 80)


def test_a_replica_that_cannot_load_ends_the_start_up_with_its_error(cluster: RayCluster) -> None:
    """h1's cache is a file, so its replica cannot build `tiny`: the front logs each failed start with h1's
    address within seconds, and exits non-zero after --replica-start-failures 2 with that error."""
    root = cluster.logs
    broken = root / "cache-h1-is-a-file"
    broken.write_text("not a folder")
    h1 = host(cluster, "h1")
    netns.stop_group(next(process for known, process in cluster.nodes if known == h1))
    cluster.start_node(h1, env=cache_env(cluster, broken))
    started = time.monotonic()
    front = start_front(
        cluster,
        host(cluster, "h0"),
        "tiny",
        cache_env(cluster, root / "cache-h0"),
        "--replica-start-failures",
        "2",
    )
    try:
        code = front.process.wait(timeout=240)
    finally:
        netns.stop_group(front.process, timeout=30)
    took = time.monotonic() - started
    log = front.log.read_text(errors="replace")
    assert code != 0, f"the front exits non-zero:\n{tail(front.log)}"
    failures = re.findall(
        rf"Replica \S*/{re.escape(h1.address)}/pid\d+\S* failed to start \((\d) of at most 2", log
    )
    assert failures[:2] == ["1", "2"], tail(front.log, 80)
    assert "2 Ray replica start(s) failed (--replica-start-failures); the last, on" in log, tail(
        front.log, 80
    )
    assert "cache-h1-is-a-file" in log, tail(front.log, 80)
    assert took < 200, f"{took:.0f} s"


def test_a_model_folder_missing_on_one_host_is_named_with_the_fix(
    cluster: RayCluster, tiny_model_dir: Path
) -> None:
    """The front serves a model folder that h1 does not have (h1 has its own files, without that folder):
    h1's replica fails naming the folder, h1's hostname and how to fix it, and the start-up ends."""
    h1 = host(cluster, "h1")
    netns.stop_group(next(process for known, process in cluster.nodes if known == h1))
    elsewhere = netns.with_own_files(h1, "gpu-without-model", own=(), missing=[str(tiny_model_dir.parent)])
    try:
        cluster.start_node(elsewhere, env=cache_env(cluster, cluster.logs / "cache-h1"))
        front = start_front(
            cluster, host(cluster, "h0"), tiny_model_dir, None, "--replica-start-failures", "2"
        )
        try:
            code = front.process.wait(timeout=240)
        finally:
            netns.stop_group(front.process, timeout=30)
    finally:
        netns.stop_group(next(process for known, process in cluster.nodes if known == elsewhere))
        elsewhere.stop()
    log = front.log.read_text(errors="replace")
    assert code != 0, f"the front exits non-zero:\n{tail(front.log)}"
    assert (
        f"The model folder {tiny_model_dir} (the generator front's --model) is not on host gpu-without-model"
        in log
    ), tail(front.log, 80)
    assert f"rsync -a {tiny_model_dir}/ gpu-without-model:{tiny_model_dir}/" in log, tail(front.log, 80)
