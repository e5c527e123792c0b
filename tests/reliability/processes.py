"""Services as real `zsplit serve` processes, so tests can signal them and read their /proc accounting."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ZSPLIT = [sys.executable, "-m", "zimage_split.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ProcessStats:
    open_fds: int
    threads: int
    rss_bytes: int


def process_stats(pid: int) -> ProcessStats:
    """File descriptors, threads and resident memory of a live process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return ProcessStats(
        open_fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(fields["Threads"].strip()),
        rss_bytes=int(fields["VmRSS"].split()[0]) * 1024,
    )


def unread_bytes(port: int) -> int:
    """Bytes that arrived on the connections a local server on `port` accepted but it has not read yet
    (Linux's /proc/net/tcp*): a stopped (SIGSTOP) server's requests wait there."""
    total = 0
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        for line in (table.read_text() if table.exists() else "").splitlines()[1:]:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if int(local.rsplit(":", 1)[1], 16) == port and state == "01":  # ESTABLISHED
                total += int(queues.split(":")[1], 16)
    return total


def health_status(port: int, service: str = "", timeout: float = 2) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return int(
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            .status
        )


class ServiceProcess:
    """`zsplit serve encoder|generator --insecure` on a free loopback port; its log goes to a file."""

    def __init__(
        self,
        service: str,
        model: Path,
        *flags: str,
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.service = service
        self.port = port or free_port()
        self.log = tempfile.NamedTemporaryFile(prefix=f"zsplit-{service}-", suffix=".log", delete=False)  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                *ZSPLIT,
                "serve",
                service,
                "--model",
                str(model),
                "--port",
                str(self.port),
                "--device",
                "cpu",
                "--insecure",
                *flags,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})},
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def wait_serving(self, timeout: float = 120) -> ServiceProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.service} exited with {self.process.returncode}:\n{self.log_text()}"
                )
            try:
                if health_status(self.port, timeout=1) == health_pb2.HealthCheckResponse.SERVING:
                    return self
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.service} on port {self.port} never reported SERVING:\n{self.log_text()}")

    def stats(self) -> ProcessStats:
        return process_stats(self.pid)

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        os.unlink(self.log.name)
