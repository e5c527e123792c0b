"""LoRA per request through a real generator: hot swap without leaks, listing, and refusals."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import start_generator
from zimage_split.client import Client, InvalidArgument, NotFound


def write_diffusers_lora(path: Path, *, seed: int, rank: int = 4, alpha: float = 4.0) -> None:
    """A diffusers/PEFT-format LoRA over the tiny DiT's attention projections (dim 32)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        for projection in ("to_q", "to_k", "to_v"):
            prefix = f"transformer.layers.{layer}.attention.{projection}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, 32, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(32, rank, generator=generator)
            tensors[f"{prefix}.alpha"] = torch.tensor(alpha)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    write_diffusers_lora(folder / "style.safetensors", seed=1)
    write_diffusers_lora(folder / "people" / "alice.safetensors", seed=2)
    write_diffusers_lora(folder / "ink.safetensors", seed=3, rank=2, alpha=1.0)
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    return folder


@pytest.fixture(scope="module")
def lora_server(loop_thread, tiny_model_dir, encoder_fp32, lora_dir):  # type: ignore[no-untyped-def]
    server = start_generator(
        loop_thread, tiny_model_dir, encoder_fp32.port, lora_dir=str(lora_dir), lora_cache=2
    )
    yield server
    loop_thread.run(server.stop(grace=0))


@pytest.fixture(scope="module")
def lora_client(lora_server):  # type: ignore[no-untyped-def]
    with Client(generator=f"127.0.0.1:{lora_server.port}", timeout=60) as client:
        yield client


def file_bytes(client: Client, **kwargs) -> bytes:  # type: ignore[no-untyped-def]
    return client.generate("a castle on a hill", seed=5, width=64, height=64, **kwargs).info["file_bytes"]


def test_a_request_without_lora_is_unaffected_by_earlier_ones(lora_client) -> None:  # type: ignore[no-untyped-def]
    base = file_bytes(lora_client)
    styled = file_bytes(lora_client, loras=[{"name": "style", "scale": 1.0}])
    assert styled != base
    assert file_bytes(lora_client) == base  # byte-identical after a LoRA request
    # The cache holds two adapters: alice, then ink evict style, which loads again, giving the same image.
    alice = file_bytes(lora_client, loras=[("people/alice", 0.8)])
    assert alice not in (base, styled)
    assert file_bytes(lora_client, loras=["ink"]) not in (base, styled, alice)
    assert file_bytes(lora_client, loras=["style"]) == styled
    assert file_bytes(lora_client) == base
    # Scale matters, and two adapters at once differ from either alone.
    assert file_bytes(lora_client, loras=[("style", 0.3)]) not in (base, styled)
    both = file_bytes(lora_client, loras=[("style", 1.0), ("people/alice", 0.8)])
    assert both not in (base, styled, alice)


def test_the_image_records_its_loras(lora_client) -> None:  # type: ignore[no-untyped-def]
    from zimage_split.dit_service.outputs import read_metadata

    image = lora_client.generate("a castle", seed=2, width=64, height=64, loras=[("style", 0.5)])
    assert image.info["loras"] == [{"name": "style", "scale": 0.5}]
    metadata = read_metadata(image.info["file_bytes"])
    assert json.loads(metadata["loras"]) == [{"name": "style", "scale": 0.5}]


def test_listing(lora_client) -> None:  # type: ignore[no-untyped-def]
    files = {file["name"]: file for file in lora_client.list_loras()}
    assert set(files) == {"style", "people/alice", "ink", "broken"}
    assert files["style"]["format"] == "diffusers" and files["style"]["rank"] == 4
    assert files["style"]["module_count"] == 6 and not files["style"]["error"]
    assert files["broken"]["error"]


@pytest.mark.parametrize("name", ["../style", "/etc/passwd", "people/../../x", "a\\b"])
def test_names_outside_the_folder_are_refused(lora_client, name) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument):
        file_bytes(lora_client, loras=[name])


def test_unknown_broken_and_bad_scales(lora_client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NotFound, match="style"):  # the message lists what there is
        file_bytes(lora_client, loras=["nope"])
    with pytest.raises(InvalidArgument):
        file_bytes(lora_client, loras=["broken"])
    with pytest.raises(InvalidArgument, match="scale"):
        file_bytes(lora_client, loras=[("style", 100.0)])
    with pytest.raises(InvalidArgument):
        file_bytes(lora_client, loras=["style", "style"])
    with pytest.raises(InvalidArgument, match="at most 2"):
        file_bytes(lora_client, loras=["style", "ink", "people/alice"])
    assert file_bytes(lora_client) == file_bytes(lora_client)  # still serving


def test_a_generator_without_lora_dir_says_so(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument, match="--lora-dir"):
        client.generate("a cat", width=64, height=64, loras=["style"])
    with pytest.raises(InvalidArgument, match="--lora-dir"):
        client.list_loras()


def test_images_with_a_lora_are_deterministic(lora_client) -> None:  # type: ignore[no-untyped-def]
    first = lora_client.generate("a fox", seed=9, width=64, height=64, loras=["style"])
    second = lora_client.generate("a fox", seed=9, width=64, height=64, loras=["style"])
    assert np.array_equal(np.asarray(first), np.asarray(second))


def test_a_batch_job_with_a_lora(lora_server, encoder_fp32, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`zsplit generate --embeddings ... --lora style:0.7`: every image has the LoRA, and a re-run with
    another LoRA makes every image again instead of keeping the old ones."""
    import asyncio

    from zimage_split.batch_jobs import BatchSettings, run_batch
    from zimage_split.client import AsyncClient

    async def batch(loras: tuple[tuple[str, float], ...]):  # type: ignore[no-untyped-def]
        async with AsyncClient(
            generator=f"127.0.0.1:{lora_server.port}", encoder=f"127.0.0.1:{encoder_fp32.port}"
        ) as client:
            embeddings = await client.encode(["a mill by a river"])
            report = await run_batch(
                client,
                embeddings,
                tmp_path,
                seeds=[1, 2],
                sizes=[(64, 64)],
                settings=BatchSettings(steps=None, guidance_scale=None, loras=loras),
                concurrency=2,
            )
            alone = await client.generate(embeddings=embeddings[0], seed=2, width=64, height=64, loras=loras)
        return report, alone

    report, alone = asyncio.run(batch((("style", 0.7),)))
    assert report.made == 2
    entries = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert all(entry["loras"] == [{"name": "style", "scale": pytest.approx(0.7)}] for entry in entries)
    from PIL import Image

    with Image.open(tmp_path / "p00000_s2_64x64.png") as made:
        assert np.array_equal(np.asarray(made.convert("RGB")), np.asarray(alone.convert("RGB")))
    assert asyncio.run(batch((("style", 0.7),)))[0].made == 0  # resumed: all there
    assert asyncio.run(batch(()))[0].made == 2  # another LoRA set: made again


def test_listing_marks_what_the_worker_holds_loaded(lora_client, lora_server) -> None:  # type: ignore[no-untyped-def]
    file_bytes(lora_client, loras=["ink"])
    files = {file["name"]: file for file in lora_client.list_loras()}
    assert files["ink"]["loaded"] and not files["broken"]["loaded"]
    assert {
        name for name, file in files.items() if file["loaded"]
    } == lora_server.servicer.worker.loaded_loras()
