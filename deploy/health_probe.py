"""Exits 0 when a zimage-split service reports SERVING on grpc.health.v1, 1 otherwise (Docker, Kubernetes, scripts).

Usage: python deploy/health_probe.py HOST:PORT [SERVICE] [--tls-ca PEM [--tls-cert PEM --tls-key PEM]
                                                 [--tls-server-name NAME]] [--timeout SECONDS]

Health checks need no bearer token, but TLS still applies: give --tls-ca for a service started with
--tls-cert, and a client certificate too (--tls-cert/--tls-key) if it requires one (--tls-client-ca).
Only grpcio and grpcio-health-checking are needed, so the file runs on its own next to any installation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", help="HOST:PORT of the encoder (50051) or generator (50052)")
    parser.add_argument(
        "service",
        nargs="?",
        default="",
        help="'' (the whole server, default), zimage.encoder.v1.EncoderService "
        "or zimage.generator.v1.GeneratorService",
    )
    tls = parser.add_argument_group("TLS (plaintext unless one of these is given)")
    tls.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CA certificates")
    tls.add_argument("--tls-ca", metavar="PEM", help="use TLS, trusting this CA certificate")
    tls.add_argument("--tls-cert", metavar="PEM", help="client certificate, for a service with mutual TLS")
    tls.add_argument("--tls-key", metavar="PEM", help="the client certificate's private key")
    tls.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="name to expect in the server certificate, e.g. when probing 127.0.0.1",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer (5)")
    return parser


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    """A plaintext channel, or a TLS one when any TLS option is given."""
    if not (args.tls or args.tls_ca or args.tls_cert):
        return grpc.insecure_channel(args.address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(args.tls_ca),
        private_key=_read(args.tls_key),
        certificate_chain=_read(args.tls_cert),
    )
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.secure_channel(args.address, credentials, options=options)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together (a client certificate and its key)")
    try:
        channel = open_channel(args)
    except OSError as error:
        print(f"health_probe: cannot read {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            # Services listen from their first second, so a refused connection means the process is down (or
            # a TLS mismatch): either way, "do not send work here".
            print(f"{args.address}: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    # NOT_SERVING: still loading or warming up its model, or draining after SIGTERM.
    note = (
        " (loading, warming up or draining)"
        if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        else ""
    )
    print(f"{args.address} {args.service or '(server)'}: {status}{note}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
