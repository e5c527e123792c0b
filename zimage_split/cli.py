"""The `zsplit` command line: serve either service, generate an image, build the tiny model."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from zimage_split.common.errors import InvalidArgument, NotFound, ZSplitError
from zimage_split.common.logs import LOG_FORMATS, configure_logging, route_library_logs
from zimage_split.common.security import ClientSecurity
from zimage_split.dit_service.validation import Limits
from zimage_split.model_source import DEFAULT_MODEL

ENCODER_PORT = 50051
GENERATOR_PORT = 50052
HTTP_PORT = 8000


def _add_model(parser: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL) -> None:
    parser.add_argument(
        "--model",
        default=default,
        help="hub id, local diffusers folder, or a random model: 'tiny', 'bench', or 'full' (the real "
        f"architecture, random weights built on the device, for GPU timings). Default {DEFAULT_MODEL}.",
    )


def _add_config(parser: argparse.ArgumentParser, section: str) -> None:
    parser.set_defaults(section=section, subparser=parser)
    parser.add_argument("--config", metavar="FILE", help="TOML settings file (env ZSPLIT_CONFIG)")
    parser.add_argument("--profile", metavar="NAME", help="profile of the config file (env ZSPLIT_PROFILE)")


def _add_listen(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for all (default loopback)"
    )
    parser.add_argument("--port", type=int, default=port, help=f"port to listen on (default {port})")
    parser.add_argument(
        "--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps"
    )
    security = parser.add_argument_group("transport security (one of --tls-cert/--tls-key or --insecure)")
    security.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate (chain)")
    security.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    security.add_argument(
        "--tls-client-ca", metavar="PEM", help="mutual TLS: require client certificates signed by this CA"
    )
    security.add_argument(
        "--auth-token-file",
        metavar="FILE",
        help="bearer tokens accepted, one per line (or one token in env ZSPLIT_AUTH_TOKEN)",
    )
    security.add_argument(
        "--insecure", action="store_true", help="serve plaintext, no TLS (trusted networks only)"
    )


def _add_metrics(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("metrics")
    group.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics on http://HOST:PORT/metrics, plain HTTP (off)",
    )
    group.add_argument("--metrics-host", default=None, help="address of --metrics-port (default: --host)")


def _check_metrics_port(args: argparse.Namespace) -> None:
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise InvalidArgument(
            f"--metrics-port must be between 0 and 65535 (got {args.metrics_port}); 0 picks a free port."
        )
    if args.metrics_port is not None and args.metrics_port == args.port != 0:
        raise InvalidArgument(
            f"--metrics-port {args.metrics_port} is the service's own --port; pick another."
        )


def _add_server_limits(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    limits = parser.add_argument_group("limits (defaults protect a GPU box; raise them knowingly)")
    limits.add_argument(
        "--max-message-mb", type=int, default=8, help="largest gRPC message received or sent, MiB (8)"
    )
    limits.add_argument(
        "--max-streams-per-connection",
        type=int,
        default=64,
        help="calls one client connection may have open at once; more wait their turn (64)",
    )
    limits.add_argument(
        "--max-prompt-bytes", type=int, default=64 << 10, help="longest prompt text, UTF-8 bytes (65536)"
    )
    limits.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="seconds SIGTERM leaves in-flight calls to finish; a second signal cuts it short (30)",
    )
    return limits


def _add_client_security(
    parser: argparse.ArgumentParser, prefix: str = "", whom: str = "the services"
) -> None:
    flag = f"--{prefix}" if prefix else "--"
    group = parser.add_argument_group(f"how to reach {whom} (TLS is on when a CA is given)")
    group.add_argument(f"{flag}tls-ca", metavar="PEM", help=f"verify {whom} with this CA; turns TLS on")
    group.add_argument(f"{flag}tls-cert", metavar="PEM", help="client certificate, for mutual TLS")
    group.add_argument(f"{flag}tls-key", metavar="PEM", help="the client certificate's private key")
    group.add_argument(
        f"{flag}tls-server-name",
        metavar="NAME",
        help="name expected in the server certificate, if not the host",
    )
    variable = _token_variable(prefix)
    group.add_argument(
        f"{flag}auth-token-file", metavar="FILE", help=f"bearer token to send (first line; or env {variable})"
    )
    group.add_argument(
        f"{flag}insecure", action="store_true", help="plaintext, no TLS (trusted networks only)"
    )


def _add_prompt_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--template", default=None, help="wrap each prompt in this template (zsplit templates lists them)"
    )
    parser.add_argument(
        "--max-sequence-length", type=int, default=None, help="prompt tokens kept, up to 1504 (512)"
    )
    parser.add_argument(
        "--long-prompt-mode",
        default=None,
        choices=["truncate", "interpolate", "pool"],
        help="prompts over --max-sequence-length: truncate (as diffusers), or interpolate or pool all of "
        "the prompt's tokens down to it (truncate)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zsplit", description=__doc__)
    parser.add_argument(
        "--log-level",
        default=os.environ.get("ZSPLIT_LOG_LEVEL"),
        help="DEBUG, INFO, WARNING (default INFO for services, WARNING for generate)",
    )
    parser.add_argument(
        "--log-format",
        default=os.environ.get("ZSPLIT_LOG_FORMAT", "text"),
        choices=LOG_FORMATS,
        help="text, or json: one object per line with time, level, logger, message, request_id (text)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run a service until SIGINT/SIGTERM")
    services = serve.add_subparsers(dest="service", required=True)

    encoder = services.add_parser("encoder", help="the Qwen3 text-encoder service")
    _add_config(encoder, "encoder")
    _add_model(encoder)
    _add_listen(encoder, ENCODER_PORT)
    encoder.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    encoder.add_argument("--hidden-layer", type=int, default=-2, help="hidden state to return (default -2)")
    encoder.add_argument("--max-sequence-length", type=int, default=512, help="default token limit (512)")
    encoder.add_argument("--cache-mb", type=int, default=1024, help="embedding cache size in MiB (1024)")
    encoder.add_argument("--max-batch-size", type=int, default=16, help="prompts per forward pass (16)")
    encoder.add_argument("--max-batch-wait-ms", type=float, default=5.0, help="wait for a batch to fill (5)")
    _add_metrics(encoder)
    _add_server_limits(encoder).add_argument(
        "--max-prompts-per-request", type=int, default=64, help="prompts one Encode call may carry (64)"
    )

    generator = services.add_parser("generator", help="the DiT + VAE generator service")
    _add_config(generator, "generator")
    _add_model(generator)
    _add_listen(generator, GENERATOR_PORT)
    generator.add_argument(
        "--encoder",
        default=f"127.0.0.1:{ENCODER_PORT}",
        help="encoder service HOST:PORT, or 'none' to accept only uploaded embeddings",
    )
    _add_client_security(generator, "encoder-", "the encoder")
    generator.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    generator.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "native", "flash", "_flash_3", "sage"],
        help="attention kernel: auto (the fastest that works here; native off CUDA), native (SDPA), flash, "
        "_flash_3, sage (auto)",
    )
    generator.add_argument(
        "--compile",
        action="store_true",
        help="regional torch.compile of the DiT blocks, compiled before health reports SERVING (off)",
    )
    generator.add_argument(
        "--vae-tiling",
        default="auto",
        choices=["auto", "on", "off"],
        help="decode in 1024-pixel tiles: auto (above 2048x2048 pixels), on, off (auto)",
    )
    generator.add_argument("--max-queue", type=int, default=32, help="requests waiting or running (32)")
    generator.add_argument("--cache-mb", type=int, default=2048, help="embedding cache size in MiB (2048)")
    generator.add_argument(
        "--embedding-store",
        metavar="DIR",
        help="also keep embeddings on disk in DIR (safetensors named by key), so a restart or an encoder "
        "outage does not lose them",
    )
    generator.add_argument(
        "--result-cache-mb",
        type=int,
        default=128,
        help="finished images kept by request_id, so retries get the same image without rerunning (128)",
    )
    generator.add_argument(
        "--max-pixels",
        type=int,
        default=Limits.max_pixels,
        help=f"largest width*height ({Limits.max_pixels})",
    )
    generator.add_argument(
        "--max-steps", type=int, default=Limits.max_steps, help=f"most steps per request ({Limits.max_steps})"
    )
    _add_metrics(generator)
    _add_server_limits(generator).add_argument(
        "--max-images-per-request",
        type=int,
        default=Limits.max_images_per_request,
        help=f"most images one request may ask for, num_images ({Limits.max_images_per_request})",
    )
    generator.add_argument(
        "--lora-dir",
        metavar="DIR",
        default=None,
        help="folder of LoRA .safetensors files requests may name (unset: LoRA off); with Ray, the same "
        "folder on every replica host",
    )
    generator.add_argument(
        "--lora-cache", type=int, default=8, help="LoRA adapters each replica keeps loaded (8)"
    )
    generator.add_argument(
        "--image-cache-mb", type=int, default=256, help="uploaded img2img images and masks kept, MiB (256)"
    )
    generator.add_argument(
        "--encoder-retries",
        type=int,
        default=2,
        help="retries of an encoder call that failed UNAVAILABLE, within the request's deadline (2)",
    )
    ray = generator.add_argument_group("Ray (several replicas, GPUs and hosts)")
    ray.add_argument(
        "--ray-address",
        default=None,
        help="run replicas under Ray Serve: 'local' (Ray in this process), 'auto' or HOST:PORT (join a "
        "cluster started with `ray start`). Unset: one in-process worker",
    )
    ray.add_argument(
        "--replicas",
        default="1",
        help="'auto' = one per GPU, growing as GPUs join; or N (CPU replicas on CPU hosts)",
    )
    ray.add_argument("--max-batch-size", type=int, default=4, help="requests per batched denoising loop (4)")
    ray.add_argument("--max-batch-wait-ms", type=float, default=10.0, help="wait for a batch to fill (10)")
    ray.add_argument(
        "--torch-threads", type=int, default=0, help="torch threads per replica (0: one per reserved CPU)"
    )
    ray.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs reserved per replica (1)")

    http = services.add_parser(
        "http",
        help="an OpenAI-compatible HTTP gateway to a generator (POST /v1/images/generations)",
        description="zsplit serve http --generator HOST:PORT [--port 8000] (docs at /docs, spec at /openapi.json)",
    )
    _add_config(http, "http")
    http.add_argument("--generator", default=f"127.0.0.1:{GENERATOR_PORT}", help="generator HOST:PORT")
    _add_client_security(http, "generator-", "the generator")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    http.add_argument("--port", type=int, default=HTTP_PORT, help=f"port to listen on (default {HTTP_PORT})")
    http.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (chain)")
    http.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    http.add_argument(
        "--auth-token-file",
        metavar="FILE",
        help="bearer tokens accepted, one per line (or one token in env ZSPLIT_AUTH_TOKEN)",
    )
    http.add_argument("--insecure", action="store_true", help="serve plain HTTP (trusted networks only)")
    http.add_argument("--timeout", type=float, default=600.0, help="seconds per image request (600)")
    _add_metrics(http)

    generate = commands.add_parser(
        "generate",
        help="make one image from a prompt, or a batch from an embeddings file",
        description="One image: zsplit generate PROMPT -o out.png. A batch: zsplit generate --embeddings "
        "embeds.safetensors --seeds 0-7 --sizes 1024x1024,768x1344 --out-dir out/ (re-run it to resume).",
    )
    _add_config(generate, "client")
    generate.add_argument("prompt", nargs="?", help="the prompt (or use --embeddings)")
    generate.add_argument(
        "-o",
        "--output",
        default=None,
        help="file to write; .png, .jpg, .webp or .safetensors (latents) pick the format (out.png)",
    )
    generate.add_argument("--generator", default=None, help="generator HOST:PORT")
    generate.add_argument("--encoder", default=None, help="encoder HOST:PORT (for a local generator)")
    _add_client_security(generate)
    _add_model(generate, default=None)  # resolved later: a batch defaults to its embeddings' model
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
        "--format",
        dest="output_format",
        default=None,
        choices=["png", "jpeg", "webp", "latent"],
        help="file format (from the --output suffix, else png)",
    )
    generate.add_argument("--quality", type=int, default=None, help="JPEG/WebP quality 1-100 (90)")
    generate.add_argument(
        "--strip-metadata", action="store_true", help="leave the prompt and settings out of the file"
    )
    _add_prompt_options(generate)
    generate.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up (600)")
    generate.add_argument("--device", default="auto", help="device for services started locally")
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

    encode = commands.add_parser(
        "encode",
        help="encode a prompt file once into one safetensors file",
        description="zsplit encode --prompts prompts.txt -o embeds.safetensors [--encoder HOST:PORT | --model M]",
    )
    _add_config(encode, "client")
    encode.add_argument(
        "--prompts", required=True, metavar="FILE", help="one prompt per line (.txt), or .jsonl lines"
    )
    encode.add_argument("-o", "--output", required=True, help="safetensors file to write")
    encode.add_argument("--encoder", default=None, help="encoder HOST:PORT (default: run one here)")
    _add_client_security(encode, whom="the encoder")
    _add_model(encode)
    encode.add_argument("--device", default="auto", help="device for an encoder started here")
    encode.add_argument("--dtype", default="bfloat16", help="dtype for an encoder started here (bfloat16)")
    _add_prompt_options(encode)
    encode.add_argument("--timeout", type=float, default=600.0, help="seconds per encoder call (600)")
    encode.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    lora = commands.add_parser("lora", help="LoRA files")
    lora_commands = lora.add_subparsers(dest="lora_command", required=True)
    lora_list = lora_commands.add_parser(
        "list",
        help="the LoRA files a generator can load",
        description="zsplit lora list --generator HOST:PORT, or --lora-dir DIR to read a folder here",
    )
    _add_config(lora_list, "client")
    lora_list.add_argument("--generator", default=None, help="generator HOST:PORT")
    lora_list.add_argument("--lora-dir", metavar="DIR", default=None, help="read this folder instead")
    lora_list.add_argument("--timeout", type=float, default=30.0, help="seconds (30)")
    _add_client_security(lora_list)

    commands.add_parser(
        "templates", help="the prompt templates --template takes (add your own in $ZSPLIT_TEMPLATE_DIR)"
    )

    tiny = commands.add_parser("make-tiny-model", help="write the offline random model to DIR")
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

    bench = commands.add_parser(
        "bench",
        help="run the benchmarks against diffusers (python -m benchmarks; needs a source checkout)",
        add_help=False,  # --help goes to the benchmark runner with the rest
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)

    certs = commands.add_parser(
        "certs", help="write a development CA and certificates for the encoder, the generator and a client"
    )
    certs.add_argument("--out-dir", default="certs", help="folder to write them to (certs)")
    certs.add_argument(
        "--hosts",
        required=True,
        help="comma-separated names and IPs the services are reached by (go into the server certificates)",
    )
    certs.add_argument("--overwrite", action="store_true", help="replace existing files")

    config = commands.add_parser("config", help="inspect settings")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser(
        "show",
        help="print the resolved settings of a command, with their sources; secrets redacted",
        description="zsplit config show generator --config zsplit.toml --profile prod [-- more flags]",
    )
    show.add_argument("target", choices=["encoder", "generator", "client"], help="whose settings")
    show.add_argument("--config", metavar="FILE", help="TOML settings file (env ZSPLIT_CONFIG)")
    show.add_argument("--profile", metavar="NAME", help="profile of the config file (env ZSPLIT_PROFILE)")
    show.add_argument("flags", nargs=argparse.REMAINDER, help="flags of that command, after --")
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
    from zimage_split.config import defer_defaults, resolve, setting_actions

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


def _show_config(args: argparse.Namespace) -> int:
    words = {"encoder": ["serve", "encoder"], "generator": ["serve", "generator"], "client": ["generate"]}
    flags = [flag for flag in args.flags if flag != "--"]
    for name, value in (("--config", args.config), ("--profile", args.profile)):
        if value:
            flags += [name, value]
    if args.target == "client":
        flags.append("x")  # `generate` wants a prompt; the settings do not depend on it
    resolved = parse_settings([*words[args.target], *flags]).resolved
    print(resolved.show())
    return 0


def _read_secret_token(path: str | None, variable: str) -> str | None:
    from zimage_split.common.security import read_tokens

    if path:
        return read_tokens(path)[0]
    return os.environ.get(variable) or None


def _server_security(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from zimage_split.common.security import ServerSecurity, read_tokens

    tokens = read_tokens(args.auth_token_file)
    if os.environ.get("ZSPLIT_AUTH_TOKEN"):
        tokens += (os.environ["ZSPLIT_AUTH_TOKEN"],)
    security = ServerSecurity(
        cert_file=args.tls_cert,
        key_file=args.tls_key,
        client_ca_file=args.tls_client_ca,
        tokens=tokens,
        insecure=args.insecure,
    )
    security.check_files()  # the server reads them only once the model is loaded
    return security


def _token_variable(prefix: str) -> str:
    """ZSPLIT_AUTH_TOKEN, or for a service reached through --encoder-... flags ZSPLIT_ENCODER_AUTH_TOKEN."""
    return f"ZSPLIT_{prefix.rstrip('-').upper()}_AUTH_TOKEN" if prefix else "ZSPLIT_AUTH_TOKEN"


def _client_security(args: argparse.Namespace, address: str | None, prefix: str = ""):  # type: ignore[no-untyped-def]
    """TLS when a CA or a client certificate is given; plaintext needs --insecure unless on loopback."""
    from zimage_split.common.security import ClientSecurity, is_loopback

    def get(name: str) -> str | None:
        return getattr(args, prefix.replace("-", "_") + name)

    flag = f"--{prefix}"
    token = _read_secret_token(get("auth_token_file"), _token_variable(prefix))
    insecure = bool(get("insecure"))
    uses_tls = bool(get("tls_ca") or get("tls_cert"))
    if not uses_tls and not insecure and address and not is_loopback(address.rsplit(":", 1)[0]):
        raise InvalidArgument(
            f"{address} is not on this host: pass {flag}tls-ca CA.pem to use TLS (see `zsplit certs`), or "
            f"{flag}insecure for plaintext on a trusted network."
        )
    security = ClientSecurity(
        ca_file=get("tls_ca"),
        cert_file=get("tls_cert"),
        key_file=get("tls_key"),
        server_name=get("tls_server_name"),
        token=token,
        insecure=not uses_tls,
    )
    security.check_files()  # the channel reads them only at the first call, maybe after loading a model
    return security


def _encoder_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from zimage_split.encoder_service.server import EncoderConfig

    _check_serve_limits(args)
    return EncoderConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        hidden_layer=args.hidden_layer,
        max_sequence_length=args.max_sequence_length,
        cache_bytes=args.cache_mb << 20,
        max_batch_size=args.max_batch_size,
        max_batch_wait_ms=args.max_batch_wait_ms,
        max_prompt_bytes=args.max_prompt_bytes,
        max_prompts_per_request=args.max_prompts_per_request,
        transport=_transport_limits(args),
        security=_server_security(args),
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )


def _check_serve_limits(args: argparse.Namespace) -> None:
    """Limits no request could meet, or that gRPC cannot hold, fail here rather than after the model loads."""
    _check_metrics_port(args)
    uint32 = 2**32 - 1
    bounds = [
        ("--port", args.port, 0, 65535, "0 picks a free port"),
        ("--max-message-mb", args.max_message_mb, 2, 2047, "1 MiB chunks need 2; gRPC sizes are 32-bit"),
        ("--max-prompt-bytes", args.max_prompt_bytes, 1, None, "0 would refuse every prompt"),
    ]
    if args.service == "encoder":
        bounds += [
            ("--max-prompts-per-request", args.max_prompts_per_request, 1, None, "0 refuses every call"),
            ("--max-sequence-length", args.max_sequence_length, 1, 4096, "the default is 512 tokens"),
            ("--max-batch-size", args.max_batch_size, 1, None, "a forward pass takes one prompt or more"),
        ]
    else:
        bounds += [
            ("--max-pixels", args.max_pixels, 64 * 64, uint32, "the smallest image, 64x64, needs 4096"),
            ("--max-steps", args.max_steps, 1, uint32, "an image needs at least one step"),
            ("--max-queue", args.max_queue, 1, None, "0 would refuse every request"),
            ("--max-batch-size", args.max_batch_size, 1, None, "a batch holds one request or more"),
            ("--encoder-retries", args.encoder_retries, 0, None, "0 tries the encoder once"),
            (
                "--max-images-per-request",
                args.max_images_per_request,
                1,
                None,
                "a request makes one image or more",
            ),
        ]
    for flag, value, low, high, why in bounds:
        if value < low or (high is not None and value > high):
            allowed = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise InvalidArgument(f"{flag} must be {allowed} (got {value}); {why}.")


def _transport_limits(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from zimage_split.common.server import TransportLimits

    return TransportLimits(
        max_message_bytes=args.max_message_mb << 20,
        max_streams_per_connection=args.max_streams_per_connection,
        shutdown_grace_seconds=args.shutdown_grace,
    )


def _replicas(value: str) -> int | None:
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise InvalidArgument(f"--replicas takes 'auto' or a positive number (got {value!r}).")
    return int(value)


def _generator_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from zimage_split.dit_service.server import GeneratorConfig, RayOptions

    _check_serve_limits(args)
    ray = None
    if args.ray_address:
        ray = RayOptions(
            address=args.ray_address,
            replicas=_replicas(args.replicas),
            max_batch_size=args.max_batch_size,
            max_batch_wait_ms=args.max_batch_wait_ms,
            torch_threads=args.torch_threads,
            cpus_per_replica=args.cpus_per_replica,
        )
    elif args.replicas != "1":
        raise InvalidArgument("--replicas needs --ray-address (local, auto or HOST:PORT).")

    encoder = None if args.encoder in ("", "none") else args.encoder
    return GeneratorConfig(
        model=args.model,
        encoder=encoder,
        security=_server_security(args),
        encoder_security=_client_security(args, encoder, prefix="encoder-"),
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        attention=args.attention,
        compile=args.compile,
        vae_tiling=args.vae_tiling,
        max_queue=args.max_queue,
        cache_bytes=args.cache_mb << 20,
        completed_cache_bytes=args.result_cache_mb << 20,
        embedding_store=args.embedding_store,
        lora_dir=args.lora_dir,
        lora_cache=args.lora_cache,
        image_cache_bytes=args.image_cache_mb << 20,
        limits=Limits(
            max_pixels=args.max_pixels,
            max_steps=args.max_steps,
            max_prompt_bytes=args.max_prompt_bytes,
            max_images_per_request=args.max_images_per_request,
        ),
        transport=_transport_limits(args),
        encoder_retries=args.encoder_retries,
        ray=ray,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )


@asynccontextmanager
async def local_services(
    model: str,
    device: str,
    encoder: str | None,
    *,
    start_encoder: bool = True,
    encoder_security: ClientSecurity | None = None,
) -> AsyncIterator[str]:
    """Starts a generator (and an encoder unless one is given or not wanted) on loopback; yields its address."""
    from zimage_split.dit_service.server import GeneratorConfig, start_generator_server
    from zimage_split.encoder_service.server import EncoderConfig, start_encoder_server

    encoder_server = None
    if encoder is None and start_encoder:
        encoder_server = await start_encoder_server(EncoderConfig(model=model, port=0, device=device))
        encoder = f"127.0.0.1:{encoder_server.port}"
    try:
        generator_server = await start_generator_server(
            GeneratorConfig(
                model=model,
                encoder=encoder,
                port=0,
                device=device,
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


def _check_output_folder(output: Path) -> None:
    """The file is written once the work is done; a folder that cannot be made fails before it."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InvalidArgument(
            f"--output {output}: cannot make the folder {output.parent} ({error.strerror}); pick another path."
        ) from None


