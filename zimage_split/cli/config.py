"""`zsplit config show`: the resolved settings of a command, each with where its value came from."""

from __future__ import annotations

import argparse

# The command whose settings each target shows.
TARGET_COMMANDS = {
    "encoder": ["serve", "encoder"],
    "generator": ["serve", "generator"],
    "client": ["generate"],
}


def add_command(commands: argparse._SubParsersAction) -> None:
    config = commands.add_parser("config", help="inspect settings")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser(
        "show",
        help="print the resolved settings of a command, with their sources; secrets redacted",
        description="zsplit config show generator --config zsplit.toml --profile prod [-- more flags]",
    )
    show.set_defaults(handler=show_config)
    show.add_argument("target", choices=list(TARGET_COMMANDS), help="whose settings")
    show.add_argument("--config", metavar="FILE", help="TOML settings file (env ZSPLIT_CONFIG)")
    show.add_argument("--profile", metavar="NAME", help="profile of the config file (env ZSPLIT_PROFILE)")
    show.add_argument("flags", nargs=argparse.REMAINDER, help="flags of that command, after --")


def show_config(args: argparse.Namespace) -> int:
    # Imported here: the package imports this module to build its parser.
    from zimage_split.cli import parse_settings

    flags = [flag for flag in args.flags if flag != "--"]
    for name, value in (("--config", args.config), ("--profile", args.profile)):
        if value:
            flags += [name, value]
    if args.target == "client":
        flags.append("x")  # `generate` wants a prompt; the settings do not depend on it
    resolved = parse_settings([*TARGET_COMMANDS[args.target], *flags]).resolved
    print(resolved.show())
    return 0
