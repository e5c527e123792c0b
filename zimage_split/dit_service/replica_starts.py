"""How a Ray replica's failed start reaches the generator front.

Ray Serve restarts a replica whose constructor raised, without end once another replica has started, and
keeps the error in its controller's log on the head: the front would wait, saying nothing. So each replica
that fails to load or warm up reports its error, with its host and name, to a small actor the front owns
(`StartFailureLog`); the front logs every report at ERROR and, while it starts, gives up after
`--replica-start-failures` of them with the last one's error. The actor lives as long as the front.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# Named in its own namespace so that replicas (in Serve's namespace) find the front's actor.
LOG_NAME = "zsplit-generator-start-failures"
NAMESPACE = "zsplit"


@dataclass(frozen=True)
class StartFailure:
    replica: str  # hostname/node IP/pid, and the GPUs Ray reserved
    error_type: str  # the exception's module-qualified class name
    message: str
    traceback: str

    def summary(self) -> str:
        return f"{self.error_type.rsplit('.', 1)[-1]}: {self.message}"


class StartFailureLog:
    """A Ray actor: replicas append their failed starts, the front takes them."""

    def __init__(self) -> None:
        self._failures: list[StartFailure] = []

    def report(self, failure: StartFailure) -> None:
        self._failures.append(failure)

    def take(self) -> list[StartFailure]:
        taken, self._failures = self._failures, []
        return taken


def create_log() -> Any:
    """The front's StartFailureLog (an actor handle); a left-over one of the same name is reused.

    It runs on the front's own node: placed anywhere, it died with whichever GPU host it landed on, and with
    it every later report, just when that host's replacement replicas had failures to tell.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0)(StartFailureLog)
    return actor.options(
        name=LOG_NAME, namespace=NAMESPACE, get_if_exists=True, scheduling_strategy=here
    ).remote()


def report_failure(replica: str, error: BaseException) -> None:
    """Sends `error` to the front's log, from a replica whose start failed. Never raises: the replica's own
    error is what Serve must see, and a front that is gone has nobody to tell."""
    import ray

    failure = StartFailure(
        replica=replica,
        error_type=f"{type(error).__module__}.{type(error).__qualname__}",
        message=str(error),
        traceback="".join(traceback.format_exception(error)),
    )
    try:
        log = ray.get_actor(LOG_NAME, namespace=NAMESPACE)
        ray.get(log.report.remote(failure), timeout=10)
    except Exception as problem:  # the front is gone, or Ray is shutting down
        logger.warning("Could not report this replica's failed start to the front: %s", problem)


def log_failures(failures: list[StartFailure], total: int, limit: int | None) -> None:
    """Logs each failed start at ERROR, with its replica, and (while starting) how many of `limit` so far."""
    for index, failure in enumerate(failures, start=total - len(failures) + 1):
        budget = f" ({index} of at most {limit} while starting)" if limit else ""
        logger.error("Replica %s failed to start%s: %s", failure.replica, budget, failure.summary())
        logger.debug("Its traceback:\n%s", failure.traceback)
