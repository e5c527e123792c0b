"""Transport security for both services and their clients: TLS, optional mutual TLS, bearer tokens.

Secrets (private keys, tokens) come from files or the environment and never appear in a repr, a log line
or `zsplit config show`. A server's token file is read again when it changes, so tokens rotate without a
restart. Plaintext is never a default: a server needs TLS material or an explicit `insecure=True`.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from zimage_split.common.errors import InvalidArgument
from zimage_split.common.interceptors import HEALTH_PREFIX, wrap_handler

logger = logging.getLogger(__name__)

AUTHORIZATION_KEY = "authorization"


def read_pem(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as error:
        raise InvalidArgument(f"Cannot read the {what} {path}: {error.strerror}.") from None
    if b"-----BEGIN" not in data:
        raise InvalidArgument(f"The {what} {path} is not PEM (no '-----BEGIN' line).")
    return data


def _certificates(data: bytes, path: str, what: str) -> list[Any]:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as error:
        raise InvalidArgument(
            f"The {what} {path} holds no usable PEM certificate ({error}). Make it again (see `zsplit certs`)."
        ) from None


def check_key_pair(cert_file: str, key_file: str) -> None:
    """Both files parse, and the key belongs to the chain's first certificate (gRPC says only 'failed to bind')."""
    from cryptography.hazmat.primitives import serialization

    chain = read_pem(cert_file, "TLS certificate") or b""
    certificate = _certificates(chain, cert_file, "TLS certificate")[0]
    try:
        key = serialization.load_pem_private_key(read_pem(key_file, "TLS key") or b"", password=None)
    except (ValueError, TypeError) as error:  # TypeError: an encrypted key, which gRPC cannot use either
        raise InvalidArgument(
            f"The TLS key {key_file} is not a usable PEM private key ({error}). Pass the unencrypted key "
            "made with the certificate (see `zsplit certs`)."
        ) from None
    public = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(*public) != key.public_key().public_bytes(*public):
        raise InvalidArgument(
            f"The TLS key {key_file} does not belong to the certificate {cert_file}; pass the key that was "
            "made with that certificate."
        )


def check_ca(path: str | None, what: str) -> None:
    if path:
        _certificates(read_pem(path, what) or b"", path, what)


def read_tokens(path: str | None) -> tuple[str, ...]:
    """Tokens from a file, one per line; blank lines and lines starting with '#' are skipped."""
    if not path:
        return ()
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"Cannot read the token file {path}: {error}.") from None
    tokens = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not tokens:
        raise InvalidArgument(f"The token file {path} holds no token; write one token per line.")
    return tokens


class TokenFile:
    """The tokens of a server's token file, read again when the file changes (its inode, size, mtime or
    ctime), so a rotation takes effect at the next call, with no restart; calls already running go on.

    `tokens()` costs one stat while the file is unchanged. A file that cannot be read, or holds no token,
    keeps the tokens read before, with a warning (an editor may be halfway through writing it). Rotate by
    writing the new file beside it and renaming it over (atomic), or by rewriting it.
    """

    def __init__(self, path: str) -> None:
        self.path = str(Path(path).expanduser())
        self._stamp = _stamp(self.path)
        self._tokens = read_tokens(self.path)  # at start an unreadable file is an error, not a warning

    def tokens(self) -> tuple[str, ...]:
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return self._tokens
        self._stamp = stamp  # before reading: a change made while we read is seen at the next call
        try:
            tokens = read_tokens(self.path)
        except InvalidArgument as error:
            logger.warning(
                "%s Still accepting the %d token(s) read before; fix the file to change them.",
                error.message,
                len(self._tokens),
            )
            return self._tokens
        if tokens != self._tokens:
            logger.info("Token file %s changed: %d token(s) accepted now.", self.path, len(tokens))
        self._tokens = tokens
        return tokens


def _stamp(path: str) -> tuple[int, ...]:
    try:
        stat = os.stat(path)
    except OSError:
        return ()
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def accepted_tokens(
    token_file: str | None, fixed: tuple[str, ...] = ()
) -> Callable[[], tuple[str, ...]] | None:
    """What a server asks, at each call, for the tokens it accepts: those of `token_file` as it is now (see
    TokenFile), plus `fixed` ones (ZSPLIT_AUTH_TOKEN); None when it needs no token."""
    if token_file:
        source = TokenFile(token_file)
        return lambda: source.tokens() + fixed
    return (lambda: fixed) if fixed else None


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Secret(str):
    """A string that does not show itself in reprs or f-string debugging of its container."""

    def __repr__(self) -> str:
        return "'<redacted>'"


