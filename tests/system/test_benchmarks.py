"""The benchmark harness in quick mode: every benchmark runs on the tiny model and the results are well formed.

Quick-mode figures mean nothing; these tests check the harness (`zsplit bench` = `python -m benchmarks`),
its JSON and markdown, and its refusals.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import BENCHMARKS, README_BEGIN, README_END, markdown, update_readme

ROOT = Path(__file__).resolve().parents[2]
ZSPLIT = str(Path(sys.executable).with_name("zsplit"))
ROW_KEYS = {
    "benchmark",
    "metric",
    "unit",
    "ours",
    "baseline",
    "baseline_name",
    "ratio",
    "ratio_meaning",
    "target",
    "target_met",
    "note",
}
# Seconds the work of each kind of test may take. pytest-timeout counts a module fixture's set-up against
# the first test that uses it, and any test may be the first (-k, -x, ordering): every test that uses
# `quick_run` gets the quick run's time, plus a little for its own checks.
# Measured on a shared 2-core machine: 133 s, 13 s and 1.2 s; each limit leaves room for a slower one.
QUICK_RUN_SECONDS = 600  # every benchmark's quick run
FAILING_RUN_SECONDS = 120  # the transfer benchmark's quick run, and the encode one's start and failure
REFUSAL_SECONDS = 30  # the runner exits at its argument checks, before any benchmark runs
OWN_CHECKS_SECONDS = 30


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """One `zsplit bench --quick` of every benchmark, from outside the checkout (as a user would)."""
    out_dir = tmp_path_factory.mktemp("bench")
    completed = subprocess.run(
        [ZSPLIT, "bench", "--quick", "--out-dir", str(out_dir)],
        cwd=out_dir,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=QUICK_RUN_SECONDS,
    )
    return completed, out_dir


@pytest.mark.timeout(QUICK_RUN_SECONDS + OWN_CHECKS_SECONDS)
def test_quick_run_of_every_benchmark_writes_well_formed_json(quick_run) -> None:  # type: ignore[no-untyped-def]
    completed, out_dir = quick_run
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    (json_path,) = out_dir.glob("*-quick.json")
    assert json_path.name.startswith(json_path.name[:10]) and json_path.name[4] == "-"  # <date>-<device>
    summary = json.loads(json_path.read_text())
    assert summary["quick"] is True and summary["model"] == "tiny"
    assert list(summary["benchmarks"]) == list(BENCHMARKS)
    for name, result in summary["benchmarks"].items():
        assert "error" not in result, (name, result)
        assert result["benchmark"] == name
        assert result["settings"]["quick"] is True
        assert isinstance(result["target"], str) and result["target"]
        assert result["target_met"] in (True, False, None)
        assert result["headline"], name
        assert result["runner_seconds"] > 0
    assert summary["headline"] == [row for r in summary["benchmarks"].values() for row in r["headline"]]
    for row in summary["headline"]:
        assert set(row) == ROW_KEYS, row
        assert row["ours"] is not None and row["ours"] > 0 and math.isfinite(row["ours"]), row
        if row["baseline"] is not None and row["ratio"] is not None:
            # The ratio is of the same medians the row quotes, one way round or the other.
            assert math.isclose(row["ratio"], row["ours"] / row["baseline"], rel_tol=1e-9) or math.isclose(
                row["ratio"], row["baseline"] / row["ours"], rel_tol=1e-9
            ), row
    # Nothing from the quick run may land among the real results.
    assert not list((ROOT / "benchmarks" / "results").glob(f"{summary['date']}-*-quick.*"))


@pytest.mark.timeout(QUICK_RUN_SECONDS + OWN_CHECKS_SECONDS)
def test_quick_run_covers_what_the_issue_names(quick_run) -> None:  # type: ignore[no-untyped-def]
    _, out_dir = quick_run
    summary = json.loads(next(out_dir.glob("*-quick.json")).read_text())
    results = summary["benchmarks"]
    assert {row["dtype"] for row in results["encode"]["dtypes"]} == {"float32", "bfloat16"}
    assert results["generate"]["max_pixel_diff"] <= 1  # same images as diffusers (padding: 1/255)
    assert results["generate"]["max_pixel_diff_ready"] <= 1  # and from the same embeddings
    assert results["batch"]["prompts_encoded_per_round"] == [results["batch"]["settings"]["prompts"]]
    # Two requests in a quick round may both go to one replica under load (Ray's router chooses); that both
    # replicas serve a burst is tested in tests/integration/test_ray.py. Here: the harness records it.
    assert isinstance(results["ray"]["replicas"]["both_replicas_served_every_round"], bool)
    assert results["ray"]["configurations"]["2 replicas x 1 thread"]["replicas_per_round"][0] in (1, 2)
    gpu = results["gpu"]
    # Quick mode runs every part of the GPU benchmark on the CPU, with the same code.
    assert gpu["settings"]["device"] == "cpu"
    assert gpu["engine"]["batch_4"]["images_per_s"] > 0 and gpu["latency"]["ours_p50_s"] > 0
    assert gpu["encode_cpu"]["tokens_per_s"] > 0
    metrics = " ".join(row["metric"] for row in summary["headline"])
    for expected in (
        "encode",
        "prompt to image",
        "embedding to image, like for like",
        "transfer",
        "encode-once",
        "2 Ray replicas",
        "tokens/s",
        "DiT image with slg",
        "DiT image with dype",
        "DiT image with controlnet",
    ):
        assert expected in metrics, expected


@pytest.mark.timeout(QUICK_RUN_SECONDS + OWN_CHECKS_SECONDS)
def test_markdown_summary_has_a_row_per_figure(quick_run) -> None:  # type: ignore[no-untyped-def]
    _, out_dir = quick_run
    summary = json.loads(next(out_dir.glob("*-quick.json")).read_text())
    text = next(out_dir.glob("*-quick.md")).read_text()
    assert text == markdown(summary)
    assert "Quick mode" in text and summary["json_name"] in text
    table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert len(table) == 1 + len(summary["headline"])


def test_readme_block_is_replaced_and_the_rest_kept(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{README_BEGIN}\nold figures\n{README_END}\nafter\n")
    update_readme(readme, "# Benchmarks, date, device\n\n| new | table |\n", "benchmarks/results/x.md")
    text = readme.read_text()
    assert "old figures" not in text and "| new | table |" in text and "benchmarks/results/x.md" in text
    assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{README_END}\nafter\n")
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no <!-- bench:begin -->"):
        update_readme(readme, "# t\n\nx\n", "y")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--only", "encode,warp"], "unknown benchmark(s) warp"),
        (["--quick", "--update-readme"], "would quote figures that mean nothing"),
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--device", "cuda"], "sees no CUDA device"),
        (["--device", "tpu"], "use auto, cpu, cuda or cuda:N"),
    ],
)
@pytest.mark.timeout(REFUSAL_SECONDS + OWN_CHECKS_SECONDS)
def test_runner_refuses_bad_arguments_before_running_anything(
    arguments: list[str], message: str, tmp_path: Path
) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--out-dir", str(tmp_path), *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=REFUSAL_SECONDS,
    )
    assert completed.returncode == 2, completed.stderr
    assert message in completed.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.timeout(FAILING_RUN_SECONDS + OWN_CHECKS_SECONDS)
def test_a_failing_benchmark_is_reported_and_the_others_still_run(tmp_path: Path) -> None:
    """A benchmark that crashes (here: a model folder that does not exist) fails the run, not the others."""
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--only",
            "transfer,encode",
            "--model",
            str(tmp_path / "missing"),
            "--out-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=FAILING_RUN_SECONDS,
    )
    assert completed.returncode == 1
    summary = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert "exited with" in summary["benchmarks"]["encode"]["error"]
    assert "error" not in summary["benchmarks"]["transfer"]  # it needs no model folder
    assert "**encode**" in next(tmp_path.glob("*.md")).read_text()
