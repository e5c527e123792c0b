"""docs/deploy.md run as written, on simulated hosts that each have their own files.

Each host is a network namespace (tests/netns.py) with its own hostname, /etc/hosts naming the guide's
hosts (and a name server that answers at once), and its own /etc, /var/lib, /opt and /root (overlays: what the guide's commands write there stays on
that host). The project is at /opt/zimage-split on every host, with this test's environment as its .venv.
The guide's shell blocks run as root on the host they are for, line by line as written, with these
translations (everything else runs unchanged):

- the guide's addresses (10.0.0.10, .11, .12) become the simulated hosts' addresses;
- `pip install`, `python3 -m venv` and `systemctl daemon-reload` are skipped (the project is installed);
  `hf download ... --local-dir DIR` copies the tiny random model to DIR instead (no network here);
- `systemctl enable --now UNIT` starts the unit as installed on the host, the way systemd would
  (tests/units.py: its User=, environment files, ExecStart, private /tmp), and `journalctl -u UNIT -f`
  waits for the lines its comment quotes;
- `scp` copies between the hosts' files; `ssh root@HOST CMD` runs CMD on HOST; `$EDITOR` is the edit its
  comment asks for; a comment such as `# on the encoder host` moves the following lines to that host.

What no guide command says and a test-only host needs, is set by the test and marked so: no GPU, so the
GPU hosts' zsplit.env adds `ZSPLIT_DEVICE=auto` and Ray nodes get `--num-gpus=1`, as the guide's
troubleshooting section says to rehearse a Ray set-up without GPUs.
"""

from __future__ import annotations

import ast
import io
import re
import shlex
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from tests import netns
from tests.system.test_multi_host_ray import processes_mentioning
from tests.units import RunningUnit, start_unit

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "deploy.md"
PROJECT = "/opt/zimage-split"
VENV_PATH = f"{PROJECT}/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SERVER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CWD_MARK = "@@cwd="


@pytest.fixture(autouse=True, scope="module")
def network_namespaces() -> None:
    netns.require()


def guide_blocks(section: str, subsection: str = "", language: str = "bash") -> list[str]:
    """The fenced `language` blocks of the guide under `## section...` (and `### subsection`, if given)."""
    text = GUIDE.read_text()
    part = re.split(r"^## ", text, flags=re.M)
    chosen = [chunk for chunk in part if chunk.startswith(section)]
    assert len(chosen) == 1, f"deploy.md has no single section {section!r}"
    body = chosen[0]
    if subsection:
        parts = [chunk for chunk in re.split(r"^### ", body, flags=re.M) if chunk.startswith(subsection)]
        assert len(parts) == 1, f"deploy.md's {section!r} has no single subsection {subsection!r}"
        body = parts[0]
    blocks = re.findall(rf"^```{language}\n(.*?)^```", body, flags=re.M | re.S)
    assert blocks, f"deploy.md's {section!r} {subsection!r} has no {language} block"
    return blocks


