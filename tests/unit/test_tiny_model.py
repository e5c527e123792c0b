import hashlib
import os
from pathlib import Path

import pytest
import torch

from zimage_split.tiny_model import build_tiny_model


def digest_folder(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_build_is_deterministic_and_complete(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = build_tiny_model(tmp_path / "again")
    assert digest_folder(again) == digest_folder(tiny_model_dir)
    for part in ("model_index.json", "text_encoder", "tokenizer", "transformer", "vae", "scheduler"):
        assert (again / part).exists(), part
    assert not list(tmp_path.glob(".again.*")), "staging folder left behind"


def test_refuses_to_overwrite(tiny_model_dir: Path) -> None:
    with pytest.raises(FileExistsError):
        build_tiny_model(tiny_model_dir)


def test_tokenizer_is_offline_byte_bpe_with_the_qwen3_template(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir / "tokenizer"))
    messages = [{"role": "user", "content": "一只猫 on a mat"}]
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert text == "<|im_start|>user\n一只猫 on a mat<|im_end|>\n<|im_start|>assistant\n"
    no_think = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert no_think.endswith("<think>\n\n</think>\n\n")
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(ids) == text
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"


def test_loads_through_the_diffusers_pipeline(reference_pipeline) -> None:  # type: ignore[no-untyped-def]
    assert type(reference_pipeline).__name__ == "ZImagePipeline"
    assert (
        reference_pipeline.transformer.config.cap_feat_dim
        == reference_pipeline.text_encoder.config.hidden_size
    )


# --- random-weights folders (`full`, and `store_weights=False`) --------------------------------------


def weights_digest(model) -> str:  # type: ignore[no-untyped-def]
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "full", size="full")


@pytest.fixture(scope="module")
def random_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-random", store_weights=False)


def test_full_has_the_real_architecture_on_the_meta_device(full_dir: Path) -> None:
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import AutoModel

    from zimage_split.random_weights import load_config, meta_model

    def parameters(model) -> int:  # type: ignore[no-untyped-def]
        assert {p.device.type for p in model.parameters()} == {"meta"}
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        return sum(p.numel() for p in model.parameters())

    configs = {
        name: load_config(cls, str(full_dir), name)
        for name, cls in (
            ("transformer", ZImageTransformer2DModel),
            ("text_encoder", AutoModel),
            ("vae", AutoencoderKL),
        )
    }
    dit = configs["transformer"]
    assert {key: dit[key] for key in REAL_TRANSFORMER} == REAL_TRANSFORMER
    text = configs["text_encoder"]
    assert {key: getattr(text, key) for key in REAL_TEXT_ENCODER} == REAL_TEXT_ENCODER
    assert text.rope_parameters["rope_theta"] == 1e6 and text.model_type == "qwen3"
    vae = configs["vae"]
    assert {key: vae[key] for key in REAL_VAE} == REAL_VAE

    # Z-Image-Turbo: a 6.15B DiT, Qwen3-4B (4.02B with tied embeddings), the 83.8M FLUX VAE.
    assert parameters(meta_model(ZImageTransformer2DModel, dit, dtype=torch.bfloat16)) == 6_154_908_736
    assert parameters(meta_model(AutoModel, text, dtype=torch.bfloat16)) == 4_022_468_096
    assert parameters(meta_model(AutoencoderKL, vae, dtype=torch.bfloat16)) == 83_819_683


