"""A second server on a port in use fails, naming the port, unless every server sharing it asks for that
(`--reuse-port`): gRPC's own default (SO_REUSEPORT on) would let it start and split the traffic silently."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import LoopThread, start_encoder, start_generator
from zimage_split.common.errors import Unavailable
from zimage_split.common.metrics import ServiceMetrics
from zimage_split.common.security import ServerSecurity
from zimage_split.common.server import TransportLimits, start_server

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_a_second_encoder_or_generator_on_a_taken_port_fails_naming_it(
    loop_thread: LoopThread, tiny_model_dir: Path
) -> None:
    first = start_encoder(loop_thread, tiny_model_dir)
    try:
        for start in (start_encoder, lambda *args, **kwargs: start_generator(*args, None, **kwargs)):
            with pytest.raises(Unavailable, match=rf"port {first.port} is in use.*pass --reuse-port"):
                start(loop_thread, tiny_model_dir, port=first.port)
    finally:
        loop_thread.run(first.stop(grace=0))


def test_the_bind_itself_refuses_a_taken_port(loop_thread: LoopThread, tiny_model_dir: Path) -> None:
    """Past the early check (as when the port is taken while the model loads), gRPC's bind still refuses."""
    first = start_encoder(loop_thread, tiny_model_dir)
    try:
        with pytest.raises(Unavailable, match=rf"port {first.port} is in use"):
            loop_thread.run(
                start_server(
                    lambda server: None,
                    (),
                    "127.0.0.1",
                    first.port,
                    ServerSecurity(insecure=True),
                    metrics=ServiceMetrics("encoder"),
                )
            )
    finally:
        loop_thread.run(first.stop(grace=0))


def test_reuse_port_on_both_servers_shares_the_port(loop_thread: LoopThread, tiny_model_dir: Path) -> None:
    sharing = TransportLimits(reuse_port=True)
    first = start_encoder(loop_thread, tiny_model_dir, transport=sharing)
    try:
        second = start_encoder(loop_thread, tiny_model_dir, port=first.port, transport=sharing)
        try:
            assert second.port == first.port
            with grpc.insecure_channel(f"127.0.0.1:{first.port}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            loop_thread.run(second.stop(grace=0))
    finally:
        loop_thread.run(first.stop(grace=0))


def test_zsplit_serve_on_a_taken_port_exits_at_once_naming_it(
    loop_thread: LoopThread, tiny_model_dir: Path
) -> None:
    first = start_encoder(loop_thread, tiny_model_dir)
    try:
        argv = ["serve", "generator", "--model", str(tiny_model_dir), "--encoder", "none", "--insecure"]
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "zimage_split.cli", *argv, "--port", str(first.port), "--device", "cpu"],
            capture_output=True,
            text=True,
            timeout=120,
            env=ENV,
        )
        assert result.returncode == 1, result.stderr
        assert f"port {first.port} is in use" in result.stderr
        assert "--reuse-port" in result.stderr
        assert "Generator dtype" not in result.stderr  # it stopped before choosing a dtype and loading
        assert time.monotonic() - started < 60
    finally:
        loop_thread.run(first.stop(grace=0))
