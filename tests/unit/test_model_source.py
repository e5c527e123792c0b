"""A hub id with the hub out of reach: the local cache if it holds the model, else a quick error with the
hint (huggingface_hub alone would retry each file for about 20 s)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESOLVE = "from zimage_split.model_source import resolve_model; print(resolve_model({model!r}).location)"


def offline_env(hf_home: Path) -> dict[str, str]:
    """HF_HUB_OFFLINE unset, and the hub at a loopback port nothing listens on: a machine with no network."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZSPLIT_", "HF_"))}
    return env | {"HF_HOME": str(hf_home), "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_forgotten_model_fails_within_seconds_with_the_hint(tmp_path: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "zimage_split.cli", "serve", "encoder", "--insecure", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=offline_env(tmp_path / "hf") | {"PYTHONPATH": str(ROOT)},
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert "Cannot reach the Hugging Face hub at http://127.0.0.1:" in result.stderr
    assert "hf download Tongyi-MAI/Z-Image-Turbo --local-dir ./Z-Image-Turbo" in result.stderr
    assert "--model tiny" in result.stderr
    assert "Retrying" not in result.stderr
    assert elapsed < 30, f"took {elapsed:.0f} s (huggingface_hub's retries alone take over a minute)"


def test_an_unreachable_hub_loads_a_cached_model_from_the_cache(tmp_path: Path) -> None:
    snapshot = tmp_path / "hf" / "hub" / "models--Tongyi-MAI--Z-Image-Turbo" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    result = subprocess.run(
        [sys.executable, "-c", RESOLVE.format(model="Tongyi-MAI/Z-Image-Turbo")],
        capture_output=True,
        text=True,
        timeout=120,
        env=offline_env(tmp_path / "hf") | {"PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == snapshot
    assert (
        "cannot be reached" in result.stderr
        and "loading Tongyi-MAI/Z-Image-Turbo from the local cache" in result.stderr
    )


def test_on_this_host_builds_a_preset_in_this_hosts_cache(tmp_path: Path) -> None:
    """A replica on another host gets the front's `tiny` rebuilt in its own ZSPLIT_CACHE, not the front's
    path; a folder the front had but this host lacks is NotFound naming the folder and the fix."""
    script = (
        "import json, os\n"
        "from zimage_split.common.errors import NotFound\n"
        "from zimage_split.model_source import ModelSource, on_this_host\n"
        "front = ModelSource(location='/front/cache/tiny-abc', model_id='zimage-split/tiny', random_weights_seed=None)\n"
        "here = on_this_host(front)\n"
        "try:\n"
        "    on_this_host(ModelSource(location='/nowhere/Z-Image-Turbo', model_id='/nowhere/Z-Image-Turbo'))\n"
        "    missing = ''\n"
        "except NotFound as error:\n"
        "    missing = str(error)\n"
        "hub = on_this_host(ModelSource(location='Tongyi-MAI/Z-Image-Turbo', model_id='Tongyi-MAI/Z-Image-Turbo'))\n"
        "print(json.dumps([here.location, here.model_id, missing, hub.location]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZSPLIT_")} | {
        "ZSPLIT_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    completed = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    location, model_id, missing, hub = json.loads(completed.stdout.strip().splitlines()[-1])
    assert Path(location).parent == tmp_path / "cache" and (Path(location) / "model_index.json").is_file()
    assert model_id == "zimage-split/tiny"
    assert "The model folder /nowhere/Z-Image-Turbo (the generator front's --model) is not on host" in missing
    assert "every Ray host needs the model at the same path" in missing
    assert hub == "Tongyi-MAI/Z-Image-Turbo"
