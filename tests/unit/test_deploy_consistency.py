"""The command lines in deploy/ and docs/deploy.md use flags that exist, and name ZSPLIT_* variables zsplit reads.

Nothing is executed: each `zsplit ...`, `ray start ...` and `health_probe.py ...` invocation is pulled out of
Dockerfiles, compose, Kubernetes manifests, systemd units, the launchd plist and the bash blocks of the
docs, and its flags are looked up in the real parsers (`zimage_split.cli.build_parser()`, Ray's click
command, the probe's argparse).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import plistlib
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from zimage_split.cli import build_parser, parse_settings
from zimage_split.cli.layered_settings import load_toml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
# The commands whose settings also come from ZSPLIT_* variables and the TOML file.
CONFIGURED_COMMANDS = (("serve", "encoder"), ("serve", "generator"), ("generate",), ("encode",))
SECTIONS = {
    "encoder": [("serve", "encoder")],
    "generator": [("serve", "generator")],
    "client": [("generate",), ("encode",)],
}
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;", "{", "}"}
WRAPPERS = {"exec", "nohup", "time", "command"}


@dataclass(frozen=True)
class Invocation:
    """One command line: `program` is zsplit, ray or health_probe.py; `args` follow it."""

    where: str
    program: str
    args: tuple[str, ...]


# ---------------------------------------------------------------- pulling command lines out of files


def _strip_wrappers(tokens: list[str]) -> list[str]:
    """Drops what runs a command without being it: VAR=value, exec, sudo -u USER, env VAR=value, python."""
    tokens = list(tokens)
    while tokens:
        head = tokens[0]
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", head) or head in WRAPPERS:
            tokens.pop(0)
        elif head == "sudo" or head == "env":
            tokens.pop(0)
            while tokens and tokens[0].startswith("-"):
                option = tokens.pop(0)
                if option in ("-u", "-g", "-C", "--chdir"):
                    tokens.pop(0)
        elif Path(head).name.startswith("python") and len(tokens) > 1 and tokens[1].endswith(".py"):
            tokens.pop(0)
        else:
            break
    return tokens


def _invocation(tokens: list[str], where: str) -> Invocation | None:
    tokens = _strip_wrappers(tokens)
    if not tokens:
        return None
    name = Path(tokens[0]).name
    if name == "zsplit":
        return Invocation(where, "zsplit", tuple(tokens[1:]))
    if name == "health_probe.py":
        return Invocation(where, "health_probe.py", tuple(tokens[1:]))
    if name == "ray" and len(tokens) > 1 and tokens[1] == "start":
        return Invocation(where, "ray start", tuple(tokens[2:]))
    return None


def _segments(tokens: list[str]) -> Iterator[list[str]]:
    """Splits a shell token list at ; && || | & ( ), dropping redirections and their targets."""
    segment: list[str] = []
    skip_next = False
    for token in tokens:
        if skip_next:
            skip_next = False
            continue
        if token in SEPARATORS:
            if segment:
                yield segment
            segment = []
        elif re.fullmatch(r"[0-9]*[<>]+&?", token):
            skip_next = True
        else:
            segment.append(token)
    if segment:
        yield segment


def shell_invocations(text: str, where: str, first_line: int | None = None) -> list[Invocation]:
    """The zsplit / ray start / health probe commands of a shell script (heredoc bodies skipped).

    Places are reported as `where:LINE`, counting from `first_line` (or from 1, as `where:N`, when unset).
    """
    lines = text.replace("\\\n", " ").splitlines()
    found = []
    heredoc_end: str | None = None
    for number, line in enumerate(lines, 1):
        if heredoc_end is not None:
            if line.strip() == heredoc_end:
                heredoc_end = None
            continue
        opener = re.search(r"<<-?\s*['\"]?([A-Za-z_]+)['\"]?", line)
        if opener:
            heredoc_end = opener.group(1)
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            tokens = list(lexer)
        except ValueError as error:
            assert "zsplit" not in line, f"{where}:{number}: cannot parse {line!r}: {error}"
            continue
        place = f"{where}:{number if first_line is None else first_line + number - 1}"
        for segment in _segments(tokens):
            invocation = _invocation(segment, place)
            if invocation is not None:
                found.append(invocation)
    return found


def markdown_blocks(path: Path, languages: tuple[str, ...]) -> Iterator[tuple[int, str]]:
    text = path.read_text()
    for match in re.finditer(r"^```(\w+)[^\n]*\n(.*?)^```", text, flags=re.M | re.S):
        if match.group(1) in languages:
            yield text.count("\n", 0, match.start()) + 2, match.group(2)  # the block's first line


def markdown_files() -> list[Path]:
    return [DEPLOY_DOC, *sorted(DEPLOY.rglob("*.md"))]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", path.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_argv(value: str) -> list[str]:
    """ENTRYPOINT/CMD in exec (JSON) or shell form."""
    return json.loads(value) if value.startswith("[") else shlex.split(value)


def dockerfile_entrypoint(path: Path) -> list[str]:
    values = {
        keyword: rest for keyword, rest in dockerfile_instructions(path) if keyword in ("ENTRYPOINT", "CMD")
    }
    return dockerfile_argv(values.get("ENTRYPOINT", "[]")) + dockerfile_argv(values.get("CMD", "[]"))


def dockerfile_invocations() -> list[Invocation]:
    found = []
    for path in sorted((DEPLOY / "docker").glob("Dockerfile.*")):
        if path.suffix == ".dockerignore":
            continue
        where = str(path.relative_to(ROOT))
        invocation = _invocation(dockerfile_entrypoint(path), f"{where}: ENTRYPOINT + CMD")
        assert invocation is not None, f"{where}: ENTRYPOINT is not a zsplit command"
        found.append(invocation)
        for keyword, rest in dockerfile_instructions(path):
            if keyword == "HEALTHCHECK":
                command = rest[rest.index("CMD ") + 4 :]
                found += shell_invocations(command, f"{where}: HEALTHCHECK")
    return found


def compose_services() -> dict[str, dict]:
    return yaml.safe_load((DEPLOY / "docker" / "compose.yaml").read_text())["services"]


def compose_invocations() -> list[Invocation]:
    found = []
    for name, service in compose_services().items():
        where = f"deploy/docker/compose.yaml: services.{name}"
        build = service["build"]
        dockerfile = (DEPLOY / "docker" / build["context"] / build["dockerfile"]).resolve()
        command = service.get("command", [])
        command = shlex.split(command) if isinstance(command, str) else command
        entrypoint = service.get("entrypoint") or dockerfile_entrypoint(dockerfile)
        invocation = _invocation([*entrypoint, *command], f"{where}.command")
        assert invocation is not None, f"{where}: does not run zsplit"
        found.append(invocation)
        test = service.get("healthcheck", {}).get("test", [])
        if test[:1] == ["CMD"]:
            found += [i for i in [_invocation(test[1:], f"{where}.healthcheck")] if i]
        elif test[:1] == ["CMD-SHELL"]:
            found += shell_invocations(test[1], f"{where}.healthcheck")
    return found


def k8s_documents() -> Iterator[tuple[str, dict]]:
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                yield str(path.relative_to(ROOT)), document


def _containers(node: object) -> Iterator[dict]:
    if isinstance(node, dict):
        if "image" in node and "name" in node:
            yield node
        for value in node.values():
            yield from _containers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _containers(value)


def _argv_invocations(argv: list[str], where: str) -> list[Invocation]:
    """A container's command + args: a shell script (bash -c) or a program run directly."""
    if argv and Path(argv[0]).name in ("bash", "sh") and "-c" in argv:
        script = [part for part in argv[argv.index("-c") + 1 :] if part != "--"]
        return shell_invocations("\n".join(script), where)
    invocation = _invocation(argv, where)
    return [invocation] if invocation else []