@dataclass(frozen=True)
class ServerSecurity:
    """What a server listens with: a certificate and key (TLS), a client CA (mutual TLS), tokens.

    Accepted tokens are those of `token_file` (one per line, read again when it changes) and `tokens`.
    """

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None
    tokens: tuple[str, ...] = field(default=(), repr=False)
    insecure: bool = False
    token_file: str | None = None

    def __post_init__(self) -> None:
        tls_flags = (
            ("--tls-cert", self.cert_file),
            ("--tls-key", self.key_file),
            ("--tls-client-ca", self.client_ca_file),
        )
        given = [flag for flag, value in tls_flags if value]
        if self.insecure and given:
            raise InvalidArgument(
                f"--insecure (plaintext) contradicts {', '.join(given)} (TLS); drop --insecure to serve TLS, "
                "or the TLS settings for plaintext."
            )
        if bool(self.cert_file) != bool(self.key_file):
            raise InvalidArgument("TLS needs both --tls-cert and --tls-key (PEM files).")
        if not self.cert_file and not self.insecure:
            raise InvalidArgument(
                "No TLS certificate given. Pass --tls-cert and --tls-key (see `zsplit certs`), or --insecure "
                "to serve plaintext on a trusted network."
            )
        if self.client_ca_file and not self.cert_file:
            raise InvalidArgument(
                "--tls-client-ca (mutual TLS) needs TLS: pass --tls-cert and --tls-key too."
            )

    @property
    def mutual_tls(self) -> bool:
        return bool(self.client_ca_file)

    def check_files(self) -> None:
        """Reads and parses the PEM and token files now, so a missing or garbled one fails before a model
        is loaded."""
        if self.cert_file and self.key_file:
            check_key_pair(self.cert_file, self.key_file)
        check_ca(self.client_ca_file, "client CA certificate")
        read_tokens(self.token_file)

    def token_source(self) -> Callable[[], tuple[str, ...]] | None:
        """The accepted tokens at each call (see accepted_tokens); None when calls need no token."""
        return accepted_tokens(self.token_file, self.tokens)

    def credentials(self) -> grpc.ServerCredentials | None:
        if self.insecure:
            return None
        key, cert = read_pem(self.key_file, "TLS key"), read_pem(self.cert_file, "TLS certificate")
        assert key is not None and cert is not None  # checked in __post_init__
        client_ca = read_pem(self.client_ca_file, "client CA certificate")
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )

    def describe(self) -> str:
        transport = "plaintext" if self.insecure else ("mutual TLS" if self.mutual_tls else "TLS")
        return f"{transport}, {'bearer tokens' if self.tokens or self.token_file else 'no token'}"


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches a service: plaintext, TLS with a CA (and a client certificate), a token.

    With no `ca_file` and `insecure` unset, TLS uses the system's trusted roots.
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    token: str | None = field(default=None, repr=False)
    insecure: bool = False

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise InvalidArgument("A client certificate needs both --tls-cert and --tls-key (PEM files).")
        if self.insecure and (self.ca_file or self.cert_file):
            raise InvalidArgument("Pass either TLS files or --insecure, not both.")
        if self.token is not None:
            object.__setattr__(self, "token", _Secret(self.token))

    @classmethod
    def plaintext(cls, token: str | None = None) -> ClientSecurity:
        return cls(insecure=True, token=token)

    def check_files(self) -> None:
        """Reads and parses the PEM files now, so a missing or garbled one fails before any other work."""
        check_ca(self.ca_file, "CA certificate")
        if self.cert_file and self.key_file:
            check_key_pair(self.cert_file, self.key_file)

    def channel(self, address: str, options: list[tuple[str, Any]]) -> aio.Channel:
        if self.insecure:
            return aio.insecure_channel(address, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.ca_file, "CA certificate"),
            private_key=read_pem(self.key_file, "TLS key"),
            certificate_chain=read_pem(self.cert_file, "TLS certificate"),
        )
        if self.server_name:
            options = [*options, ("grpc.ssl_target_name_override", self.server_name)]
        return aio.secure_channel(address, credentials, options=options)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTHORIZATION_KEY, f"Bearer {self.token}"),) if self.token else ()


class TokenAuthInterceptor(aio.ServerInterceptor):
    """Refuses calls without one of the accepted bearer tokens with UNAUTHENTICATED (health is exempt).

    `tokens` gives the accepted tokens when a call starts (a fixed tuple, or ServerSecurity.token_source(),
    which follows the token file); a call let in runs to its end whatever changes later.
    """

    def __init__(self, tokens: tuple[str, ...] | Callable[[], tuple[str, ...]]) -> None:
        self._tokens = tokens if callable(tokens) else (lambda: tokens)
        self._seen: tuple[str, ...] | None = None
        self._accepted: list[bytes] = []

    def _authorized(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> bool:
        presented = next((value for key, value in metadata or () if key == AUTHORIZATION_KEY), None)
        if presented is None:
            return False
        tokens = self._tokens()
        if tokens != self._seen:
            self._seen, self._accepted = tokens, [f"Bearer {token}".encode() for token in tokens]
        offered = presented if isinstance(presented, bytes) else presented.encode()
        # Compare with every token, without stopping early, so timing tells nothing about which matched.
        matches = [hmac.compare_digest(offered, accepted) for accepted in self._accepted]
        return any(matches)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        # Probes (kubelet, load balancers, grpc_health_probe) cannot always send a token; health says nothing secret.
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler
        return _refusal(handler, method)


def _refusal(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with UNAUTHENTICATED."""
    message = (
        f"{method} needs a valid bearer token: send 'authorization: Bearer <token>' (SDK: "
        "ClientSecurity(token=...); CLI: --auth-token-file or ZSPLIT_AUTH_TOKEN)."
    )

    async def refuse(request: Any, context: aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request: Any, context: aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    return wrap_handler(handler, lambda _: refuse, lambda _: refuse_stream)
