import hashlib
from pathlib import Path

import pytest

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
