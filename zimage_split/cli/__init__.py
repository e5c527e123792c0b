"""The `zsplit` command line. Each command's module adds its parser and names its handler; the handlers
import what they need (torch among it), so building the parser imports none of it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from zimage_split.cli import bench, certs, config, encode, generate, lora, make_tiny_model, serve, templates
from zimage_split.cli.flags import add_logging
from zimage_split.cli.layered_settings import defer_defaults, resolve, setting_actions
from zimage_split.common.errors import (
    MISSING_EXTRA,
    MISSING_EXTRA_EXIT_STATUS,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ZSplitError,
)
from zimage_split.common.logs import configure_logging, route_library_logs

DESCRIPTION = "The `zsplit` command line: serve either service, generate an image, build the tiny model."
# In the order `zsplit --help` lists them.
COMMANDS = (serve, generate, encode, lora, templates, make_tiny_model, bench, certs, config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zsplit", description=DESCRIPTION)
    add_logging(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_command(commands)
    return parser


def _command_parsers(parser: argparse.ArgumentParser) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every (sub)command's parser, by its words: ("serve", "generator"), ("generate",), ..."""
    found: dict[tuple[str, ...], argparse.ArgumentParser] = {}

    def walk(current: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
        subparsers = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers:
            found[words] = current
        for action in subparsers:
            for name, child in action.choices.items():
                walk(child, (*words, name))

    walk(parser, ())
    return found


def parse_settings(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses the command line and resolves every setting: flags > ZSPLIT_* > --config TOML > defaults."""
    parser = build_parser()
    commands = _command_parsers(parser)
    known = frozenset(dest for sub in commands.values() for dest in setting_actions(sub))
    defaults = {words: defer_defaults(sub) for words, sub in commands.items() if sub.get_default("section")}
    typed = parser.parse_args(argv)
    words = next((w for w, sub in commands.items() if sub is getattr(typed, "subparser", None)), None)
    if words is None:
        return typed
    resolved = resolve(typed.subparser, defaults[words], typed, typed.section, known_keys=known)
    return argparse.Namespace(
        **{**vars(typed), **{k: v.value for k, v in resolved.settings.items()}}, resolved=resolved
    )


def _report(error: ZSplitError) -> None:
    print(f"zsplit: error ({error.code}): {error.message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:  # argparse would claim the runner's own flags, --help among them
        try:
            return bench.run_benchmarks(arguments[1:])
        except ZSplitError as error:
            _report(error)
            return 2
    try:
        args = parse_settings(argv)
    except ZSplitError as error:
        _report(error)
        return 2
    log_level = args.log_level or ("WARNING" if args.command == "generate" else "INFO")
    configure_logging(log_level, args.log_format)
    if args.log_format == "json" and args.command == "serve":
        route_library_logs()
    try:
        result: int = args.handler(args)
        return result
    except ZSplitError as error:
        _report(error)
        if error.reason == MISSING_EXTRA:  # 3: the install must change, as the message says
            return MISSING_EXTRA_EXIT_STATUS
        # 2: what the command was given must change (a flag, a path, a folder's state); 1: the services.
        fixed_by_the_caller = InvalidArgument | NotFound | FailedPrecondition | PermissionDenied
        return 2 if isinstance(error, fixed_by_the_caller) else 1
    except KeyboardInterrupt:
        return 130
