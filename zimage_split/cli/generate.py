"""`zsplit generate`: one image from a prompt, or a batch from an embeddings file; against a running generator,
or with the services started here for the one command."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from zimage_split.cli.flags import (
    add_client_security,
    add_model,
    add_prompt_options,
    add_settings_file,
    check_output_folder,
    client_security,
    templated,
    write_output,
)
from zimage_split.common import extras
from zimage_split.common.errors import InvalidArgument
from zimage_split.common.security import ClientSecurity
from zimage_split.common.vocabulary import (
    DEFAULT_OUTPUT_FORMAT,
    DEFAULT_TIMEOUT_SECONDS,
    DTYPES,
    DYPE_METHODS,
    FORMAT_SUFFIXES,
    OUTPUT_FORMATS,
    SUFFIX_FORMATS,
)
from zimage_split.dit_service.config import GeneratorConfig
from zimage_split.model_source import DEFAULT_MODEL


def add_command(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser(
        "generate",
        help="make one image from a prompt, or a batch from an embeddings file",
        description="One image: zsplit generate PROMPT -o out.png. A batch: zsplit generate --embeddings "
        "embeds.safetensors --seeds 0-7 --sizes 1024x1024,768x1344 --out-dir out/ (re-run it to resume).",
    )
    generate.set_defaults(handler=generate_images)
    add_settings_file(generate, "client")
    generate.add_argument("prompt", nargs="?", help="the prompt (or use --embeddings)")
    generate.add_argument(
        "-o",
        "--output",
        default=None,
        help="file to write; .png, .jpg, .webp or .safetensors (latents) pick the format (out.png)",
    )
    generate.add_argument("--generator", default=None, help="generator HOST:PORT")
    generate.add_argument(
        "--encoder",
        default=None,
        help="encoder HOST:PORT, or several separated by commas (for a local generator)",
    )
    add_client_security(generate)
    add_model(generate, default=None)  # resolved later: a batch defaults to its embeddings' model
    generate.add_argument(
        "--seed", type=int, default=None, help="random if unset; printed and stored in the PNG"
    )
    generate.add_argument(
        "--num-images",
        type=int,
        default=1,
        help="images of the prompt, seeds seed..seed+N-1, -o stem-I.png (1)",
    )
    generate.add_argument("--width", type=int, default=None, help="pixels, multiple of 16 (1024)")
    generate.add_argument("--height", type=int, default=None, help="pixels, multiple of 16 (1024)")
    generate.add_argument("--steps", type=int, default=None, help="denoising steps (8)")
    generate.add_argument("--guidance-scale", type=float, default=None, help="CFG scale, 0 = off (0)")
    generate.add_argument("--negative-prompt", default=None, help="used when --guidance-scale > 0")
    generate.add_argument(
        "--cfg-normalization",
        type=float,
        default=0.0,
        help="cap the guided norm at this multiple, 0 = off (0)",
    )
    generate.add_argument(
        "--cfg-truncation", type=float, default=None, help="stop guidance past this normalised time (1.0)"
    )
    generate.add_argument(
        "--shift",
        type=float,
        default=None,
        help="schedule shift, 0.1-20: higher spends more steps on composition, lower on detail (the model's, 3)",
    )
    generate.add_argument(
        "--slg-scale",
        type=float,
        default=0.0,
        help="Skip Layer Guidance strength, 0 = off, 2-4 usual; one more DiT pass per active step (0)",
    )
    generate.add_argument(
        "--slg-layers",
        type=slg_layers_flag,
        default=(),
        metavar="BLOCKS",
        help="DiT blocks SLG skips, e.g. 7-12 or 7,9,11 (7-12)",
    )
    generate.add_argument(
        "--slg-start", type=float, default=None, help="SLG from this fraction of the steps (0.05)"
    )
    generate.add_argument(
        "--slg-stop", type=float, default=None, help="SLG until this fraction of the steps (0.5)"
    )
    generate.add_argument(
        "--dype",
        action="store_true",
        help="DyPE position extrapolation, for images over 1024 pixels a side (off)",
    )
    generate.add_argument(
        "--dype-method",
        choices=DYPE_METHODS,
        default=None,
        help="with --dype: how positions are extrapolated (vision_yarn)",
    )
    generate.add_argument(
        "--dype-scale", type=float, default=None, help="with --dype: how far it reaches at first, 0-10 (2)"
    )
    generate.add_argument(
        "--dype-exponent",
        type=float,
        default=None,
        help="with --dype: how fast it fades as the noise falls, 0-10 (2)",
    )
    generate.add_argument(
        "--pass",
        dest="passes",
        action="append",
        type=pass_flag,
        default=None,
        metavar="SCALE[:STEPS[:STRENGTH]]",
        help="multi-pass: one per pass, e.g. --pass 0.5 --pass 1:8:0.5 (later passes refine an upscale)",
    )
    generate.add_argument(
        "--save-passes",
        action="store_true",
        help="with --pass, also write each earlier pass's image (-o stem-pass0.png, ...)",
    )
    generate.add_argument(
        "--lora",
        action="append",
        default=None,
        metavar="NAME[:SCALE]",
        help="LoRA from the generator's --lora-dir, scale 1.0 unless given; repeat for several",
    )
    generate.add_argument("--init-image", metavar="PATH", default=None, help="img2img start image")
    generate.add_argument(
        "--strength", type=float, default=None, help="img2img: 0 keeps the image, 1 repaints it (0.6)"
    )
    generate.add_argument(
        "--mask", metavar="PATH", default=None, help="inpainting mask for --init-image (white = repaint)"
    )
    generate.add_argument(
        "--controlnet",
        metavar="NAME",
        default=None,
        help="a ControlNet the generator loaded (serve generator --controlnet NAME=PATH); needs --control-image",
    )
    generate.add_argument(
        "--control-image",
        metavar="PATH",
        default=None,
        help="the ControlNet's control image (pose, depth, edges...), resized to the output if of its shape",
    )
    generate.add_argument(
        "--controlnet-scale", type=float, default=None, help="ControlNet conditioning scale, 0-10 (0.75)"
    )
    generate.add_argument(
        "--format",
        dest="output_format",
        default=None,
        choices=OUTPUT_FORMATS,
        help=f"file format (from the --output suffix, else {DEFAULT_OUTPUT_FORMAT})",
    )
    generate.add_argument("--quality", type=int, default=None, help="JPEG/WebP quality 1-100 (90)")
    generate.add_argument(
        "--strip-metadata", action="store_true", help="leave the prompt and settings out of the file"
    )
    add_prompt_options(generate)
    generate.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_SECONDS,
        help=f"seconds before giving up ({DEFAULT_TIMEOUT_SECONDS:g})",
    )
    generate.add_argument(
        "--device", default=GeneratorConfig.device, help="device for services started locally"
    )
    generate.add_argument(
        "--dtype",
        default=GeneratorConfig.dtype,
        choices=("auto", *DTYPES),
        help="dtype for services started locally; auto: bf16 on CUDA, MPS and CPUs with native bf16 "
        "matrix instructions, else float32 (auto)",
    )
    generate.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    batch = generate.add_argument_group("batch from an embeddings file (made by zsplit encode)")
    batch.add_argument("--embeddings", metavar="FILE", help="safetensors file from `zsplit encode`")
    batch.add_argument("--seeds", default="0", help="seeds per prompt: '0-7', '42' or '0,5,9' (0)")
    batch.add_argument("--sizes", default=None, help="WIDTHxHEIGHT list, e.g. 1024x1024,768x1344 (1024x1024)")
    batch.add_argument("--out-dir", default="out", help="folder for the images and manifest.jsonl (out)")
    batch.add_argument(
        "--concurrency", type=int, default=8, help="requests in flight, spread over the replicas (8)"
    )
    batch.add_argument(
        "--allow-other-model",
        action="store_true",
        help="accept embeddings whose model id differs from the generator's (e.g. hub id vs local copy)",
    )


def generate_images(args: argparse.Namespace) -> int:
    remote = args.generator or (args.encoder and not args.embeddings)
    if not remote:
        warn_unused_security(args)
    if args.embeddings:
        return asyncio.run(_generate_batch(args))
    return asyncio.run(_generate(args))


def warn_unused_security(args: argparse.Namespace) -> None:
    """TLS and token settings say how to reach a remote service; with none named, they do nothing: say so,
    rather than let someone believe their call was encrypted. (A warning: a config file's [client] section
    may set them for the days a --generator is given.)"""
    given = [
        f"--{name.replace('_', '-')}"
        for name in ("tls_ca", "tls_cert", "tls_key", "tls_server_name", "auth_token_file")
        if getattr(args, name, None)
    ]
    if given:
        print(
            f"zsplit: warning: {', '.join(given)} ignored: without --generator HOST:PORT"
            f"{'' if args.embeddings else ' (or --encoder HOST:PORT)'} the model runs here, in this process, "
            "and nothing goes over the network.",
            file=sys.stderr,
        )


@asynccontextmanager
async def local_services(
    model: str,
    device: str,
    encoder: str | None,
    *,
    dtype: str = GeneratorConfig.dtype,
    start_encoder: bool = True,
    encoder_security: ClientSecurity | None = None,
) -> AsyncIterator[str]:
    """Starts a generator (and an encoder unless one is given or not wanted) on loopback; yields its address."""
    starts_encoder = encoder is None and start_encoder
    extras.require(
        "generator", *(("encoder",) if starts_encoder else ()), what="zsplit generate without --generator"
    )
    from zimage_split.dit_service.server import start_generator_server
    from zimage_split.encoder_service.config import EncoderConfig
    from zimage_split.encoder_service.server import start_encoder_server

    encoder_server = None
    if starts_encoder:
        encoder_server = await start_encoder_server(
            EncoderConfig(model=model, port=0, device=device, dtype=dtype)
        )
        encoder = f"127.0.0.1:{encoder_server.port}"
    try:
        generator_server = await start_generator_server(
            GeneratorConfig(
                model=model,
                encoder=encoder,
                port=0,
                device=device,
                dtype=dtype,
                encoder_security=encoder_security or ClientSecurity.plaintext(),
            )
        )
        try:
            yield f"127.0.0.1:{generator_server.port}"
        finally:
            await generator_server.stop(grace=1)
    finally:
        if encoder_server is not None:
            await encoder_server.stop(grace=1)


def output_file(output: str | None, output_format: str | None) -> tuple[str, Path]:
    """The format and path of `zsplit generate`'s file: --format, else the --output suffix, else PNG."""
    suffix_format = SUFFIX_FORMATS.get(Path(output).suffix.lower()) if output else None
    if output and suffix_format is None:
        raise InvalidArgument(
            f"--output {output} must end in {', '.join(SUFFIX_FORMATS)}: the suffix says the file format."
        )
    chosen = output_format or suffix_format or DEFAULT_OUTPUT_FORMAT
    if suffix_format is not None and suffix_format != chosen:
        raise InvalidArgument(f"--format {chosen} does not match --output {output}; make them agree.")
    return chosen, Path(output or f"out{FORMAT_SUFFIXES[chosen]}")


