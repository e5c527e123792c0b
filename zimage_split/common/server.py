"""gRPC server plumbing shared by both services: interceptor, health, message limits, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from zimage_split.common.errors import Unavailable
from zimage_split.common.interceptors import ErrorMappingInterceptor
from zimage_split.common.security import ServerSecurity, TokenAuthInterceptor, is_loopback

logger = logging.getLogger(__name__)

# Chunks are 1 MiB; the headroom covers the other fields of a message.
MAX_MESSAGE_BYTES = 8 << 20
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


@dataclass
class RunningServer:
    server: aio.Server
    port: int
    health: HealthServicer
    service_names: tuple[str, ...]

    async def set_serving(self) -> None:
        for name in (*self.service_names, ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Reports NOT_SERVING, lets in-flight calls finish for `grace` seconds, then stops."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(
    add_servicers: Callable[[aio.Server], None],
    service_names: tuple[str, ...],
    host: str,
    port: int,
    security: ServerSecurity,
) -> RunningServer:
    """Starts a server that reports NOT_SERVING until `set_serving()` is called after warm-up."""
    interceptors: list[aio.ServerInterceptor] = [ErrorMappingInterceptor()]
    if security.tokens:
        interceptors.insert(0, TokenAuthInterceptor(security.tokens))
    server = aio.server(interceptors=interceptors, options=GRPC_OPTIONS)
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
        raise Unavailable(
            f"Cannot listen on {address}: {error}. Is the port already in use? Pick another --port."
        ) from error
    await server.start()
    return RunningServer(server=server, port=bound, health=health, service_names=service_names)


async def wait_for_shutdown_signal() -> None:
    """Returns on the first SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("Shutdown signal received; draining in-flight calls.")
