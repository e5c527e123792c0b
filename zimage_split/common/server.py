"""gRPC server plumbing shared by both services: interceptors, health, transport limits, graceful drain."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from zimage_split.common.errors import InvalidArgument, Unavailable
from zimage_split.common.interceptors import (
    CallObserver,
    ChunkMessages,
    ErrorMappingInterceptor,
    ServingGate,
)
from zimage_split.common.metrics import (
    MetricsEndpoint,
    MetricsSettings,
    ServiceMetrics,
    metrics_settings,
    serve_metrics,
)
from zimage_split.common.security import ServerSecurity, TokenAuthInterceptor, is_loopback
from zimage_split.common.wire import CHUNK_BYTES

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Test-only fault injection: seconds each service sleeps at the start of its model load, with its port already
# open and NOT_SERVING, so tests can watch a long load. Never set it in production.
LOAD_DELAY_ENV = "ZSPLIT_TEST_LOAD_DELAY_SECONDS"

# Chunks are 1 MiB; the headroom covers the other fields of a message.
MAX_MESSAGE_BYTES = 8 << 20
# After a drain, how long calls whose handlers have returned get to send their last messages and status.
FLUSH_SECONDS = 5.0
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


@dataclass(frozen=True)
class TransportLimits:
    """Per-server transport settings: what a connection may send (`--max-message-mb`,
    `--max-streams-per-connection`), the drain on SIGTERM, and whether the port may be shared."""

    max_message_bytes: int = MAX_MESSAGE_BYTES
    # Calls one HTTP/2 connection may have open at once; more wait in the client until one ends.
    max_streams_per_connection: int = 64
    # Seconds a SIGTERM leaves in-flight calls to finish before they are cancelled.
    shutdown_grace_seconds: float = 30.0
    # SO_REUSEPORT, which gRPC turns on by default: a second server on a port in use would then start too,
    # and the kernel would split the connections between them without a word. Off, that second server
    # fails at start-up; `--reuse-port` (on every server sharing the port) asks for the sharing.
    reuse_port: bool = False

    def __post_init__(self) -> None:
        if self.max_message_bytes < 2 * CHUNK_BYTES:
            raise InvalidArgument(
                f"max message size {self.max_message_bytes} bytes is below the {2 * CHUNK_BYTES // (1 << 20)} "
                "MiB that 1 MiB chunks plus their headers need; raise --max-message-mb."
            )
        if self.max_streams_per_connection < 1:
            raise InvalidArgument(
                f"--max-streams-per-connection must be at least 1 (got {self.max_streams_per_connection})."
            )
        if self.shutdown_grace_seconds < 0:
            raise InvalidArgument(
                f"--shutdown-grace must be >= 0 seconds (got {self.shutdown_grace_seconds})."
            )

    def grpc_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
            ("grpc.so_reuseport", int(self.reuse_port)),
        ]


@dataclass
class RunningServer:
    server: aio.Server
    port: int
    health: HealthServicer
    service_names: tuple[str, ...]
    gate: ServingGate
    metrics: ServiceMetrics
    # The Prometheus endpoint, when --metrics-port is set.
    metrics_endpoint: MetricsEndpoint | None = None

    async def set_serving(self) -> None:
        """The model has loaded and warmed up: calls pass the gate, and health reports SERVING."""
        self.gate.mark_loaded()
        for name in (*self.service_names, ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = 5.0) -> bool:
        """Drains: health reports NOT_SERVING and new calls get UNAVAILABLE at once, while calls in flight
        have `grace` seconds to finish; then the rest are cancelled. Returns True if all finished in time."""
        await self.health.enter_graceful_shutdown()
        self.gate.close()
        started = time.monotonic()
        drained = await self.gate.wait_idle(grace or 0)
        if drained:
            logger.info("Drained in %.1f s; stopping.", time.monotonic() - started)
        elif self.gate.given_up:
            logger.warning(
                "A second signal ended the drain after %.1f s; cancelling %d call(s) still running.",
                time.monotonic() - started,
                self.gate.in_flight,
            )
        else:
            logger.warning(
                "%d call(s) still running after the %.1f s grace period; cancelling them.",
                self.gate.in_flight,
                grace or 0,
            )
        # The gate counts a call until its handler returns, which can be before gRPC has sent the call's
        # last messages and status: a drained server still gives those a moment (gRPC's stop returns as soon
        # as every call is done) instead of cancelling them. Calls still running past the grace are cancelled.
        await self.server.stop(FLUSH_SECONDS if drained else 0)
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
        return drained


def check_bounds(bounds: Iterable[tuple[str, float, float, float | None, str]]) -> None:
    """Raises InvalidArgument for the first (flag, value, low, high or None, why) whose value is out of range."""
    for flag, value, low, high, why in bounds:
        if value < low or (high is not None and value > high):
            allowed = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise InvalidArgument(f"{flag} must be {allowed} (got {value}); {why}.")


def check_metrics_port(port: int, metrics_port: int | None) -> None:
    """`--metrics-port` must be a port (0 or unset: no metrics), and not the service's own."""
    if metrics_port is not None and not 0 <= metrics_port <= 65535:
        raise InvalidArgument(
            f"--metrics-port must be between 0 and 65535 (got {metrics_port}); 0 (or unset) turns metrics off."
        )
    if metrics_port is not None and metrics_port == port != 0:
        raise InvalidArgument(f"--metrics-port {metrics_port} is the service's own --port; pick another.")