def pass_flag(value: str) -> dict[str, float]:
    """--pass SCALE, SCALE:STEPS or SCALE:STEPS:STRENGTH (STEPS may be empty: 1::0.5)."""
    parts = value.split(":")
    try:
        if not 1 <= len(parts) <= 3:
            raise ValueError
        spec: dict[str, float] = {"scale": float(parts[0])}
        if len(parts) > 1 and parts[1]:
            spec["steps"] = int(parts[1])
        if len(parts) > 2 and parts[2]:
            spec["strength"] = float(parts[2])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not SCALE[:STEPS[:STRENGTH]]; use e.g. 0.5 or 1:8:0.5"
        ) from None
    return spec


def slg_layers_flag(value: str) -> tuple[int, ...]:
    """--slg-layers 7-12, 7,9,11 or 3,7-9: DiT block numbers."""
    layers: list[int] = []
    try:
        for part in filter(None, (piece.strip() for piece in value.split(","))):
            first, _, last = part.partition("-")
            layers.extend(range(int(first), int(last or first) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a list of DiT blocks; use e.g. 7-12 or 7,9,11"
        ) from None
    return tuple(layers)


def lora_flag(value: str) -> tuple[str, float]:
    """--lora NAME or NAME:SCALE."""
    name, _, scale = value.rpartition(":") if ":" in value else (value, "", "")
    try:
        return name, float(scale) if scale else 1.0
    except ValueError:
        raise InvalidArgument(
            f"--lora {value!r}: the scale after ':' must be a number, e.g. style:0.8."
        ) from None


async def _generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from zimage_split.client.aio import AsyncClient

    if args.prompt is None:
        raise InvalidArgument(
            'Give a prompt (zsplit generate "a red fox"), or --embeddings FILE for a batch.'
        )
    output_format, output = output_file(args.output, args.output_format)
    check_output_folder(output)
    prompt = templated(args.template, args.prompt)
    loras = [lora_flag(value) for value in args.lora or ()]
    for flag, path in (
        ("--init-image", args.init_image),
        ("--mask", args.mask),
        ("--control-image", args.control_image),
    ):
        if path is not None and not Path(path).is_file():
            raise InvalidArgument(f"{flag} {path}: no such file.")
    if args.mask and not args.init_image:
        raise InvalidArgument(
            "--mask needs --init-image: the mask says which parts of that image to repaint."
        )
    if args.strength is not None and not args.init_image:
        raise InvalidArgument("--strength needs --init-image (img2img); drop it for text-to-image.")
    if (args.controlnet is None) != (args.control_image is None):
        raise InvalidArgument(
            "--controlnet NAME and --control-image PATH go together: the ControlNet steers by that image."
        )
    if args.controlnet_scale is not None and not args.controlnet:
        raise InvalidArgument("--controlnet-scale needs --controlnet and --control-image.")
    bars: list[tqdm] = []  # created on the first step, after any local services have loaded

    def on_progress(step: int, total: int) -> None:
        if not bars:
            bars.append(
                tqdm(total=total, desc="denoising", unit="step", disable=args.no_progress, leave=False)
            )
        bars[0].update(step - bars[0].n)

    def close_bar() -> None:
        for bar in bars:
            bar.close()

    async def run(address: str, security: ClientSecurity) -> None:
        async with AsyncClient(generator=address, timeout=args.timeout, security=security) as client:
            images = await client.generate_images(
                prompt,
                seed=args.seed,
                width=args.width,
                height=args.height,
                steps=args.steps,
                guidance_scale=args.guidance_scale,
                negative_prompt=args.negative_prompt,
                cfg_normalization=args.cfg_normalization,
                cfg_truncation=args.cfg_truncation,
                shift=args.shift,
                slg_scale=args.slg_scale,
                slg_layers=args.slg_layers,
                slg_start=args.slg_start,
                slg_stop=args.slg_stop,
                dype=args.dype,
                dype_method=args.dype_method,
                dype_scale=args.dype_scale,
                dype_exponent=args.dype_exponent,
                passes=args.passes or (),
                return_intermediate=args.save_passes,
                num_images=args.num_images,
                max_sequence_length=args.max_sequence_length,
                long_prompt_mode=args.long_prompt_mode,
                loras=loras,
                init_image=Path(args.init_image) if args.init_image else None,
                strength=args.strength,
                mask=Path(args.mask) if args.mask else None,
                controlnet=args.controlnet,
                control_image=Path(args.control_image) if args.control_image else None,
                controlnet_scale=args.controlnet_scale,
                output_format=output_format,
                quality=args.quality,
                strip_metadata=args.strip_metadata,
                on_progress=on_progress,
            )
        close_bar()
        for image in images:
            path = (
                output if len(images) == 1 else output.with_stem(f"{output.stem}-{image.info['image_index']}")
            )
            write_output(path, image.info["file_bytes"])
            for earlier in image.info.get("intermediate", ()):
                # Earlier passes are PNG, whatever the last pass's format.
                pass_path = path.with_name(f"{path.stem}-pass{earlier.info['pass_index']}.png")
                write_output(pass_path, earlier.info["file_bytes"])
                print(
                    f"wrote {pass_path} (pass {earlier.info['pass_index']}, {earlier.width}x{earlier.height})"
                )
            shortened = image.info.get("prompt_shortened_by")
            if shortened:
                print(
                    f"prompt of {image.info['prompt_source_token_count']} tokens shortened to "
                    f"{image.info['prompt_token_count']} by {shortened}",
                    file=sys.stderr,
                )
            timings = image.info["timings"]
            print(
                f"wrote {path} ({image.info['width']}x{image.info['height']}, seed {image.info['seed']}, "
                f"{image.info['steps']} steps) in {timings['total']:.2f}s "
                f"[queue {timings['queue']:.2f}s, encode {timings['encode']:.2f}s, "
                f"denoise {timings['denoise']:.2f}s, decode {timings['decode']:.2f}s]"
            )

    try:
        if args.generator:
            await run(args.generator, client_security(args, args.generator))
        else:
            model = str(args.model or DEFAULT_MODEL)
            encoder_security = client_security(args, args.encoder) if args.encoder else None
            async with local_services(
                model, args.device, args.encoder, dtype=args.dtype, encoder_security=encoder_security
            ) as address:
                await run(address, ClientSecurity.plaintext())
    finally:
        close_bar()
    return 0


async def _generate_batch(args: argparse.Namespace) -> int:
    """Every prompt of an embeddings file x seeds x sizes into --out-dir; a re-run resumes."""
    from tqdm import tqdm

    from zimage_split.batch_jobs import (
        BatchSettings,
        DypeRequest,
        SkipLayerGuidanceRequest,
        check_out_dir,
        run_batch,
    )
    from zimage_split.client.aio import AsyncClient
    from zimage_split.client.batch import parse_seeds, parse_sizes
    from zimage_split.client.embeddings import Embeddings, check_for_generator

    conflicting = [
        flag
        for flag, value in (
            ("a prompt", args.prompt),
            ("--output", args.output),
            ("--seed", args.seed),
            ("--width", args.width),
            ("--height", args.height),
        )
        if value is not None
    ]
    if conflicting:
        raise InvalidArgument(
            f"--embeddings makes a batch; drop {', '.join(conflicting)} and use --seeds, --sizes and --out-dir."
        )
    unsupported = [
        flag
        for flag, value in (
            ("--init-image", args.init_image),
            ("--mask", args.mask),
            ("--strength", args.strength),
            ("--controlnet", args.controlnet),
            ("--control-image", args.control_image),
            ("--controlnet-scale", args.controlnet_scale),
            ("--format", args.output_format if args.output_format != DEFAULT_OUTPUT_FORMAT else None),
            ("--quality", args.quality),
            ("--strip-metadata", args.strip_metadata or None),
            ("--template", args.template),
            ("--max-sequence-length", args.max_sequence_length),
            ("--long-prompt-mode", args.long_prompt_mode),
            ("--negative-prompt", args.negative_prompt),
            ("--pass", args.passes),
            ("--save-passes", args.save_passes or None),
            ("--cfg-truncation", args.cfg_truncation),
            ("--cfg-normalization", args.cfg_normalization or None),
        )
        if value is not None
    ]
    if unsupported:
        raise InvalidArgument(
            f"A batch from --embeddings takes no {', '.join(unsupported)}: its images are PNG, made from "
            "prompts encoded already (use --template and --long-prompt-mode with zsplit encode). Drop them, "
            "or make single images with zsplit generate PROMPT."
        )
    embeddings = Embeddings.load(args.embeddings)  # checks every tensor before any DiT work
    seeds = parse_seeds(args.seeds)
    sizes = parse_sizes(args.sizes or "1024x1024")
    settings = BatchSettings(
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        loras=tuple(lora_flag(value) for value in args.lora or ()),
        shift=args.shift,
        slg=SkipLayerGuidanceRequest(args.slg_scale, args.slg_layers, args.slg_start, args.slg_stop),
        dype=DypeRequest(args.dype, args.dype_method, args.dype_scale, args.dype_exponent),
    )
    out_dir = Path(args.out_dir)
    check_out_dir(out_dir)  # a folder we cannot write fails now, not after loading the model
    bars: list[tqdm] = []  # made once the generator is up, so loading the model does not count

    def on_start(planned: int, done: int) -> None:
        bars.append(tqdm(total=planned, initial=done, desc="images", unit="img", disable=args.no_progress))
        if done:
            print(
                f"{done} of {planned} images already in {out_dir} (verified); making the rest",
                file=sys.stderr,
            )

    async def run(address: str, security: ClientSecurity) -> None:
        async with AsyncClient(
            generator=address, timeout=args.timeout, busy_retries=100, security=security
        ) as client:
            check_for_generator(
                embeddings, await client.generator_info(), allow_other_model=args.allow_other_model
            )
            report = await run_batch(
                client,
                embeddings,
                out_dir,
                seeds=seeds,
                sizes=sizes,
                settings=settings,
                concurrency=args.concurrency,
                on_image=lambda entry: bars[0].update(1),
                on_start=on_start,
            )
        close_bars()
        print(
            f"{report.planned} images in {out_dir} ({report.already_done} already there, {report.made} made "
            f"in {report.seconds:.1f}s); manifest: {out_dir / 'manifest.jsonl'}"
        )

    def close_bars() -> None:
        for bar in bars:
            bar.close()

    try:
        if args.generator:
            await run(args.generator, client_security(args, args.generator))
        else:
            # No encoder at all: the embeddings are all there is to condition on.
            model = args.model or embeddings.model_id
            async with local_services(
                model, args.device, None, dtype=args.dtype, start_encoder=False
            ) as address:
                await run(address, ClientSecurity.plaintext())
    finally:
        close_bars()
    return 0
