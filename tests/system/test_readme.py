"""The README's and docs/'s commands and examples work as written (CI runs the two Quick start commands themselves).

Executed: the Quick start demo, the README's `<!-- services -->` block (each service in its own process, as
in three terminals) and every Python block. Checked against the real parsers: every `zsplit` command line,
`ZSPLIT_*` variable and TOML example, and every relative link. docs/deploy.md is a guide for real hosts
(DNS names, TLS, tokens); tests/unit/test_deploy_consistency.py checks its commands.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from scripts.readme_command import readme_command
from tests.system.test_end_to_end import ZSPLIT, free_port, stop
from tests.unit.test_deploy_consistency import (
    check_zsplit,
    markdown_blocks,
    shell_invocations,
    variables_zsplit_reads,
)

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
CHECKED_HERE = [path for path in DOCS if path.name != "deploy.md"]
# Every Python block, by the file it is in, and the files it leaves in its working folder.
EXAMPLE_FILES = {
    "README.md": ["lighthouse.png"],
    "sdk.md": ["fox-1.png", "fox-2.png", "fox.png", "lighthouse.png"],
    "generation.md": [
        "batch/p00000_s0_512x512.png",
        "batch/p00000_s1_512x512.png",
        "batch/p00001_s0_512x512.png",
        "batch/p00001_s1_512x512.png",
        "embeds.safetensors",
        "fox.webp",
    ],
    "http.md": [],
}
# Read by the test suite, not by zsplit (tests/conftest.py: skip_or_fail).
TEST_VARIABLES = {"ZSPLIT_REQUIRE_BROWSER", "ZSPLIT_REQUIRE_ROOT", "ZSPLIT_ALLOW_NO_INDEX"}


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One model cache for the module's commands, so the tiny model is built once."""
    cache = tmp_path_factory.mktemp("zsplit-cache")
    return {**os.environ, "ZSPLIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


# ---------------------------------------------------------------- the two commands and the demo


def test_ci_runs_the_readme_commands_and_installs_the_torch_pin_first() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_command setup" in ci and "readme_command test" in ci
    setup = readme_command("setup")
    assert setup.index("torch==2.13.0") < setup.index('-e ".[dev]"')
    assert setup.index(". .venv/bin/activate") < setup.index("pip install")
    test = readme_command("test")
    assert test.startswith(". .venv/bin/activate && ") and "pytest" in test


def test_docs_call_zsplit_one_way() -> None:
    """Plain `zsplit` in an activated virtualenv; deploy.md's absolute /opt/... paths are for services."""
    for path in DOCS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not re.search(r"(?<![\w/])\.venv/bin/zsplit", line), f"{relative(path)}:{number}: {line}"


def test_the_quick_start_demo_writes_its_image(tmp_path: Path, offline_env: dict[str, str]) -> None:
    demo = readme_command("setup").split("&&")[-1].strip()
    arguments = shlex.split(demo)
    assert arguments[0] == "zsplit" and "--model" in arguments and "tiny" in arguments
    result = subprocess.run(
        [*ZSPLIT, *arguments[1:], "--no-progress"],
        cwd=tmp_path,
        env=offline_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    output = arguments[arguments.index("-o") + 1]
    width, height = (int(arguments[arguments.index(flag) + 1]) for flag in ("--width", "--height"))
    with Image.open(tmp_path / output) as image:
        assert image.size == (width, height)


# ---------------------------------------------------------------- running the services, as pasted


def wait_for_line(log: Path, process: subprocess.Popen, text: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert process.poll() is None, f"exited with {process.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} line after {timeout:.0f} s:\n{log.read_text()}"
        time.sleep(0.2)


def test_the_services_run_as_pasted(tmp_path: Path, offline_env: dict[str, str]) -> None:
    """The README's three terminals, in order, on free ports instead of 50051 and 50052."""
    ports = {"encoder": free_port(), "generator": free_port()}
    lines = [shlex.split(line, comments=True) for line in readme_command("services").splitlines()]
    assert [line[:3] for line in lines[:2]] == [
        ["zsplit", "serve", "encoder"],
        ["zsplit", "serve", "generator"],
    ]
    assert lines[2][:2] == ["zsplit", "generate"] and len(lines) == 3

    def moved(arguments: list[str]) -> list[str]:
        text = shlex.join(arguments)
        text = text.replace(":50051", f":{ports['encoder']}").replace(":50052", f":{ports['generator']}")
        return shlex.split(text)

    services: list[subprocess.Popen] = []
    try:
        for arguments in lines[:2]:
            log = tmp_path / f"{arguments[2]}.log"
            with log.open("w") as stream:
                process = subprocess.Popen(
                    [*ZSPLIT, *moved(arguments[1:]), "--port", str(ports[arguments[2]])],
                    cwd=tmp_path,
                    env=offline_env,
                    stdout=stream,
                    stderr=subprocess.STDOUT,
                )
            services.append(process)
            wait_for_line(log, process, "listening on")
        generate = moved(lines[2])
        result = subprocess.run(
            [*ZSPLIT, *generate[1:], "--no-progress"],
            cwd=tmp_path,
            env=offline_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
    finally:
        for process in reversed(services):
            assert stop(process) == 0
    output = generate[generate.index("-o") + 1]
    width, height = (int(generate[generate.index(flag) + 1]) for flag in ("--width", "--height"))
    with Image.open(tmp_path / output) as image:
        assert image.size == (width, height) and image.text["prompt"] == lines[2][2]


# ---------------------------------------------------------------- every Python block


def python_blocks(path: Path) -> list[str]:
    return [block for _, block in markdown_blocks(path, ("python",))]


def written_files(folder: Path) -> Iterator[str]:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            yield str(path.relative_to(folder))


def test_the_python_examples_run_against_live_services(
    generator, encoder_fp32, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from tests.integration.test_http_gateway import serve
    from zimage_split.http_gateway import create_app

    with_examples = {path.name: path for path in CHECKED_HERE if python_blocks(path)}
    assert sorted(with_examples) == sorted(EXAMPLE_FILES), "update EXAMPLE_FILES for the docs' Python blocks"
    gateway = create_app(f"127.0.0.1:{generator.port}", tokens=("TOKEN",), timeout=120)
    for http_url in serve(gateway):
        for name, path in with_examples.items():
            folder = tmp_path / name
            folder.mkdir()
            monkeypatch.chdir(folder)
            for source in python_blocks(path):
                source = source.replace("localhost:50052", f"127.0.0.1:{generator.port}")
                source = source.replace("localhost:50051", f"127.0.0.1:{encoder_fp32.port}")
                source = source.replace("http://localhost:8000", http_url)
                exec(compile(source, relative(path), "exec"), {"__name__": "__readme__"})  # noqa: S102
            assert sorted(written_files(folder)) == EXAMPLE_FILES[name], name
            for png in folder.rglob("*.png"):  # written from file_bytes, so the settings are still in it
                with Image.open(png) as image:
                    assert "seed" in image.text, f"{name}: {png.name} lost its metadata"


# ---------------------------------------------------------------- commands, variables, TOML and links


def test_doc_commands_use_flags_that_exist() -> None:
    invocations = [
        invocation
        for path in CHECKED_HERE
        for line, block in markdown_blocks(path, ("bash", "sh", "shell", "console"))
        for invocation in shell_invocations(block, relative(path), first_line=line)
        if invocation.program == "zsplit"
    ]
    assert len(invocations) > 20, "the docs' zsplit commands were not found"
    # `zsplit bench` hands its flags to the benchmark runner (python -m benchmarks), not to zsplit's parser.
    problems = [p for i in invocations if i.args[:1] != ("bench",) for p in check_zsplit(i)]
    assert not problems, "\n".join(problems)


def all_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from all_parsers(child)


def help_variables() -> set[str]:
    """ZSPLIT_* names the parsers' help texts promise, such as ZSPLIT_GENERATOR_AUTH_TOKEN."""
    from zimage_split.cli import build_parser

    texts = [action.help or "" for parser in all_parsers(build_parser()) for action in parser._actions]
    return set(re.findall(r"\bZSPLIT_[A-Z0-9_]*[A-Z0-9]\b", " ".join(texts)))


def test_doc_variables_are_ones_zsplit_reads() -> None:
    known = variables_zsplit_reads() | help_variables() | TEST_VARIABLES
    problems = [
        f"{relative(path)}:{number}: zsplit does not read {name}"
        for path in CHECKED_HERE
        for number, line in enumerate(path.read_text().splitlines(), 1)
        for name in re.findall(r"\bZSPLIT_[A-Z0-9_]*[A-Z0-9]\b", line)
        if name not in known
    ]
    assert not problems, "\n".join(problems)


def test_doc_toml_examples_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zimage_split.cli import parse_settings
    from zimage_split.cli.layered_settings import load_toml

    for name in list(os.environ):
        if name.startswith("ZSPLIT_"):
            monkeypatch.delenv(name)
    (tmp_path / "prompts.txt").write_text("a prompt\n")
    commands = {
        "encoder": [["serve", "encoder"]],
        "generator": [["serve", "generator"]],
        "http": [["serve", "http"]],
        "client": [
            ["generate", "a prompt"],
            ["encode", "--prompts", str(tmp_path / "prompts.txt"), "-o", "x"],
        ],
    }
    examples = [
        (path, line, block) for path in CHECKED_HERE for line, block in markdown_blocks(path, ("toml",))
    ]
    assert examples, "no TOML example found"
    for path, line, block in examples:
        file = tmp_path / f"{path.stem}-{line}.toml"
        file.write_text(block)
        document = load_toml(str(file))
        for section in [s for s in commands if s in document] or list(commands):
            for argv in commands[section]:
                for profile in [None, *document.get("profiles", {})]:
                    try:
                        parse_settings(
                            [*argv, "--config", str(file), *(["--profile", profile] if profile else [])]
                        )
                    except Exception as error:  # say which block, section and profile
                        pytest.fail(f"{relative(path)}:{line} [{section}] profile {profile}: {error}")


def anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens (fenced blocks skipped)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    headings = re.findall(r"^#+\s+(.*)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_doc_links_lead_somewhere() -> None:
    pages = [*DOCS, ROOT / "deploy" / "README.md", ROOT / "benchmarks" / "README.md"]
    problems = []
    for page in pages:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (page.parent / file).resolve() if file else page
            if not linked.exists():
                problems.append(f"{relative(page)}: {target} does not exist")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                problems.append(f"{relative(page)}: {target} names no heading of {relative(linked)}")
    assert not problems, "\n".join(problems)
