"""`zsplit certs`: a development CA and certificates for the encoder, the generator and a client.

For trying TLS and mutual TLS on a test network. Production certificates come from your own CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING

from zimage_split.common.errors import InvalidArgument

if TYPE_CHECKING:
    from cryptography import x509

ROLES = ("encoder", "generator", "client")
VALID_DAYS = 365


def _write(path: Path, data: bytes, *, private: bool) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _alternative_names(hosts: list[str]) -> x509.SubjectAlternativeName:
    from cryptography import x509

    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def write_dev_certificates(out_dir: Path, hosts: list[str], *, overwrite: bool = False) -> list[Path]:
    """Writes ca.crt/ca.key and <role>.crt/<role>.key for each role; server certificates name `hosts`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    hosts = [host.strip() for host in hosts if host.strip()]
    if not hosts:
        raise InvalidArgument("--hosts needs at least one host name or IP the services are reached by.")
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = [out_dir / f"{name}.{ext}" for name in ("ca", *ROLES) for ext in ("crt", "key")]
    existing = [path for path in targets if path.exists()]
    if existing and not overwrite:
        raise InvalidArgument(f"{existing[0]} exists; pass --overwrite or choose another --out-dir.")

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "zimage-split development CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    _write(out_dir / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(out_dir / "ca.key", pem_key(ca_key), private=True)
    for role in ROLES:
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if role == "client" else ExtendedKeyUsageOID.SERVER_AUTH
        # The generator is also the encoder's client, so its certificate serves both ways.
        usages = [usage, ExtendedKeyUsageOID.CLIENT_AUTH] if role == "generator" else [usage]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"zimage-split {role}")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if role != "client":
            builder = builder.add_extension(_alternative_names(hosts), critical=False)
        certificate = builder.sign(ca_key, hashes.SHA256())
        _write(out_dir / f"{role}.crt", certificate.public_bytes(serialization.Encoding.PEM), private=False)
        _write(out_dir / f"{role}.key", pem_key(key), private=True)
    return targets
