"""Settings for every `zsplit` command, resolved once: flags > ZSPLIT_* environment > TOML file > defaults.

The TOML file (`--config FILE`, or ZSPLIT_CONFIG) has top-level keys shared by all commands, a section per
command family ([encoder], [generator], [client] for `generate` and `encode`), and named profiles
([profiles.NAME] and [profiles.NAME.<section>]) chosen with `--profile` (or ZSPLIT_PROFILE) that override
the base. Keys are the flag names with underscores. Each setting's environment variable is ZSPLIT_ plus
its name in capitals (ZSPLIT_PORT, ZSPLIT_TLS_CERT, ...).

Secrets never come from flags (they would show in `ps`) or from the TOML file (it tends to be committed):
tokens come from files named by `--auth-token-file`, or from ZSPLIT_AUTH_TOKEN / ZSPLIT_ENCODER_AUTH_TOKEN.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from zimage_split.common.errors import InvalidArgument, NotFound

# Options that say where the settings come from, or are not settings at all.
NOT_SETTINGS = frozenset({"help", "config", "profile", "command", "service"})
# Secret values read only from the environment; shown redacted.
SECRET_ENVIRONMENT = {"auth_token": "ZSPLIT_AUTH_TOKEN", "encoder_auth_token": "ZSPLIT_ENCODER_AUTH_TOKEN"}
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def env_name(setting: str) -> str:
    return "ZSPLIT_" + setting.upper()


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str  # "flag", "env ZSPLIT_X", "config FILE [section]", "default"


@dataclass(frozen=True)
class ResolvedSettings:
    """The resolved settings of one command, read-only, each with where its value came from."""

    section: str
    settings: Mapping[str, Setting]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.settings[name].value
        except KeyError:
            raise AttributeError(name) from None

    def show(self) -> str:
        """TOML-style lines with each value's source; secrets redacted, never printed."""
        lines = [f"[{self.section}]"]
        for name, setting in sorted(self.settings.items()):
            lines.append(f"{name} = {_toml_value(setting.value)}  # {setting.source}")
        for name, variable in SECRET_ENVIRONMENT.items():
            if name == "encoder_auth_token" and self.section != "generator":
                continue
            state = '"<redacted>"' if os.environ.get(variable) else '""'
            lines.append(f"{name} = {state}  # env {variable} (secret; only ever read from the environment)")
        return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def load_toml(path: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        with open(Path(path).expanduser(), "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise NotFound(f"No config file at {path}.") from None
    except tomllib.TOMLDecodeError as error:
        raise InvalidArgument(f"{path} is not valid TOML: {error}.") from None


def _file_layers(
    document: dict[str, Any], section: str, profile: str | None, path: str
) -> list[tuple[dict, str]]:
    """The TOML tables that apply to `section`, weakest first, each with a name for `config show`."""

    def split(table: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        shared = {key: value for key, value in table.items() if not isinstance(value, dict)}
        return shared, table.get(section, {}) if isinstance(table.get(section, {}), dict) else {}

    profiles = document.get("profiles", {})
    shared, own = split(document)
    layers = [(shared, f"config {path}"), (own, f"config {path} [{section}]")]
    if profile is not None:
        if profile not in profiles:
            known = ", ".join(sorted(profiles)) or "none"
            raise NotFound(f"No profile {profile!r} in {path} (profiles there: {known}).")
        profile_shared, profile_own = split(profiles[profile])
        layers += [
            (profile_shared, f"config {path} [profiles.{profile}]"),
            (profile_own, f"config {path} [profiles.{profile}.{section}]"),
        ]
    return layers


def _convert(action: argparse.Action, raw: Any, where: str) -> Any:
    """A value from the environment (a string) or the TOML file, as the flag would have produced it."""
    # The setting is the flag's dest: `pack-weights = false` sets what --no-pack-weights would.
    if isinstance(
        action, argparse._StoreTrueAction | argparse._StoreFalseAction | argparse.BooleanOptionalAction
    ):
        if isinstance(raw, bool):
            return raw
        if str(raw).strip().lower() in TRUE:
            return True
        if str(raw).strip().lower() in FALSE:
            return False
        raise InvalidArgument(f"{where}: {raw!r} is not a boolean; use true or false.")
    if isinstance(
        action, argparse._AppendAction
    ):  # a repeatable flag: a TOML list, or "a,b" from the environment
        items = raw if isinstance(raw, list) else str(raw).split(",")
        return [str(item).strip() for item in items if str(item).strip()]
    if action.type is not None and not isinstance(raw, bool):
        try:
            value = action.type(str(raw)) if isinstance(raw, str) or action.type in (int, float) else raw  # type: ignore[operator]
        except (TypeError, ValueError):
            raise InvalidArgument(f"{where}: {raw!r} is not a valid {action.dest}.") from None
    else:
        value = str(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else raw
    if action.choices is not None and value not in action.choices:
        raise InvalidArgument(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}.")
    return value


def setting_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        action.dest: action
        for action in parser._actions
        if action.dest not in NOT_SETTINGS and action.option_strings and action.dest != argparse.SUPPRESS
    }


def defer_defaults(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Takes the defaults out of the parser, so a parse yields only what was typed; returns them."""
    defaults = {}
    for dest, action in setting_actions(parser).items():
        defaults[dest] = action.default
        action.default = argparse.SUPPRESS
    return defaults


def resolve(
    parser: argparse.ArgumentParser,
    defaults: dict[str, Any],
    typed: argparse.Namespace,
    section: str,
    *,
    known_keys: frozenset[str],
    environ: Mapping[str, str] = os.environ,
) -> ResolvedSettings:
    """Merges defaults, the TOML file, the environment and the typed flags for one command."""
    actions = setting_actions(parser)
    config_path = getattr(typed, "config", None) or environ.get("ZSPLIT_CONFIG")
    profile = getattr(typed, "profile", None) or environ.get("ZSPLIT_PROFILE")
    if profile and not config_path:
        raise InvalidArgument("--profile needs a config file: pass --config FILE (or set ZSPLIT_CONFIG).")
    settings = {dest: Setting(defaults[dest], "default") for dest in actions}
    if config_path:
        document = load_toml(config_path)
        for table, where in _file_layers(document, section, profile, config_path):
            for key, raw in table.items():
                dest = key.replace("-", "_")
                if dest in SECRET_ENVIRONMENT:
                    raise InvalidArgument(
                        f"{where}: {key} is a secret; put it in a file named by {dest}_file, or in "
                        f"{SECRET_ENVIRONMENT[dest]}, not in the config file."
                    )
                if dest not in known_keys:
                    raise InvalidArgument(
                        f"{where}: unknown setting {key!r}. Known: {', '.join(sorted(known_keys))}."
                    )
                if dest in actions:  # a shared key another command uses is not this one's business
                    settings[dest] = Setting(_convert(actions[dest], raw, f"{where} {key}"), where)
    for dest, action in actions.items():
        variable = env_name(dest)
        if variable in environ and dest not in SECRET_ENVIRONMENT:
            settings[dest] = Setting(_convert(action, environ[variable], variable), f"env {variable}")
        if dest in vars(typed):
            settings[dest] = Setting(getattr(typed, dest), "flag")
    return ResolvedSettings(section, MappingProxyType(settings))
