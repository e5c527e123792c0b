"""The README's commands and examples work as written (CI runs the two Quick start commands themselves)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from PIL import Image

from scripts.readme_command import readme_command

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_ci_runs_the_readme_commands_and_installs_the_torch_pin_first() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_command setup" in ci and "readme_command test" in ci
    setup = readme_command("setup")
    assert setup.index("torch==2.13.0") < setup.index('-e ".[dev]"')
    assert "pytest" in readme_command("test")


def test_the_quick_start_demo_writes_its_image(tmp_path: Path) -> None:
    demo = readme_command("setup").split("&&")[-1].strip()
    arguments = shlex.split(demo)
    assert arguments[0] == ".venv/bin/zsplit" and "--model" in arguments and "tiny" in arguments
    env = {**os.environ, "ZSPLIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "zimage_split.cli", *arguments[1:], "--no-progress"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    output = arguments[arguments.index("-o") + 1]
    width, height = (int(arguments[arguments.index(flag) + 1]) for flag in ("--width", "--height"))
    with Image.open(tmp_path / output) as image:
        assert image.size == (width, height)


def test_the_python_examples_run_against_live_services(
    generator, encoder_fp32, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from tests.integration.test_http_gateway import serve
    from zimage_split.http_gateway import create_app

    examples = re.findall(r"```python\n(.*?)```", README, re.DOTALL)
    assert len(examples) >= 4
    monkeypatch.chdir(tmp_path)
    gateway = create_app(f"127.0.0.1:{generator.port}", tokens=("TOKEN",), timeout=120)
    for http_url in serve(gateway):
        for source in examples:
            source = source.replace("localhost:50052", f"127.0.0.1:{generator.port}")
            source = source.replace("localhost:50051", f"127.0.0.1:{encoder_fp32.port}")
            source = source.replace("http://localhost:8000", http_url)
            exec(compile(source, "README.md", "exec"), {"__name__": "__readme__"})  # noqa: S102
    assert sorted(path.name for path in tmp_path.glob("*.png")) == [
        "fox-1.png",
        "fox-2.png",
        "fox.png",
        "lighthouse.png",
    ]
