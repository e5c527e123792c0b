"""Each service in its own process, driven through the `zsplit` command line, as an operator runs them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from safetensors import safe_open

from zimage_split.client import Client

ZSPLIT = [sys.executable, "-m", "zimage_split.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(port: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(
                    f"service exited early: {process.stderr.read() if process.stderr else ''}"
                )
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"service on port {port} never reported SERVING")


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=60)


def parameter_count(folder: Path) -> int:
    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                total += _numel(handle.get_slice(name).get_shape())
    return total


def _numel(shape: list[int]) -> int:
    result = 1
    for dim in shape:
        result *= dim
    return result


@dataclass(frozen=True)
class Services:
    encoder_port: int
    generator_port: int
    encoder_metrics_port: int
    generator_metrics_port: int
    encoder_log: Path
    generator_log: Path

    def __iter__(self) -> Iterator[int]:
        return iter((self.encoder_port, self.generator_port))


def start_service(arguments: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as stderr:  # the child keeps its own descriptor
        return subprocess.Popen(
            [*ZSPLIT, "--log-format", "json", "serve", *arguments, "--insecure"],
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            stderr=stderr,
            text=True,
        )


@pytest.fixture(scope="module")
def services(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    logs = tmp_path_factory.mktemp("logs")
    ports = Services(
        free_port(), free_port(), free_port(), free_port(), logs / "encoder.log", logs / "generator.log"
    )
    model = ["--model", str(tiny_model_dir)]
    encoder = start_service(
        [
            "encoder",
            *model,
            "--port",
            str(ports.encoder_port),
            "--metrics-port",
            str(ports.encoder_metrics_port),
        ],
        ports.encoder_log,
    )
    generator = None
    try:
        wait_until_serving(ports.encoder_port, encoder)
        generator = start_service(
            [
                "generator",
                *model,
                "--port",
                str(ports.generator_port),
                "--encoder",
                f"127.0.0.1:{ports.encoder_port}",
                "--metrics-port",
                str(ports.generator_metrics_port),
            ],
            ports.generator_log,
        )
        wait_until_serving(ports.generator_port, generator)
        yield ports
    finally:
        codes = [stop(p) for p in (generator, encoder) if p is not None]
    assert codes == [0] * len(codes), "services must drain and exit cleanly on SIGTERM"


def json_log(path: Path) -> list[dict]:  # type: ignore[type-arg]
    """Every line of a --log-format json log, parsed: a line that is not JSON fails the test."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_request_ids_flow_into_both_json_logs_and_metrics_count_the_calls(services: Services) -> None:
    with Client(generator=f"127.0.0.1:{services.generator_port}") as client:
        client.generate("a logged lighthouse", request_id="e2e-7f3a", width=64, height=64, steps=1)

    def lines_of(path: Path) -> list[dict]:  # type: ignore[type-arg]
        deadline = time.monotonic() + 10  # the access line is written as the call ends
        while True:
            lines = [line for line in json_log(path) if line["request_id"] == "e2e-7f3a"]
            if lines or time.monotonic() > deadline:
                return lines
            time.sleep(0.1)

    generator_lines, encoder_lines = lines_of(services.generator_log), lines_of(services.encoder_log)
    assert any(line["message"].startswith("Generate OK") for line in generator_lines), generator_lines
    assert any(line["message"].startswith("Encode OK") for line in encoder_lines), encoder_lines
    assert {"time", "level", "logger", "message", "request_id"} <= set(encoder_lines[0])
    for port, method in (
        (services.generator_metrics_port, "Generate"),
        (services.encoder_metrics_port, "Encode"),
    ):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        assert f'zsplit_requests_total{{code="OK",method="{method}",service=' in text, text[:2000]


