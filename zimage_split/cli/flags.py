"""Flag groups more than one command takes (model, settings file, listening, TLS and tokens, limits, logging,
metrics, prompts), and the functions that turn each group back into the object it describes."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from zimage_split.common.addresses import host_of
from zimage_split.common.errors import FailedPrecondition, InvalidArgument
from zimage_split.common.files import write_atomically, write_error
from zimage_split.common.logs import LOG_FORMATS
from zimage_split.common.security import ClientSecurity, ServerSecurity, is_loopback, read_tokens
from zimage_split.common.server import TransportLimits, check_bounds
from zimage_split.common.vocabulary import DEFAULT_LONG_PROMPT_MODE, LONG_PROMPT_MODES
from zimage_split.model_source import DEFAULT_MODEL

DEFAULT_SHUTDOWN_GRACE = TransportLimits.shutdown_grace_seconds
DEFAULT_MAX_MESSAGE_MB = TransportLimits.max_message_bytes >> 20


def add_logging(parser: argparse.ArgumentParser) -> None:
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


def add_model(parser: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL) -> None:
    parser.add_argument(
        "--model",
        default=default,
        help="hub id, local diffusers folder, or a random model: 'tiny', 'bench', or 'full' (the real "
        f"architecture, random weights built on the device, for GPU timings). Default {DEFAULT_MODEL}.",
    )


def add_settings_file(parser: argparse.ArgumentParser, section: str) -> None:
    """--config and --profile, and the [section] of the file whose keys this command reads."""
    parser.set_defaults(section=section, subparser=parser)
    parser.add_argument("--config", metavar="FILE", help="TOML settings file (env ZSPLIT_CONFIG)")
    parser.add_argument("--profile", metavar="NAME", help="profile of the config file (env ZSPLIT_PROFILE)")


def add_listen(parser: argparse.ArgumentParser, *, host: str, port: int, device: str) -> None:
    """Where a gRPC service listens, on what device it runs, and how it secures its port."""
    parser.add_argument(
        "--host", default=host, help="address to listen on; 0.0.0.0 for all (default loopback)"
    )
    parser.add_argument("--port", type=int, default=port, help=f"port to listen on (default {port})")
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="share --port with other servers that pass this flag too (SO_REUSEPORT: the kernel spreads "
        "connections over them); without it a port in use is an error",
    )
    parser.add_argument(
        "--device", default=device, help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps"
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


def add_metrics(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("metrics")
    group.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics on HOST:PORT/metrics, over HTTPS with the service's own --tls-cert "
        "when it has one (off; 0 is off too)",
    )
    group.add_argument("--metrics-host", default=None, help="address of --metrics-port (default: --host)")
    group.add_argument(
        "--metrics-auth-token-file",
        metavar="FILE",
        default=None,
        help="bearer tokens a scrape must send, one per line, read again when the file changes (none)",
    )


def add_server_limits(parser: argparse.ArgumentParser, *, max_prompt_bytes: int) -> argparse._ArgumentGroup:
    """The limits both gRPC services take; returns the group, for the service's own limits."""
    limits = parser.add_argument_group("limits (defaults protect a GPU box; raise them knowingly)")
    limits.add_argument(
        "--max-message-mb",
        type=int,
        default=DEFAULT_MAX_MESSAGE_MB,
        help=f"largest gRPC message received or sent, MiB ({DEFAULT_MAX_MESSAGE_MB})",
    )
    limits.add_argument(
        "--max-streams-per-connection",
        type=int,
        default=TransportLimits.max_streams_per_connection,
        help="calls one client connection may have open at once; more wait their turn "
        f"({TransportLimits.max_streams_per_connection})",
    )
    limits.add_argument(
        "--max-prompt-bytes",
        type=int,
        default=max_prompt_bytes,
        help=f"longest prompt text, UTF-8 bytes ({max_prompt_bytes})",
    )
    limits.add_argument(
        "--shutdown-grace",
        type=float,
        default=DEFAULT_SHUTDOWN_GRACE,
        help="seconds SIGTERM leaves in-flight calls to finish; a second signal cuts it short "
        f"({DEFAULT_SHUTDOWN_GRACE:g})",
    )
    return limits


def transport_limits(args: argparse.Namespace) -> TransportLimits:
    # Checked in MiB, as typed, before TransportLimits checks the bytes.
    check_bounds(
        [("--max-message-mb", args.max_message_mb, 2, 2047, "1 MiB chunks need 2; gRPC sizes are 32-bit")]
    )
    return TransportLimits(
        max_message_bytes=args.max_message_mb << 20,
        max_streams_per_connection=args.max_streams_per_connection,
        shutdown_grace_seconds=args.shutdown_grace,
        reuse_port=args.reuse_port,
    )


