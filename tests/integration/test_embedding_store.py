"""The generator serves cached prompts while the encoder is down, from memory and from --embedding-store."""

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import LoopThread, start_encoder, start_generator
from zimage_split._proto.generator.v1 import generator_pb2, generator_pb2_grpc
from zimage_split.client import Client
from zimage_split.common.errors import Unavailable
from zimage_split.dit_service.disk_store import IDENTITY_FILE, TEMP_PREFIX

SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 7}
PROMPT = "a lighthouse at dusk, oil painting"


class Servers:
    """Fresh servers for one test (these tests stop the encoder); whatever still runs is stopped at the end."""

    def __init__(self, loop_thread: LoopThread, model: Path) -> None:
        self.loop_thread = loop_thread
        self.model = model
        self.running: list[Any] = []

    def encoder(self) -> Any:
        server = start_encoder(self.loop_thread, self.model, dtype="float32")
        self.running.append(server)
        return server

    def generator(self, encoder_port: int, **overrides: Any) -> Any:
        server = start_generator(self.loop_thread, self.model, encoder_port, **overrides)
        self.running.append(server)
        return server

    def stop(self, server: Any) -> None:
        self.running.remove(server)
        self.loop_thread.run(server.stop(grace=0))


@pytest.fixture
def servers(loop_thread: LoopThread, tiny_model_dir: Path) -> Iterator[Servers]:
    started = Servers(loop_thread, tiny_model_dir)
    yield started
    for server in list(started.running):
        started.stop(server)


def generate_by_key(port: int, key: str) -> generator_pb2.ImageHeader:
    """Names an uploaded embedding by its key alone, which the SDK never does (it would upload again)."""
    request = generator_pb2.GenerateRequest(
        prompt=generator_pb2.Conditioning(embedding_key=key), width=64, height=64, steps=2, seed=7
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        responses = list(stub.Generate(request, timeout=60))
    return next(response.image for response in responses if response.WhichOneof("event") == "image")


def names_starting(directory: Path, prefix: str) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith(prefix))


def test_cached_prompt_is_served_while_the_encoder_is_down(servers: Servers) -> None:
    encoder = servers.encoder()
    generator = servers.generator(encoder.port)
    with Client(generator=f"127.0.0.1:{generator.port}", timeout=60) as client:
        first = client.generate(PROMPT, **SMALL)
        servers.stop(encoder)

        again = client.generate(PROMPT, **SMALL)
        assert np.array_equal(np.asarray(first), np.asarray(again))
        assert again.info["timings"]["encode"] == 0.0

        with pytest.raises(Unavailable) as raised:
            client.generate("a prompt nobody encoded yet", **SMALL)
    message = raised.value.message
    assert "encoder is unreachable" in message and "not in the generator's embedding cache" in message
    assert f"127.0.0.1:{encoder.port}" in message and "generate(embeddings=...)" in message


def test_store_serves_prompts_and_uploads_after_a_restart_with_the_encoder_down(
    servers: Servers, tmp_path: Path
) -> None:
    store = tmp_path / "embeddings"  # does not exist yet: the generator creates it
    embedding = torch.randn(6, 16)
    encoder = servers.encoder()
    first_generator = servers.generator(encoder.port, embedding_store=str(store))
    with Client(generator=f"127.0.0.1:{first_generator.port}", timeout=60) as client:
        by_text = client.generate(PROMPT, **SMALL)
        upload_key = client.upload(embedding)
        by_upload = client.generate(embeddings=embedding, **SMALL)
    servers.stop(first_generator)
    servers.stop(encoder)
    assert (store / f"{upload_key}.safetensors").is_file() and (store / IDENTITY_FILE).is_file()
    assert len(names_starting(store, "text-")) == 1

    # A new process on the same folder, whose encoder never answers.
    generator = servers.generator(encoder.port, embedding_store=str(store))
    with Client(generator=f"127.0.0.1:{generator.port}", timeout=60) as client:
        again = client.generate(PROMPT, **SMALL)
        assert np.array_equal(np.asarray(by_text), np.asarray(again))
        assert again.info["prompt_key"] == by_text.info["prompt_key"]

        assert generate_by_key(generator.port, upload_key).sha256 == by_upload.info["sha256"]

        with pytest.raises(Unavailable, match=r"not in the generator's embedding cache or --embedding-store"):
            client.generate("a prompt nobody encoded yet", **SMALL)
    assert names_starting(store, TEMP_PREFIX) == []


