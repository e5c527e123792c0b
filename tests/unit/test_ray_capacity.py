"""What the replicas ask of a Ray cluster and when its nodes cannot hold them, and the Ray options' checks."""

from __future__ import annotations

import pytest

from zimage_split.common.errors import InvalidArgument, Unavailable
from zimage_split.dit_service.config import GeneratorConfig, RayOptions
from zimage_split.dit_service.ray_capacity import (
    NodeResources,
    ReplicaShape,
    check_capacity,
    live_nodes,
    replicas_that_fit,
)

GPU_HOST = NodeResources("10.0.0.1", gpus=4, cpus=16)
SMALL_GPU_HOST = NodeResources("10.0.0.2", gpus=2, cpus=1)
CPU_HOST = NodeResources("10.0.0.3", gpus=0, cpus=8)


def test_live_nodes_read_ray_nodes_and_skip_dead_ones() -> None:
    nodes = [
        {
            "Alive": True,
            "NodeManagerAddress": "10.0.0.1",
            "Resources": {"CPU": 16.0, "GPU": 4.0, "memory": 1e9},
        },
        {"Alive": False, "NodeManagerAddress": "10.0.0.9", "Resources": {"CPU": 8.0, "GPU": 8.0}},
        {"Alive": True, "NodeManagerAddress": "10.0.0.3", "Resources": {"CPU": 8.0}},
    ]
    assert live_nodes(nodes) == [GPU_HOST, CPU_HOST]


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        (ReplicaShape(gpus=1, cpus=1), 4 + 1),  # the small GPU host has one CPU for its two GPUs
        (ReplicaShape(gpus=1, cpus=0), 4 + 2),
        (ReplicaShape(gpus=0, cpus=2), 8 + 0 + 4),
        (ReplicaShape(gpus=0, cpus=0.3), 53 + 3 + 26),  # Ray's fixed point: 16 / 0.3 holds 53
        (ReplicaShape(gpus=0, cpus=0), None),
    ],
)
def test_replicas_fit_node_by_node(shape: ReplicaShape, expected: int | None) -> None:
    assert replicas_that_fit([GPU_HOST, SMALL_GPU_HOST, CPU_HOST], shape) == expected


def test_what_fits_passes() -> None:
    check_capacity(5, ReplicaShape(gpus=1, cpus=1), [GPU_HOST, SMALL_GPU_HOST])
    check_capacity(100, ReplicaShape(gpus=0, cpus=0), [CPU_HOST])


def test_more_gpu_replicas_than_gpus_say_what_was_asked_and_what_is_there() -> None:
    with pytest.raises(Unavailable) as raised:
        check_capacity(6, ReplicaShape(gpus=1, cpus=1), [GPU_HOST, SMALL_GPU_HOST, CPU_HOST])
    message = raised.value.message
    assert "6 replicas x (1 GPU + 1 CPU, on one node each)" in message
    assert "can hold only 5" in message
    assert "10.0.0.1: 4 GPUs, 16 CPUs; 10.0.0.2: 2 GPUs, 1 CPU; 10.0.0.3: 0 GPUs, 8 CPUs" in message
    # The small host's second GPU waits for a CPU: fewer CPUs per replica would fit all six.
    assert (
        "pass --replicas 5 (or --replicas auto: one per GPU), lower --cpus-per-replica or add nodes"
        in message
    )


def test_gpus_not_cpus_run_out() -> None:
    with pytest.raises(Unavailable) as raised:
        check_capacity(5, ReplicaShape(gpus=1, cpus=1), [GPU_HOST])
    assert "pass --replicas 4 (or --replicas auto: one per GPU) or add nodes" in raised.value.message
    assert "--cpus-per-replica" not in raised.value.message


def test_gpu_replicas_on_a_cluster_without_gpus() -> None:
    with pytest.raises(Unavailable) as raised:
        check_capacity(1, ReplicaShape(gpus=1, cpus=1), [CPU_HOST])
    assert "the Ray cluster has no GPUs (10.0.0.3: 0 GPUs, 8 CPUs)" in raised.value.message
    assert "Pass --device cpu" in raised.value.message


def test_cpu_replicas_that_need_more_cpus_than_there_are() -> None:
    with pytest.raises(Unavailable) as raised:
        check_capacity(3, ReplicaShape(gpus=0, cpus=4), [CPU_HOST])
    assert "3 replicas x (4 CPUs, on one node each)" in raised.value.message
    assert "pass --replicas 2, lower --cpus-per-replica or add nodes" in raised.value.message


def test_an_empty_cluster() -> None:
    with pytest.raises(Unavailable, match=r"can hold only 0 \(no live nodes\).*To fix: lower --cpus"):
        check_capacity(1, ReplicaShape(gpus=0, cpus=1), [])


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"start_timeout_s": 0}, "--replica-start-timeout"),
        ({"cpus_per_replica": -1}, "--cpus-per-replica"),
        ({"replicas": 0}, "--replicas"),
        ({"max_start_failures": 0}, "--replica-start-failures"),
    ],
)
def test_ray_options_refuse_impossible_values(options: dict[str, float], flag: str) -> None:
    with pytest.raises(InvalidArgument, match=flag):
        RayOptions(**options)  # type: ignore[arg-type]


def test_a_numbered_cuda_device_is_refused_with_ray() -> None:
    with pytest.raises(InvalidArgument, match="Pass --device cuda"):
        GeneratorConfig(model="tiny", encoder=None, device="cuda:1", ray=RayOptions())
    GeneratorConfig(model="tiny", encoder=None, device="cuda:1")  # one in-process engine may pick its GPU
    GeneratorConfig(model="tiny", encoder=None, device="cuda", ray=RayOptions())


def test_replica_device_uses_the_gpu_ray_gave_it_and_no_other() -> None:
    import torch

    from zimage_split.dit_service.ray_replica import replica_device

    # No reserved GPU: never CUDA, even where the host has one (Ray leaves CUDA_VISIBLE_DEVICES alone then).
    assert replica_device("auto", []).type in ("cpu", "mps")
    assert replica_device("cpu", ["3"]) == torch.device("cpu")
    with pytest.raises(InvalidArgument, match="Ray reserved no GPU for this replica"):
        replica_device("cuda", [])
    if torch.cuda.is_available():
        # Whatever the physical id, the one GPU this process sees is cuda (cuda:0).
        assert replica_device("auto", ["3"]) == torch.device("cuda")
        assert replica_device("cuda", ["3"]) == torch.device("cuda")
    else:
        # A Ray node that only claims a GPU (`ray start --num-gpus 1` on a CPU host): auto computes on the CPU.
        assert replica_device("auto", ["0"]).type in ("cpu", "mps")
        with pytest.raises(InvalidArgument, match="CUDA is not available"):
            replica_device("cuda", ["0"])
