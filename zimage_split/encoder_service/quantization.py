"""`--quantize int8`: the text encoder's linear layers as int8 weights (one scale per output row) with int8
activations quantized per token on the fly (torchao), on the CPU, with everything else in float32."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from zimage_split.common.errors import InvalidArgument
from zimage_split.common.vocabulary import QUANTIZATIONS

if TYPE_CHECKING:
    import torch

INSTALL_HINT = "pip install 'zimage-split[int8]' (or pip install torchao)"


def check_quantize_setting(quantize: str, *, device: str, dtype: str) -> None:
    """Checks `--quantize` against the `--device` and `--dtype` flags as given (before anything loads)."""
    if quantize not in QUANTIZATIONS:
        raise InvalidArgument(
            f"--quantize must be one of {', '.join(QUANTIZATIONS)} (got {quantize!r}); none keeps the "
            "weights in --dtype."
        )
    if quantize == "none":
        return
    if device not in ("auto", "cpu"):
        raise InvalidArgument(
            f"--quantize {quantize} runs on the CPU only (got --device {device}); use --device cpu, or "
            "--quantize none on a GPU, where bfloat16 is faster anyway."
        )
    if dtype not in ("auto", "float32"):
        raise InvalidArgument(
            f"--quantize {quantize} computes its activations in float32 (got --dtype {dtype}); leave --dtype "
            "at auto or set --dtype float32."
        )


def check_device(quantize: str, device: torch.device) -> None:
    """Refuses a quantized encoder on the device `--device auto` picked, when that is not the CPU."""
    if quantize != "none" and device.type != "cpu":
        raise InvalidArgument(
            f"--quantize {quantize} runs on the CPU only, but --device auto picked {device}; add --device cpu."
        )


def require_torchao() -> None:
    """Imports torchao, or says how to install it. torchao's import logs a warning for each of its CUDA
    kernel libraries that a CPU-only torch cannot load; none of them is used here."""
    torchao_logger = logging.getLogger("torchao")
    level = torchao_logger.level
    torchao_logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization  # noqa: F401
    except ImportError as error:
        raise InvalidArgument(
            f"--quantize int8 needs torchao, which is not installed ({error}); {INSTALL_HINT}."
        ) from None
    finally:
        torchao_logger.setLevel(level)


def quantize_model(model: torch.nn.Module, quantize: str) -> torch.nn.Module:
    """Quantizes `model`'s nn.Linear layers in place as `quantize` says ("none" leaves it as it is).

    The model must already be float32 on the CPU; embeddings and norms stay float32.
    """
    if quantize == "none":
        return model
    check_quantize_setting(quantize, device="cpu", dtype="float32")
    weight = next(model.parameters())
    if weight.device.type != "cpu" or str(weight.dtype) != "torch.float32":
        raise InvalidArgument(
            f"--quantize {quantize} needs a float32 model on the CPU (got {weight.dtype} on {weight.device}); "
            "use --device cpu and --dtype float32."
        )
    require_torchao()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    # set_inductor_config would change torch.compile's global settings; nothing here is compiled.
    quantize_(model, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    return model