async def _generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from zimage_split.client.aio import AsyncClient
    from zimage_split.common.files import write_atomically

    if args.embeddings:
        return await _generate_batch(args)
    if args.prompt is None:
        raise InvalidArgument(
            'Give a prompt (zsplit generate "a red fox"), or --embeddings FILE for a batch.'
        )
    output_format, output = _output_file(args.output, args.output_format)
    _check_output_folder(output)
    prompt = _templated(args.template, args.prompt)
    loras = [_lora_flag(value) for value in args.lora or ()]
    for flag, path in (("--init-image", args.init_image), ("--mask", args.mask)):
        if path is not None and not Path(path).is_file():
            raise InvalidArgument(f"{flag} {path}: no such file.")
    if args.mask and not args.init_image:
        raise InvalidArgument(
            "--mask needs --init-image: the mask says which parts of that image to repaint."
        )
    if args.strength is not None and not args.init_image:
        raise InvalidArgument("--strength needs --init-image (img2img); drop it for text-to-image.")
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
                num_images=args.num_images,
                max_sequence_length=args.max_sequence_length,
                long_prompt_mode=args.long_prompt_mode,
                loras=loras,
                init_image=Path(args.init_image) if args.init_image else None,
                strength=args.strength,
                mask=Path(args.mask) if args.mask else None,
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
            write_atomically(path, image.info["file_bytes"])
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
            await run(args.generator, _client_security(args, args.generator))
        else:
            model = str(args.model or DEFAULT_MODEL)
            encoder_security = _client_security(args, args.encoder) if args.encoder else None
            async with local_services(
                model, args.device, args.encoder, encoder_security=encoder_security
            ) as address:
                await run(address, ClientSecurity.plaintext())
    finally:
        close_bar()
    return 0


