"""The systemd units of deploy/systemd run as systemd would run them, on a test host that has no systemd.

What is read from a unit installed on the host (`/etc/systemd/system/NAME.service`, then its drop-ins
`NAME.service.d/*.conf` in name order): User, Group, WorkingDirectory, Environment, EnvironmentFile (a
leading `-`: optional), ExecStart (an empty `ExecStart=` resets it, as drop-ins do), PrivateTmp,
SuccessExitStatus and TimeoutStopSec. The process starts as systemd starts it: a clean environment (PATH,
HOME, USER, LOGNAME and SHELL of User=, then Environment=, then the files, later ones overriding),
`${VAR}` expanded in ExecStart, the working directory, User= and Group= with their groups, and a /tmp of
its own. A stop is KillMode=mixed: SIGTERM to the main process, SIGKILL to what is left of its group when
it has exited or TimeoutStopSec has passed. Its output goes to one log file per start, the journal.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

SYSTEM_UNITS = "/etc/systemd/system"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class UnitHost(Protocol):
    name: str

    def command(self, argv: list[str]) -> list[str]: ...

    def read(self, path: str) -> str: ...


@dataclass
class Unit:
    name: str
    user: str = "root"
    group: str | None = None
    working_directory: str = "/"
    environment: dict[str, str] = field(default_factory=dict)
    environment_files: list[str] = field(default_factory=list)
    exec_start: str = ""
    private_tmp: bool = False
    success_exit_status: set[int] = field(default_factory=lambda: {0})
    timeout_stop: float = 90.0


def read_unit(host: UnitHost, name: str) -> Unit:
    """The unit `name` (without .service) as installed on `host`, with its drop-ins applied."""
    listing = subprocess.run(
        host.command(["sh", "-c", 'ls "$0"/*.conf 2>/dev/null || true', f"{SYSTEM_UNITS}/{name}.service.d"]),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    unit = Unit(name)
    for path in [f"{SYSTEM_UNITS}/{name}.service", *sorted(listing)]:
        _apply(unit, host.read(path))
    if not unit.exec_start:
        raise ValueError(f"{name}.service on {host.name} has no ExecStart.")
    return unit


def _apply(unit: Unit, text: str) -> None:
    section = ""
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section != "[Service]":
            continue
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if key == "User":
            unit.user = value
        elif key == "Group":
            unit.group = value
        elif key == "WorkingDirectory":
            unit.working_directory = value
        elif key == "Environment":
            for assignment in shlex.split(value):
                variable, _, setting = assignment.partition("=")
                unit.environment[variable] = setting
        elif key == "EnvironmentFile":
            unit.environment_files.append(value)
        elif key == "ExecStart":
            unit.exec_start = value
        elif key == "PrivateTmp":
            unit.private_tmp = value.lower() in ("true", "yes", "1", "on")
        elif key == "SuccessExitStatus":
            unit.success_exit_status |= {int(code) for code in value.split()}
        elif key == "TimeoutStopSec":
            unit.timeout_stop = float(value.removesuffix("s"))


def parse_environment_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines as systemd reads them: comments and blank lines skipped, one level of quotes off."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def expand(command_line: str, environment: dict[str, str]) -> list[str]:
    """ExecStart's words with `${VAR}` replaced inside a word and a bare `$VAR` word split on whitespace."""
    words: list[str] = []
    for word in shlex.split(command_line):
        if re.fullmatch(r"\$[A-Za-z_][A-Za-z0-9_]*", word):
            words += environment.get(word[1:], "").split()
        else:
            words.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: environment.get(m[1], ""), word))
    return words


@dataclass
class RunningUnit:
    unit: Unit
    process: subprocess.Popen[bytes]
    journal: Path

    def log(self) -> str:
        return self.journal.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float) -> None:
        """Waits until the journal shows `text`; fails at once if the service exits first."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.unit.name} exited with {self.process.returncode} before logging {text!r}:\n"
                    f"{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.unit.name} did not log {text!r} in {timeout:.0f} s:\n{self.tail()}"
                )
            time.sleep(0.2)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self, check: bool = True) -> int:
        """`systemctl stop`: returns the main process's exit code, which (`check`) the unit must count as
        success."""
        with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
            os.kill(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=self.unit.timeout_stop)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        code = self.process.wait()
        assert not check or code in self.unit.success_exit_status, (
            f"{self.unit.name} stopped with {code}, which the unit counts as a failure:\n{self.tail()}"
        )
        return code


def start_unit(
    host: UnitHost, name: str, journal: Path, extra_arguments: tuple[str, ...] = ()
) -> RunningUnit:
    """`systemctl start NAME` on `host`: the unit as installed there, started as systemd would."""
    unit = read_unit(host, name)
    home = subprocess.run(
        host.command(["getent", "passwd", unit.user]), capture_output=True, text=True, check=True
    ).stdout.split(":")
    environment = {
        "PATH": DEFAULT_PATH,
        "HOME": home[5],
        "USER": unit.user,
        "LOGNAME": unit.user,
        "SHELL": home[6].strip(),
        **unit.environment,
    }
    for entry in unit.environment_files:
        path = entry.removeprefix("-")
        try:
            environment |= parse_environment_file(host.read(path))
        except subprocess.CalledProcessError:
            if not entry.startswith("-"):
                raise AssertionError(f"{name}: EnvironmentFile {path} is missing on {host.name}") from None
    argv = [*expand(unit.exec_start, environment), *extra_arguments]
    group = unit.group or unit.user
    # sh runs as root: a private /tmp, the working directory, then the user's identity and environment.
    script = 'set -e; if [ "$0" = yes ]; then mount -t tmpfs -o mode=1777 private-tmp /tmp; fi; cd "$1"; shift; exec "$@"'
    as_user = ["setpriv", f"--reuid={unit.user}", f"--regid={group}", "--init-groups", "env", "-i"]
    command = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "yes" if unit.private_tmp else "no",
        unit.working_directory,
        *as_user,
        *(f"{key}={value}" for key, value in environment.items()),
        *argv,
    ]
    with journal.open("ab") as output:
        process = subprocess.Popen(
            host.command(command), stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    return RunningUnit(unit, process, journal)