def port_taken(host: str, port: int, reuse_port: bool) -> Unavailable:
    """The error for a port this server cannot listen on, saying what to do."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sharing = (
        "--reuse-port shares a port only with servers that pass it too"
        if reuse_port
        else "to share the port on purpose (the kernel then spreads connections over the servers), pass "
        "--reuse-port to each of them"
    )
    return Unavailable(
        f"Cannot listen on {address}: port {port} is in use (or {host} is not an address of this host). "
        f"Stop the server that holds it or pick another --port; {sharing}."
    )


class LateServicer(Generic[T]):
    """Stands in for a servicer built only once the model has loaded, so the port can open first: gRPC takes
    the servicer's methods when the server starts, and these forward each call to `target`. The serving gate
    lets no call through before `set_serving()`, by which time `target` is set."""

    def __init__(self, kind: type[T]) -> None:
        self._kind = kind
        self.target: T | None = None

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._kind, name)  # an AttributeError for what the servicer lacks, as gRPC expects
        if inspect.isasyncgenfunction(method):

            async def stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                async for response in getattr(self.target, name)(request, context):
                    yield response

            return stream

        async def call(request: Any, context: aio.ServicerContext) -> Any:
            return await getattr(self.target, name)(request, context)

        return call


def injected_load_delay_seconds() -> float:
    """ZSPLIT_TEST_LOAD_DELAY_SECONDS (a test-only fault injection that slows the model load), logged if set."""
    delay = float(os.environ.get(LOAD_DELAY_ENV) or 0)
    if delay > 0:
        logger.warning("%s=%s: delaying the model load on purpose (tests only).", LOAD_DELAY_ENV, delay)
    return delay


async def injected_load_delay() -> None:
    """Sleeps for ZSPLIT_TEST_LOAD_DELAY_SECONDS, if set."""
    await asyncio.sleep(injected_load_delay_seconds())


class ServiceEndpoint(Protocol):
    """The settings of a service's port and its metrics endpoint (EncoderConfig and GeneratorConfig have them)."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def security(self) -> ServerSecurity: ...
    @property
    def transport(self) -> TransportLimits: ...
    @property
    def metrics_host(self) -> str | None: ...
    @property
    def metrics_port(self) -> int | None: ...
    @property
    def metrics_token_file(self) -> str | None: ...


async def open_service_port(
    add_servicers: Callable[[aio.Server], None], service_name: str, kind: str, endpoint: ServiceEndpoint
) -> RunningServer:
    """`start_server` for the service `kind` ("encoder", "generator") as `endpoint` says: its metrics (when
    on) behind the same walls, on its host unless told otherwise, with its certificate and a token file."""
    return await start_server(
        add_servicers,
        (service_name,),
        endpoint.host,
        endpoint.port,
        endpoint.security,
        endpoint.transport,
        metrics=ServiceMetrics(kind),
        metrics_settings=metrics_settings(
            endpoint.host,
            endpoint.metrics_host,
            endpoint.metrics_port,
            token_file=endpoint.metrics_token_file,
            cert_file=endpoint.security.cert_file,
            key_file=endpoint.security.key_file,
        ),
    )