async def _generate_batch(args: argparse.Namespace) -> int:
    """Every prompt of an embeddings file x seeds x sizes into --out-dir; a re-run resumes."""
    from tqdm import tqdm

    from zimage_split.batch_jobs import BatchSettings, check_out_dir, run_batch
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
            ("--format", args.output_format if args.output_format != "png" else None),
            ("--quality", args.quality),
            ("--strip-metadata", args.strip_metadata or None),
            ("--template", args.template),
            ("--max-sequence-length", args.max_sequence_length),
            ("--long-prompt-mode", args.long_prompt_mode),
            ("--negative-prompt", args.negative_prompt),
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
        loras=tuple(_lora_flag(value) for value in args.lora or ()),
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
            await run(args.generator, _client_security(args, args.generator))
        else:
            # No encoder at all: the embeddings are all there is to condition on.
            model = args.model or embeddings.model_id
            async with local_services(model, args.device, None, start_encoder=False) as address:
                await run(address, ClientSecurity.plaintext())
    finally:
        close_bars()
    return 0


async def _encode(args: argparse.Namespace) -> int:
    """A prompt file -> one safetensors file of embeddings, one tensor per prompt."""
    from tqdm import tqdm

    from zimage_split.batch_jobs import encode_prompts, read_prompt_file
    from zimage_split.client.aio import AsyncClient

    output = Path(args.output)
    if output.suffix.lower() != ".safetensors":
        raise InvalidArgument(f"--output {output} must end in .safetensors.")
    _check_output_folder(output)
    prompts = read_prompt_file(Path(args.prompts), warn=lambda message: print(message, file=sys.stderr))

    async def run(address: str, security: ClientSecurity) -> None:
        with tqdm(total=len(prompts), desc="encoding", unit="prompt", disable=args.no_progress) as bar:
            async with AsyncClient(
                generator=None, encoder=address, timeout=args.timeout, security=security
            ) as client:
                embeddings = await encode_prompts(
                    client,
                    [_templated(args.template, prompt) for prompt in prompts],
                    max_sequence_length=args.max_sequence_length,
                    long_prompt_mode=args.long_prompt_mode,
                    on_encoded=bar.update,
                )
        embeddings.save(output)
        tokens = sum(item.token_count for item in embeddings)
        truncated = sum(item.truncated for item in embeddings)
        print(
            f"wrote {len(embeddings)} embeddings ({tokens} tokens, {truncated} truncated) of "
            f"{embeddings.model_id} to {output}"
        )

    if args.encoder:
        await run(args.encoder, _client_security(args, args.encoder))
        return 0
    from zimage_split.encoder_service.server import EncoderConfig, start_encoder_server

    server = await start_encoder_server(
        EncoderConfig(model=args.model, port=0, device=args.device, dtype=args.dtype)
    )
    try:
        await run(f"127.0.0.1:{server.port}", ClientSecurity.plaintext())
    finally:
        await server.stop(grace=1)
    return 0


