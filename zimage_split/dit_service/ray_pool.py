"""The generator front's view of a Ray Serve deployment of DiT replicas; same contract as LocalWorker.

Routing (to the replica with the fewest requests in flight), batching, restarts and autoscaling are
Serve's. This module adds what the service promises on top: embeddings put once in the object store,
retries on another replica when one dies, idempotent request ids, and typed errors.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from typing import Any

import torch

from zimage_split.common.errors import (
    BUSY,
    ERRORS_BY_CODE,
    DeadlineExceeded,
    ResourceExhausted,
    Unavailable,
    ZSplitError,
)
from zimage_split.common.server import reclaim_stop_signals
from zimage_split.dit_service.config import EngineOptions, RayOptions
from zimage_split.dit_service.engine import EngineInfo, GenerationJob
from zimage_split.dit_service.ray_capacity import ReplicaShape, check_capacity, live_nodes
from zimage_split.dit_service.ray_replica import ReplicaImage, ReplicaJob, ReplicaProgress, build_deployment
from zimage_split.dit_service.replica_starts import StartFailure, create_log, log_failures
from zimage_split.dit_service.worker import WorkerResult
from zimage_split.model_source import ModelSource

logger = logging.getLogger(__name__)

APP_NAME = "zsplit-generator"
MAX_ATTEMPTS = 3
# While the replicas start, how often the front logs how many are ready.
PROGRESS_REPORT_SECONDS = 30.0


# Whether this process started the Ray it is connected to (--ray-address local), and so must stop it.
_started_here = False


def connect(address: str) -> bool:
    """Joins or starts Ray; returns True if this process started it (and so must stop it)."""
    global _started_here
    import ray

    if ray.is_initialized():
        return _started_here
    if address == "local":
        _start_local_ray()
        _started_here = True
        return True
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError) as error:
        raise Unavailable(
            f"Cannot join the Ray cluster at {address!r}: {error}. Start it with `ray start --head` "
            "(or pass --ray-address local to run Ray inside this process)."
        ) from error
    return False


def _stop_own_ray() -> None:
    """Stops Serve and the Ray this process started."""
    global _started_here
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    _started_here = False


# Ray waits a fixed 30 s for a new node's raylet to register. Ray starts its processes with a fork that runs
# Python (a preexec_fn) before exec; in a process where other threads run (gRPC's), that child can deadlock
# or die before exec, and the raylet never starts: 3 of 35 starts with a busy gRPC server in the process,
# 0 of 25 without (scripts/ray_local_start_check.py). Generators start their local Ray before their port
# opens (`open_generator_port`); the second try is for other callers (benchmarks, tests) that start it later.
LOCAL_RAY_TRIES = 2
LOCAL_RAY_RETRY_PAUSE_S = 5.0


def _start_local_ray() -> None:
    import ray

    for attempt in range(1, LOCAL_RAY_TRIES + 1):
        try:
            ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
            return
        except Exception as error:
            if "timed out during startup" not in str(error) or attempt == LOCAL_RAY_TRIES:
                raise
            logger.warning("Ray's local node did not start (%s); trying once more.", error)
            ray.shutdown()
            time.sleep(LOCAL_RAY_RETRY_PAUSE_S)


def replica_failure(error: RuntimeError) -> ZSplitError:
    """Why the replicas did not start, as our error: serve.run only says the deployment failed, and keeps the
    constructor's traceback in the deployment's status. A replica on a GPU host that cannot run --attention
    flash, say, then fails the front with the same InvalidArgument an in-process engine raises.
    """
    from ray import serve

    try:
        message = serve.status().applications[APP_NAME].deployments["DiTReplica"].message
    except (KeyError, AttributeError):
        message = ""
    last = (message.strip().splitlines() or [str(error)])[-1]
    name, _, text = last.partition(": ")
    ours = {f"{cls.__module__}.{cls.__name__}": cls for cls in ERRORS_BY_CODE.values()}
    if name in ours:
        return ours[name](text)
    return Unavailable(f"The Ray replicas failed to start: {last}")


def replica_shape(device: str, cluster_gpus: float, cpus_per_replica: float) -> ReplicaShape:
    """What Ray reserves per replica: a GPU for --device cuda, and for auto when the cluster has GPUs."""
    use_gpu = device.startswith("cuda") or (device == "auto" and cluster_gpus > 0)
    return ReplicaShape(gpus=1.0 if use_gpu else 0.0, cpus=cpus_per_replica)


def _warn_if_busy(replicas: int, shape: ReplicaShape, available: dict[str, float]) -> None:
    """The cluster can hold the replicas, but other jobs may hold what they need now: say so, as they wait."""
    free_gpus, free_cpus = available.get("GPU", 0.0), available.get("CPU", 0.0)
    if free_gpus + 1e-4 < replicas * shape.gpus or free_cpus + 1e-4 < replicas * shape.cpus:
        logger.warning(
            "Ray has %g GPUs and %g CPUs free now, and %d replicas need %s each: they wait until other jobs "
            "free them (at most --replica-start-timeout)",
            free_gpus,
            free_cpus,
            replicas,
            shape.describe(),
        )


def _start_failure(failure: StartFailure, count: int) -> ZSplitError:
    """The error the front exits with after `count` failed replica starts, the last being `failure`: the
    replica's own error class (ours) with its host, or Unavailable."""
    text = (
        f"{count} Ray replica start(s) failed (--replica-start-failures); the last, on {failure.replica}: "
        f"{failure.message}"
    )
    ours = {f"{cls.__module__}.{cls.__name__}": cls for cls in ERRORS_BY_CODE.values()}
    cls = ours.get(failure.error_type)
    return cls(text) if cls is not None else Unavailable(f"{text} ({failure.error_type})")


