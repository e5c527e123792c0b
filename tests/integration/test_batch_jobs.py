"""Encode once, generate many: P prompts x K seeds cost exactly P encoder passes."""

import asyncio
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import start_encoder, start_generator
from zimage_split.client import Client, Embeddings

PROMPTS = ["a red fox in snow", "a lighthouse at dusk", "steaming ramen, top view", "neon city"]


@pytest.fixture
def fresh_services(loop_thread, tiny_model_dir):  # type: ignore[no-untyped-def]
    """An encoder and a generator of their own, so their counters start at zero."""
    encoder = start_encoder(loop_thread, tiny_model_dir, dtype="float32")
    generator = start_generator(loop_thread, tiny_model_dir, encoder.port)
    try:
        yield f"127.0.0.1:{encoder.port}", f"127.0.0.1:{generator.port}"
    finally:
        loop_thread.run(generator.stop(grace=0))
        loop_thread.run(encoder.stop(grace=0))


def test_four_prompts_by_three_seeds_make_exactly_four_encoder_passes(fresh_services, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    encoder, generator = fresh_services
    with Client(generator=generator, encoder=encoder) as client:
        before = client.encoder_info()  # after the encoder's own warm-up pass
        embeddings = client.encode(PROMPTS)
        path = embeddings.save(tmp_path / "embeds.safetensors")
        results = list(
            client.generate_many(
                Embeddings.load(path), seeds=range(3), sizes=[(64, 64)], steps=2, concurrency=4
            )
        )
        info = client.encoder_info()
        generator_info = client.generator_info()
    assert int(info["prompts_encoded"]) - int(before.get("prompts_encoded", 0)) == 4
    assert 1 <= int(info["forward_passes"]) - int(before.get("forward_passes", 0)) <= 4
    assert sorted((r.job.prompt_index, r.job.seed) for r in results) == [
        (p, s) for p in range(4) for s in range(3)
    ]
    assert all(r.image.size == (64, 64) and r.image.info["seed"] == r.job.seed for r in results)
    # Every Generate found its prompt's uploaded embedding by key.
    assert int(generator_info.get("embedding_cache_misses", 0)) == 0
    by_prompt = Counter(r.image.info["prompt_key"] for r in results)
    assert sorted(by_prompt.values()) == [3, 3, 3, 3]


def test_prompt_text_batches_also_encode_each_prompt_once(fresh_services) -> None:  # type: ignore[no-untyped-def]
    encoder, generator = fresh_services
    with Client(generator=generator, encoder=encoder) as client:
        images = [
            client.generate(prompt, seed=seed, width=64, height=64, steps=2)
            for prompt in PROMPTS
            for seed in range(3)
        ]
        info = client.encoder_info()
    assert len(images) == 12 and int(info["prompts_encoded"]) == 4


def test_generate_many_stops_on_the_first_error_and_names_it(fresh_services) -> None:  # type: ignore[no-untyped-def]
    from zimage_split.client import InvalidArgument

    encoder, generator = fresh_services
    with Client(generator=generator, encoder=encoder) as client:
        embeddings = client.encode(PROMPTS[:1])
        with pytest.raises(InvalidArgument, match="divisible by 16"):
            list(client.generate_many(embeddings, seeds=[0], sizes=[(64, 65)], steps=2))


def test_file_embeddings_give_the_same_pixels_as_the_prompt(fresh_services, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    encoder, generator = fresh_services
    with Client(generator=generator, encoder=encoder) as client:
        client.encode(PROMPTS).save(tmp_path / "embeds.safetensors")
        from_file = {
            (r.job.prompt_index, r.job.seed): np.asarray(r.image)
            for r in client.generate_many(
                Embeddings.load(tmp_path / "embeds.safetensors"), seeds=[5, 6], sizes=[(64, 80)], steps=2
            )
        }
        for (index, seed), pixels in from_file.items():
            by_text = client.generate(PROMPTS[index], seed=seed, width=64, height=80, steps=2)
            assert np.array_equal(np.asarray(by_text), pixels), (index, seed)


def test_batch_pngs_carry_the_prompt_and_a_full_parameters_line(
    generator, encoder_fp32, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The generator gets only embeddings in a batch; the files still name their prompt, as single images do."""
    from zimage_split.batch_jobs import BatchSettings, run_batch
    from zimage_split.client import AsyncClient

    async def run() -> None:
        addresses = {"generator": f"127.0.0.1:{generator.port}", "encoder": f"127.0.0.1:{encoder_fp32.port}"}
        async with AsyncClient(**addresses, timeout=60) as client:
            embeddings = await client.encode(PROMPTS[:2])
            settings = BatchSettings(steps=2, guidance_scale=None)
            await run_batch(
                client, embeddings, tmp_path, seeds=[3], sizes=[(64, 64)], settings=settings, concurrency=2
            )

    asyncio.run(run())
    entries = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert sorted(entry["prompt"] for entry in entries) == sorted(PROMPTS[:2])
    for entry in entries:
        with Image.open(tmp_path / entry["file"]) as image:
            text = dict(image.text)  # type: ignore[attr-defined]
        prompt, settings = text["parameters"].split("\n")
        assert text["prompt"] == prompt == entry["prompt"]
        assert settings.startswith(
            "Steps: 2, Sampler: Euler (flow match), CFG scale: 0, Seed: 3, Size: 64x64, "
        )
        assert (text["seed"], text["steps"], text["width"], text["height"]) == ("3", "2", "64", "64")
        assert json.loads(text["zimage-split"])["prompt"] == prompt


def test_a_batch_shift_reaches_every_image_and_a_resume_with_another_shift_makes_them_again(
    generator, encoder_fp32, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from zimage_split.batch_jobs import BatchSettings, run_batch
    from zimage_split.client import AsyncClient

    async def run(shift: float | None) -> None:
        addresses = {"generator": f"127.0.0.1:{generator.port}", "encoder": f"127.0.0.1:{encoder_fp32.port}"}
        async with AsyncClient(**addresses, timeout=60) as client:
            embeddings = await client.encode(PROMPTS[:1])
            settings = BatchSettings(steps=2, guidance_scale=None, shift=shift)
            await run_batch(
                client, embeddings, tmp_path, seeds=[0, 1], sizes=[(64, 64)], settings=settings, concurrency=2
            )

    def entries() -> list[dict]:
        return [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]

    asyncio.run(run(1.5))
    first = entries()
    assert [entry["shift"] for entry in first] == [1.5, 1.5]
    for entry in first:
        with Image.open(tmp_path / entry["file"]) as image:
            assert "Shift: 1.5," in image.text["parameters"]  # type: ignore[attr-defined]
    asyncio.run(run(1.5))  # the same settings: nothing is made again
    assert [entry["finished_at"] for entry in entries()] == [entry["finished_at"] for entry in first]
    asyncio.run(run(4.0))  # another shift: every image is made again, with it
    again = entries()
    assert [entry["shift"] for entry in again] == [4.0, 4.0]
    assert {entry["sha256"] for entry in again}.isdisjoint(entry["sha256"] for entry in first)


def test_a_batch_with_skip_layer_guidance_records_it_and_a_resume_without_it_makes_the_images_again(
    generator, encoder_fp32, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from zimage_split.batch_jobs import BatchSettings, SkipLayerGuidanceRequest, run_batch
    from zimage_split.client import AsyncClient

    async def run(slg: SkipLayerGuidanceRequest) -> None:
        addresses = {"generator": f"127.0.0.1:{generator.port}", "encoder": f"127.0.0.1:{encoder_fp32.port}"}
        async with AsyncClient(**addresses, timeout=60) as client:
            embeddings = await client.encode(PROMPTS[:1])
            settings = BatchSettings(steps=4, guidance_scale=None, slg=slg)
            await run_batch(
                client, embeddings, tmp_path, seeds=[0], sizes=[(64, 64)], settings=settings, concurrency=1
            )

    def entries() -> list[dict]:
        return [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]

    guided = SkipLayerGuidanceRequest(scale=2.0, layers=(1,), start=0.0)
    asyncio.run(run(guided))
    [first] = entries()
    assert first["skip_layer_guidance"]["layers"] == [1] and first["skip_layer_guidance"]["scale"] == 2.0
    asyncio.run(run(guided))  # the same settings: nothing is made again
    assert entries()[0]["finished_at"] == first["finished_at"]
    asyncio.run(run(SkipLayerGuidanceRequest()))  # without SLG: made again, without it
    [again] = entries()
    assert again["skip_layer_guidance"] is None and again["sha256"] != first["sha256"]


def test_a_batch_with_dype_records_it_and_a_resume_without_it_makes_the_images_again(
    generator, encoder_fp32, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from zimage_split.batch_jobs import BatchSettings, DypeRequest, run_batch
    from zimage_split.client import AsyncClient

    async def run(dype: DypeRequest) -> None:
        addresses = {"generator": f"127.0.0.1:{generator.port}", "encoder": f"127.0.0.1:{encoder_fp32.port}"}
        async with AsyncClient(**addresses, timeout=60) as client:
            embeddings = await client.encode(PROMPTS[:1])
            settings = BatchSettings(steps=2, guidance_scale=None, dype=dype)
            await run_batch(
                client, embeddings, tmp_path, seeds=[0], sizes=[(64, 64)], settings=settings, concurrency=1
            )

    def entries() -> list[dict]:
        return [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]

    extrapolated = DypeRequest(on=True, method="pi", scale=3.0)
    asyncio.run(run(extrapolated))
    [first] = entries()
    assert first["dype"] == {"method": "pi", "scale": 3.0, "exponent": 2.0}
    with Image.open(tmp_path / first["file"]) as image:
        assert "DyPE: pi scale 3 exponent 2" in image.text["parameters"]  # type: ignore[attr-defined]
    asyncio.run(run(extrapolated))  # the same settings: nothing is made again
    assert entries()[0]["finished_at"] == first["finished_at"]
    asyncio.run(run(DypeRequest()))  # without DyPE: made again, without it
    [again] = entries()
    assert again["dype"] is None and again["finished_at"] != first["finished_at"]