OUTPUT_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp", ".safetensors": "latent"}


def _output_file(output: str | None, output_format: str | None) -> tuple[str, Path]:
    """The format and path of `zsplit generate`'s file: --format, else the --output suffix, else PNG."""
    suffix_format = OUTPUT_SUFFIXES.get(Path(output).suffix.lower()) if output else None
    if output and suffix_format is None:
        raise InvalidArgument(
            f"--output {output} must end in {', '.join(OUTPUT_SUFFIXES)}: the suffix says the file format."
        )
    chosen = output_format or suffix_format or "png"
    if suffix_format is not None and suffix_format != chosen:
        raise InvalidArgument(f"--format {chosen} does not match --output {output}; make them agree.")
    default_suffix = {"png": ".png", "jpeg": ".jpg", "webp": ".webp", "latent": ".safetensors"}[chosen]
    return chosen, Path(output or f"out{default_suffix}")


def _lora_flag(value: str) -> tuple[str, float]:
    """--lora NAME or NAME:SCALE."""
    name, _, scale = value.rpartition(":") if ":" in value else (value, "", "")
    try:
        return name, float(scale) if scale else 1.0
    except ValueError:
        raise InvalidArgument(
            f"--lora {value!r}: the scale after ':' must be a number, e.g. style:0.8."
        ) from None


