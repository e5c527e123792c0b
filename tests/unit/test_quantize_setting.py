"""`--quantize` as a setting: flag, environment and TOML reach EncoderConfig, bad values are refused with the
fix, and only a quantized encoder adds to the identity that text keys hash."""

from __future__ import annotations

from pathlib import Path

import pytest

from zimage_split.cli import main, parse_settings
from zimage_split.cli.serve import encoder_config
from zimage_split.common.encoder_pool import describe_identity, encoder_identity
from zimage_split.common.errors import InvalidArgument
from zimage_split.encoder_service.config import EncoderConfig

SERVE = ["serve", "encoder", "--model", "tiny", "--insecure"]


@pytest.fixture(autouse=True)
def no_settings_from_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ZSPLIT_QUANTIZE", "ZSPLIT_DTYPE", "ZSPLIT_DEVICE", "ZSPLIT_CONFIG", "ZSPLIT_PROFILE"):
        monkeypatch.delenv(name, raising=False)


def test_quantize_comes_from_the_flag_the_environment_or_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert encoder_config(parse_settings(SERVE)).quantize == "none"
    assert encoder_config(parse_settings([*SERVE, "--quantize", "int8"])).quantize == "int8"
    settings = tmp_path / "zsplit.toml"
    settings.write_text('[encoder]\nquantize = "int8"\n')
    assert encoder_config(parse_settings([*SERVE, "--config", str(settings)])).quantize == "int8"
    monkeypatch.setenv("ZSPLIT_QUANTIZE", "none")
    assert encoder_config(parse_settings([*SERVE, "--config", str(settings)])).quantize == "none"
    monkeypatch.setenv("ZSPLIT_QUANTIZE", "int4")
    with pytest.raises(InvalidArgument, match="'int4' is not one of none, int8"):
        parse_settings(SERVE)


def test_an_unknown_flag_value_is_refused_by_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*SERVE, "--quantize", "int4"])
    assert exited.value.code == 2
    assert "argument --quantize: invalid choice: 'int4'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"quantize": "int4"}, "--quantize must be one of none, int8 (got 'int4')"),
        (
            {"quantize": "int8", "dtype": "bfloat16"},
            "computes its activations in float32 (got --dtype bfloat16)",
        ),
        ({"quantize": "int8", "device": "cuda"}, "runs on the CPU only (got --device cuda)"),
        ({"quantize": "int8", "device": "mps"}, "runs on the CPU only (got --device mps)"),
    ],
)
def test_settings_int8_cannot_serve_are_refused_before_anything_loads(
    settings: dict[str, str], message: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        EncoderConfig(model="tiny", **settings)
    assert message in refused.value.message


def test_only_a_quantized_encoder_changes_its_identity() -> None:
    info = {"model_id": "tiny", "dtype": "DTYPE_FLOAT32", "hidden_layer": -2, "max_sequence_length": 512}
    before = "tiny|DTYPE_FLOAT32|-2|512"  # what every encoder's identity was before --quantize
    assert encoder_identity(info) == before
    assert encoder_identity(info | {"quantization": "none"}) == before
    assert encoder_identity(info | {"quantization": ""}) == before
    assert encoder_identity(info | {"quantization": "int8"}) == before + "|int8"
    assert describe_identity(info).endswith("quantization none")
    assert describe_identity(info | {"quantization": "int8"}).endswith("quantization int8")


def test_a_gpu_that_device_auto_picked_or_a_model_not_in_float32_is_refused() -> None:
    import torch

    from zimage_split.encoder_service.quantization import check_device, quantize_model

    check_device("int8", torch.device("cpu"))
    check_device("none", torch.device("cuda"))
    with pytest.raises(InvalidArgument, match=r"--device auto picked cuda:0; add --device cpu"):
        check_device("int8", torch.device("cuda:0"))
    with pytest.raises(InvalidArgument, match="needs a float32 model on the CPU"):
        quantize_model(torch.nn.Linear(4, 4).to(torch.bfloat16), "int8")
