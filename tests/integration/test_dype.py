"""DyPE: the RoPE frequencies equal the paper's formulas worked out by hand, the transformer gets them at every
step with that step's noise level, and a 2048x2048 image from the tiny model comes back whole, decoded in tiles.
"""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from zimage_split.client import InvalidArgument
from zimage_split.dit_service.dype import Dype, DypeRope, axis_frequencies, extrapolating
from zimage_split.dit_service.engine import DiTEngine, GenerationJob, GenerationParams
from zimage_split.dit_service.outputs import OutputOptions, read_metadata
from zimage_split.model_source import resolve_model

CPU = torch.device("cpu")
# Z-Image-Turbo's image axes: 48 dimensions each, rope_theta 256, trained at 1024 pixels = 64 tokens a side.
DIM, THETA, BASE = 48, 256.0, 64


def by_hand(method: str, *, dim: int, tokens: int, scale: float, sigma: float) -> tuple[list[float], float]:
    """The paper's per-axis formulas (module docstring of dype.py) one frequency at a time, in plain floats."""
    kappa = 2.0 * sigma**2.0
    base = [THETA ** (-2 * j / dim) for j in range(dim // 2)]
    if method == "ntk":
        theta = THETA * max(1.0, (scale ** (dim / (dim - 2))) ** kappa)
        return [theta ** (-2 * j / dim) for j in range(dim // 2)], 1.0
    if method == "pi":
        return [f / max(1.0, scale**kappa) for f in base], 1.0

    def index(turns: float) -> float:
        return dim * math.log(BASE / (2 * math.pi * turns)) / (2 * math.log(THETA))

    def ramp(fast: float, slow: float) -> list[float]:
        low = max(math.floor(index(fast)), 0)
        high = min(math.ceil(index(slow)), dim - 1, dim // 2)
        if high == low:
            high += 0.001
        return [min(max((j - low) / (high - low), 0.0), 1.0) for j in range(dim // 2)]

    beta, gamma = ramp(1.25**kappa, 0.75**kappa), ramp(16**kappa, 2**kappa)
    ntk_theta = THETA * scale ** (dim / (dim - 2))
    frequencies = []
    for j in range(dim // 2):
        linear = base[j] / max(1.0, tokens / BASE)
        ntk = ntk_theta ** (-2 * j / dim)
        mixed = linear * beta[j] + ntk * (1 - beta[j])
        frequencies.append(mixed * gamma[j] + base[j] * (1 - gamma[j]))
    return frequencies, 1 + 0.1 * math.log(scale) * sigma**2.0


# (method, image tokens along the axis, larger axis's tokens, sigma): 2048 and 4096 pixels, a 2048x1024 image's
# short side, the first step, half way and the end of the schedule.
CASES = [
    (method, tokens, longest, sigma)
    for method in ("vision_yarn", "ntk", "pi")
    for tokens, longest in ((128, 128), (256, 256), (64, 128))
    for sigma in (1.0, 0.5, 0.0)
]


@pytest.mark.parametrize(("method", "tokens", "longest", "sigma"), CASES)
def test_frequencies_equal_the_formula_by_hand(method: str, tokens: int, longest: int, sigma: float) -> None:
    scale = longest / BASE
    expected, expected_amplitude = by_hand(method, dim=DIM, tokens=tokens, scale=scale, sigma=sigma)
    frequencies, amplitude = axis_frequencies(
        Dype(method=method), dim=DIM, theta=THETA, tokens=tokens, base_tokens=BASE, scale=scale, sigma=sigma
    )
    assert frequencies.tolist() == pytest.approx(expected, rel=1e-12)
    assert amplitude == pytest.approx(expected_amplitude, rel=1e-12)


def test_a_few_values_written_out() -> None:
    """vision_yarn at 2048x2048 (s = 2): the first step keeps the highest frequencies, extrapolates the middle
    ones NTK-style and interpolates the slowest; at sigma 0 the ramps are steps at index 11-12."""
    first, amplitude = axis_frequencies(
        Dype(), dim=DIM, theta=THETA, tokens=128, base_tokens=BASE, scale=2.0, sigma=1.0
    )
    # j = 0: theta^0 = 1 for every method. j = 23, slowest: base 256^(-46/48) / s.
    assert first[0].item() == 1.0
    assert first[23].item() == pytest.approx(256 ** (-46 / 48) / 2, rel=1e-12)
    assert amplitude == pytest.approx(1 + 0.1 * math.log(2), rel=1e-12)
    last, amplitude = axis_frequencies(
        Dype(), dim=DIM, theta=THETA, tokens=128, base_tokens=BASE, scale=2.0, sigma=0.0
    )
    assert amplitude == 1.0
    # kappa = 0: every ramp bound is r(1) = 48 ln(64 / 2pi) / (2 ln 256) = 10.04..., so low 10 and high 11.
    assert last[10].item() == pytest.approx(256 ** (-20 / 48), rel=1e-12)  # base
    assert last[11].item() == pytest.approx(256 ** (-22 / 48) / 2, rel=1e-12)  # linear: base / s
    assert first[10].item() != last[10].item() or first[11].item() != last[11].item()


def test_no_change_at_or_below_the_trained_size() -> None:
    for method in ("vision_yarn", "ntk", "pi"):
        frequencies, amplitude = axis_frequencies(
            Dype(method=method), dim=DIM, theta=THETA, tokens=64, base_tokens=BASE, scale=1.0, sigma=0.7
        )
        assert frequencies.tolist() == [THETA ** (-2 * j / DIM) for j in range(DIM // 2)]
        assert amplitude == 1.0


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> DiTEngine:
    return DiTEngine(resolve_model(str(tiny_model_dir)), device=CPU, dtype=torch.float32)


def embedding(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(tokens, 16, generator=torch.Generator().manual_seed(seed))


def test_rope_rotations_for_image_positions(engine: DiTEngine) -> None:
    """The embedder's output: caption axis as the model's own, image axes amplitude * exp(i * p * f)."""
    original = engine.pipe.transformer.rope_embedder
    rope = DypeRope(original, Dype(), rows=96, columns=128, base_tokens=64)
    rope.sigma = 0.4
    rows, columns = torch.meshgrid(torch.arange(96), torch.arange(128), indexing="ij")
    ids = torch.stack([torch.full_like(rows, 9), rows, columns], dim=-1).reshape(-1, 3).int()
    embedded = rope(ids)
    dims = [dim // 2 for dim in original.axes_dims]
    caption, row_part, column_part = embedded.split(dims, dim=-1)
    assert torch.equal(caption, original(ids).split(dims, dim=-1)[0])
    for part, axis, tokens in ((row_part, 1, 96), (column_part, 2, 128)):
        frequencies, amplitude = by_hand(
            "vision_yarn", dim=original.axes_dims[axis], tokens=tokens, scale=2.0, sigma=0.4
        )
        # The tiny model's image axes have 4 dimensions: its own theta (256) and the same formula.
        angles = ids[:, axis].double()[:, None] * torch.tensor(frequencies, dtype=torch.float64)[None]
        expected = torch.polar(torch.full_like(angles, amplitude), angles).to(torch.complex64)
        torch.testing.assert_close(part, expected, rtol=1e-6, atol=1e-6)
    assert rope.scale == 2.0 and amplitude > 1


def test_each_step_embeds_positions_at_its_own_noise_level(engine: DiTEngine) -> None:
    """Through the real pipeline: the transformer's calls see sigma 1, then the schedule's sigmas, in turn."""
    seen: list[float] = []
    params = GenerationParams(width=1280, height=1280, steps=4, seed=3, guidance_scale=2.0, dype=Dype())
    transformer = engine.pipe.transformer

    def record(module: torch.nn.Module, args: tuple, output: tuple) -> None:
        seen.append(module.rope_embedder.sigma)  # after the call: the sigma it embedded positions with

    with extrapolating(transformer, Dype(), width=64, height=64, patch=16) as probe:
        assert transformer.rope_embedder is probe
    assert transformer.rope_embedder is probe.original  # restored on exit
    handle = transformer.register_forward_hook(record)
    try:
        engine.render(
            [GenerationJob(params, embedding(5, 0), negative_prompt_embeds=embedding(3, 1), output=_latent())]
        )
    finally:
        handle.remove()
    scheduler = engine.pipe.scheduler
    assert seen == pytest.approx(scheduler.sigmas[:-1].tolist(), abs=1e-6)
    assert seen[0] == pytest.approx(1.0) and seen == sorted(seen, reverse=True) and len(set(seen)) == 4
    assert not isinstance(transformer.rope_embedder, DypeRope)


def _latent() -> OutputOptions:
    return OutputOptions(format="latent")


def test_dype_at_the_trained_size_is_the_plain_image(engine: DiTEngine) -> None:
    plain = GenerationParams(width=1024, height=512, steps=2, seed=5)
    jobs = [GenerationJob(plain, embedding(6, 2), output=_latent())]
    with_dype = [GenerationJob(dataclasses.replace(plain, dype=Dype()), embedding(6, 2), output=_latent())]
    assert engine.generate(jobs)[0].data == engine.generate(with_dype)[0].data  # type: ignore[union-attr]


def test_a_2048_image_through_grpc(client) -> None:  # type: ignore[no-untyped-def]
    """The tiny model at 2048x2048 with DyPE: the right size, decoded in tiles, DyPE recorded in the header and
    the file; not the image without it."""
    settings = {"width": 2048, "height": 2048, "steps": 1, "seed": 11}
    image = client.generate("a lighthouse", dype=True, dype_scale=3.0, **settings)
    assert image.size == (2048, 2048)
    assert image.info["vae_tiled"] is True
    assert image.info["dype"] == {"method": "vision_yarn", "scale": 3.0, "exponent": 2.0}
    recorded = read_metadata(image.info["file_bytes"])
    assert '"method": "vision_yarn"' in recorded["dype"]
    assert "DyPE: vision_yarn scale 3 exponent 2" in recorded["parameters"]
    plain = client.generate("a lighthouse", **settings)
    assert plain.info["dype"] is None and "dype" not in read_metadata(plain.info["file_bytes"])
    assert Image.open(io.BytesIO(plain.info["file_bytes"])).tobytes() != image.tobytes()


def test_bad_settings_are_refused(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument, match="Unknown dype method 'yarn'; use one of vision_yarn, ntk, pi"):
        client.generate("a cat", width=64, height=64, steps=1, dype=True, dype_method="yarn")
    with pytest.raises(InvalidArgument, match="dype_scale must be between 0 and 10"):
        client.generate("a cat", width=64, height=64, steps=1, dype=True, dype_scale=-2.0)
    with pytest.raises(InvalidArgument, match="need dype=True"):
        client.generate("a cat", width=64, height=64, steps=1, dype_exponent=1.0)


def test_a_controlnet_embeds_positions_with_the_same_dype(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A ControlNet shares the DiT's RoPE embedder (diffusers' from_transformer): with DyPE both call the
    same DypeRope at every step, each at the step's sigma, and both get the model's own back afterwards."""
    from zimage_split.dit_service.controlnets import ControlNetSpec
    from zimage_split.tiny_model import build_tiny_controlnet

    path = build_tiny_controlnet(tmp_path / "union", seed=5)
    engine = DiTEngine(
        resolve_model(str(tiny_model_dir)),
        device=CPU,
        dtype=torch.float32,
        controlnets=(ControlNetSpec("edges", str(path)),),
    )
    params = GenerationParams(
        width=1280, height=1280, steps=3, seed=1, dype=Dype(), controlnet="edges", controlnet_scale=0.8
    )
    controlnet = engine._controlnet_pipe(params).controlnet
    seen: dict[str, list[float]] = {"transformer": [], "controlnet": []}
    hooks = [
        module.register_forward_hook(
            lambda module, args, output, name=name: seen[name].append(module.rope_embedder.sigma)
        )
        for name, module in (("transformer", engine.pipe.transformer), ("controlnet", controlnet))
    ]
    control = Image.new("RGB", (1280, 1280), (128, 64, 32))
    try:
        engine.render([GenerationJob(params, embedding(5, 0), control_image=control, output=_latent())])
    finally:
        for hook in hooks:
            hook.remove()
    assert (
        seen["controlnet"] == seen["transformer"] == pytest.approx(engine.pipe.scheduler.sigmas[:-1].tolist())
    )
    assert controlnet.rope_embedder is engine.pipe.transformer.rope_embedder
    assert not isinstance(controlnet.rope_embedder, DypeRope)