def _templated(template: str | None, prompt: str) -> str:
    from zimage_split.client.templates import apply_template

    try:
        return apply_template(template, prompt)
    except ValueError as error:
        raise InvalidArgument(str(error)) from None


def _list_loras(args: argparse.Namespace) -> int:
    if (args.generator is None) == (args.lora_dir is None):
        raise InvalidArgument(
            "Give --generator HOST:PORT (what a server can load) or --lora-dir DIR (a folder here)."
        )
    if args.lora_dir:
        from zimage_split.dit_service.lora import LoraLibrary

        if not Path(args.lora_dir).is_dir():
            raise InvalidArgument(f"--lora-dir {args.lora_dir} is not a folder.")
        files = [vars(file) | {"loaded": False} for file in LoraLibrary(args.lora_dir).list()]
    else:
        from zimage_split.client.aio import AsyncClient

        async def ask() -> list[dict]:
            security = _client_security(args, args.generator)
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


def _serve_http(args: argparse.Namespace) -> int:
    from zimage_split.common.metrics import ServiceMetrics
    from zimage_split.common.security import read_tokens
    from zimage_split.common.server import metrics_address

    try:
        from zimage_split.http_gateway import create_app, serve_http
    except ImportError as error:
        raise InvalidArgument(
            f"zsplit serve http needs FastAPI and uvicorn ({error}); install them with "
            "`pip install 'zimage-split[http]'`."
        ) from None

    if not args.insecure and not (args.tls_cert and args.tls_key):
        raise InvalidArgument(
            "zsplit serve http needs --tls-cert and --tls-key, or --insecure for plain HTTP on a trusted network."
        )
    if args.insecure and args.tls_cert:
        raise InvalidArgument("--insecure and --tls-cert contradict each other; pick one.")
    _check_metrics_port(args)
    tokens = read_tokens(args.auth_token_file)
    if os.environ.get("ZSPLIT_AUTH_TOKEN"):
        tokens += (os.environ["ZSPLIT_AUTH_TOKEN"],)
    metrics = ServiceMetrics("http")
    app = create_app(
        args.generator,
        security=_client_security(args, args.generator, prefix="generator-"),
        tokens=tokens,
        timeout=args.timeout,
        metrics=metrics,
    )
    asyncio.run(
        serve_http(
            app,
            host=args.host,
            port=args.port,
            cert_file=args.tls_cert,
            key_file=args.tls_key,
            metrics=metrics,
            metrics_address=metrics_address(args.host, args.metrics_host, args.metrics_port),
        )
    )
    return 0