def _wait_until_running(
    replicas: int,
    shape: ReplicaShape,
    timeout_s: float,
    failures: Any = None,
    max_failures: int = 3,
    abandon: threading.Event | None = None,
) -> None:
    """Waits until every replica has loaded and warmed up; raises the replicas' own error if one failed, and
    DeadlineExceeded, saying what is missing, after `timeout_s`. Each failed start reported to `failures`
    (a StartFailureLog) is logged at once; after `max_failures` of them the last one's error is raised.
    Once `abandon` is set (a stop signal came), it raises Unavailable."""
    import ray
    from ray import serve

    started = time.monotonic()
    next_report = started + PROGRESS_REPORT_SECONDS
    failed = 0
    while True:
        _raise_if_abandoned(abandon)
        reported = []
        if failures is not None:
            try:
                reported = ray.get(failures.take.remote(), timeout=30)
            except Exception as error:  # the log is gone: Serve's own status still ends the wait
                logger.warning("Cannot read the replicas' failed starts (%s); going on without them.", error)
                failures = None
        failed += len(reported)
        log_failures(reported, failed, max_failures)
        if reported and failed >= max_failures:
            raise _start_failure(reported[-1], failed)
        application = serve.status().applications.get(APP_NAME)
        if application is not None and application.status == "RUNNING":
            return
        if application is not None and application.status == "DEPLOY_FAILED":
            raise replica_failure(RuntimeError(application.message))
        deployment = application.deployments.get("DiTReplica") if application is not None else None
        running = int(deployment.replica_states.get("RUNNING", 0)) if deployment is not None else 0
        serve_says = deployment.message.strip() if deployment is not None and deployment.message else ""
        waited = time.monotonic() - started
        if waited > timeout_s:
            free, total = ray.available_resources(), ray.cluster_resources()
            raise DeadlineExceeded(
                f"{running} of {replicas} Ray replicas were ready after {timeout_s:g} s "
                f"(--replica-start-timeout). Each needs {shape.describe()} on one node; the cluster has "
                f"{free.get('GPU', 0.0):g} of {total.get('GPU', 0.0):g} GPUs and {free.get('CPU', 0.0):g} of "
                f"{total.get('CPU', 0.0):g} CPUs free. Ray Serve says: {serve_says or 'nothing'}. Replicas "
                "waiting for resources (another job holds them, or a node left): free them, add nodes or pass "
                "fewer --replicas. Replicas still loading the model (a slow disk, --compile): raise "
                "--replica-start-timeout."
            )
        if time.monotonic() >= next_report:
            logger.warning(
                "%d of %d Ray replicas ready after %.0f s; Ray Serve says: %s",
                running,
                replicas,
                waited,
                serve_says or "nothing",
            )
            next_report += PROGRESS_REPORT_SECONDS
        time.sleep(0.5)


