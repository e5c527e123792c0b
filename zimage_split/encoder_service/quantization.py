"""`--quantize int8`: the text encoder's linear layers as int8 weights (one scale per output row) with int8
activations quantized per token on the fly (torchao), on the CPU, with everything else in float32."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from zimage_split.common.errors import InvalidArgument
from zimage_split.common.logs import NOISY_IMPORT_LOGGERS
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


@contextlib.contextmanager
def _quiet_import_noise() -> Iterator[None]:
    """Silences torchao's import-time warnings (common.logs says which) for callers that did not configure
    logging through zsplit."""
    loggers = [logging.getLogger(name) for name in NOISY_IMPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def require_torchao() -> None:
    """Imports torchao, or says how to install it."""
    try:
        with _quiet_import_noise():
            import torchao.quantization  # noqa: F401
    except ImportError as error:
        raise InvalidArgument(
            f"--quantize int8 needs torchao, which is not installed ({error}); {INSTALL_HINT}."
        ) from None


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

    with _quiet_import_noise():  # torchao imports the int8 tensor's modules on first use
        # set_inductor_config would change torch.compile's global settings; nothing here is compiled.
        quantize_(model, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    return model
