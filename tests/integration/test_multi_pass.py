"""Multi-pass ("hires") generation equals the same calls made by hand: an image at the first pass's size, then
img2img of it (resized by the generator, as any start image) at each later pass's size."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch

from zimage_split.client import InvalidArgument


def embedding(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(tokens, 16, generator=torch.Generator().manual_seed(seed))


def test_two_passes_equal_the_calls_made_by_hand(client: Any) -> None:
    prompt = embedding(9, 4)
    request = {
        "embeddings": prompt,
        "seed": 5,
        "width": 256,
        "height": 192,
        "steps": 4,
        "passes": [{"scale": 0.5}, {"scale": 1.0, "strength": 0.5, "steps": 6}],
    }
    final = client.generate(**request, return_intermediate=True)
    [intermediate] = final.info["intermediate"]
    by_hand_first = client.generate(embeddings=prompt, seed=5, width=128, height=96, steps=4)
    assert intermediate.size == (128, 96)
    assert np.array_equal(np.asarray(intermediate), np.asarray(by_hand_first))
    by_hand = client.generate(
        embeddings=prompt, seed=5, width=256, height=192, steps=6, init_image=by_hand_first, strength=0.5
    )
    assert final.size == (256, 192)
    assert np.array_equal(np.asarray(final), np.asarray(by_hand))
    assert (final.info["pass_index"], final.info["pass_count"]) == (1, 2)
    assert (intermediate.info["pass_index"], intermediate.info["pass_count"]) == (0, 2)
    # Without return_intermediate only the final image comes back, the same one.
    again = client.generate(**request)
    assert np.array_equal(np.asarray(again), np.asarray(final)) and "intermediate" not in again.info


@pytest.mark.parametrize(
    ("passes", "message"),
    [
        ([{"scale": 1.0}], "passes takes 2 to 4 passes"),
        ([{"scale": 0.5}, {"scale": 0.4}, {"scale": 1.0}], r"passes\[1\].scale must be above 0.5"),
        ([{"scale": 0.5}, {"scale": 0.8}], "The last pass makes the request's size: give it scale 1"),
        ([{"scale": 0.5, "strength": 0.5}, {"scale": 1.0}], r"passes\[0\].strength has nothing to act on"),
        ([{"scale": 0.25}, {"scale": 1.0}], "under the 64-pixel smallest side"),
        ([{"scale": 0.5}, {"scale": 1.0, "strength": 1.5}], r"passes\[1\].strength must be above 0"),
        ([{"scale": 0.5}, {"scale": 1.0}], None),  # valid: the control case
    ],
)
def test_bad_passes_say_how_to_fix_them(client: Any, passes: list, message: str | None) -> None:
    def call() -> Any:
        return client.generate(
            embeddings=embedding(5, 1), seed=1, width=128, height=128, steps=2, passes=passes
        )

    if message is None:
        assert call().size == (128, 128)
        return
    with pytest.raises(InvalidArgument, match=message):
        call()


def test_the_files_record_their_passes_and_the_cli_writes_each_one(
    client: Any, generator: Any, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    from zimage_split.cli import main

    final = client.generate(
        "a barn",
        seed=2,
        width=128,
        height=128,
        steps=2,
        passes=[{"scale": 0.5}, {"scale": 1, "strength": 0.6}],
    )
    assert json.loads(final.text["passes"]) == [
        {"scale": 0.5, "steps": 2},
        {"scale": 1.0, "steps": 2, "strength": 0.6},
    ]
    assert 'Passes: "0.5:2, 1:2:0.6"' in final.text["parameters"]
    plain = client.generate("a barn", seed=2, width=128, height=128, steps=2)
    assert "passes" not in plain.text and "Passes" not in plain.text["parameters"]

    out = tmp_path / "barn.png"
    argv = ["generate", "a barn", "--generator", f"127.0.0.1:{generator.port}", "--insecure", "--seed", "2"]
    argv += ["--width", "128", "--height", "128", "--steps", "2", "--pass", "0.5", "--pass", "1::0.6"]
    assert main([*argv, "--save-passes", "-o", str(out)]) == 0
    with Image.open(out) as written, Image.open(tmp_path / "barn-pass0.png") as first:
        assert written.size == (128, 128) and first.size == (64, 64)
        assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(final))
