"""`--dtype auto` on real services: Info says what was chosen and why."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import LoopThread, start_encoder, start_generator
from zimage_split.client import Client
from zimage_split.devices import choose_dtype


def test_info_says_which_dtype_auto_chose_and_why(loop_thread: LoopThread, tiny_model_dir: Path) -> None:
    expected = choose_dtype("auto", torch.device("cpu"))
    encoder = start_encoder(loop_thread, tiny_model_dir, dtype="auto")
    try:
        generator = start_generator(loop_thread, tiny_model_dir, encoder.port, dtype="auto")
        try:
            with Client(
                generator=f"127.0.0.1:{generator.port}", encoder=f"127.0.0.1:{encoder.port}"
            ) as client:
                encoder_info, generator_info = client.encoder_info(), client.generator_info()
                image = client.generate("a lighthouse", width=64, height=64, steps=2, seed=1)
        finally:
            loop_thread.run(generator.stop(grace=1))
    finally:
        loop_thread.run(encoder.stop(grace=1))
    wire_name = f"DTYPE_{expected.name.upper()}"
    for info in (encoder_info, generator_info):
        assert info["dtype"] == wire_name
        assert info["dtype_reason"] == expected.reason
    assert image.size == (64, 64)


def test_an_explicit_dtype_is_reported_as_such(generator, client) -> None:  # type: ignore[no-untyped-def]
    info = client.generator_info()
    assert (info["dtype"], info["dtype_reason"]) == ("DTYPE_FLOAT32", "--dtype float32")