def k8s_invocations() -> list[Invocation]:
    found = []
    for where, document in k8s_documents():
        for container in _containers(document):
            here = f"{where}: {document['kind']}/{document['metadata']['name']} container {container['name']}"
            found += _argv_invocations([*container.get("command", []), *container.get("args", [])], here)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if "exec" in container.get(probe, {}):
                    found += _argv_invocations(container[probe]["exec"]["command"], f"{here} {probe}")
    return found


def unit_exec_lines(path: Path) -> Iterator[tuple[str, str]]:
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        match = re.match(r"(Exec\w+)=([-@:+!]*)(.*)", line.strip())
        if match:
            yield match.group(1), match.group(3)


def systemd_files() -> list[Path]:
    return sorted(p for p in (DEPLOY / "systemd").rglob("*") if p.suffix in (".service", ".conf"))


def systemd_invocations() -> list[Invocation]:
    found = []
    for path in systemd_files():
        for key, command in unit_exec_lines(path):
            found += shell_invocations(command, f"{path.relative_to(ROOT)}: {key}")
    return found


def launchd_invocations() -> list[Invocation]:
    found = []
    for path in sorted((DEPLOY / "launchd").glob("*.plist")):
        arguments = plistlib.loads(path.read_bytes())["ProgramArguments"]
        found += [i for i in [_invocation(arguments, f"{path.relative_to(ROOT)}: ProgramArguments")] if i]
    return found