def _list_templates() -> int:
    from zimage_split.client.templates import list_templates

    for template in list_templates():
        print(f"{template.name:<16} {template.description}")
    return 0


def _bench(arguments: list[str]) -> int:
    """`zsplit bench` is `python -m benchmarks`: the benchmarks live beside the package in a checkout."""
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / "benchmarks" / "__main__.py").is_file():
        raise NotFound(
            "zsplit bench runs the benchmarks of a source checkout, and this zimage-split was installed "
            "without one. Clone the repository, `pip install -e .` from it, and run `zsplit bench` again."
        )
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    from benchmarks.__main__ import main as run_benchmarks

    return run_benchmarks(arguments)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:  # argparse would claim the runner's own flags, --help among them
        try:
            return _bench(arguments[1:])
        except ZSplitError as error:
            print(f"zsplit: error ({error.code}): {error.message}", file=sys.stderr)
            return 2
    try:
        args = parse_settings(argv)
    except ZSplitError as error:
        print(f"zsplit: error ({error.code}): {error.message}", file=sys.stderr)
        return 2
    log_level = args.log_level or ("WARNING" if args.command == "generate" else "INFO")
    configure_logging(log_level, args.log_format)
    if args.log_format == "json" and args.command == "serve":
        route_library_logs()
    try:
        if args.command == "config":
            return _show_config(args)
        if args.command == "certs":
            from zimage_split.certs import write_dev_certificates

            hosts = args.hosts.split(",")
            written = write_dev_certificates(Path(args.out_dir), hosts, overwrite=args.overwrite)
            print(f"wrote {len(written)} files to {args.out_dir} for {', '.join(hosts)} (development only)")
            return 0
        if args.command == "bench":
            return _bench(args.bench_args)
        if args.command == "make-tiny-model":
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
            configs_only = (path / "random_weights.json").exists()
            what = " (configs only: weights are drawn on the device at load time)" if configs_only else ""
            print(f"wrote the {args.size} random Z-Image model to {path}{what}")
            return 0
        if args.command == "serve" and args.service == "encoder":
            from zimage_split.encoder_service.server import serve_encoder

            asyncio.run(serve_encoder(_encoder_config(args)))
            return 0
        if args.command == "serve" and args.service == "http":
            return _serve_http(args)
        if args.command == "serve" and args.service == "generator":
            from zimage_split.dit_service.server import serve_generator

            asyncio.run(serve_generator(_generator_config(args)))
            return 0
        if args.command == "encode":
            return asyncio.run(_encode(args))
        if args.command == "lora":
            return _list_loras(args)
        if args.command == "templates":
            return _list_templates()
        return asyncio.run(_generate(args))
    except ZSplitError as error:
        print(f"zsplit: error ({error.code}): {error.message}", file=sys.stderr)
        return 2 if isinstance(error, InvalidArgument | NotFound) else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
