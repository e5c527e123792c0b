import math

import pytest
import torch

from zimage_split.common.errors import InvalidArgument, NotFound
from zimage_split.dit_service.config import Limits
from zimage_split.dit_service.controlnets import ControlNetInfo
from zimage_split.dit_service.validation import (
    all_finite,
    check_control_image_size,
    validate_controlnet,
    validate_embedding,
    validate_params,
)

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
    assert result.shift is None  # the model's own, filled in by the generator


@pytest.mark.parametrize("shift", [0.1, 1.0, 3.0, 20.0])
def test_a_shift_in_range_is_kept(shift: float) -> None:
    assert params(shift=shift).shift == shift


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
        ({"shift": 0.0}, r"shift must be between 0.1 and 20 \(got 0.0\); leave it unset for the model's own"),
        ({"shift": 20.5}, r"shift must be between 0.1 and 20 \(got 20.5\)"),
        ({"shift": math.inf}, "shift must be between"),
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


BAD_VALUES = [math.nan, -math.nan, math.inf, -math.inf]
FLOAT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("value", BAD_VALUES, ids=["nan", "-nan", "+inf", "-inf"])
def test_a_non_finite_value_anywhere_is_refused(dtype: torch.dtype, value: float) -> None:
    # The check reduces to a min and a max; it must still see one bad value in any position: the
    # vectorised body and tail of a small odd shape, and first, last and random ones of the real size,
    # which torch splits between threads.
    small = torch.randn(3, 37, generator=torch.Generator().manual_seed(0)).to(dtype)
    for position in range(small.numel()):
        bad = small.clone()
        bad.view(-1)[position] = value
        with pytest.raises(InvalidArgument, match="e contains NaN or infinite values; re-encode the prompt"):
            validate_embedding(bad, caption_dim=37, max_tokens=10, what="e")
    real = torch.randn(512, 2560, generator=torch.Generator().manual_seed(1)).to(dtype)
    rng = torch.Generator().manual_seed(2)
    positions = [0, 1, real.numel() - 1, *torch.randint(real.numel(), (8,), generator=rng).tolist()]
    for position in positions:
        bad = real.clone()
        bad.view(-1)[position] = value
        with pytest.raises(InvalidArgument, match="NaN or infinite"):
            validate_embedding(bad, caption_dim=2560, max_tokens=512, what="e")
    assert validate_embedding(real, caption_dim=2560, max_tokens=512, what="e") is real


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_finite_check_agrees_with_isfinite(dtype: torch.dtype) -> None:
    extremes = torch.tensor([[torch.finfo(dtype).max, torch.finfo(dtype).min, torch.finfo(dtype).tiny, -0.0]])
    assert all_finite(extremes.to(dtype))
    transposed = torch.randn(64, 16).to(dtype).t()  # not contiguous
    transposed[3, 5] = math.inf
    assert not all_finite(transposed)
    both = torch.randn(4, 16).to(dtype)
    both[0, 0], both[-1, -1] = math.inf, -math.inf
    assert not all_finite(both)
    assert not all_finite(torch.full((2, 16), math.nan, dtype=dtype))
    for shape in [(0,), (0, 16), (5, 0)]:  # torch.aminmax refuses empty tensors; isfinite().all() is True
        assert all_finite(torch.empty(shape, dtype=dtype)) == bool(torch.isfinite(torch.empty(shape)).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_finite_check_agrees_with_isfinite_on_every_16_bit_pattern(dtype: torch.dtype) -> None:
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    finite = torch.isfinite(patterns)
    assert 0 < int(finite.sum()) < patterns.numel()
    assert all_finite(patterns[finite])  # every finite pattern together
    mixed = patterns[finite][:8].clone()
    for bits in (
        patterns[~finite].view(torch.int16).tolist()
    ):  # every NaN and infinity alone, among finite ones
        mixed.view(torch.int16)[3] = bits
        assert not all_finite(mixed), bits


def test_finite_check_of_float32_sign_exponent_and_mantissa_edges() -> None:
    edges = [
        0x7F800000,
        0xFF800000,
        0x7F800001,
        0xFFC00000,
        0x7FFFFFFF,
        0x7F7FFFFF,
        0xFF7FFFFF,
        0x00000001,
        0x80000000,
    ]
    for bits in edges:
        value = torch.tensor([bits], dtype=torch.int64).to(torch.uint32).view(torch.float32)
        assert all_finite(value) is bool(torch.isfinite(value).all()), hex(bits)


@pytest.mark.parametrize(
    ("size", "width", "height", "fits"),
    [
        ((64, 64), 64, 64, True),
        ((512, 512), 64, 64, True),  # larger, same shape: resized
        ((1000, 667), 1024, 688, True),  # 3:2 rounded to multiples of 16
        ((1000, 667), 1024, 704, False),
        ((64, 64), 128, 64, False),
        ((96, 64), 64, 96, False),  # turned
    ],
)
def test_a_control_image_fits_when_it_has_the_requests_shape(size, width, height, fits) -> None:  # type: ignore[no-untyped-def]
    if fits:
        check_control_image_size(size, width, height, 16)
    else:
        with pytest.raises(InvalidArgument, match=f"another shape than the {width}x{height} requested"):
            check_control_image_size(size, width, height, 16)


def test_controlnet_names_and_scales() -> None:
    loaded = (ControlNetInfo("union", takes_mask=True, control_layers=15),)
    assert validate_controlnet("union", None, loaded) is loaded[0]
    assert validate_controlnet("union", 0.0, loaded) is loaded[0]
    with pytest.raises(NotFound, match=r"No ControlNet 'pose' on this generator. Loaded: 'union'."):
        validate_controlnet("pose", 1.0, loaded)
    with pytest.raises(NotFound, match=r"It loaded none: start it with --controlnet NAME=PATH"):
        validate_controlnet("pose", 1.0, ())
    for scale in (-0.1, 10.5, math.nan, math.inf):
        with pytest.raises(InvalidArgument, match=r"controlnet.conditioning_scale must be between 0 and 10"):
            validate_controlnet("union", scale, loaded)
