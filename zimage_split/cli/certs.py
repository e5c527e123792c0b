"""`zsplit certs`: a development CA and certificates for the encoder, the generator and a client."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_command(commands: argparse._SubParsersAction) -> None:
    certs = commands.add_parser(
        "certs", help="write a development CA and certificates for the encoder, the generator and a client"
    )
    certs.set_defaults(handler=write_certificates)
    certs.add_argument("--out-dir", default="certs", help="folder to write them to (certs)")
    certs.add_argument(
        "--hosts",
        required=True,
        help="comma-separated names and IPs the services are reached by (go into the server certificates)",
    )
    certs.add_argument("--overwrite", action="store_true", help="replace existing files")


def write_certificates(args: argparse.Namespace) -> int:
    from zimage_split.certs import write_dev_certificates

    hosts = args.hosts.split(",")
    written = write_dev_certificates(Path(args.out_dir), hosts, overwrite=args.overwrite)
    print(f"wrote {len(written)} files to {args.out_dir} for {', '.join(hosts)} (development only)")
    return 0
