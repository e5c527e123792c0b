"""`zsplit encode`: a prompt file, encoded once into one safetensors file of embeddings."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from zimage_split.cli.flags import (
    add_client_security,
    add_model,
    add_prompt_options,
    add_settings_file,
    check_output_folder,
    client_security,
    templated,
)
from zimage_split.common import extras
from zimage_split.common.errors import InvalidArgument
from zimage_split.common.files import write_error
from zimage_split.common.security import ClientSecurity
from zimage_split.common.vocabulary import DEFAULT_TIMEOUT_SECONDS
from zimage_split.encoder_service.config import EncoderConfig


def add_command(commands: argparse._SubParsersAction) -> None:
    encode = commands.add_parser(
        "encode",
        help="encode a prompt file once into one safetensors file",
        description="zsplit encode --prompts prompts.txt -o embeds.safetensors [--encoder HOST:PORT | --model M]",
    )
    encode.set_defaults(handler=encode_prompts)
    add_settings_file(encode, "client")
    encode.add_argument(
        "--prompts", required=True, metavar="FILE", help="one prompt per line (.txt), or .jsonl lines"
    )
    encode.add_argument("-o", "--output", required=True, help="safetensors file to write")
    encode.add_argument(
        "--encoder",
        default=None,
        help="encoder HOST:PORT, or several separated by commas (default: run one here)",
    )
    add_client_security(encode, whom="the encoder")
    add_model(encode)
    encode.add_argument("--device", default=EncoderConfig.device, help="device for an encoder started here")
    encode.add_argument(
        "--dtype",
        default=EncoderConfig.dtype,
        help=f"dtype for an encoder started here ({EncoderConfig.dtype})",
    )
    add_prompt_options(encode)
    encode.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_SECONDS,
        help=f"seconds per encoder call ({DEFAULT_TIMEOUT_SECONDS:g})",
    )
    encode.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def encode_prompts(args: argparse.Namespace) -> int:
    return asyncio.run(_encode(args))


async def _encode(args: argparse.Namespace) -> int:
    """A prompt file -> one safetensors file of embeddings, one tensor per prompt."""
    if not args.encoder:
        extras.require("encoder", what="zsplit encode without --encoder")
    from tqdm import tqdm

    from zimage_split.batch_jobs import encode_prompts, read_prompt_file
    from zimage_split.client.aio import AsyncClient

    output = Path(args.output)
    if output.suffix.lower() != ".safetensors":
        raise InvalidArgument(f"--output {output} must end in .safetensors.")
    check_output_folder(output)
    prompts = read_prompt_file(Path(args.prompts), warn=lambda message: print(message, file=sys.stderr))

    async def run(address: str, security: ClientSecurity) -> None:
        with tqdm(total=len(prompts), desc="encoding", unit="prompt", disable=args.no_progress) as bar:
            async with AsyncClient(
                generator=None, encoder=address, timeout=args.timeout, security=security
            ) as client:
                embeddings = await encode_prompts(
                    client,
                    [templated(args.template, prompt) for prompt in prompts],
                    max_sequence_length=args.max_sequence_length,
                    long_prompt_mode=args.long_prompt_mode,
                    on_encoded=bar.update,
                )
        try:
            embeddings.save(output)
        except OSError as error:
            raise write_error(
                error,
                f"--output {output}",
                "writing it",
                "Free space or fix the folder, or pick another path.",
            ) from None
        tokens = sum(item.token_count for item in embeddings)
        truncated = sum(item.truncated for item in embeddings)
        print(
            f"wrote {len(embeddings)} embeddings ({tokens} tokens, {truncated} truncated) of "
            f"{embeddings.model_id} to {output}"
        )

    if args.encoder:
        await run(args.encoder, client_security(args, args.encoder))
        return 0
    from zimage_split.encoder_service.server import start_encoder_server

    server = await start_encoder_server(
        EncoderConfig(model=args.model, port=0, device=args.device, dtype=args.dtype)
    )
    try:
        await run(f"127.0.0.1:{server.port}", ClientSecurity.plaintext())
    finally:
        await server.stop(grace=1)
    return 0
