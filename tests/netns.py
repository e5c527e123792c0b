"""Simulated hosts for multi-host tests: Linux network namespaces on one bridge, reachable from the test.

Each host is a network namespace with `lo` and an `eth0` on a private /24; a bridge in the root namespace
joins them and holds the .254 address, so the test process reaches every host by its IP, and every host
routes through the bridge (programs that find their own IP by routing towards the internet, as Ray does,
then find the host's address). Needs root and iproute2; `require()` skips a test where they are missing
(fails it under ZSPLIT_REQUIRE_ROOT=1, as in CI).
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from tests.conftest import REQUIRE_ROOT, skip_or_fail

MAX_INTERFACE_NAME = 15  # IFNAMSIZ - 1
_networks = itertools.count()


def skip_reason() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs the multi-host tests as root)"
    if shutil.which("ip") is None:
        return "network namespaces need the `ip` command (iproute2)"
    return None


def require() -> None:
    """Skips the calling test where network namespaces cannot be made; fails it under ZSPLIT_REQUIRE_ROOT=1."""
    if (reason := skip_reason()) is not None:
        skip_or_fail(reason, REQUIRE_ROOT)


def ip(*args: str, namespace: str | None = None) -> str:
    command = ["ip", *(["-n", namespace] if namespace else []), *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed: {result.stderr.strip()}")
    return result.stdout


@dataclass(frozen=True)
class Host:
    name: str
    namespace: str
    address: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this host's network namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def start(self, argv: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
        """Starts `argv` on this host in a process group of its own; stop it with `stop_group`."""
        return subprocess.Popen(self.command(argv), start_new_session=True, **popen)


@dataclass
class HostNetwork:
    """Hosts on one bridge. Names are unique to this process (pid) and network, so parallel runs never meet."""

    prefix: str
    subnet: str  # the first three octets, e.g. "10.77.12"
    hosts: list[Host] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"{self.prefix}-br"

    @property
    def gateway(self) -> str:
        return f"{self.subnet}.254"

    def add_host(self, name: str) -> Host:
        """A new namespace `name` with eth0 on the bridge; hosts may join while others run."""
        outer = f"{self.prefix}-{name}"  # the root namespace's end of the veth; also the namespace's name
        longest = MAX_INTERFACE_NAME - len(self.prefix) - 1
        if len(name) > longest or name == "br" or any(host.name == name for host in self.hosts):
            raise ValueError(f"Host name {name!r} is taken or longer than {longest} characters.")
        host = Host(name, outer, f"{self.subnet}.{len(self.hosts) + 1}")
        ip("netns", "add", host.namespace)
        self.hosts.append(host)
        ip("link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", host.namespace)
        ip("link", "set", outer, "master", self.bridge, "up")
        ip("link", "set", "lo", "up", namespace=host.namespace)
        ip("addr", "add", f"{host.address}/24", "dev", "eth0", namespace=host.namespace)
        ip("link", "set", "eth0", "up", namespace=host.namespace)
        ip("route", "add", "default", "via", self.gateway, namespace=host.namespace)
        return host

    def close(self) -> None:
        """Removes every veth, namespace and the bridge; stop the hosts' processes first."""
        for host in self.hosts:
            # Deleting the root end removes the pair now; a deleted namespace frees its end only later.
            subprocess.run(["ip", "link", "del", f"{self.prefix}-{host.name}"], capture_output=True)
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def leftovers(self) -> list[str]:
        """Namespaces and interfaces of this network that still exist."""
        names = ip("netns", "list").split() + [
            line.split(":")[1].strip().split("@")[0] for line in ip("-o", "link", "show").splitlines()
        ]
        return [name for name in names if name.startswith(f"{self.prefix}-")]


def _free_subnet() -> str:
    """A 10.77.X.0/24 no interface uses yet, starting from one picked by our pid."""
    taken = ip("-4", "-o", "addr", "show")
    for offset in range(250):
        subnet = f"10.77.{(os.getpid() + offset) % 250 + 1}"
        if f" {subnet}." not in taken:
            return subnet
    raise RuntimeError("No free 10.77.X.0/24 subnet for a test network.")


@contextmanager
def host_network() -> Iterator[HostNetwork]:
    """A bridge with no hosts yet (add them with `add_host`); everything is removed on exit."""
    network = HostNetwork(
        prefix=f"zs{os.getpid()}{chr(ord('a') + next(_networks) % 26)}", subnet=_free_subnet()
    )
    try:
        ip("link", "add", network.bridge, "type", "bridge")
        ip("addr", "add", f"{network.gateway}/24", "dev", network.bridge)
        ip("link", "set", network.bridge, "up")
        yield network
    finally:
        network.close()


def stop_group(process: subprocess.Popen[Any], timeout: float = 30) -> int:
    """SIGTERM to the process's group (it and what it started), SIGKILL if any outlives `timeout`.

    Returns the exit code of the process itself: 0 or -15 after a clean stop, -9 if it had to be killed.
    """
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        if _group_gone(process, wait):
            break
    return process.wait()


def _group_gone(process: subprocess.Popen[Any], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        process.poll()  # reap the leader: a zombie still counts as a member of the group
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
