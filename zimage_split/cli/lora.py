"""`zsplit lora list`: the LoRA files a generator can load, or those in a folder here."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from zimage_split.cli.flags import add_client_security, add_settings_file, client_security
from zimage_split.common.errors import InvalidArgument


def add_command(commands: argparse._SubParsersAction) -> None:
    lora = commands.add_parser("lora", help="LoRA files")
    lora_commands = lora.add_subparsers(dest="lora_command", required=True)
    lora_list = lora_commands.add_parser(
        "list",
        help="the LoRA files a generator can load",
        description="zsplit lora list --generator HOST:PORT, or --lora-dir DIR to read a folder here",
    )
    lora_list.set_defaults(handler=list_loras)
    add_settings_file(lora_list, "client")
    lora_list.add_argument("--generator", default=None, help="generator HOST:PORT")
    lora_list.add_argument("--lora-dir", metavar="DIR", default=None, help="read this folder instead")
    lora_list.add_argument("--timeout", type=float, default=30.0, help="seconds (30)")
    add_client_security(lora_list)


def list_loras(args: argparse.Namespace) -> int:
    if (args.generator is None) == (args.lora_dir is None):
        raise InvalidArgument(
            "Give --generator HOST:PORT (what a server can load) or --lora-dir DIR (a folder here)."
        )
    files: list[dict[str, Any]]
    if args.lora_dir:
        from zimage_split.dit_service.lora.library import LoraLibrary

        files = [vars(file) | {"loaded": False} for file in LoraLibrary(args.lora_dir).list()]
    else:
        from zimage_split.client.aio import AsyncClient

        async def ask() -> list[dict[str, Any]]:
            security = client_security(args, args.generator)
            async with AsyncClient(
                generator=args.generator, timeout=args.timeout, security=security
            ) as client:
                return await client.list_loras()

        files = asyncio.run(ask())
    if not files:
        print("no LoRA files" + (f" in {args.lora_dir}" if args.lora_dir else " on the generator"))
        return 0
    for file in files:
        state = f"error: {file['error']}" if file["error"] else ("loaded" if file["loaded"] else "")
        print(
            f"{file['name']:<32} {file['format']:<10} rank {file['rank']:<4} {file['module_count']:>4} modules "
            f"{file['byte_length'] / 1e6:8.1f} MB  {state}".rstrip()
        )
    return 0
