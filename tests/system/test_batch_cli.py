"""`zsplit encode` then `zsplit generate --embeddings`: a batch survives SIGKILL and resumes exactly once."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tests.system.test_end_to_end import ZSPLIT
from zimage_split.client import Client

PROMPTS = [
    "a red fox in snow",
    "a lighthouse at dusk, oil on canvas",
    "ramen",
    "a neon city in the rain at night",
]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def zsplit(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*ZSPLIT, *args], capture_output=True, text=True, timeout=timeout, env=ENV)
    assert result.returncode == 0, result.stderr
    return result


def manifest_lines(out_dir: Path) -> list[dict]:
    path = out_dir / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_encode_file_then_batch_resumes_after_sigkill(
    tiny_model_dir: Path, tmp_path: Path, generator, encoder_fp32
) -> None:  # type: ignore[no-untyped-def]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n\n" + "\n".join(PROMPTS[2:]) + "\n")
    embeds = tmp_path / "embeds.safetensors"
    encoded = zsplit(
        "encode",
        "--prompts",
        str(prompts),
        "--model",
        str(tiny_model_dir),
        "--dtype",
        "float32",
        "-o",
        str(embeds),
        "--device",
        "cpu",
    )
    assert "skipped 1 empty line(s) (line 3)" in encoded.stderr
    assert "wrote 4 embeddings" in encoded.stdout

    out_dir = tmp_path / "out"
    batch = [
        "generate", "--embeddings", str(embeds), "--seeds", "0-2", "--sizes", "128x128,64x96",
        "--steps", "6", "--out-dir", str(out_dir), "--concurrency", "1", "--device", "cpu", "--dtype", "float32",
        "--no-progress",
    ]  # fmt: skip
    # No --generator: a generator runs in the command, with no encoder at all. Kill it partway.
    process = subprocess.Popen(
        [*ZSPLIT, *batch], env=ENV, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 180
    while len(manifest_lines(out_dir)) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    made_before_kill = len(manifest_lines(out_dir))
    assert 3 <= made_before_kill < 24, "the kill landed partway through the batch"
    (out_dir / ".p00003_s2_64x96.png.dead.tmp").write_bytes(b"half a png")  # as a kill mid-write leaves

    resumed = zsplit(*batch)
    assert (
        f"24 images in {out_dir} ({made_before_kill} already there, {24 - made_before_kill} made"
        in resumed.stdout
    )

    entries = manifest_lines(out_dir)
    files = sorted(path.name for path in out_dir.iterdir())
    assert len(entries) == 24 == len({entry["file"] for entry in entries}), (
        "every image recorded exactly once"
    )
    assert files == sorted([entry["file"] for entry in entries] + ["manifest.jsonl"]), (
        "no partial or extra files"
    )
    for entry in entries:
        data = (out_dir / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert (
            entry["file"]
            == f"p{entry['prompt_index']:05d}_s{entry['seed']}_{entry['width']}x{entry['height']}.png"
        )

    # A third run finds everything done and makes nothing.
    again = zsplit(*batch)
    assert "(24 already there, 0 made" in again.stdout and len(manifest_lines(out_dir)) == 24

    # The file's embeddings give the same pixels as sending the prompt text to the running services.
    with Client(generator=f"127.0.0.1:{generator.port}", encoder=f"127.0.0.1:{encoder_fp32.port}") as client:
        for entry in entries:
            if entry["seed"] == 1:
                by_text = client.generate(
                    PROMPTS[entry["prompt_index"]],
                    seed=1,
                    width=entry["width"],
                    height=entry["height"],
                    steps=6,
                )
                with Image.open(out_dir / entry["file"]) as from_file:
                    assert np.array_equal(np.asarray(by_text), np.asarray(from_file)), entry["file"]


def test_a_batch_refuses_a_file_for_another_model_before_any_work(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    import torch

    from zimage_split.client import Embeddings, PromptEmbedding

    embeds = Embeddings(
        [PromptEmbedding("x", "k", torch.randn(4, 16), 4, False)], model_id="someone/other-model"
    ).save(tmp_path / "other.safetensors")
    result = subprocess.run(
        [*ZSPLIT, "generate", "--embeddings", str(embeds), "--model", str(tiny_model_dir), "--out-dir",
         str(tmp_path / "out"), "--sizes", "64x64", "--no-progress"],
        capture_output=True, text=True, timeout=180, env=ENV,
    )  # fmt: skip
    assert result.returncode == 2 and "encoded for 'someone/other-model'" in result.stderr
    assert not list((tmp_path / "out").glob("*.png"))