REAL_TRANSFORMER = {
    "all_f_patch_size": [1],
    "all_patch_size": [2],
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
    "cap_feat_dim": 2560,
    "dim": 3840,
    "in_channels": 16,
    "n_heads": 30,
    "n_kv_heads": 30,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "norm_eps": 1e-05,
    "qk_norm": True,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
}
REAL_TEXT_ENCODER = {
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": True,
    "vocab_size": 151936,
}
REAL_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def test_resolve_full_gives_a_random_weights_source_without_weight_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    from zimage_split.model_source import resolve_model

    monkeypatch.setenv("ZSPLIT_CACHE", str(tmp_path))
    source = resolve_model("full")
    assert source.model_id == "zimage-split/full" and source.random_weights_seed == 0
    assert resolve_model("zimage-split/full") == source  # the model id resolves too (embeddings files)
    folder = Path(source.location)
    assert folder.parent == tmp_path
    files = [path for path in folder.rglob("*") if path.is_file()]
    assert not [path for path in files if path.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    assert sum(path.stat().st_size for path in files) < 100_000
    for part in ("text_encoder", "transformer", "vae"):
        assert (folder / part / "config.json").is_file()
    # Any folder with the marker loads the same way; tiny, with its weight files, does not.
    assert resolve_model(str(folder)).random_weights_seed == 0
    assert resolve_model(str(tiny_model_dir)).random_weights_seed is None
    with pytest.raises(ValueError, match="not written to disk"):
        build_tiny_model(tmp_path / "full-with-weights", size="full", store_weights=True)


def test_configs_only_tiny_folder_has_the_tiny_configs(random_tiny_dir: Path, tiny_model_dir: Path) -> None:
    json_files = sorted(path.relative_to(tiny_model_dir) for path in tiny_model_dir.rglob("*.json"))
    for relative in json_files:
        assert (random_tiny_dir / relative).read_text() == (tiny_model_dir / relative).read_text(), relative
    assert not list(random_tiny_dir.rglob("*.safetensors"))
    assert (random_tiny_dir / "random_weights.json").is_file()


def test_random_weights_are_seeded_finite_and_leave_the_global_rng_alone(random_tiny_dir: Path) -> None:
    from diffusers import ZImageTransformer2DModel

    from zimage_split.random_weights import build_random_model, load_config

    config = load_config(ZImageTransformer2DModel, str(random_tiny_dir), "transformer")

    def build(seed: int, dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
        return build_random_model(
            ZImageTransformer2DModel, config, seed=seed, component="transformer", device="cpu", dtype=dtype
        )

    rng_state = torch.random.get_rng_state()
    first = build(7)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert not first.training
    assert weights_digest(build(7)) == weights_digest(first)
    assert weights_digest(build(8)) != weights_digest(first)
    assert {p.dtype for p in build(7, torch.bfloat16).parameters()} == {torch.bfloat16}
    weights = dict(first.named_parameters())
    assert torch.count_nonzero(weights["layers.0.feed_forward.w1.weight"]) > 0
    assert 0.015 < weights["layers.0.feed_forward.w1.weight"].std().item() < 0.025
    assert torch.equal(weights["layers.0.attention_norm1.weight"], torch.ones(32))
    assert not torch.count_nonzero(weights["all_x_embedder.2-1.bias"])
    x = [torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))]
    caption = [torch.randn(5, 16, generator=torch.Generator().manual_seed(1))]
    with torch.inference_mode():
        out = first(x, torch.tensor([0.5]), caption, return_dict=False)[0][0]
    assert out.shape == (16, 1, 8, 8) and torch.isfinite(out).all() and out.std() > 0


def test_random_weights_are_the_same_in_another_process(random_tiny_dir: Path) -> None:
    import subprocess
    import sys

    from diffusers import AutoencoderKL

    from zimage_split.random_weights import build_random_model, load_config

    code = (
        "import sys, torch; from diffusers import AutoencoderKL; "
        "from tests.unit.test_tiny_model import weights_digest; "
        "from zimage_split.random_weights import build_random_model, load_config; "
        "config = load_config(AutoencoderKL, sys.argv[1], 'vae'); "
        "print(weights_digest(build_random_model(AutoencoderKL, config, seed=3, component='vae', "
        "device='cpu', dtype=torch.float32)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(random_tiny_dir)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        cwd=Path(__file__).resolve().parents[2],
    )
    config = load_config(AutoencoderKL, str(random_tiny_dir), "vae")
    here = build_random_model(
        AutoencoderKL, config, seed=3, component="vae", device="cpu", dtype=torch.float32
    )
    assert result.stdout.strip() == weights_digest(here)