def server_security(args: argparse.Namespace) -> ServerSecurity:
    """The --tls-* and token flags of add_listen, with ZSPLIT_AUTH_TOKEN; the files are checked now. The
    token file is read again whenever it changes; the variable's token is fixed for the process's life."""
    security = ServerSecurity(
        cert_file=args.tls_cert,
        key_file=args.tls_key,
        client_ca_file=args.tls_client_ca,
        tokens=(os.environ["ZSPLIT_AUTH_TOKEN"],) if os.environ.get("ZSPLIT_AUTH_TOKEN") else (),
        token_file=args.auth_token_file,
        insecure=args.insecure,
    )
    security.check_files()  # the server reads them only once the model is loaded
    return security


def token_variable(prefix: str) -> str:
    """ZSPLIT_AUTH_TOKEN, or for a service reached through --encoder-... flags ZSPLIT_ENCODER_AUTH_TOKEN."""
    return f"ZSPLIT_{prefix.rstrip('-').upper()}_AUTH_TOKEN" if prefix else "ZSPLIT_AUTH_TOKEN"


def add_client_security(
    parser: argparse.ArgumentParser, prefix: str = "", whom: str = "the services"
) -> None:
    """How to reach another service: --tls-ca ... (or --encoder-tls-ca ... with prefix "encoder-")."""
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
    variable = token_variable(prefix)
    group.add_argument(
        f"{flag}auth-token-file", metavar="FILE", help=f"bearer token to send (first line; or env {variable})"
    )
    group.add_argument(
        f"{flag}insecure", action="store_true", help="plaintext, no TLS (trusted networks only)"
    )


def client_security(args: argparse.Namespace, address: str | None, prefix: str = "") -> ClientSecurity:
    """TLS when a CA or a client certificate is given; plaintext needs --insecure unless on loopback."""

    def get(name: str) -> str | None:
        value: str | None = getattr(args, prefix.replace("-", "_") + name)
        return value

    flag = f"--{prefix}"
    token_file = get("auth_token_file")
    token = read_tokens(token_file)[0] if token_file else os.environ.get(token_variable(prefix)) or None
    insecure = bool(get("insecure"))
    uses_tls = bool(get("tls_ca") or get("tls_cert"))
    tls_flags = [
        f"{flag}{name}"
        for name in ("tls-ca", "tls-cert", "tls-key", "tls-server-name")
        if get(name.replace("-", "_"))
    ]
    if insecure and tls_flags:
        raise InvalidArgument(
            f"{flag}insecure (plaintext) contradicts {', '.join(tls_flags)} (TLS); drop {flag}insecure to use "
            "TLS, or the TLS settings for plaintext."
        )
    # `address` may list several (an encoder pool); plaintext without --insecure only to loopback addresses:
    # any other, even one of this host's own, is reachable from the network.
    entries = [entry.strip() for entry in (address or "").split(",") if entry.strip()]
    remote = [entry for entry in entries if not is_loopback(host_of(entry))]
    if not uses_tls and not insecure and remote:
        raise InvalidArgument(
            f"{remote[0]} is not a loopback address (127.0.0.1, ::1 or localhost), so plaintext to it needs "
            f"{flag}insecure (trusted networks only); or pass {flag}tls-ca CA.pem to use TLS (see `zsplit certs`)."
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


def add_prompt_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--template", default=None, help="wrap each prompt in this template (zsplit templates lists them)"
    )
    parser.add_argument(
        "--max-sequence-length", type=int, default=None, help="prompt tokens kept, up to 1504 (512)"
    )
    parser.add_argument(
        "--long-prompt-mode",
        default=None,
        choices=LONG_PROMPT_MODES,
        help="prompts over --max-sequence-length: truncate (as diffusers), or interpolate or pool all of "
        f"the prompt's tokens down to it ({DEFAULT_LONG_PROMPT_MODE})",
    )


def templated(template: str | None, prompt: str) -> str:
    """`prompt` wrapped in --template (a name or a file), if one is given."""
    from zimage_split.client.templates import apply_template

    try:
        return apply_template(template, prompt)
    except ValueError as error:
        raise InvalidArgument(str(error)) from None


def check_output_folder(output: Path) -> None:
    """The file is written once the work is done; a folder that cannot be made fails before it."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_error(
            error, f"--output {output}: the folder {output.parent}", "creating it", "Pick another path."
        ) from None
    if output.is_dir():
        raise FailedPrecondition(
            f"--output {output} is a folder; pass a file name, e.g. {output / 'out.png'}."
        )


def write_output(output: Path, data: bytes) -> None:
    """Writes a result file atomically; a failed write is a typed error naming the file, never a traceback."""
    try:
        write_atomically(output, data)
    except OSError as error:
        raise write_error(
            error, f"--output {output}", "writing it", "Free space or fix the folder, or pick another path."
        ) from None
