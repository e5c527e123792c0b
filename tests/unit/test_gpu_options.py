"""The generator's GPU-path options on a CPU host: what `auto` picks, what fails before the model loads, and how.

Everything here runs without a model: the checks come before any weights are read. The model-level behaviour
(compiled images, tiled decodes, Ray replicas) is in tests/integration/test_gpu_path.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from zimage_split.cli import main, parse_settings
from zimage_split.common.errors import InvalidArgument
from zimage_split.dit_service.attention import (
    AttentionChoice,
    check_backend,
    choose_attention,
    needs_padding_mask,
    time_backends,
)
from zimage_split.dit_service.config import EngineOptions, GeneratorConfig, Limits, RayOptions
from zimage_split.dit_service.engine import decodes_tiled, to_device
from zimage_split.dit_service.server import start_generator_server, warm_up_side

CPU = torch.device("cpu")
GPU_ONLY = ["flash", "_flash_3", "sage"]
# A model path that does not exist: an error about it would mean the model was looked at first.
NO_MODEL = "/nonexistent/z-image"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_is_native_on_cpu(dtype: torch.dtype) -> None:
    choice = choose_attention("auto", CPU, dtype)
    assert (choice.backend, choice.masked) == ("native", "native")


@pytest.mark.parametrize("backend", GPU_ONLY)
def test_a_gpu_only_backend_on_cpu_says_how_to_fix_it(backend: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        check_backend(backend, CPU, torch.bfloat16)
    message = raised.value.message
    assert f"--attention {backend} needs a CUDA GPU" in message
    assert "pip install" in message or "built from" in message  # how to get the kernel
    assert "use --attention native or auto" in message


@pytest.mark.parametrize("backend", GPU_ONLY)
def test_the_cli_refuses_a_gpu_only_backend_before_looking_at_the_model(
    backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["serve", "generator", "--model", NO_MODEL, "--device", "cpu", "--encoder", "none", "--insecure"]
    assert main([*argv, "--attention", backend]) == 2
    error = capsys.readouterr().err
    assert f"INVALID_ARGUMENT): --attention {backend} needs a CUDA GPU" in error
    assert NO_MODEL not in error


def test_the_environment_and_config_file_set_the_options(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "zsplit.toml"
    config.write_text('[generator]\nattention = "native"\ncompile = true\nvae_tiling = "off"\n')
    resolved = parse_settings(["serve", "generator", "--config", str(config)]).resolved
    assert (resolved.attention, resolved.compile, resolved.vae_tiling) == ("native", True, "off")
    monkeypatch.setenv("ZSPLIT_ATTENTION", "sage")
    argv = ["serve", "generator", "--model", NO_MODEL, "--device", "cpu", "--encoder", "none", "--insecure"]
    assert main(argv) == 2
    assert "--attention sage needs a CUDA GPU" in capsys.readouterr().err
    monkeypatch.setenv("ZSPLIT_VAE_TILING", "sometimes")
    assert main(argv) == 2
    assert "ZSPLIT_VAE_TILING: 'sometimes' is not one of auto, on, off" in capsys.readouterr().err


@pytest.mark.parametrize("backend", GPU_ONLY)
@pytest.mark.parametrize("ray", [None, RayOptions(address="local", replicas=1)])
def test_generator_config_refuses_a_gpu_only_backend_before_the_model_or_ray(
    backend: str, ray: RayOptions | None
) -> None:
    config = GeneratorConfig(
        model=NO_MODEL, encoder=None, port=0, device="cpu", engine=EngineOptions(attention=backend), ray=ray
    )
    with pytest.raises(InvalidArgument, match=f"--attention {backend} needs a CUDA GPU"):
        asyncio.run(start_generator_server(config))
    if ray is not None:
        import ray as ray_module

        assert not ray_module.is_initialized()


def test_bad_values_in_generator_config_are_invalid_arguments() -> None:
    for engine, dtype, expected in (
        (
            EngineOptions(vae_tiling="sometimes"),
            "auto",
            "Unknown --vae-tiling 'sometimes'; use auto, on or off",
        ),
        (EngineOptions(attention="xformers"), "auto", "Unknown --attention 'xformers'"),
        (EngineOptions(attention="flash"), "float32", "--attention flash needs a CUDA GPU"),
    ):
        config = GeneratorConfig(
            model=NO_MODEL, encoder=None, port=0, device="cpu", dtype=dtype, engine=engine
        )
        with pytest.raises(InvalidArgument, match=expected):
            asyncio.run(start_generator_server(config))


def test_compile_without_a_cpu_compiler_fails_before_the_model_loads() -> None:
    """A host with no C++ compiler, as torch's inductor sees it: the compiler it searches for is absent."""
    config = GeneratorConfig(
        model=NO_MODEL, encoder=None, port=0, device="cpu", engine=EngineOptions(compile=True)
    )
    with (
        torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/g++",)}),
        pytest.raises(InvalidArgument, match="--compile on CPU needs a C\\+\\+ compiler"),
    ):
        asyncio.run(start_generator_server(config))