def test_zsplit_generate_writes_a_png_of_the_requested_size(services, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, generator_port = services
    output = tmp_path / "nested" / "fox.png"
    result = subprocess.run(
        [
            *ZSPLIT,
            "generate",
            "a red fox",
            "-o",
            str(output),
            "--generator",
            f"127.0.0.1:{generator_port}",
            "--width",
            "96",
            "--height",
            "64",
            "--seed",
            "4",
            "--steps",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "seed 4" in result.stdout and "denoising" in result.stderr
    with Image.open(output) as image:
        image.verify()
    with Image.open(output) as image:
        assert image.format == "PNG" and image.size == (96, 64)
        metadata = dict(image.text)
    assert metadata["seed"] == "4" and metadata["steps"] == "3" and metadata["prompt"]
    assert [p.name for p in output.parent.iterdir()] == ["fox.png"], "temporary files left behind"


def test_each_process_holds_only_its_own_models(services, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    encoder_port, generator_port = services
    with Client(generator=f"127.0.0.1:{generator_port}", encoder=f"127.0.0.1:{encoder_port}") as client:
        generator_info = client.generator_info()
        encoder_info = client.encoder_info()
    dit_and_vae = parameter_count(tiny_model_dir / "transformer") + parameter_count(tiny_model_dir / "vae")
    assert int(generator_info["parameter_count"]) == dit_and_vae
    assert sorted(generator_info["components"]) == ["scheduler", "transformer", "vae"]
    text_encoder = parameter_count(tiny_model_dir / "text_encoder")
    assert 0 < int(encoder_info["parameter_count"]) <= text_encoder
    assert encoder_info["components"] == ["tokenizer", "text_encoder"]


def test_zsplit_generate_without_addresses_runs_both_services_locally(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    output = tmp_path / "local.png"
    result = subprocess.run(
        [
            *ZSPLIT,
            "generate",
            "a quiet harbour",
            "-o",
            str(output),
            "--model",
            str(tiny_model_dir),
            "--width",
            "64",
            "--height",
            "80",
            "--steps",
            "2",
            "--no-progress",
            # How to reach a remote service, with none named: said to do nothing, not silently dropped.
            "--tls-ca",
            str(tmp_path / "ca.crt"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    with Image.open(output) as image:
        assert image.size == (64, 80)
    assert "zsplit: warning: --tls-ca ignored: without --generator HOST:PORT (or --encoder HOST:PORT)" in (
        result.stderr
    )


def test_unknown_model_fails_fast_with_a_hint(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *ZSPLIT,
            "serve",
            "encoder",
            "--model",
            str(tmp_path / "missing"),
            "--port",
            str(free_port()),
            "--insecure",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "NOT_FOUND" in result.stderr and "--model tiny" in result.stderr


def test_generator_with_ray_replicas_from_the_command_line(tiny_model_dir: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            *ZSPLIT,
            "serve",
            "generator",
            "--model",
            str(tiny_model_dir),
            "--port",
            str(port),
            "--encoder",
            "none",
            "--insecure",
            "--ray-address",
            "local",
            "--replicas",
            "2",
            "--cpus-per-replica",
            "0.5",
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_serving(port, process, timeout=180)
        import torch

        with Client(generator=f"127.0.0.1:{port}") as client:
            images = [
                client.generate(embeddings=torch.randn(6, 16), seed=i, width=64, height=64, steps=2)
                for i in range(4)
            ]
        assert all(image.info["replica"] for image in images)
    finally:
        code = stop(process)
    assert code == 0, "the generator stops Ray and exits cleanly on SIGTERM"


def test_the_http_gateway_process_serves_metrics_and_json_logs(services: Services, tmp_path: Path) -> None:
    port, metrics = free_port(), free_port()
    log = tmp_path / "http.log"
    arguments = ["http", "--generator", f"127.0.0.1:{services.generator_port}", "--port", str(port)]
    gateway = start_service([*arguments, "--metrics-port", str(metrics)], log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/healthz", headers={"x-request-id": "hz-1"}
                )
                with urllib.request.urlopen(request, timeout=5) as response:
                    assert response.status == 200
                break
            except OSError:
                assert gateway.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as response:
            text = response.read().decode()
        assert 'zsplit_requests_total{code="200",method="GET /healthz",service="http"} 1.0' in text, text[
            -3000:
        ]
    finally:
        assert stop(gateway) == 0
    lines = json_log(log)  # uvicorn's own lines are JSON too
    assert any(line["request_id"] == "hz-1" and "GET /healthz 200" in line["message"] for line in lines), (
        lines
    )
    assert any(line["logger"].startswith("uvicorn") for line in lines), lines
