"""Replicas on hosts of their own (network namespaces, each Ray node with its own ZSPLIT_CACHE): the random
`tiny` preset is built where each replica runs, and a replica that cannot load reaches the front's log at
once, with its host, and ends the start-up after --replica-start-failures tries instead of looping.
"""

from __future__ import annotations

import re
import time
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
    wait_until_serving,
)


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
