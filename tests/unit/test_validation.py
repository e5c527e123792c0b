import math

import pytest
import torch

from zimage_split.common.errors import InvalidArgument
from zimage_split.dit_service.validation import Limits, validate_embedding, validate_params

LIMITS = Limits()


def params(**overrides):  # type: ignore[no-untyped-def]
    values = dict(
        width=None,
        height=None,
        steps=None,
        guidance_scale=None,
        cfg_normalization=0.0,
        cfg_truncation=None,
        seed=1,
    )
    values.update(overrides)
    return validate_params(LIMITS, **values)


def test_defaults_are_the_turbo_settings() -> None:
    result = params()
    assert (result.width, result.height, result.steps, result.guidance_scale) == (1024, 1024, 8, 0.0)
    assert result.cfg_truncation == 1.0 and result.seed == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"width": 1000}, r"Width must be divisible by 16 \(got 1000\). Use 992 or 1008"),
        ({"height": 8}, "Height must be divisible by 16"),
        ({"width": 32}, "between 64 and 4096"),
        ({"steps": 0}, "steps must be between 1 and 100 .got 0."),
        ({"steps": 10_000}, "steps must be between 1 and 100 .got 10000."),
        ({"width": 4096, "height": 4096}, "over this server's limit"),
        ({"guidance_scale": -1.0}, "guidance_scale must be between 0"),
        ({"guidance_scale": math.nan}, "guidance_scale"),
        ({"cfg_truncation": 2.0}, "cfg_truncation"),
        ({"cfg_normalization": -0.5}, "cfg_normalization"),
    ],
)
def test_bad_parameters_say_how_to_fix_them(overrides: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        params(**overrides)


def test_embedding_checks() -> None:
    good = torch.randn(5, 16)
    assert validate_embedding(good, caption_dim=16, max_tokens=10, what="e") is good
    with pytest.raises(InvalidArgument, match="hidden size 32, but this generator's DiT takes 16"):
        validate_embedding(torch.randn(5, 32), caption_dim=16, max_tokens=10, what="e")
    with pytest.raises(InvalidArgument, match="NaN"):
        validate_embedding(torch.tensor([[math.nan] * 16]), caption_dim=16, max_tokens=10, what="e")
    with pytest.raises(InvalidArgument, match="shape"):
        validate_embedding(torch.randn(1, 5, 16), caption_dim=16, max_tokens=10, what="e")
    with pytest.raises(InvalidArgument, match="11 tokens"):
        validate_embedding(torch.randn(11, 16), caption_dim=16, max_tokens=10, what="e")