def _start_together(size: str, callers: int = 2) -> list[Path | BaseException]:
    """Calls cached_tiny_model(size) from `callers` threads at once; returns what each got."""
    import threading

    # diffusers' and transformers' lazy imports are not thread-safe; the real race is between processes.
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel  # noqa: F401
    from transformers import AutoTokenizer, Qwen2Tokenizer, Qwen3Config, Qwen3Model  # noqa: F401

    from zimage_split import tiny_model

    results: list[Path | BaseException] = []

    def start() -> None:
        try:
            results.append(tiny_model.cached_tiny_model(size))
        except BaseException as error:
            results.append(error)

    threads = [threading.Thread(target=start) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return results


def test_callers_starting_together_on_a_fresh_cache_build_the_preset_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An encoder and a generator started together on a fresh cache: one builds, the other waits for it."""
    import time

    from zimage_split import tiny_model

    monkeypatch.setenv("ZSPLIT_CACHE", str(tmp_path / "cache"))
    build = tiny_model.build_tiny_model
    builds: list[Path] = []

    def slow_build(*args, **kwargs):  # type: ignore[no-untyped-def]
        builds.append(Path(args[0]))
        time.sleep(1)  # the other caller, started at the same moment, arrives while this one builds
        return build(*args, **kwargs)

    monkeypatch.setattr(tiny_model, "build_tiny_model", slow_build)
    results = _start_together("tiny")
    assert len(builds) == 1, "one caller built, the other waited for it"
    assert results[0] == results[1] and isinstance(results[0], Path), results
    assert (results[0] / "model_index.json").is_file()
    assert [p.name for p in results[0].parent.iterdir()] == [results[0].name], "no staging or lock file"


def test_two_builds_of_the_same_preset_at_once_both_get_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the lock (an older zsplit beside this one, a file system without flock) both build; the
    one whose rename comes second used to die with ENOTEMPTY."""
    import contextlib
    import threading

    from zimage_split import tiny_model

    monkeypatch.setenv("ZSPLIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tiny_model, "locked_folder", lambda folder: contextlib.nullcontext())
    barrier = threading.Barrier(2)
    build = tiny_model.build_tiny_model
    builds: list[Path] = []

    def build_after_the_other_started(*args, **kwargs):  # type: ignore[no-untyped-def]
        barrier.wait(timeout=60)  # both have seen no model: the race the two services ran
        builds.append(Path(args[0]))
        return build(*args, **kwargs)

    monkeypatch.setattr(tiny_model, "build_tiny_model", build_after_the_other_started)
    results = _start_together("tiny")
    assert len(builds) == 2, "both callers must have built"
    assert results[0] == results[1] and isinstance(results[0], Path), results
    assert (results[0] / "model_index.json").is_file()
    assert [p.name for p in results[0].parent.iterdir()] == [results[0].name], "no staging folder left"


def test_a_cache_that_cannot_be_written_is_a_typed_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zimage_split.common.errors import FailedPrecondition
    from zimage_split.tiny_model import cached_tiny_model

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ZSPLIT_CACHE", str(blocker / "cache"))
    with pytest.raises(FailedPrecondition, match=rf"{blocker}/cache/tiny-\w+ is not a folder.*ZSPLIT_CACHE"):
        cached_tiny_model("tiny")


def test_a_build_killed_halfway_leaves_nothing_behind_once_the_preset_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build killed before its rename leaves its staging folder; the next build of that preset removes it."""
    import shutil

    from zimage_split import tiny_model

    monkeypatch.setenv("ZSPLIT_CACHE", str(tmp_path / "cache"))
    built = tiny_model.cached_tiny_model("tiny")
    shutil.rmtree(built)
    abandoned = built.parent / f".{built.name}.k1ll3d"
    (abandoned / "transformer").mkdir(parents=True)
    (abandoned / "transformer" / "half.safetensors").write_bytes(b"\0" * 1024)
    other = built.parent / ".another-model.k1ll3d"
    other.mkdir()
    assert tiny_model.cached_tiny_model("tiny") == built
    assert (built / "model_index.json").is_file()
    assert not abandoned.exists(), "the killed build's folder is removed"
    assert other.exists(), "another preset's folder is not this build's to remove"