async def start_server(
    add_servicers: Callable[[aio.Server], None],
    service_names: tuple[str, ...],
    host: str,
    port: int,
    security: ServerSecurity,
    limits: TransportLimits | None = None,
    *,
    metrics: ServiceMetrics,
    metrics_settings: MetricsSettings | None = None,
) -> RunningServer:
    """Starts a server, before the model loads, that reports NOT_SERVING (and answers every other call with
    UNAVAILABLE, reason `loading`) until `set_serving()` is called after warm-up, counting its calls in
    `metrics`, which it serves to Prometheus as `metrics_settings` say, when given."""
    limits = limits or TransportLimits()
    gate = ServingGate(metrics.service, loaded=False)
    # Outermost first: the observer (request ids, spans, metrics: it sees every final status), tokens, then
    # error mapping, then the gate (whose refusals the mapping turns into UNAVAILABLE), then the chunk codec.
    interceptors: list[aio.ServerInterceptor] = [
        CallObserver(metrics),
        ErrorMappingInterceptor(),
        gate,
        ChunkMessages(),
    ]
    tokens = security.token_source()
    if tokens is not None:
        interceptors.insert(1, TokenAuthInterceptor(tokens))
    server = aio.server(interceptors=interceptors, options=limits.grpc_options())
    add_servicers(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for name in (*service_names, ""):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    credentials = security.credentials()
    if credentials is None and not is_loopback(host):
        logger.warning(
            "Serving PLAINTEXT on %s (--insecure): anyone who can reach this port can use it and read the "
            "traffic. Use --tls-cert/--tls-key (and --auth-token-file) off a trusted network.",
            address,
        )
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as error:
        raise port_taken(host, port, limits.reuse_port) from error
    endpoint = serve_metrics(metrics, metrics_settings) if metrics_settings is not None else None
    try:
        await server.start()
    except BaseException:
        if endpoint is not None:
            endpoint.stop()
        raise
    return RunningServer(
        server=server,
        port=bound,
        health=health,
        service_names=service_names,
        gate=gate,
        metrics=metrics,
        metrics_endpoint=endpoint,
    )


def catch_stop_signals() -> asyncio.Event:
    """An event that SIGINT or SIGTERM sets from now on: one watch over the load and the serving after it,
    so a signal that lands as the load ends is not lost."""
    signalled = asyncio.Event()
    _set_on_stop_signals(signalled)
    return signalled


# The event our SIGINT/SIGTERM handlers set, once catch_stop_signals has put them in place.
_caught: asyncio.Event | None = None


def reclaim_stop_signals() -> None:
    """Puts our SIGINT/SIGTERM handlers back on top after a library installed its own: Ray's driver
    (ray.init, even from a worker thread) installs one that aborts the process after ours has run. Call it
    on the event loop's thread; a no-op where catch_stop_signals was not called (tests, library users)."""
    if _caught is not None:
        _set_on_stop_signals(_caught)


def _set_on_stop_signals(signalled: asyncio.Event) -> None:
    global _caught
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signalled.set)
    _caught = signalled


async def load_until_signal(
    running: RunningServer,
    load: Coroutine[Any, Any, T],
    signalled: asyncio.Event,
    abandon_wait: float = 5.0,
) -> T | None:
    """Runs `load` (the model's load and warm-up, with the port already open) until it ends or `signalled`
    (catch_stop_signals) is set. On a signal the server stops at once (no call has got past the loading gate,
    so there is nothing to drain) and None is returned, after giving the cancelled load up to `abandon_wait`
    seconds to clean up; if `load` fails, the server stops and the error propagates."""
    loading = asyncio.ensure_future(load)
    waiting = asyncio.ensure_future(signalled.wait())
    try:
        await asyncio.wait({loading, waiting}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
    if loading.done():
        try:
            loaded = loading.result()  # a signal that came meanwhile is served by serve_until_signal: a drain
        except BaseException:
            await running.stop(0)
            raise
        # The load may have put handlers of its own in place: Ray's driver (ray.init) installs one that
        # aborts the process on SIGTERM after ours has run. Ours again, on top.
        _set_on_stop_signals(signalled)
        return loaded
    logger.info("Shutdown signal while loading the model: stopping without serving.")
    loading.cancel()
    # A load running in a thread cannot be interrupted; the caller exits without waiting for it.
    await asyncio.wait({loading}, timeout=abandon_wait)
    await running.stop(0)
    return None


def exit_abandoning_load() -> None:
    """Ends the process now (exit status 0) after a signal during the model load: waiting for the load's
    thread, which cannot be interrupted, could take minutes."""
    logging.shutdown()
    os._exit(0)


async def serve_until_signal(
    running: RunningServer,
    stop: Callable[[float], Awaitable[object]],
    grace: float,
    signalled: asyncio.Event | None = None,
) -> None:
    """Waits for SIGINT or SIGTERM (or `signalled`, from catch_stop_signals, already set if one came during
    the load), then `stop(grace)`: a drain of up to `grace` seconds, which a second signal cuts short."""
    signalled = signalled or catch_stop_signals()
    await signalled.wait()
    logger.info("Shutdown signal: NOT_SERVING, draining in-flight calls for up to %.0f s.", grace)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, running.gate.give_up)
    await stop(grace)