def _raise_if_abandoned(abandon: threading.Event | None) -> None:
    if abandon is not None and abandon.is_set():
        raise Unavailable("The generator was stopped while its Ray replicas were starting.")


def _undeploy(handle: Any, owns_ray: bool) -> None:
    """Removes the front's Serve application (and the Ray it started, if any): no replica outlives it."""
    from ray import serve

    # Stop the handle's router first: it pushes autoscaling metrics to Serve every 10 s from a thread of
    # its own, and a push that lands after Ray disconnects at exit kills the process with an error.
    handle.shutdown()
    try:
        serve.delete(APP_NAME)
    finally:
        if owns_ray:
            _stop_own_ray()


# How long a front stopped during its start-up waits for its Serve application to be removed.
ABANDON_SECONDS = 40.0
# How often a running front looks for replicas (restarted, or added as GPU hosts join) that failed to start.
FAILURE_CHECK_SECONDS = 5.0


class RayWorkerPool:
    def __init__(
        self, handle: Any, info: EngineInfo, *, max_queue: int, owns_ray: bool, failures: Any = None
    ) -> None:
        self.handle = handle
        self.info = info
        self.max_queue = max_queue
        self._owns_ray = owns_ray
        self._failures = failures
        self._failed_starts = 0
        self._watch: asyncio.Task[None] | None = None
        # One object-store copy per cached embedding tensor, by id; dropped when the cache drops the tensor.
        # Not a WeakKeyDictionary: its lookups compare tensors with ==, which fails for a tensor already in it.
        self._refs: dict[int, Any] = {}
        self._in_flight: dict[str, asyncio.Future[WorkerResult]] = {}
        self._outstanding = 0

    @property
    def outstanding(self) -> int:
        """Jobs dispatched to the replicas and not finished (queued in Serve, batching or running)."""
        return self._outstanding

    def loaded_loras(self) -> frozenset[str]:
        """None known: each replica keeps its own adapter cache, and this front does not ask them."""
        return frozenset()

    @property
    def failed_starts(self) -> int:
        return self._failed_starts

    def replica_count(self) -> int:
        from ray import serve

        status = serve.status().applications[APP_NAME].deployments["DiTReplica"]
        return int(status.replica_states.get("RUNNING", 0))

    @classmethod
    async def start(
        cls,
        source: ModelSource,
        options: RayOptions,
        *,
        device: str,
        dtype: str,
        max_queue: int,
        engine: EngineOptions,
    ) -> RayWorkerPool:
        """Joins or starts Ray, deploys the replicas and waits until they have loaded (and warmed up) the model.

        Cancelled (a stop signal during the start-up), it removes the application it deployed, waiting up to
        ABANDON_SECONDS: replicas that went on loading without a front would hold their GPUs for nothing.
        """
        abandon = threading.Event()
        loop = asyncio.get_running_loop()

        def deploy() -> tuple[Any, bool, Any]:
            owns_ray = connect(options.address)
            # ray.init put a SIGTERM handler of its own on top of ours, which would abort this process on a
            # stop during the rest of the start-up: ours again, from the loop's thread.
            loop.call_soon_threadsafe(reclaim_stop_signals)
            return cls._deploy(
                source,
                options,
                owns_ray,
                device=device,
                dtype=dtype,
                max_queue=max_queue,
                engine=engine,
                abandon=abandon,
            )

        # Ray's set-up calls block; run them off the event loop.
        deploying = asyncio.ensure_future(asyncio.to_thread(deploy))
        try:
            handle, owns_ray, failures = await asyncio.shield(deploying)
        except asyncio.CancelledError:
            abandon.set()
            done, _ = await asyncio.wait({deploying}, timeout=ABANDON_SECONDS)
            if deploying in done and deploying.exception() is None:  # it had just finished
                handle, owns_ray, _ = deploying.result()
                await asyncio.to_thread(_undeploy, handle, owns_ray)
            elif not done:
                logger.error(
                    "The Ray Serve application %s may still be deployed: remove it with "
                    "`serve shutdown` or restart the generator.",
                    APP_NAME,
                )
            raise
        info, _ = await handle.info.remote()
        pool = cls(handle, info, max_queue=max_queue, owns_ray=owns_ray, failures=failures)
        pool._watch = asyncio.ensure_future(pool._log_failed_starts())
        return pool

    async def _log_failed_starts(self) -> None:
        """After start-up, replicas that fail to start (Serve restarts them, or adds them as GPU hosts join)
        are logged at ERROR with their host; the front keeps serving on the others."""
        readable = True
        while True:
            await asyncio.sleep(FAILURE_CHECK_SECONDS)
            try:
                reported = await self._failures.take.remote()
            except Exception as error:  # Ray going down at exit, or the log's node gone
                if readable:
                    logger.warning(
                        "Cannot read the replicas' failed starts (%s); Ray's logs have them.", error
                    )
                readable = False
                continue
            readable = True
            self._failed_starts += len(reported)
            log_failures(reported, self._failed_starts, None)

    @staticmethod
    def _deploy(
        source: ModelSource,
        options: RayOptions,
        owns_ray: bool,
        *,
        device: str,
        dtype: str,
        max_queue: int,
        engine: EngineOptions,
        abandon: threading.Event | None = None,
    ) -> tuple[Any, bool, Any]:
        import ray
        from ray import serve

        try:
            nodes = live_nodes(ray.nodes())
            gpus = sum(node.gpus for node in nodes)
            shape = replica_shape(device, gpus, options.cpus_per_replica)
            if options.replicas is None and gpus == 0:
                raise Unavailable(
                    "--replicas auto makes one replica per GPU, but the Ray cluster has no GPUs. "
                    "Pass --replicas N for N CPU replicas."
                )
            replicas = max(1, int(gpus)) if options.replicas is None else options.replicas
            check_capacity(replicas, shape, nodes)
            # CPU replicas: options that need a GPU fail here, before any replica starts.
            if shape.gpus == 0:
                from zimage_split.devices import parse_dtype

                cpu = torch.device("cpu")
                engine.resolved(cpu, parse_dtype(dtype, cpu))
            _warn_if_busy(replicas, shape, ray.available_resources())
            application = build_deployment(
                source,
                device=device,
                dtype=dtype,
                replicas=options.replicas,
                gpu_count=int(gpus),
                gpus_per_replica=shape.gpus,
                cpus_per_replica=shape.cpus,
                torch_threads=options.torch_threads,
                max_batch_size=options.max_batch_size,
                max_batch_wait_seconds=options.max_batch_wait_ms / 1000,
                max_queue=max_queue,
                engine=engine,
            )
            _raise_if_abandoned(abandon)
            serve.start(http_options={"location": "NoServer"})
            failures = create_log()
            # Not serve.run: it waits for the replicas with no deadline, and a replica whose resources are
            # gone (a node left, another job took them) stays pending forever.
            logger.info(
                "Deploying Ray Serve application %s: %d replica(s), each on %s",
                APP_NAME,
                replicas,
                shape.describe(),
            )
            handle = serve._run(application, _blocking=False, name=APP_NAME, route_prefix=None)
            try:
                _wait_until_running(
                    replicas, shape, options.start_timeout_s, failures, options.max_start_failures, abandon
                )
            except BaseException:
                handle.shutdown()
                serve.delete(APP_NAME)  # no replica may start later without a front
                raise
        except BaseException:
            if owns_ray:
                _stop_own_ray()
            raise
        logger.info("Ray Serve application %s is running", APP_NAME)
        return handle, owns_ray, failures

    def _object_ref(self, tensor: torch.Tensor | None) -> Any:
        import ray

        if tensor is None:
            return None
        ref = self._refs.get(id(tensor))
        if ref is None:
            ref = self._refs[id(tensor)] = ray.put(tensor)
            weakref.finalize(tensor, self._refs.pop, id(tensor), None)
        return ref

    async def replica_states(self) -> list[dict[str, Any]]:
        """Each live replica's counters. Serve picks the replica per call, so ask until all have answered."""
        running = await asyncio.to_thread(self.replica_count)
        states: dict[int, dict[str, Any]] = {}
        for _ in range(running * 10):
            _, state = await self.handle.info.remote()
            states[state["pid"]] = state
            if len(states) >= running:
                break
        return list(states.values())

    async def run(self, job: GenerationJob, *, request_id: str = "") -> WorkerResult:
        """Runs the job on some replica; a repeated request_id joins the run already in flight."""
        if request_id and request_id in self._in_flight:
            return await asyncio.shield(self._in_flight[request_id])
        future: asyncio.Future[WorkerResult] = asyncio.ensure_future(self._run_with_retries(job, request_id))
        self._outstanding += 1
        future.add_done_callback(self._finished)
        if request_id:
            self._in_flight[request_id] = future
            future.add_done_callback(lambda _: self._in_flight.pop(request_id, None))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.cancel()
            raise

    def _finished(self, _: asyncio.Future[WorkerResult]) -> None:
        self._outstanding -= 1

    async def _run_with_retries(self, job: GenerationJob, request_id: str) -> WorkerResult:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError

        replica_job = ReplicaJob(
            request_id=request_id,
            params=job.params,
            prompt_embeds=self._object_ref(job.prompt_embeds),
            negative_prompt_embeds=self._object_ref(job.negative_prompt_embeds),
            init_image=job.init_image,
            mask_image=job.mask_image,
            control_image=job.control_image,
            output=job.output,
        )
        last_step = 0
        dispatched = time.perf_counter()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            stream = self.handle.options(stream=True, method_name="generate").remote(replica_job)
            try:
                async for event in stream:
                    if isinstance(event, ReplicaProgress):
                        # After a retry the new replica starts over; report only new progress.
                        if event.step > last_step and job.on_step is not None:
                            last_step = event.step
                            job.on_step(event.step, event.total, event.replica)
                    elif isinstance(event, ReplicaImage):
                        # Everything but the replica's own work: Serve's queue, the batch wait, transfers,
                        # and any attempt lost to a dead replica.
                        busy = event.image.denoise_seconds + event.image.decode_seconds
                        return WorkerResult(
                            image=event.image,
                            queue_seconds=max(0.0, time.perf_counter() - dispatched - busy),
                            replica=event.replica,
                            batch_size=event.batch_size,
                        )
            except asyncio.CancelledError:
                stream.cancel()
                raise
            except BackPressureError:
                raise ResourceExhausted(
                    f"All generator replicas are busy (more than {self.max_queue} requests queued); retry later.",
                    retry_after_seconds=1.0,
                    reason=BUSY,
                ) from None
            except (ActorDiedError, ActorUnavailableError, RayActorError) as error:
                logger.warning("Replica died during request %s (attempt %d): %s", request_id, attempt, error)
                await asyncio.sleep(0.2 * attempt)
                continue
            raise Unavailable(f"Request {request_id} ended without an image; retry it.")
        raise Unavailable(f"Replicas kept failing during request {request_id} ({MAX_ATTEMPTS} attempts).")

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        _undeploy(self.handle, self._owns_ray)
