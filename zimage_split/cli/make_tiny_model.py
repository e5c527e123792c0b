"""`zsplit make-tiny-model DIR`: write the offline random model (tiny, bench or full) to a folder."""

from __future__ import annotations

import argparse

from zimage_split.common import extras
from zimage_split.common.errors import InvalidArgument


def add_command(commands: argparse._SubParsersAction) -> None:
    tiny = commands.add_parser("make-tiny-model", help="write the offline random model to DIR")
    tiny.set_defaults(handler=make_tiny_model)
    tiny.add_argument("directory")
    tiny.add_argument(
        "--size",
        default="tiny",
        choices=["tiny", "bench", "full"],
        help="tiny (tests), bench (CPU timings) or full (the real architecture; configs only)",
    )
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--no-weights",
        action="store_true",
        help="write configs only: the services build the random weights on their device (always so for full)",
    )
    tiny.add_argument(
        "--controlnet",
        metavar="PATH",
        default=None,
        help="also write a random ControlNet for the model to PATH: a diffusers folder, or with a .safetensors "
        "suffix one file in the Union layout (serve generator --controlnet NAME=PATH); tiny and bench only",
    )


def make_tiny_model(args: argparse.Namespace) -> int:
    extras.require("generator", what="zsplit make-tiny-model")
    from zimage_split.tiny_model import build_tiny_model

    try:
        path = build_tiny_model(
            args.directory,
            size=args.size,
            seed=args.seed,
            store_weights=False if args.no_weights else None,
        )
    except FileExistsError as error:
        raise InvalidArgument(str(error)) from None
    if args.controlnet:
        from zimage_split.tiny_model import build_tiny_controlnet

        try:
            controlnet = build_tiny_controlnet(args.controlnet, size=args.size, seed=args.seed)
        except (FileExistsError, ValueError) as error:
            raise InvalidArgument(str(error)) from None
        print(f"wrote a random ControlNet for it to {controlnet}")
    configs_only = (path / "random_weights.json").exists()
    what = " (configs only: weights are drawn on the device at load time)" if configs_only else ""
    print(f"wrote the {args.size} random Z-Image model to {path}{what}")
    return 0
