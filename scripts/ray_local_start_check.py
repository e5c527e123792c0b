"""How often `ray.init()` (a local node) fails to start in a process where gRPC threads are busy.

Ray starts its local node's processes with `subprocess.Popen(preexec_fn=...)`: a fork that runs Python
before exec. With other threads running (a gRPC server answering calls), that child sometimes dies before
exec, the raylet never starts, and `ray.init` gives up after its fixed 30 s ("The current node timed out
during startup"). This starts and stops a local Ray ROUNDS times, with (`--grpc`) or without a gRPC server
that 4 client threads keep busy, and prints each start's outcome and, for a failed one, this process's
children (the one that never exec'd shows as a zombie).

    python scripts/ray_local_start_check.py --grpc --rounds 25
    python scripts/ray_local_start_check.py --rounds 25
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
from concurrent import futures
from pathlib import Path


def children() -> list[dict[str, str]]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().split()[3]) == os.getpid():
                status = dict(
                    line.split(":\t", 1)
                    for line in (entry / "status").read_text().splitlines()
                    if ":\t" in line
                )
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
                found.append({"pid": entry.name, "state": status.get("State", "?"), "command": command})
        except (OSError, ValueError):
            continue
    return found


def busy_grpc_server(stop: threading.Event) -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(8))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    def ask() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                stub.Check(health_pb2.HealthCheckRequest())

    for _ in range(4):
        threading.Thread(target=ask, daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--grpc", action="store_true", help="with a busy gRPC server in the process")
    args = parser.parse_args()
    import ray

    stop = threading.Event()
    if args.grpc:
        busy_grpc_server(stop)
    outcomes = []
    for round_number in range(args.rounds):
        started = time.monotonic()
        try:
            ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
            outcome: dict = {"ok": True}
        except Exception as error:  # Ray raises a bare Exception for the timeout
            outcome = {"ok": False, "error": str(error)[:120], "children": children()}
        outcome["seconds"] = round(time.monotonic() - started, 1)
        ray.shutdown()
        outcomes.append(outcome)
        print(round_number, json.dumps(outcome), flush=True)
    failed = sum(not outcome["ok"] for outcome in outcomes)
    print(
        f"{failed} of {len(outcomes)} local starts failed ({'with' if args.grpc else 'without'} busy gRPC threads)"
    )
    stop.set()
    os._exit(0)  # the client threads may be inside a call; nothing to clean up


if __name__ == "__main__":
    main()
