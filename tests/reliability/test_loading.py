"""Health from the first second: each service listens at start, says NOT_SERVING and refuses calls with
UNAVAILABLE (reason `loading`) while its model loads (slowed on purpose with ZSPLIT_TEST_LOAD_DELAY_SECONDS),
then serves; a SIGTERM during the load stops it at once."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from tests.conftest import wait_for
from tests.reliability.processes import ServiceProcess, health_status
from zimage_split.client import Client, Unavailable
from zimage_split.common.errors import LOADING
from zimage_split.common.server import LOAD_DELAY_ENV

pytestmark = pytest.mark.timeout(300)

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING
DELAY = {LOAD_DELAY_ENV: "8"}


def answers_health(port: int) -> bool:
    try:
        health_status(port, timeout=1)
    except grpc.RpcError:
        return False
    return True


def test_the_generator_listens_at_once_and_refuses_calls_while_it_loads(tiny_model_dir: Path) -> None:
    with ServiceProcess("generator", tiny_model_dir, "--encoder", "none", env=DELAY) as server:
        # The port opens before the load (delayed 8 s) is over: health answers, and says NOT_SERVING.
        wait_for(lambda: answers_health(server.port), 30, "the generator's port to open")
        assert health_status(server.port) == NOT_SERVING
        assert health_status(server.port, "zimage.generator.v1.GeneratorService") == NOT_SERVING
        with Client(generator=server.address, timeout=10) as client:
            with pytest.raises(Unavailable) as refused:
                client.generate(embeddings=torch.randn(5, 16), steps=1, width=64, height=64, seed=0)
            assert refused.value.reason == LOADING
            assert "generator is still loading its model" in refused.value.message
            assert "retry shortly" in refused.value.message
            with pytest.raises(Unavailable) as info_refused:
                client.generator_info()
            assert info_refused.value.reason == LOADING
        assert server.process.poll() is None
        server.wait_serving(120)
        with Client(generator=server.address, timeout=60) as client:
            image = client.generate(embeddings=torch.randn(5, 16), steps=1, width=64, height=64, seed=0)
            assert image.size == (64, 64)
            assert client.generator_info()
        assert "delaying the model load on purpose" in server.log_text()


def test_the_encoder_listens_at_once_and_refuses_encode_while_it_loads(tiny_model_dir: Path) -> None:
    with ServiceProcess("encoder", tiny_model_dir, "--dtype", "float32", env=DELAY) as server:
        wait_for(lambda: answers_health(server.port), 30, "the encoder's port to open")
        assert health_status(server.port) == NOT_SERVING
        with Client(generator=None, encoder=server.address, timeout=10) as client:
            with pytest.raises(Unavailable) as refused:
                client.encode(["a cat"])
            assert refused.value.reason == LOADING
            assert "encoder is still loading its model" in refused.value.message
        server.wait_serving(120)
        assert health_status(server.port) == SERVING
        with Client(generator=None, encoder=server.address, timeout=60) as client:
            assert client.encode(["a cat"])[0].tensor.shape[0] > 0


def test_sigterm_during_the_load_stops_at_once(tiny_model_dir: Path) -> None:
    with ServiceProcess(
        "generator", tiny_model_dir, "--encoder", "none", env={LOAD_DELAY_ENV: "120"}
    ) as server:
        wait_for(lambda: answers_health(server.port), 30, "the generator's port to open")
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        exit_code = server.process.wait(30)
        seconds = time.monotonic() - signalled
        assert exit_code == 0, server.log_text()
        assert seconds < 10, f"took {seconds:.1f} s to stop during the load"
        assert "Shutdown signal while loading the model" in server.log_text()
        assert not answers_health(server.port)
