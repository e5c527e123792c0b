"""The one-step GPU check (`python -m benchmarks.device_check`), rehearsed on the CPU: `--quick` runs every
phase on the tiny model, and a failed or skipped phase is recorded without losing the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.device_check import PHASES

ROOT = Path(__file__).resolve().parents[2]


def device_check(out_dir: Path, *flags: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    """Runs the check in a fresh process (as on the GPU machine, where ray is not installed)."""
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.device_check", "--out-dir", str(out_dir), *flags],
        cwd=ROOT,
        env=os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=280,
    )
    report = json.loads((out_dir / "device-check.json").read_text())
    return completed, report, (out_dir / "device-check.md").read_text()


def test_quick_runs_every_phase_and_writes_json_and_markdown(tmp_path: Path) -> None:
    completed, report, markdown = device_check(tmp_path, "--quick")
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert report["quick"] is True and report["model"] == "tiny" and report["device"] == "cpu"
    assert list(report["phases"]) == list(PHASES)
    for name, phase in report["phases"].items():
        assert phase["status"] == "ok", (name, phase)
        assert phase["seconds"] > 0 and phase["summary"], name
    assert not report["ray_imported"]
    phases = report["phases"]
    assert phases["versions"]["distributions"]["diffusers"] == "0.42.1"
    for name in ("latency", "latency_compiled"):
        latency = phases[name]
        assert latency["compiled"] is (name == "latency_compiled")
        assert len(latency["warmup_rounds"]) >= 1 and latency["rounds"]
        assert latency["diffusers_with_png_p50_s"] > latency["diffusers_p50_s"]
    assert phases["latency_compiled"]["generator_start_s"] > phases["latency"]["generator_start_s"]
    tiled = [point["vae_tiled"] for point in phases["vram"]["points"]]
    assert tiled == [False, True]
    assert phases["encode"]["tokens_per_s"] > 0
    assert "| latency_compiled | ok |" in markdown and "Quick mode" in markdown


def test_phases_that_do_not_fit_the_budget_are_skipped_and_recorded(tmp_path: Path) -> None:
    completed, report, markdown = device_check(tmp_path, "--quick", "--budget-seconds", "0")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert [phase["status"] for phase in report["phases"].values()] == ["skipped"] * len(PHASES)
    assert "--budget-seconds" in report["phases"]["versions"]["reason"]
    assert "| encode | skipped |" in markdown


def test_a_failed_phase_is_recorded_and_the_phases_that_need_it_are_skipped(tmp_path: Path) -> None:
    """Without --quick the check wants a GPU: on a CPU-only host the first phase fails, saying so."""
    completed, report, markdown = device_check(tmp_path, "--device", "cuda", "--skip", "encode")
    if report["phases"]["versions"]["status"] == "ok":  # a host with a GPU: nothing to check here
        return
    assert completed.returncode == 1
    assert "sees no GPU" in report["phases"]["versions"]["error"]
    assert report["phases"]["cuda_smoke"] == {
        "status": "skipped",
        "reason": "needs versions, which did not succeed",
    }
    assert report["phases"]["encode"]["reason"] == "--skip"
    assert "## versions failed" in markdown
