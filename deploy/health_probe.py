"""Exits 0 when a zimage-split service reports SERVING on grpc.health.v1, 1 otherwise (for Docker, systemd, scripts).

Usage: python deploy/health_probe.py HOST:PORT [SERVICE] [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", help="HOST:PORT of the encoder (50051) or generator (50052)")
    parser.add_argument(
        "service",
        nargs="?",
        default="",
        help="'' (the whole server, default), zimage.encoder.v1.EncoderService "
        "or zimage.generator.v1.GeneratorService",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer (5)")
    args = parser.parse_args()
    with grpc.insecure_channel(args.address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            # Not listening yet, or already draining after SIGTERM: both mean "do not send work here".
            print(f"{args.address}: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address} {args.service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
