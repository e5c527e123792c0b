"""`zsplit templates`: the prompt templates --template takes."""

from __future__ import annotations

import argparse


def add_command(commands: argparse._SubParsersAction) -> None:
    templates = commands.add_parser(
        "templates", help="the prompt templates --template takes (add your own in $ZSPLIT_TEMPLATE_DIR)"
    )
    templates.set_defaults(handler=show_templates)


def show_templates(args: argparse.Namespace) -> int:
    from zimage_split.client.templates import list_templates

    for template in list_templates():
        print(f"{template.name:<16} {template.description}")
    return 0