def markdown_invocations() -> list[Invocation]:
    found = []
    for path in markdown_files():
        for line, block in markdown_blocks(path, ("bash", "sh", "shell", "console")):
            found += shell_invocations(block, str(path.relative_to(ROOT)), first_line=line)
    return found


SOURCES = {
    "Dockerfiles": dockerfile_invocations,
    "compose": compose_invocations,
    "Kubernetes": k8s_invocations,
    "systemd": systemd_invocations,
    "launchd": launchd_invocations,
    "docs": markdown_invocations,
}


def all_invocations() -> list[Invocation]:
    return [invocation for source in SOURCES.values() for invocation in source()]


# ---------------------------------------------------------------- checking them against the parsers


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _is_option(token: str) -> bool:
    return token.startswith("-") and token not in ("-", "--") and not re.fullmatch(r"-\d+(\.\d+)?", token)


def command_parser(words: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = build_parser()
    for word in words:
        subcommands = _subcommands(parser)
        assert subcommands is not None
        parser = subcommands.choices[word]
    return parser


def unknown_options(parser: argparse.ArgumentParser, tokens: list[str]) -> list[str]:
    return [
        t.split("=", 1)[0]
        for t in tokens
        if _is_option(t) and t.split("=", 1)[0] not in parser._option_string_actions
    ]


def check_zsplit(invocation: Invocation) -> list[str]:
    """Walks the subcommands of `zsplit`; every option must belong to the parser it lands in."""
    parser, words, tokens = build_parser(), [], list(invocation.args)
    while (subcommands := _subcommands(parser)) is not None:
        while tokens and _is_option(tokens[0]):  # options of the parent (zsplit --log-level X ...)
            option = tokens.pop(0)
            action = parser._option_string_actions.get(option.split("=", 1)[0])
            if action is None:
                return [f"{invocation.where}: `zsplit {' '.join(words)}` has no option {option}"]
            if "=" not in option and _takes_value(action):
                tokens.pop(0)
        if not tokens or tokens[0] not in subcommands.choices:
            got = tokens[0] if tokens else "nothing"
            return [
                f"{invocation.where}: `zsplit {' '.join(words)}` expects one of {sorted(subcommands.choices)}, got {got}"
            ]
        words.append(tokens[0])
        parser = subcommands.choices[tokens.pop(0)]
    rest: list[str] = []
    if "--" in tokens:
        tokens, rest = tokens[: tokens.index("--")], tokens[tokens.index("--") + 1 :]
    problems = [
        f"{invocation.where}: `zsplit {' '.join(words)}` has no option {option}"
        for option in unknown_options(parser, tokens)
    ]
    if words == ["config", "show"] and rest:  # zsplit config show generator -- --flags of that command
        target = next(t for t in tokens if not _is_option(t))
        target_parser = command_parser(SECTIONS[target][0])
        problems += [
            f"{invocation.where}: {target} has no option {o}" for o in unknown_options(target_parser, rest)
        ]
    return problems


def load_health_probe():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("health_probe", DEPLOY / "health_probe.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_extractors_find_commands_everywhere() -> None:
    """Guards the test itself: a source whose commands are not found would pass vacuously."""
    for name, source in SOURCES.items():
        invocations = source()
        assert any(i.program == "zsplit" for i in invocations), f"no zsplit command found in the {name}"
    probes = {i.where.split(":")[0] for i in all_invocations() if i.program == "health_probe.py"}
    assert any("Dockerfile" in p for p in probes) and any("compose" in p for p in probes)
    assert any("k8s" in p for p in probes)


def test_zsplit_flags_exist() -> None:
    problems = [p for i in all_invocations() if i.program == "zsplit" for p in check_zsplit(i)]
    assert not problems, "\n".join(problems)


def test_health_probe_flags_exist() -> None:
    parser = load_health_probe().build_parser()
    problems = [
        f"{i.where}: health_probe.py has no option {option}"
        for i in all_invocations()
        if i.program == "health_probe.py"
        for option in unknown_options(parser, list(i.args))
    ]
    assert not problems, "\n".join(problems)


def test_ray_start_flags_exist() -> None:
    from ray.scripts import scripts

    known = {opt for param in scripts.start.params for opt in [*param.opts, *param.secondary_opts]}
    invocations = [i for i in all_invocations() if i.program == "ray start"]
    assert invocations, "no `ray start` command found"
    problems = [
        f"{i.where}: `ray start` has no option {t.split('=', 1)[0]}"
        for i in invocations
        for t in i.args
        if _is_option(t) and t.split("=", 1)[0] not in known
    ]
    assert not problems, "\n".join(problems)


def test_no_unit_stops_ray_by_name() -> None:
    """`ray stop` kills every Ray process on the host by name; units stop their own main process."""
    for path in systemd_files():
        for key, command in unit_exec_lines(path):
            assert not re.search(r"\bray\s+stop\b", command), f"{path.name}: {key} runs `ray stop`"


# ---------------------------------------------------------------- environment variables and TOML files


def _string_constants() -> set[str]:
    constants = set()
    for path in (ROOT / "zimage_split").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                constants.add(node.value)
    return constants


def variables_zsplit_reads() -> set[str]:
    """Names zsplit's code spells out, plus ZSPLIT_ + each setting of the configured commands."""
    names = {c for c in _string_constants() if re.fullmatch(r"ZSPLIT_[A-Z0-9_]+", c)}
    for words in CONFIGURED_COMMANDS:
        for action in command_parser(words)._actions:
            if action.option_strings and action.dest not in ("help", argparse.SUPPRESS):
                names.add("ZSPLIT_" + action.dest.upper())
    return names


def deploy_text_files() -> list[Path]:
    files = [DEPLOY_DOC]
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            try:
                path.read_text()
            except UnicodeDecodeError:
                continue
            files.append(path)
    return files


def test_zsplit_variables_are_ones_zsplit_reads() -> None:
    known = variables_zsplit_reads()
    problems = []
    for path in deploy_text_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for name in re.findall(r"\bZSPLIT_[A-Z0-9_]*[A-Z0-9]\b", line):
                if name not in known:
                    problems.append(f"{path.relative_to(ROOT)}:{number}: zsplit does not read {name}")
    assert not problems, "\n".join(problems)


def toml_sources(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(DEPLOY.rglob("*.toml*")):
        yield str(path.relative_to(ROOT)), path
    for markdown in markdown_files():
        for line, block in markdown_blocks(markdown, ("toml",)):
            copy = tmp_path / f"{markdown.stem}-{line}.toml"
            copy.write_text(block)
            yield f"{markdown.relative_to(ROOT)}:{line}", copy


def test_toml_examples_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every section and profile of the example config files resolves with zsplit's own loader."""
    for name in list(os.environ):
        if name.startswith("ZSPLIT_"):
            monkeypatch.delenv(name)
    (tmp_path / "prompts.txt").write_text("a prompt\n")
    # What each command needs besides its settings.
    required = {
        "generate": ["a prompt"],
        "encode": ["--prompts", str(tmp_path / "prompts.txt"), "-o", "x.safetensors"],
    }
    sources = list(toml_sources(tmp_path))
    assert sources, "no TOML example found"
    for where, path in sources:
        document = load_toml(str(path))
        sections = [s for s in SECTIONS if s in document] or list(SECTIONS)
        profiles = [None, *document.get("profiles", {})]
        for section in sections:
            for words in SECTIONS[section]:
                for profile in profiles:
                    argv = [*words, *required.get(words[0], []), "--config", str(path)]
                    argv += ["--profile", profile] if profile else []
                    try:
                        parse_settings(argv)
                    except Exception as error:  # report which file, table and profile
                        pytest.fail(f"{where} [{section}] profile {profile}: {error}")


# ---------------------------------------------------------------- files the commands point at


def test_compose_secrets_used_are_mounted() -> None:
    top = yaml.safe_load((DEPLOY / "docker" / "compose.yaml").read_text()).get("secrets", {})
    for name, service in compose_services().items():
        used = set(re.findall(r"/run/secrets/([\w.-]+)", json.dumps(service)))
        mounted = {s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])}
        assert used <= mounted, f"compose service {name} uses secrets it does not mount: {used - mounted}"
        assert mounted <= set(top), f"compose service {name} mounts undeclared secrets: {mounted - set(top)}"


def test_k8s_secret_files_used_are_in_their_secrets() -> None:
    """Paths under a mounted Secret must be keys of that Secret, as kustomization.yaml generates it."""
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    keys = {
        generator["name"]: {entry.split("=", 1)[0] for entry in generator["files"]}
        for generator in kustomization["secretGenerator"]
    }
    problems = []
    for where, document in k8s_documents():
        volumes: dict[str, str] = {}
        for node in _dicts(document):
            for volume in node.get("volumes", []) if isinstance(node.get("volumes"), list) else []:
                if "secret" in volume:
                    volumes[volume["name"]] = volume["secret"]["secretName"]
        for container in _containers(document):
            mounts = {
                m["mountPath"]: volumes[m["name"]]
                for m in container.get("volumeMounts", [])
                if m["name"] in volumes
            }
            text = json.dumps(container)
            for mount_path, secret in mounts.items():
                assert secret in keys, f"{where}: Secret {secret} is not generated by kustomization.yaml"
                for file_name in re.findall(re.escape(mount_path) + r"/([\w.-]+)", text):
                    if file_name not in keys[secret]:
                        problems.append(
                            f"{where} {container['name']}: {mount_path}/{file_name} is not in {secret}"
                        )
    assert not problems, "\n".join(problems)


def _dicts(node: object) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _dicts(value)
    elif isinstance(node, list):
        for value in node:
            yield from _dicts(value)


# ---------------------------------------------------------------- what each image installs (pyproject's extras)

# The model libraries: never in the base install (the SDK), each brought by a role's extra.
MODEL_LIBRARIES = {"torch", "diffusers", "transformers", "accelerate", "peft"}


def _requirement_name(requirement: str) -> tuple[str, set[str]]:
    """("ray", {"serve"}) for 'ray[serve]>=2.40,<3'; names lower-cased with _ and . as -."""
    match = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?", requirement)
    assert match, f"unreadable requirement {requirement!r}"
    extras = {e.strip() for e in (match.group(2) or "").split(",") if e.strip()}
    return re.sub(r"[-_.]+", "-", match.group(1)).lower(), extras


def project_table() -> dict:
    return load_toml(str(ROOT / "pyproject.toml"))["project"]


def reachable_packages(extras: set[str], project: dict | None = None) -> set[str]:
    """The packages `pip install '.[extras]'` asks for by name: the base, the extras, and the extras they name."""
    project = project or project_table()
    declared = project["optional-dependencies"]
    found: set[str] = set()
    pending, seen = [*project["dependencies"]], set()
    pending += [requirement for extra in extras for requirement in declared[extra]]
    seen |= extras
    while pending:
        name, inner = _requirement_name(pending.pop())
        if name == "zimage-split":
            for extra in inner - seen:
                seen.add(extra)
                pending += declared[extra]
            continue
        found.add(name)
    return found


def dockerfile_pip_installs(text: str) -> tuple[set[str], set[str]]:
    """The extras of the checkout (`.` or `.[a,b]`) and the other packages a Dockerfile's `pip install`s name."""
    extras: set[str] = set()
    others: set[str] = set()
    for line in re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", text).splitlines():
        line = line.strip()
        if not line.upper().startswith("RUN "):
            continue
        for segment in _segments(shlex.split(line[4:], comments=True)):
            if segment[:2] != ["pip", "install"]:
                continue
            tokens = iter(segment[2:])
            for token in tokens:
                if token in ("--index-url", "-i", "--extra-index-url", "-r", "-c"):
                    next(tokens, None)  # the option's value
                if token.startswith("-"):
                    continue
                if token == "." or token.startswith(".["):
                    extras |= _requirement_name("zimage-split" + token[1:])[1]
                    continue
                others.add(_requirement_name(token)[0])
    return extras, others


def image_packages(name: str) -> tuple[set[str], set[str]]:
    """The checkout's extras an image installs, and every package it asks for by name."""
    text = (DEPLOY / "docker" / f"Dockerfile.{name}").read_text()
    extras, others = dockerfile_pip_installs(text)
    return extras, reachable_packages(extras) | others


def test_the_base_install_holds_no_model_library() -> None:
    assert not reachable_packages(set()) & MODEL_LIBRARIES


def test_the_encoder_image_installs_the_encoder_extra_and_no_diffusers() -> None:
    extras, packages = image_packages("encoder")
    assert extras == {"encoder"}
    assert {"torch", "transformers"} <= packages
    assert not packages & {"diffusers", "peft", "ray", "fastapi", "uvicorn", "openai"}, packages


def test_the_generator_image_installs_the_generator_and_ray_extras_only() -> None:
    extras, packages = image_packages("generator")
    assert extras == {"generator", "ray"}
    assert {"torch", "diffusers", "transformers", "peft", "ray"} <= packages
    client_only = reachable_packages({"http", "otel"}) - reachable_packages(set())
    client_only |= {"openai", "playwright", "pytest"}
    assert not packages & client_only, packages & client_only


def test_the_image_check_sees_a_wrong_install() -> None:
    """Guards the two tests above: an encoder image that installed [all] would bring diffusers."""
    extras, others = dockerfile_pip_installs(
        'RUN python -m venv /v \\\n    && pip install "torch==2.13.0" --index-url "$X"\n'
        "# a comment\nRUN pip install '.[all]' \\\n    && useradd zsplit\n"
    )
    assert extras == {"all"} and others == {"torch"}
    assert "diffusers" in reachable_packages(extras)


def test_the_cli_checks_the_modules_the_extras_provide() -> None:
    """common/extras.py names, for each extra, modules whose packages that extra lists."""
    from zimage_split.common.extras import EXTRA_MODULES

    declared = project_table()["optional-dependencies"]
    for extra, modules in EXTRA_MODULES.items():
        listed = {_requirement_name(requirement)[0] for requirement in declared[extra]}
        # A module's name is its package's, with - for _ (python_multipart is python-multipart's).
        checked = {module.replace("_", "-") for module in modules}
        assert checked <= listed, f"[{extra}] lists {listed}, but the CLI checks for {modules}"
    # [all] is every extra a user installs; [dev] adds the test tools to it.
    assert reachable_packages({"all"}) == reachable_packages(set(declared) - {"all", "dev"})
    assert reachable_packages({"all"}) < reachable_packages({"dev"})