@dataclass
class Guide:
    """The hosts of one set-up and the state of the guide's commands run on them."""

    hosts: dict[str, netns.HostWithOwnFiles]  # by short name: "adm", "enc", "gpu1" (4 letters at most)
    names: dict[str, str]  # the guide's host names and addresses -> the short name of the host
    addresses: dict[str, str]  # the guide's addresses -> the simulated ones
    tiny_model: Path
    logs: Path
    units: dict[tuple[str, str], RunningUnit] = field(default_factory=dict)
    cwd: dict[str, str] = field(default_factory=dict)
    edits: dict[str, Callable[[netns.HostWithOwnFiles, str], None]] = field(default_factory=dict)
    extra_unit_arguments: dict[str, tuple[str, ...]] = field(default_factory=dict)
    replacements: list[tuple[str, str]] = field(default_factory=list)

    def translate(self, line: str) -> str:
        for old, new in self.replacements:
            line = line.replace(old, new)
        return re.sub(r"\b10\.0\.0\.1[0-9]\b", lambda m: self.addresses.get(m[0], m[0]), line)

    def host_named(self, name: str) -> netns.HostWithOwnFiles:
        return self.hosts[self.names[name]]

    def run(self, block: str, on: str, switches: dict[str, str] | None = None) -> None:
        """Runs a guide block on host `on`, line by line; `switches` maps a comment to the host it moves to."""
        pending: list[str] = []
        for raw in block.replace("\\\n", " ").splitlines():
            line = self.translate(raw.strip())
            if line.startswith("#"):
                moved = next((host for phrase, host in (switches or {}).items() if phrase in line), None)
                if moved is not None:
                    self.shell(on, pending)
                    pending, on = [], moved
                continue
            if not line or re.match(r"(python3 -m venv|\S*pip install|systemctl daemon-reload)\b", line):
                continue
            if "hf download" in line:
                target = re.search(r"--local-dir (\S+)", line)
                assert target, line
                folder = shlex.quote(target[1])
                pending.append(f"[ -e {folder}/model_index.json ] || cp -a {self.tiny_model} {folder}")
                continue
            action = self.action(line, on)
            if action is None:
                pending.append(line)
            else:
                self.shell(on, pending)
                pending = []
                action()
        self.shell(on, pending)

    def action(self, line: str, on: str) -> Callable[[], None] | None:
        words = shlex.split(line.split(" #")[0])
        comment = line.partition(" #")[2]
        if words[:3] == ["systemctl", "enable", "--now"]:
            return lambda: self.start(on, words[3])
        if words[:2] == ["journalctl", "-u"]:
            return lambda: [
                self.units[(on, words[2])].wait_for(text, 300) for text in re.findall(r'"([^"]+)"', comment)
            ]
        if words[0] == "$EDITOR":
            return lambda: self.edits[words[1]](self.hosts[on], words[1])
        if words[0] == "scp":
            return lambda: self.scp(on, [word for word in words[1:] if word != "-p"])
        if words[0] == "ssh":
            destination = self.names[words[1].split("@")[1]]
            return lambda: self.shell(destination, [shlex.join(words[2:])])
        return None

    def shell(self, on: str, lines: list[str]) -> str:
        """Runs shell lines as root on host `on`, in the folder the last lines there left; returns stdout."""
        if not lines:
            return ""
        cwd = self.cwd.get(on, "/root")
        script = "\n".join([f"cd {shlex.quote(cwd)}", *lines, f'echo "{CWD_MARK}$PWD"'])
        path = VENV_PATH if on == "adm" else SERVER_PATH  # the admin machine has zsplit's venv activated
        env = {"PATH": path, "HOME": "/root", "LANG": "C.UTF-8"}
        result = subprocess.run(
            self.hosts[on].command(
                ["env", "-i", *(f"{k}={v}" for k, v in env.items()), "bash", "-euo", "pipefail", "-c", script]
            ),
            capture_output=True,
            text=True,
            timeout=300,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, (
            f"on {on}, the guide's commands failed:\n{script}\n---\n{output[-4000:]}"
        )
        self.cwd[on] = result.stdout.rsplit(CWD_MARK, 1)[1].strip()
        with (self.logs / f"{on}-shell.log").open("a") as log:
            log.write(f"$ {script}\n{output}\n")
        return result.stdout.rsplit(CWD_MARK, 1)[0]

    def scp(self, on: str, arguments: list[str]) -> None:
        *sources, destination = arguments
        host_part, _, folder = destination.partition(":")
        target = self.host_named(host_part.split("@")[-1])
        source = self.hosts[on]
        for path in sources:
            full = path if path.startswith("/") else f"{self.cwd.get(on, '/root')}/{path}"
            data = subprocess.run(source.command(["cat", full]), capture_output=True, check=True).stdout
            mode = int(
                subprocess.run(
                    source.command(["stat", "-c", "%a", full]), capture_output=True, text=True, check=True
                ).stdout,
                8,
            )
            where = folder if not folder.endswith("/") else folder + Path(path).name
            target.write(where, data, mode)

    def start(self, on: str, unit: str) -> None:
        journal = self.logs / f"{on}-{unit}.journal"
        self.units[(on, unit)] = start_unit(
            self.hosts[on], unit, journal, self.extra_unit_arguments.get(unit, ())
        )

    def copy_files(self, on: str, files: list[str], to: str, folder: str) -> None:
        """Copies files from the admin machine to `to`, then installs them as section 3 does (640, group zsplit)."""
        self.scp(on, [*files, f"root@{to}:/root/"])
        names = " ".join(Path(file).name for file in files)
        self.shell(self.names[to], [f"cd /root && install -m 640 -g zsplit {names} {folder}/ && rm {names}"])

    def stop_all(self) -> dict[tuple[str, str], int]:
        return {key: running.stop() for key, running in reversed(list(self.units.items()))}


def hosts_file(guide: Guide, hostnames: dict[str, str]) -> bytes:
    """/etc/hosts for every host: the machine's, and the guide's names (generator.internal, ...)."""
    lines = [
        f"{guide.hosts[short].address} {name}" for name, short in guide.names.items() if name[0].isalpha()
    ]
    return (Path("/etc/hosts").read_text() + "\n" + "\n".join(lines) + "\n").encode()


@contextmanager
def guide_hosts(
    hostnames: dict[str, str], addresses: dict[str, str], tiny_model: Path, logs: Path
) -> Iterator[Guide]:
    """Hosts named `hostnames` (short name -> hostname); `addresses` maps the guide's addresses to short names.

    Every unit still running is stopped at the end, then the hosts, the network, and nothing may remain.
    """
    with netns.host_network() as network:
        hosts: dict[str, netns.HostWithOwnFiles] = {}
        guide = None
        try:
            for short, hostname in hostnames.items():
                hosts[short] = netns.with_own_files(
                    network.add_host(short), hostname, project=(str(ROOT), PROJECT)
                )
            names = {hostname: short for short, hostname in hostnames.items()} | addresses
            guide = Guide(
                hosts,
                names=names,
                addresses={guide_address: hosts[short].address for guide_address, short in addresses.items()},
                tiny_model=tiny_model,
                logs=logs,
            )
            for host in hosts.values():
                host.write("/etc/hosts", hosts_file(guide, hostnames), 0o644)
                # The machine's name server is out of the namespaces' reach, and gRPC's resolver (c-ares)
                # waits for it before it reads /etc/hosts: a local one that refuses at once, as a real
                # host's name server answers at once.
                host.write("/etc/resolv.conf", b"nameserver 127.0.0.1\n", 0o644)
            guide.cwd["adm"] = PROJECT
            yield guide
        finally:
            if guide is not None:
                for running in reversed(list(guide.units.values())):
                    if running.process.poll() is None:
                        running.stop(check=False)
            for host in hosts.values():
                host.stop()
    assert network.leftovers() == [], "every namespace and interface is removed"


def install(guide: Guide, short: str, gpu: bool) -> None:
    """Section 2 on one host: the zsplit user, the folders, the example files, the model."""
    guide.run(guide_blocks("2. Install")[0], short)
    guide.run(guide_blocks("2. Install", "What to install where")[0], short)
    if gpu:  # test-only: these hosts have no GPU
        guide.shell(short, ["echo ZSPLIT_DEVICE=auto >> /etc/zsplit/zsplit.env"])


def probe_states(address: str, ca: bytes, server_name: str, stop: threading.Event) -> list[str]:
    """Health answers of `address`, polled until SERVING or `stop`: "refused" where nothing answers."""
    seen: list[str] = []
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    options = [("grpc.ssl_target_name_override", server_name)]
    with grpc.secure_channel(address, credentials, options=options) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set():
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                state = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as error:
                state = "refused" if error.code() == grpc.StatusCode.UNAVAILABLE else error.code().name
            if not seen or seen[-1] != state:
                seen.append(state)
            if state == "SERVING":
                break
            time.sleep(0.5)
    return seen


def scrape(address: str, ca: bytes, server_name: str, token: str | None) -> int:
    """The HTTP status of GET /metrics over TLS, with `token` as bearer token if given."""
    context = ssl.create_default_context(cadata=ca.decode())
    context.check_hostname = False  # dialled by address; the certificate names the host
    request = urllib.request.Request(f"https://{address}/metrics")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def copy_generator_files(guide: Guide, to: str) -> None:
    """What set-up 1's GPU box and set-up 2's front say in words: the generator's certificates and tokens."""
    guide.copy_files(
        "adm", ["certs/ca.crt", "certs/generator.crt", "certs/generator.key"], to, "/etc/zsplit/tls"
    )
    tokens = ["tokens/generator.tokens", "tokens/generator-to-encoder.token", "tokens/metrics.tokens"]
    guide.copy_files("adm", tokens, to, "/etc/zsplit/tokens")


def sdk_one_liner() -> str:
    """Section 9's `python -c "..."` that prints the generator's Info."""
    found = re.findall(r'`(python -c "from zimage_split\.client import [^`]+)`', GUIDE.read_text())
    assert len(found) == 1, "deploy.md's section 9 has one SDK one-liner"
    return found[0]


def image_on(guide: Guide, short: str, path: str) -> Image.Image:
    data = subprocess.run(guide.hosts[short].command(["cat", path]), capture_output=True, check=True).stdout
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def check_metrics(guide: Guide, short: str, server_name: str) -> None:
    """The example's metrics: HTTPS with the service's certificate; a scrape needs metrics.tokens' token."""
    ca = guide.hosts["adm"].read(f"{PROJECT}/certs/ca.crt").encode()
    token = guide.hosts["adm"].read(f"{PROJECT}/tokens/metrics.tokens").strip()
    address = f"{guide.hosts[short].address}:9090"
    assert scrape(address, ca, server_name, token) == 200
    assert scrape(address, ca, server_name, None) == 401


@pytest.mark.timeout(900)
def test_set_up_0_a_cpu_encoder_and_one_gpu_box(tiny_model_dir: Path, tmp_path: Path) -> None:
    hostnames = {"adm": "admin.internal", "enc": "encoder.internal", "gpu": "gpu.internal"}
    with guide_hosts(hostnames, {"10.0.0.10": "enc", "10.0.0.11": "gpu"}, tiny_model_dir, tmp_path) as guide:
        for short in ("enc", "gpu"):
            install(guide, short, gpu=short == "gpu")
        guide.run(guide_blocks("4. Set-up 0")[0], "adm")  # certificates
        guide.run(guide_blocks("3. Certificates")[1], "adm")  # tokens
        guide.run(guide_blocks("3. Certificates")[2], "adm", switches={"on the encoder host": "enc"})
        # The encoder host: "exactly as set-up 2's encoder host".
        guide.run(guide_blocks("6. Set-up 2", "The encoder host")[0], "enc")
        # The GPU box: "exactly as set-up 1's GPU box, with encoder = "encoder.internal:50051" instead of the Mac".
        guide.replacements = [("mac.internal", "encoder.internal")]
        copy_generator_files(guide, "gpu.internal")
        toml = guide.translate(guide_blocks("5. Set-up 1", "On the GPU box", "toml")[0])
        assert 'encoder = "encoder.internal:50051"' in toml
        guide.hosts["gpu"].write("/etc/zsplit/zsplit.toml", toml.encode(), 0o640)
        guide.run(guide_blocks("5. Set-up 1", "On the GPU box")[0], "gpu")
        guide.run(guide_blocks("5. Set-up 1", "Check it")[0], "gpu", switches={"from a client": "adm"})
        guide.run(guide_blocks("4. Set-up 0")[1], "adm")  # its own check from the admin machine
        image = image_on(guide, "adm", f"{PROJECT}/lighthouse.png")
        assert image.info["prompt"] == "a lighthouse on a cliff at dusk" and image.info["seed"] == "7"
        # Section 9 from the admin machine, for set-up 0's names.
        guide.replacements.append(("generator.internal", "gpu.internal"))
        guide.run(guide_blocks("9. Health")[0], "adm", switches={"on the generator host": "gpu"})
        info = guide.shell("adm", [guide.translate(sdk_one_liner())])
        assert "model" in info, info
        check_metrics(guide, "enc", "encoder.internal")
        codes = guide.stop_all()
    assert set(codes.values()) == {0}, codes


@pytest.mark.timeout(900)
def test_set_up_2_a_cpu_encoder_and_two_gpu_hosts_in_one_ray_cluster(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    hostnames = {
        "adm": "admin.internal",
        "enc": "encoder.internal",
        "gpu1": "gpu1.internal",
        "gpu2": "gpu2.internal",
    }
    addresses = {
        "10.0.0.10": "enc",
        "10.0.0.11": "gpu1",
        "10.0.0.12": "gpu2",
        "generator.internal": "gpu1",
    }
    with guide_hosts(hostnames, addresses, tiny_model_dir, tmp_path) as guide:
        for short in ("enc", "gpu1", "gpu2"):
            install(guide, short, gpu=short != "enc")
        for short in ("gpu1", "gpu2"):  # test-only: a node stops at once instead of draining for 30 s
            guide.shell(short, ["echo RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 >> /etc/zsplit/zsplit.env"])
        guide.extra_unit_arguments = {
            "zsplit-ray-head": ("--num-gpus=1",),
            "zsplit-ray-worker": ("--num-gpus=1",),
        }
        head_address = f"{guide.hosts['gpu1'].address}:6379"

        def edit_ray_env(host: netns.HostWithOwnFiles, path: str) -> None:
            # "NODE_IP=10.0.0.11 on gpu1, 10.0.0.12 on gpu2; HEAD_ADDRESS=10.0.0.11:6379 on both"
            script = f"sed -i -e 's/^NODE_IP=.*/NODE_IP={host.address}/' -e 's/^HEAD_ADDRESS=.*/HEAD_ADDRESS={head_address}/' {path}"
            subprocess.run(host.command(["sh", "-c", script]), check=True)

        guide.edits["/etc/zsplit/ray.env"] = edit_ray_env
        guide.run(guide_blocks("6. Set-up 2")[0], "adm")  # certificates
        guide.run(guide_blocks("3. Certificates")[1], "adm")  # tokens
        guide.run(guide_blocks("3. Certificates")[2], "adm", switches={"on the encoder host": "enc"})
        guide.run(guide_blocks("6. Set-up 2", "The encoder host")[0], "enc")
        ray_settings, ray_token = guide_blocks("6. Set-up 2", "Both GPU hosts")
        for short in ("gpu1", "gpu2"):
            guide.run(ray_settings, short)
        guide.run(ray_token, "gpu1")
        assert guide.hosts["gpu2"].read("/etc/zsplit/ray/auth_token") == guide.hosts["gpu1"].read(
            "/etc/zsplit/ray/auth_token"
        )
        guide.run(guide_blocks("6. Set-up 2", "gpu1: the Ray head")[0], "gpu1")
        guide.run(guide_blocks("6. Set-up 2", "gpu2: the Ray worker")[0], "gpu2")
        copy_generator_files(guide, "gpu1.internal")
        # Health of the front while it starts its replicas: the port is open, NOT_SERVING, then SERVING.
        ca = guide.hosts["adm"].read(f"{PROJECT}/certs/ca.crt").encode()
        stop = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            front = f"{guide.hosts['gpu1'].address}:50052"
            states = pool.submit(probe_states, front, ca, "generator.internal", stop)
            try:
                guide.run(guide_blocks("6. Set-up 2", "gpu1: the generator front")[0], "gpu1")
                seen = states.result(timeout=60)  # it stops by itself at SERVING
            finally:
                stop.set()
        assert "NOT_SERVING" in seen and seen[-1] == "SERVING", seen
        assert "refused" not in seen[seen.index("NOT_SERVING") :], seen
        check = guide_blocks("6. Set-up 2", "Check it")[0]
        guide.run(check, "gpu1", switches={"from a client": "adm"})
        assert image_on(guide, "adm", f"{PROJECT}/fox.png").info["prompt"] == "a red fox in snow"
        # The guide's burst, again if one host took it all (as it says: Serve picks the less busy replica of
        # two, and on a loaded machine one replica's answer can come late): both hosts serve.
        burst = guide_blocks("6. Set-up 2", "Check it", "python")[0]
        replica_hosts: set[str] = set()
        for _ in range(3):
            replicas = guide.shell("adm", [f"python -c {shlex.quote(burst)}"])
            listed = ast.literal_eval(replicas.strip().splitlines()[-1])
            assert listed and all(name.count("/") >= 3 for name in listed), replicas
            replica_hosts |= {name.split("/")[0] for name in listed}
            if len(replica_hosts) == 2:
                break
        assert replica_hosts == {"gpu1.internal", "gpu2.internal"}, replicas
        guide.run(guide_blocks("9. Health")[0], "adm", switches={"on the generator host": "gpu1"})
        info = guide.shell("adm", [sdk_one_liner()])
        assert "model" in info, info
        check_metrics(guide, "gpu1", "generator.internal")
        codes = guide.stop_all()
    assert codes[("gpu1", "zsplit-generator")] == 0, codes
    assert processes_mentioning("/var/lib/zsplit/tmp") == [], "no Ray process outlives its unit"
