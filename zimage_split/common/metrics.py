"""Prometheus metrics of one service (`--metrics-port`): calls, stage latencies, caches, bytes, queue, replicas;
served behind the service's own walls (its host, its TLS certificate, an optional bearer token)."""

from __future__ import annotations

import hmac
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from zimage_split.common.encoder_pool import EncoderStatus
from zimage_split.common.errors import InvalidArgument, Unavailable

logger = logging.getLogger(__name__)

# From a cache hit (milliseconds) to a large image on a slow host (minutes).
SECONDS_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
)
STAGES = ("queue", "encode", "transfer", "denoise", "decode")


class CacheCounters(Protocol):
    """What a cache reports (ByteBoundedLRU and the stores built on it)."""

    @property
    def hits(self) -> int: ...

    @property
    def misses(self) -> int: ...

    @property
    def bytes(self) -> int: ...


class _LiveValues(Collector):
    """Values read from the service's own objects at scrape time (cache counters, queue depth, replicas),
    so they can never drift from what the service reports in Info."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.caches: dict[str, CacheCounters] = {}
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.encoders: Callable[[], Iterable[EncoderStatus]] | None = None

    def collect(self) -> Iterator[Metric]:
        labels = ["service", "cache"]
        hits = CounterMetricFamily("zsplit_cache_hits", "Cache lookups that found the entry.", labels=labels)
        misses = CounterMetricFamily("zsplit_cache_misses", "Cache lookups that did not.", labels=labels)
        ratio = GaugeMetricFamily(
            "zsplit_cache_hit_ratio", "Hits over all lookups since start (0 before any).", labels=labels
        )
        size = GaugeMetricFamily("zsplit_cache_bytes", "Bytes the cache holds now.", labels=labels)
        for name, cache in self.caches.items():
            values = [self.service, name]
            hits.add_metric(values, cache.hits)
            misses.add_metric(values, cache.misses)
            lookups = cache.hits + cache.misses
            ratio.add_metric(values, cache.hits / lookups if lookups else 0.0)
            size.add_metric(values, cache.bytes)
        yield from (hits, misses, ratio, size)
        if self.encoders is not None:
            yield from self._encoder_metrics(self.encoders())
        for name, (documentation, read) in self.gauges.items():
            gauge = GaugeMetricFamily(name, documentation, labels=["service"])
            try:
                gauge.add_metric([self.service], float(read()))
            except Exception as error:  # a scrape must not fail because one source could not answer
                logger.debug("Metric %s unavailable: %s", name, error)
                continue
            yield gauge

    def _encoder_metrics(self, encoders: Iterable[EncoderStatus]) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "zsplit_encoder_calls",
            "Calls to each encoder (Encode, and Info to check it), by final status code name.",
            labels=["service", "encoder", "code"],
        )
        healthy = GaugeMetricFamily(
            "zsplit_encoder_healthy",
            "1 while the encoder answers and serves the expected model, 0 while it is down or refused.",
            labels=["service", "encoder"],
        )
        for encoder in encoders:
            for code, count in sorted(encoder.calls.items()):
                calls.add_metric([self.service, encoder.address, code], count)
            healthy.add_metric([self.service, encoder.address], 1.0 if encoder.healthy else 0.0)
        yield from (calls, healthy)


class ServiceMetrics:
    """Every metric of one service, in a registry of its own (so services sharing a process stay apart).
    All carry a `service` label: "encoder", "generator" or "http"."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "zsplit_requests",
            "Calls answered, by method and final status code (gRPC code names; HTTP status for the gateway).",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "zsplit_request_duration_seconds",
            "Time from a call's arrival to its last response message.",
            ["service", "method"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "zsplit_stage_duration_seconds",
            "Time per stage of a request: queue (waiting for the model), encode (the text encoder's forward "
            "pass), transfer (embedding bytes between the services), denoise, decode (VAE and image file).",
            ["service", "stage"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.bytes = Counter(
            "zsplit_transferred_bytes",
            "Payload bytes sent or received, by direction and kind (embedding, image, upload).",
            ["service", "direction", "kind"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "zsplit_in_flight_requests", "Calls running now.", ["service"], registry=self.registry
        )
        self._live = _LiveValues(service)
        self.registry.register(self._live)

    def count_request(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(self.service, method, code).inc()
        self.request_seconds.labels(self.service, method).observe(seconds)

    def observe_stage(self, stage: str, seconds: float) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")
        self.stage_seconds.labels(self.service, stage).observe(max(0.0, seconds))

    def count_bytes(self, direction: str, kind: str, count: int) -> None:
        self.bytes.labels(self.service, direction, kind).inc(count)

    def watch_cache(self, name: str, cache: CacheCounters) -> None:
        self._live.caches[name] = cache

    def watch_queue_depth(self, read: Callable[[], float]) -> None:
        self._live.gauges["zsplit_queue_depth"] = (
            "Jobs accepted and waiting for the model (or, with Ray replicas, dispatched and not finished).",
            read,
        )

    def watch_replicas(self, read: Callable[[], float]) -> None:
        self._live.gauges["zsplit_replicas"] = ("Model replicas serving now.", read)

    def watch_replica_start_failures(self, read: Callable[[], float]) -> None:
        self._live.gauges["zsplit_replica_start_failures"] = (
            "Ray replicas that failed to load or warm up since the generator began serving (logged at ERROR).",
            read,
        )

    def watch_encoders(self, read: Callable[[], Iterable[EncoderStatus]]) -> None:
        """Per-encoder calls and health of the encoders this service calls, read at scrape time."""
        self._live.encoders = read


@dataclass(frozen=True)
class MetricsSettings:
    """Where and how `--metrics-port` serves: host and port (0 at this level picks a free one; the flag's 0
    means off and never gets here), the token file (`--metrics-auth-token-file`, read again when it changes),
    and the certificate and key of TLS (the service's own `--tls-cert`/`--tls-key`)."""

    host: str
    port: int
    token_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.cert_file else "http"


def metrics_settings(
    host: str,
    metrics_host: str | None,
    metrics_port: int | None,
    *,
    token_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> MetricsSettings | None:
    """The metrics endpoint of a service listening on `host`: None (off) when `--metrics-port` is unset or 0;
    else on the service's own host unless --metrics-host says otherwise, with TLS when the service has TLS."""
    if not metrics_port:
        return None
    return MetricsSettings(metrics_host or host, metrics_port, token_file, cert_file, key_file)


@dataclass
class MetricsEndpoint:
    """The HTTP server that answers Prometheus scrapes on /metrics (any path works)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Scrapes come every few seconds; they are not worth a log line each."""


def _bearer_only(app: Any, tokens: Callable[[], tuple[str, ...]]) -> Any:
    """`app`, answering 401 to a request without `Authorization: Bearer <an accepted token>`."""

    def guarded(environ: dict[str, Any], start_response: Any) -> Any:
        scheme, _, offered = str(environ.get("HTTP_AUTHORIZATION", "")).partition(" ")
        offered_bytes = offered.strip().encode()
        accepted = scheme.lower() == "bearer" and any(
            hmac.compare_digest(offered_bytes, token.encode()) for token in tokens()
        )
        if not accepted:
            start_response(
                "401 Unauthorized",
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("WWW-Authenticate", 'Bearer realm="metrics"'),
                ],
            )
            return [
                b"Missing or wrong bearer token: send Authorization: Bearer <token> (see the scrape config's "
                b"authorization.credentials_file).\n"
            ]
        return app(environ, start_response)

    return guarded


def serve_metrics(metrics: ServiceMetrics, settings: MetricsSettings) -> MetricsEndpoint:
    """Serves `metrics` on settings.host:port from a daemon thread: HTTPS with the service's certificate when
    it has one, and only to requests with an accepted bearer token when a token file is given."""
    # Copied in part from prometheus_client.exposition.start_wsgi_server, which takes no token.
    # Imported here: security imports the interceptors, which import this module.
    from zimage_split.common.security import TokenFile, is_loopback

    app = make_wsgi_app(metrics.registry)
    if settings.token_file:
        token_file = TokenFile(settings.token_file)
        app = _bearer_only(app, token_file.tokens)
    try:
        family, _, _, _, address = socket.getaddrinfo(
            settings.host.strip("[]"), settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]

        class Server(ThreadingWSGIServer):
            address_family = family

        server = make_server(str(address[0]), settings.port, app, Server, handler_class=_QuietHandler)
    except OSError as error:
        raise Unavailable(
            f"Cannot serve metrics on {settings.host}:{settings.port}: {error}. Is the port in use? Pick another "
            "--metrics-port (or --metrics-host)."
        ) from error
    if settings.cert_file and settings.key_file:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(settings.cert_file, settings.key_file)
        except (OSError, ssl.SSLError) as error:
            server.server_close()
            raise InvalidArgument(
                f"Cannot serve metrics over TLS with {settings.cert_file} and {settings.key_file}: {error}."
            ) from error
        # The handshake happens on the first read, in the request's own thread, not in the accept loop.
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    endpoint = MetricsEndpoint(server, thread)
    guard = "bearer token" if settings.token_file else "no token"
    logger.info(
        "Prometheus metrics on %s://%s:%d/metrics (%s)", settings.scheme, settings.host, endpoint.port, guard
    )
    if not settings.token_file and not is_loopback(settings.host):
        logger.warning(
            "Metrics on %s:%d need no token: anyone who can reach the port reads them. Set "
            "--metrics-auth-token-file, or bind them to loopback or a monitoring network with --metrics-host.",
            settings.host,
            endpoint.port,
        )
    return endpoint
