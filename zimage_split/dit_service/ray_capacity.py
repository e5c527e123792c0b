"""Whether the Ray cluster's nodes can hold the replicas asked for, checked before any replica is created:
Ray would otherwise leave the ones that do not fit pending, and the front waiting, forever."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from zimage_split.common.errors import Unavailable

# Ray keeps resources in fixed point with 4 decimals, so 0.3 + 0.3 + 0.4 may not add up to exactly 1.0.
_EPSILON = 1e-4


@dataclass(frozen=True)
class ReplicaShape:
    """What Ray reserves for each replica, all on one node."""

    gpus: float
    cpus: float

    def describe(self) -> str:
        parts = [_amount(self.gpus, "GPU")] if self.gpus > 0 else []
        return " + ".join([*parts, _amount(self.cpus, "CPU")])


@dataclass(frozen=True)
class NodeResources:
    """One live node's total resources (not what is free now)."""

    address: str
    gpus: float
    cpus: float

    def describe(self) -> str:
        return f"{self.address}: {_amount(self.gpus, 'GPU')}, {_amount(self.cpus, 'CPU')}"


def _amount(value: float, unit: str) -> str:
    return f"{value:g} {unit}{'' if value == 1 else 's'}"


def live_nodes(nodes: Iterable[Mapping[str, object]]) -> list[NodeResources]:
    """The live nodes of `ray.nodes()`, with their GPUs and CPUs."""
    found = []
    for node in nodes:
        if not node.get("Alive"):
            continue
        resources = node.get("Resources")
        totals = resources if isinstance(resources, Mapping) else {}
        found.append(
            NodeResources(
                address=str(node.get("NodeManagerAddress", "?")),
                gpus=float(totals.get("GPU", 0.0)),
                cpus=float(totals.get("CPU", 0.0)),
            )
        )
    return found


def replicas_that_fit(nodes: Iterable[NodeResources], shape: ReplicaShape) -> int | None:
    """How many replicas of `shape` the nodes can hold at once; None when the shape reserves nothing."""
    needs = [(need, kind) for need, kind in ((shape.gpus, "gpus"), (shape.cpus, "cpus")) if need > 0]
    if not needs:
        return None
    return sum(
        min(math.floor(getattr(node, kind) / need + _EPSILON) for need, kind in needs) for node in nodes
    )


def check_capacity(replicas: int, shape: ReplicaShape, nodes: list[NodeResources]) -> None:
    """Raises Unavailable, saying what was asked, what the cluster has and how to fix it, when the nodes
    cannot hold `replicas` replicas of `shape` even with nothing else running."""
    fit = replicas_that_fit(nodes, shape)
    if fit is None or fit >= replicas:
        return
    cluster = "; ".join(node.describe() for node in nodes) or "no live nodes"
    asked = f"{replicas} replica{'s' if replicas != 1 else ''} x ({shape.describe()}, on one node each)"
    if shape.gpus > 0 and not any(node.gpus > 0 for node in nodes):
        raise Unavailable(
            f"The generator asks Ray for {asked}, but the Ray cluster has no GPUs ({cluster}). "
            "Pass --device cpu for CPU replicas, or add GPU hosts to the cluster "
            "(`ray start --address HEAD:6379` on each) and check that Ray sees their GPUs (`ray status`)."
        )
    fixes = []
    if fit > 0:
        fixes.append(
            f"pass --replicas {fit}" + (" (or --replicas auto: one per GPU)" if shape.gpus > 0 else "")
        )
    gpu_bound = replicas_that_fit(nodes, ReplicaShape(gpus=shape.gpus, cpus=0.0))
    if shape.cpus > 0 and (gpu_bound is None or gpu_bound > fit):  # CPUs are what runs out
        fixes.append("lower --cpus-per-replica")
    fixes.append("add nodes to the cluster (`ray start --address HEAD:6379` on another host)")
    raise Unavailable(
        f"The generator asks Ray for {asked}, but the cluster's nodes can hold only {fit} ({cluster}); "
        "Ray would leave the rest pending and the generator would never start. "
        f"To fix: {', '.join(fixes[:-1])}{' or ' if len(fixes) > 1 else ''}{fixes[-1]}."
    )
