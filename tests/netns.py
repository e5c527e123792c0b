"""Simulated hosts for multi-host tests: Linux network namespaces on one bridge, reachable from the test.

Each host is a network namespace with `lo` and an `eth0` on a private /24; a bridge in the root namespace
joins them and holds the .254 address, so the test process reaches every host by its IP, and every host
routes through the bridge (programs that find their own IP by routing towards the internet, as Ray does,
then find the host's address). Needs root and iproute2; `require()` skips a test where they are missing
(fails it under ZSPLIT_REQUIRE_ROOT=1, as in CI).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
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


@dataclass(frozen=True)
class HostWithOwnFiles(Host):
    """A host with a hostname and its own copy of some folders, as a separate machine has.

    `holder` is a process that keeps the host's mount and UTS namespaces; commands join them with nsenter.
    Each folder in `own` is an overlay on the machine's: reads see the machine's files, writes stay on
    this host (in a tmpfs, gone with the holder).
    """

    holder: subprocess.Popen[bytes] = field(compare=False, repr=False, kw_only=True)

    def command(self, argv: Sequence[str]) -> list[str]:
        return ["nsenter", f"--target={self.holder.pid}", "--mount", "--uts", "--net", "--", *argv]

    def read(self, path: str) -> str:
        return subprocess.run(self.command(["cat", path]), capture_output=True, text=True, check=True).stdout

    def write(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Writes `path` on this host (as root), as a file copied there would arrive."""
        script = 'umask 077 && cat > "$0" && chmod "$1" "$0"'
        subprocess.run(self.command(["sh", "-c", script, path, f"{mode:o}"]), input=data, check=True)

    @property
    def scratch(self) -> str:
        return _scratch(self.name)

    def stop(self) -> None:
        """Ends the host's namespaces (stop its processes first); its files go with them."""
        self.holder.kill()
        self.holder.wait()
        with contextlib.suppress(OSError):
            os.rmdir(self.scratch)


def with_own_files(
    host: Host,
    hostname: str,
    own: Sequence[str] = ("/etc", "/var/lib", "/opt", "/root"),
    project: tuple[str, str] | None = None,
    missing: Sequence[str] = (),
) -> HostWithOwnFiles:
    """`host` with the hostname `hostname` and its own copy of each folder in `own`.

    `project=(SOURCE, TARGET)` also shows the folder SOURCE at TARGET on this host (an overlay too, so
    nothing written there reaches SOURCE), with this Python's environment as TARGET/.venv, as if the
    project were installed there. Folders on the way to the project, the environment or its Python that
    other users cannot enter (a pyenv under /root) are replaced, on this host only, by ones they can:
    services that drop root still reach their code. Each folder in `missing` is empty on this host, as on a machine that lacks it.
    """
    root = _scratch(host.name)
    os.makedirs(root, exist_ok=True)
    lines = ["set -e", f"mount -t tmpfs -o mode=700 zsplit-host {root}"]

    def overlay(lower: str, target: str, index: int) -> None:
        upper, work = f"{root}/upper{index}", f"{root}/work{index}"
        lines.append(f"mkdir -p {upper} {work}")
        lines.append(f"mount -t overlay overlay -o lowerdir={lower},upperdir={upper},workdir={work} {target}")

    for index, folder in enumerate(own):
        overlay(folder, folder, index)
    if project is not None:
        source, target = project
        lines.append(f"mkdir -p {shlex.quote(target)}")
        overlay(shlex.quote(source), shlex.quote(target), len(own))
        if Path(sys.prefix).resolve() != Path(source, ".venv").resolve():
            lines.append(f"mkdir -p {shlex.quote(target)}/.venv")
            lines.append(f"mount --bind {shlex.quote(sys.prefix)} {shlex.quote(target)}/.venv")
        python_home = Path(os.path.realpath(sys.executable)).parent.parent  # where the venv's python links
        lines += _open_the_way(root, [Path(source), Path(sys.prefix), python_home])
    lines += [f"mount -t tmpfs -o mode=755 missing {shlex.quote(folder)}" for folder in missing]
    lines += [f"hostname {shlex.quote(hostname)}", "echo ready", "exec sleep infinity"]
    holder = subprocess.Popen(
        host.command(
            ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", "\n".join(lines)]
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert holder.stdout is not None and holder.stderr is not None
    if holder.stdout.readline().strip() != b"ready":
        holder.kill()
        raise RuntimeError(f"Host {host.name} could not get its own files: {holder.stderr.read().decode()}")
    return HostWithOwnFiles(host.name, host.namespace, host.address, holder=holder)


def _scratch(name: str) -> str:
    """Where host `name` keeps its own files: a mount point whose tmpfs is seen only on that host."""
    return f"/tmp/zsh-{os.getpid()}-{name}"


def _open_the_way(root: str, paths: Sequence[Path]) -> list[str]:
    """Shell lines that make each of `paths` reachable by any user on a host (see `with_own_files`)."""
    closed: dict[Path, list[Path]] = {}
    for path in paths:
        first = next((a for a in reversed(path.parents) if not a.stat().st_mode & stat.S_IXOTH), None)
        if first is not None:
            closed.setdefault(first, []).append(path)
    lines = []
    for index, (folder, inside) in enumerate(closed.items()):
        keep, where = f"{root}/way{index}", shlex.quote(str(folder))
        lines += [
            f"mkdir -p {keep}",
            f"mount --bind {where} {keep}",
            f"mount -t tmpfs -o mode=755 way {where}",
        ]
        for path in inside:
            relative = shlex.quote(str(path.relative_to(folder)))
            lines += [f"mkdir -p {where}/{relative}", f"mount --bind {keep}/{relative} {where}/{relative}"]
    return lines


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