def test_padding_mask_follows_the_32_token_caption_padding() -> None:
    assert not needs_padding_mask([7])
    assert not needs_padding_mask([1, 32])  # both pad to 32 tokens
    assert needs_padding_mask([32, 33])  # 32 and 64
    assert not needs_padding_mask([33, 64, 50])
    choice = AttentionChoice(backend="flash")
    assert choice.for_captions([10, 20]) == "flash"
    assert choice.for_captions([10, 40]) == "native"  # flash takes no mask


def test_auto_timing_keeps_backends_that_agree_with_native_and_drops_failing_ones() -> None:
    """The code `auto` runs on CUDA, run on CPU with the CPU backends diffusers has (and one that fails)."""
    best, trials = time_backends(
        ["native", "_native_math", "flash"], CPU, torch.float32, shape=(1, 64, 2, 16)
    )
    assert best in ("native", "_native_math")
    assert isinstance(trials["native"], float) and isinstance(trials["_native_math"], float)
    assert isinstance(trials["flash"], str) and trials["flash"].startswith("failed")


def test_tiled_decode_from_2048_squared_in_auto() -> None:
    assert decodes_tiled("auto", 2048, 2048)  # the default --max-pixels
    assert not decodes_tiled("auto", 2048, 2032)
    assert decodes_tiled("auto", 4096, 1024)  # exactly 2048 * 2048 pixels
    assert not decodes_tiled("auto", 4096, 1008)
    assert not decodes_tiled("auto", 1024, 1024)
    assert decodes_tiled("on", 1040, 64)  # two tiles
    assert not decodes_tiled("on", 1024, 1024)  # one 1024-pixel tile is an untiled decode
    assert not decodes_tiled("off", 4096, 4096)


def test_warm_up_size_is_the_default_or_the_largest_allowed_square() -> None:
    assert warm_up_side(Limits()) == 1024
    assert warm_up_side(Limits(max_pixels=256 * 256)) == 256
    assert warm_up_side(Limits(max_pixels=300 * 300)) == 288  # a multiple of 16
    assert warm_up_side(Limits(max_pixels=64 * 64)) == 64


def test_embeddings_reach_a_cpu_device_by_the_plain_copy() -> None:
    embedding = torch.randn(5, 16, dtype=torch.bfloat16)
    moved = to_device(embedding, CPU, torch.float32)
    assert moved.dtype == torch.float32 and torch.equal(moved, embedding.float())
    assert not moved.is_pinned()
    if not torch.cuda.is_available():  # why CPU must not take the pinned path
        with pytest.raises(RuntimeError):
            embedding.pin_memory()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            {"fpu", "avx2", "avx512f", "amx_bf16", "amx_tile", "avx512_bf16"},
            torch.bfloat16,
        ),  # Sapphire Rapids
        ({"fpu", "avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),  # Zen 4, Cooper Lake
        ({"fp", "asimd", "sve", "bf16"}, torch.bfloat16),  # Graviton 3 (Arm `Features`)
        ({"fpu", "avx2", "avx512f"}, torch.float32),  # Skylake, Zen 3: bf16 would be emulated
        ({"fpu", "avx2"}, torch.float32),
        (set(), torch.float32),  # the kernel lists nothing (macOS, Windows)
    ],
)
def test_auto_dtype_on_a_cpu_follows_its_bf16_instructions(flags: set[str], expected: torch.dtype) -> None:
    from zimage_split.devices import choose_dtype

    choice = choose_dtype("auto", torch.device("cpu"), flags)
    assert choice.dtype == expected
    assert choice.reason.startswith("auto: ")
    assert ("runs natively" in choice.reason) == (expected == torch.bfloat16)


def test_auto_dtype_is_bf16_on_gpus_and_explicit_dtypes_win() -> None:
    from zimage_split.devices import choose_dtype

    for device in ("cuda", "mps"):
        assert choose_dtype("auto", torch.device(device), set()).dtype == torch.bfloat16
    assert choose_dtype("float32", torch.device("cuda")).dtype == torch.float32
    assert choose_dtype("bfloat16", torch.device("cpu"), set()).reason == "--dtype bfloat16"
    with pytest.raises(InvalidArgument, match="Unknown dtype 'int8'; use auto, bfloat16, float16, float32"):
        choose_dtype("int8", torch.device("cpu"))


def test_cpu_features_are_read_from_the_kernels_list(tmp_path: Path) -> None:
    from zimage_split.devices import cpu_features

    x86 = tmp_path / "x86"
    x86.write_text(
        "processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2 amx_bf16\n"
    )
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\nCPU implementer\t: 0x41\n")
    assert cpu_features(x86) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_features(arm) == {"fp", "asimd", "bf16"}
    assert cpu_features(tmp_path / "missing") == frozenset()


def test_the_choice_made_on_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    """Not a fixed answer: what `auto` chose here, and that it agrees with the kernel's own list."""
    from zimage_split.devices import BF16_CPU_FEATURES, choose_dtype, cpu_features

    choice = choose_dtype("auto", torch.device("cpu"))
    native = bool(cpu_features() & BF16_CPU_FEATURES.keys())
    assert choice.dtype == (torch.bfloat16 if native else torch.float32)
    with capsys.disabled():
        print(f"\n  --dtype auto on this CPU: {choice.name} ({choice.reason})")
