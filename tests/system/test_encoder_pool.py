"""Several encoder processes behind one generator (and one SDK client): spread, failover, identity."""

from __future__ import annotations

import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_for
from tests.reliability.processes import ServiceProcess, free_port, unread_bytes
from zimage_split.client import Client

ENCODE = "Encode"


def samples(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def encode_calls(metrics_port: int) -> float:
    """Encode calls an encoder answered OK, from its own metrics."""
    return sum(
        count
        for (name, labels), count in samples(metrics_port).items()
        if name == "zsplit_requests_total" and ("method", ENCODE) in labels and ("code", "OK") in labels
    )


def pool_value(metrics_port: int, name: str, **labels: str) -> float:
    found = samples(metrics_port)
    return found.get((name, frozenset({"service": "generator", **labels}.items())), 0.0)


@pytest.fixture(scope="module")
def reference_encoder(tiny_model_dir: Path) -> Iterator[ServiceProcess]:
    with ServiceProcess("encoder", tiny_model_dir, "--dtype", "float32") as encoder:
        yield encoder.wait_serving()


def test_two_encoders_share_the_load_and_one_killed_loses_no_request(tiny_model_dir: Path) -> None:
    ports = [free_port(), free_port()]
    encoders = [
        ServiceProcess("encoder", tiny_model_dir, "--dtype", "float32", "--metrics-port", str(port))
        for port in ports
    ]
    generator_metrics = free_port()
    generator: ServiceProcess | None = None
    try:
        for encoder in encoders:
            encoder.wait_serving()
        pool = ",".join(encoder.address for encoder in encoders)
        # No retries: only the failover to the other encoder can save a call the kill interrupts.
        generator = ServiceProcess(
            "generator",
            tiny_model_dir,
            "--encoder",
            pool,
            "--encoder-retries",
            "0",
            "--metrics-port",
            str(generator_metrics),
        ).wait_serving()
        victim, survivor = encoders
        address = generator.address

        def generate(prompt: str) -> tuple[int, int]:
            with Client(generator=address, timeout=120) as client:
                image = client.generate(prompt, steps=1, width=64, height=64, seed=0)
            return image.size  # type: ignore[union-attr]

        with ThreadPoolExecutor(4) as threads:
            list(threads.map(generate, [f"warm-up prompt {index}" for index in range(8)]))
        served_before = [encode_calls(port) for port in ports]
        assert all(count > 0 for count in served_before), served_before

        # Frozen, the victim holds the calls sent to it; killed, it drops them mid-call.
        victim.signal(signal.SIGSTOP)
        with ThreadPoolExecutor(16) as threads:
            results = threads.map(generate, [f"a distinct prompt number {index}" for index in range(16)])
            # Frozen, it reads nothing: a call sent to it waits, unread, in its socket.
            wait_for(lambda: unread_bytes(victim.port) > 0, 30, "a call to reach the frozen encoder")
            victim.signal(signal.SIGKILL)
            victim.process.wait(10)
            sizes = list(results)
        assert sizes == [(64, 64)] * 16
        assert pool_value(generator_metrics, "zsplit_encoder_healthy", encoder=victim.address) == 0
        assert pool_value(generator_metrics, "zsplit_encoder_healthy", encoder=survivor.address) == 1
        # Some of the 16 were on the victim when it died, and moved to the survivor.
        failed_over = pool_value(
            generator_metrics, "zsplit_encoder_calls_total", encoder=victim.address, code="UNAVAILABLE"
        )
        assert failed_over >= 1
        assert encode_calls(ports[1]) >= served_before[1] + 16 - 8
    finally:
        if generator is not None:
            generator.stop()
        for encoder in encoders:
            encoder.stop()


def test_an_encoder_serving_another_model_is_refused_at_start_up(
    tiny_model_dir: Path, reference_encoder: ServiceProcess
) -> None:
    with ServiceProcess(
        "encoder", tiny_model_dir, "--dtype", "float32", "--max-sequence-length", "256"
    ) as other:
        other.wait_serving()
        generator = ServiceProcess(
            "generator", tiny_model_dir, "--encoder", f"{reference_encoder.address},{other.address}"
        )
        try:
            exit_code = generator.process.wait(120)
        except subprocess.TimeoutExpired:
            generator.stop()
            raise
        log = generator.log_text()
        generator.stop()
    assert exit_code != 0, log
    assert f"The encoder at {other.address} serves" in log, log
    assert "max_sequence_length 256" in log and "max_sequence_length 512" in log, log
    assert reference_encoder.address in log, log


def test_the_sdk_encodes_with_one_of_two_encoders_down(reference_encoder: ServiceProcess) -> None:
    down = f"127.0.0.1:{free_port()}"
    with Client(encoder=f"{down},{reference_encoder.address}", timeout=30) as client:
        for index in range(4):  # every encoder gets its turn, the down one included
            embeddings = client.encode(f"prompt {index}")
            assert embeddings[0].tensor.shape[0] > 0
