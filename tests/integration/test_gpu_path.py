"""The generator's GPU-path features on the tiny model, on CPU: compiled DiT, tiled VAE decode, Ray replicas.

Attention: on CPU every request runs native attention (the kernels flash and sage need CUDA), so images equal
diffusers' (test_generator_parity.py). Here: the padding-mask rule the engine uses to fall back from flash/sage
matches diffusers' DiT; --compile gives the eager images and compiles before SERVING; --vae-tiling.
"""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from tests.conftest import start_generator
from zimage_split._proto.generator.v1 import generator_pb2, generator_pb2_grpc
from zimage_split.client import Client
from zimage_split.dit_service.attention import needs_padding_mask
from zimage_split.dit_service.config import EngineOptions, GeneratorConfig, Limits, RayOptions
from zimage_split.dit_service.engine import DiTEngine, GenerationJob, GenerationParams
from zimage_split.dit_service.server import start_generator_server
from zimage_split.model_source import resolve_model

CPU = torch.device("cpu")


def embedding(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(tokens, 16, generator=torch.Generator().manual_seed(seed))


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ---- attention: when a batch needs a padding mask ----------------------------------------------------------


@pytest.fixture(scope="module")
def transformer(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel.from_pretrained(str(tiny_model_dir), subfolder="transformer")


@pytest.mark.parametrize("lengths", [[4, 31], [4, 33], [32, 33], [64, 40], [5, 70, 9], [7]])
def test_padding_mask_rule_matches_the_dit(transformer, lengths: list[int]) -> None:  # type: ignore[no-untyped-def]
    """flash and sage take no mask, so the engine must know exactly when diffusers' Z-Image DiT makes one."""
    masks: list[torch.Tensor | None] = []
    layer = transformer.layers[0].attention
    hook = layer.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    try:
        with torch.inference_mode():
            transformer(
                [torch.zeros(16, 1, 8, 8) for _ in lengths],
                torch.full((len(lengths),), 0.5),
                [embedding(length, length) for length in lengths],
                return_dict=False,
            )
    finally:
        hook.remove()
    assert len(masks) == 1
    assert (masks[0] is not None) == needs_padding_mask(lengths)


# ---- --compile ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def compiled_generator(loop_thread, tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    """A --compile generator, warmed up at 128x128 (its largest size); health is polled while it starts."""
    port = free_port()
    first_serving: list[int] = []  # compiled graphs at the first SERVING answer
    done = threading.Event()

    def poll() -> None:
        while not done.is_set() and not first_serving:
            # A new channel each time: a channel that keeps failing to connect backs off for seconds.
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        first_serving.append(compiled_graphs())
                except grpc.RpcError:
                    pass  # not listening yet
            time.sleep(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    before = compiled_graphs()
    poller.start()
    started = time.perf_counter()
    config = GeneratorConfig(
        model=str(tiny_model_dir),
        encoder=None,
        port=port,
        device="cpu",
        dtype="float32",  # as the eager reference; `auto` would follow this CPU's bf16 support
        engine=EngineOptions(compile=True),
        limits=Limits(max_pixels=128 * 128),
    )
    server = loop_thread.run(start_generator_server(config), timeout=600)
    start_seconds = time.perf_counter() - started
    poller.join(timeout=10)
    done.set()
    yield server, {"before": before, "after_start": compiled_graphs(), "first_serving": first_serving}
    print(f"compiled generator started in {start_seconds:.1f} s")
    loop_thread.run(server.stop(grace=0))


def test_health_is_serving_only_after_the_compiled_warm_up(compiled_generator) -> None:  # type: ignore[no-untyped-def]
    server, graphs = compiled_generator
    assert graphs["after_start"] > graphs["before"], "the warm-up compiled nothing"
    # The first SERVING answer came once every warm-up graph existed.
    assert graphs["first_serving"] == [graphs["after_start"]]
    with Client(generator=f"127.0.0.1:{server.port}", timeout=120) as client:
        info = client.generator_info()
        assert (info["compiled"], info["attention_backend"], info["vae_tiling"]) == (True, "native", "auto")
        # Sizes, caption lengths and guidance the warm-up did not use compile nothing more: the graphs are
        # shape-generic, and guided batches (with and without a padding mask) were warmed up.
        client.generate(embeddings=embedding(9, 1), seed=1, width=96, height=128, steps=2)
        for negative in (embedding(70, 2), embedding(3, 3)):
            client.generate(
                embeddings=embedding(9, 1),
                negative_embeddings=negative,
                seed=1,
                width=112,
                height=64,
                steps=2,
                guidance_scale=3.0,
            )
    assert compiled_graphs() == graphs["after_start"]


def test_compiled_images_match_the_eager_ones(compiled_generator, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """Measured: at most 1 level of 255 on a handful of values (inductor fuses and reorders float32 sums, so a
    value that sits on a rounding boundary of the 8-bit output can flip). Any real error, a wrong mask or a
    wrong kernel, moves most pixels by many levels.
    """
    server, _ = compiled_generator
    eager = DiTEngine(resolve_model(str(tiny_model_dir)), device=CPU, dtype=torch.float32)
    cases = [
        (GenerationParams(width=96, height=128, steps=4, seed=5), embedding(20, 5), None),
        (
            GenerationParams(width=128, height=64, steps=4, seed=6, guidance_scale=4.0),
            embedding(9, 6),
            embedding(40, 7),
        ),
        (
            GenerationParams(width=64, height=96, steps=4, seed=7, guidance_scale=4.0),
            embedding(9, 8),
            embedding(3, 9),
        ),
    ]
    with Client(generator=f"127.0.0.1:{server.port}", timeout=120) as client:
        for params, prompt, negative in cases:
            image = client.generate(
                embeddings=prompt,
                negative_embeddings=negative,
                seed=params.seed,
                width=params.width,
                height=params.height,
                steps=params.steps,
                guidance_scale=params.guidance_scale,
            )
            ours = np.asarray(image.convert("RGB")).astype(np.int16)
            reference = eager.generate([GenerationJob(params, prompt, negative)])[0]
            assert reference is not None
            difference = np.abs(ours - pixels(reference.data))
            print(
                f"compiled vs eager {params}: max {difference.max()}, differing {np.mean(difference > 0):.2e}"
            )
            assert difference.max() <= 1
            assert np.mean(difference > 0) < 1e-3


# ---- --vae-tiling ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def thin_vae_model(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny model with a 4-channel VAE and no mid-block attention, so a 2048x2048 decode takes seconds."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("models") / "thin-vae"
    shutil.copytree(tiny_model_dir, root)
    shutil.rmtree(root / "vae")
    torch.manual_seed(3)
    AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[4] * 4,  # four blocks: the real VAE's 8x scale
        layers_per_block=0,  # one resnet per decoder block
        latent_channels=16,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    ).save_pretrained(str(root / "vae"))
    return root


def test_forced_tiling_is_close_to_the_untiled_decode(thin_vae_model: Path) -> None:
    """Tiles of 1024 pixels overlap by a quarter and are blended. Each tile normalises (GroupNorm) over itself
    only, so values shift a little, most near tile borders. Measured on this random VAE at 1280x1088 (4 tiles):
    mean 0.3 levels of 255, 99th percentile 3, max 15. Misplaced or unblended tiles give tens of levels.
    """
    source = resolve_model(str(thin_vae_model))
    tiled = DiTEngine(source, device=CPU, dtype=torch.float32, vae_tiling="on")
    plain = DiTEngine(source, device=CPU, dtype=torch.float32, vae_tiling="off")
    assert tiled.decodes_tiled(1280, 1088) and not plain.decodes_tiled(1280, 1088)
    latents = torch.randn(1, 16, 1088 // 8, 1280 // 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours, theirs = (np.asarray(engine.decode(latents)[0]).astype(np.int16) for engine in (tiled, plain))
    assert ours.shape == theirs.shape == (1088, 1280, 3)
    difference = np.abs(ours - theirs)
    print(
        f"tiled vs untiled: mean {difference.mean():.2f}, p99 {np.percentile(difference, 99)}, max {difference.max()}"
    )
    assert difference.mean() < 2.0
    assert np.percentile(difference, 99) <= 12
    assert not np.array_equal(ours, theirs)  # the tiled path did run


def test_auto_tiles_from_2048_squared(thin_vae_model: Path) -> None:
    engine = DiTEngine(resolve_model(str(thin_vae_model)), device=CPU, dtype=torch.float32)
    assert engine.vae_tiling == "auto"
    started = time.perf_counter()
    large, small = (
        engine.generate([GenerationJob(GenerationParams(width=side, height=side, steps=1), embedding(5, 0))])[
            0
        ]
        for side in (2048, 64)
    )
    assert large is not None and small is not None
    print(
        f"2048x2048 and 64x64, one step each: {time.perf_counter() - started:.1f} s (2048x2048: denoise "
        f"{large.denoise_seconds:.1f} s, tiled decode {large.decode_seconds:.1f} s)"
    )
    assert large.vae_tiled and Image.open(io.BytesIO(large.data)).size == (2048, 2048)
    assert not small.vae_tiled


# ---- Ray ---------------------------------------------------------------------------------------------------


def test_ray_replicas_take_the_options(loop_thread, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """The options reach the replicas (one EngineOptions value, built into the deployment). Not --compile
    here: a replica compiles like the in-process engine above (its constructor warms up before Serve routes
    to it), and compiling in a one-CPU replica adds about 45 s on a 2-core machine.
    """
    server = start_generator(
        loop_thread,
        tiny_model_dir,
        None,
        ray=RayOptions(address="local", replicas=1, cpus_per_replica=1),
        attention="native",
        vae_tiling="on",
        limits=Limits(max_pixels=1040 * 64),
    )
    try:
        address = f"127.0.0.1:{server.port}"
        with Client(generator=address, timeout=120) as client:
            info = client.generator_info()
            key = client.upload(embedding(6, 1))
        assert (info["attention_backend"], info.get("compiled", False), info["vae_tiling"]) == (
            "native",
            False,
            "on",
        )
        with grpc.insecure_channel(address) as channel:
            request = generator_pb2.GenerateRequest(
                prompt=generator_pb2.Conditioning(embedding_key=key), width=1040, height=64, steps=1, seed=1
            )
            headers = [
                event.image
                for event in generator_pb2_grpc.GeneratorServiceStub(channel).Generate(request, timeout=120)
                if event.WhichOneof("event") == "image"
            ]
        assert len(headers) == 1 and headers[0].vae_tiled  # 1040 pixels wide: two 1024-pixel tiles
        assert headers[0].replica
    finally:
        loop_thread.run(server.stop(grace=0), timeout=120)
