"""examples/diffusers_interop.py, the example docs/sdk.md shows: diffusers' ZImagePipeline given
`client.encode([...]).to_diffusers()` from our encoder makes the image our generator makes, byte for byte."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "diffusers_interop.py"


def test_the_interop_example_makes_our_generators_image(
    client, encoder_fp32, tiny_model_dir, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    prompt, seed, width, height = "a red fox in deep snow", 9, 96, 64
    output = tmp_path / "diffusers.png"
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), prompt, "--encoder", f"127.0.0.1:{encoder_fp32.port}"]
        + ["--model", str(tiny_model_dir), "--seed", str(seed), "--width", str(width)]
        + ["--height", str(height), "-o", str(output)],
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    ours = client.generate(prompt, seed=seed, width=width, height=height, steps=8, guidance_scale=0.0)
    with Image.open(output) as theirs:
        assert np.array_equal(np.asarray(theirs.convert("RGB")), np.asarray(ours.convert("RGB")))


def test_to_diffusers_gives_one_tensor_per_prompt_on_the_device_and_dtype_asked(client) -> None:  # type: ignore[no-untyped-def]
    embeddings = client.encode(["a fox", "a lighthouse on a cliff"])
    tensors = embeddings.to_diffusers(dtype=torch.bfloat16)
    assert [tuple(t.shape) for t in tensors] == [item.shape for item in embeddings]
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)
    same = embeddings.to_diffusers()
    assert all(
        torch.equal(t, item.tensor) and t.dtype == torch.float32
        for t, item in zip(same, embeddings, strict=True)
    )


def test_the_docs_show_the_example_that_runs() -> None:
    code = EXAMPLE.read_text()
    shown = re.search(r"# --8<-- \[start:example\]\n(.*?)# --8<-- \[end:example\]", code, re.S)
    assert shown, "the example's marked block is gone"
    assert shown.group(1).strip() in (ROOT / "docs" / "sdk.md").read_text()