def test_corrupt_store_files_are_misses_not_crashes(servers: Servers, tmp_path: Path) -> None:
    embedding = torch.randn(6, 16)
    encoder = servers.encoder()
    first_generator = servers.generator(encoder.port, embedding_store=str(tmp_path))
    with Client(generator=f"127.0.0.1:{first_generator.port}", timeout=60) as client:
        by_text = client.generate(PROMPT, **SMALL)
        upload_key = client.upload(embedding)
    servers.stop(first_generator)

    text_file = tmp_path / names_starting(tmp_path, "text-")[0]
    encoded = load_file(str(text_file))["embedding"].clone()  # load_file maps the file we damage next
    data = text_file.read_bytes()
    text_file.write_bytes(data[:-8] + bytes(byte ^ 0xFF for byte in data[-8:]))  # flipped tensor bytes
    upload_file = tmp_path / f"{upload_key}.safetensors"
    upload_file.write_bytes(upload_file.read_bytes()[:100])  # truncated
    leftover = tmp_path / f"{TEMP_PREFIX}from-a-killed-process"
    leftover.write_bytes(b"half an embedding")
    an_hour_ago = time.time() - 3600
    os.utime(leftover, (an_hour_ago, an_hour_ago))

    generator = servers.generator(encoder.port, embedding_store=str(tmp_path))
    assert not leftover.exists()
    with pytest.raises(grpc.RpcError) as raised:
        generate_by_key(generator.port, upload_key)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert not upload_file.exists()

    with Client(generator=f"127.0.0.1:{generator.port}", timeout=60) as client:
        again = client.generate(PROMPT, **SMALL)
        assert again.info["timings"]["encode"] > 0, "served from the corrupt file instead of the encoder"
        assert np.array_equal(np.asarray(by_text), np.asarray(again))
        client.generate(embeddings=embedding, **SMALL)  # a new client uploads it once more

    assert torch.equal(load_file(str(text_file))["embedding"], encoded)  # rewritten whole
    assert torch.equal(load_file(str(upload_file))["embedding"], embedding)
    assert names_starting(tmp_path, TEMP_PREFIX) == []


def test_a_size_limited_store_keeps_the_most_recent_embeddings_within_its_bytes(
    servers: Servers, tmp_path: Path
) -> None:
    """--embedding-store-max-gb: uploads beyond the limit push the least recently used files out."""
    folder = tmp_path / "store"
    tensors = [torch.full((8, 16), float(index)) for index in range(5)]
    generator = servers.generator(0, embedding_store=str(folder))  # no limit: learn one file's size
    with Client(generator=f"127.0.0.1:{generator.port}", timeout=60) as client:
        client.generate(embeddings=tensors[0], **SMALL)
    size = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    servers.stop(generator)

    generator = servers.generator(0, embedding_store=str(folder), embedding_store_max_bytes=3 * size)
    with Client(generator=f"127.0.0.1:{generator.port}", timeout=60) as client:
        for tensor in tensors[1:]:
            client.generate(embeddings=tensor, **SMALL)
    files = sorted(folder.glob("*.safetensors"), key=lambda path: path.stat().st_mtime_ns)
    assert len(files) == 3 and sum(path.stat().st_size for path in files) <= 3 * size
    kept = [load_file(str(path))["embedding"][0, 0].item() for path in files]
    assert kept == [2.0, 3.0, 4.0], "the three most recent uploads stay"


@pytest.fixture
def store_mount(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs for the store, so it can really fill up or turn read-only (root only)."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "mount"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_store_that_turns_read_only_or_fills_up_is_a_precise_status_naming_the_file(
    servers: Servers, store_mount: Path
) -> None:
    import subprocess

    from zimage_split.client import FailedPrecondition, ResourceExhausted

    generator = servers.generator(0, embedding_store=str(store_mount))
    with Client(generator=f"127.0.0.1:{generator.port}", timeout=60) as client:
        client.generate(embeddings=torch.zeros(8, 16), **SMALL)
        subprocess.run(["mount", "-o", "remount,ro", str(store_mount)], check=True)
        with pytest.raises(FailedPrecondition, match=rf"{store_mount}/b3-\w+\.safetensors is on a read-only"):
            client.generate(embeddings=torch.ones(8, 16), **SMALL)
        subprocess.run(["mount", "-o", "remount,rw", str(store_mount)], check=True)
        with pytest.raises(OSError, match="No space left"):  # takes what is left of the 64 KiB
            (store_mount / "filler").write_bytes(b"x" * (64 << 10))
        with pytest.raises(ResourceExhausted, match=rf"{store_mount}/b3-\w+\.safetensors is on a full disk"):
            client.generate(embeddings=torch.full((8, 16), 2.0), **SMALL)
    assert not names_starting(store_mount, TEMP_PREFIX)
