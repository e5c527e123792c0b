"""Several encoder addresses used as one: calls spread over the healthy ones and fail over within their
deadline, and every encoder must serve the same model (the SDK and the generator share this pool)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from zimage_split.common.addresses import with_default_port
from zimage_split.common.errors import DeadlineExceeded, InvalidArgument, Unavailable
from zimage_split.common.vocabulary import ENCODER_PORT

logger = logging.getLogger(__name__)
T = TypeVar("T")

# The encoder Info fields that change what it outputs for the same text; text keys include them, so every
# encoder of a pool must agree on them.
IDENTITY_FIELDS = ("model_id", "dtype", "hidden_layer", "max_sequence_length")
# An entry "dns:NAME:PORT" stands for every address NAME resolves to.
DNS_PREFIX = "dns:"
# An encoder that failed is skipped for 0.5 s, then 1, 2, ... up to this, unless no other one is left.
MAX_DOWN_SECONDS = 10.0
# One that answered with another identity is left alone this long before it is asked again.
REFUSED_SECONDS = 30.0
# The Info call that checks an encoder's identity before it is used again; the rest of the deadline is
# left for the call itself.
PROBE_SECONDS = 5.0
# Names are resolved again when every encoder is down, at most this often.
RESOLVE_INTERVAL_SECONDS = 1.0

InfoCall = Callable[[str, "float | None"], Awaitable[dict[str, Any]]]


def identity_fields(info: dict[str, Any]) -> dict[str, Any]:
    """The Info fields that decide an encoder's output for a text. `quantization` is there only when the
    encoder is quantized, so unquantized encoders keep the identity (and text keys) they always had."""
    fields = {name: info.get(name, "") for name in IDENTITY_FIELDS}
    if info.get("quantization", "none") not in ("", "none"):
        fields["quantization"] = info["quantization"]
    return fields


def encoder_identity(info: dict[str, Any]) -> str:
    """The identity of an encoder from its Info: the fields that decide its output for a text."""
    return "|".join(str(value) for value in identity_fields(info).values())


def describe_identity(info: dict[str, Any]) -> str:
    fields = identity_fields(info)
    fields.setdefault("quantization", "none")
    return ", ".join(f"{name} {value}" for name, value in fields.items())


def parse_encoder_addresses(value: str) -> tuple[str, ...]:
    """`HOST:PORT[,HOST:PORT...]` (entries may be `dns:NAME:PORT`) to its entries, checked; a HOST (or
    dns:NAME) without a port gets the encoder's default port, 50051."""
    example = "e.g. 10.0.0.5:50051,10.0.0.6:50051 or dns:encoders.internal:50051"
    entries = [with_default_port(entry, ENCODER_PORT) for entry in value.split(",")]
    if any(not entry for entry in entries):
        raise InvalidArgument(
            f"The encoder addresses {value!r} hold an empty entry; give HOST:PORT addresses separated by "
            f"commas ({example})."
        )
    seen: set[str] = set()
    for entry in entries:
        host, colon, port = entry.removeprefix(DNS_PREFIX).rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidArgument(
                f"The encoder address {entry!r} is not HOST:PORT with a port from 1 to 65535 ({example})."
            )
        if entry in seen:
            raise InvalidArgument(f"The encoder addresses {value!r} name {entry} twice; give each once.")
        seen.add(entry)
    return tuple(entries)


@dataclass
class EncoderStatus:
    """One encoder of a pool as metrics report it."""

    address: str
    healthy: bool
    # Calls made to it, by final status code name ("OK", "UNAVAILABLE", ...).
    calls: dict[str, int]


@dataclass
class _Member:
    address: str
    outstanding: int = 0
    # Failures in a row; 0 means healthy.
    failures: int = 0
    down_until: float = 0.0
    # Its identity was checked since it last failed (only pools of several encoders check).
    verified: bool = False
    # Why it is refused (another model), "" when it is not.
    refused: str = ""
    calls: Counter[str] = field(default_factory=Counter)

    def status(self) -> EncoderStatus:
        return EncoderStatus(self.address, self.failures == 0 and not self.refused, dict(self.calls))


class _IdentityMismatch(Unavailable):
    """An encoder answered with another model's identity: it is skipped, as an unreachable one is."""


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


class EncoderPool:
    """The encoders behind one `encoder=` value. A call goes to the healthy encoder with the fewest calls
    outstanding (ties in turn); one that fails UNAVAILABLE is marked down and the call moves at once to
    another, within the same deadline. A down encoder is skipped, with a back-off, until it answers again.
    With more than one entry, an encoder's Info is checked before its first use and after each failure, and
    one whose identity differs from the pool's is refused and logged. One address behaves as a plain
    channel: no extra Info calls, and it is always tried."""

    def __init__(self, addresses: str, info: InfoCall) -> None:
        """`info(address, timeout)`: that encoder's Info as a dict."""
        self.entries = parse_encoder_addresses(addresses)
        self._info = info
        self._names = tuple(entry for entry in self.entries if entry.startswith(DNS_PREFIX))
        self._members = {entry: _Member(entry) for entry in self.entries if entry not in self._names}
        self._resolved_at: float | None = None if self._names else 0.0
        self._turn = 0
        self.checks_identity = len(self.entries) > 1 or bool(self._names)
        # The identity every encoder must report; set by the first one checked.
        self.identity: str | None = None

    def statuses(self) -> list[EncoderStatus]:
        return [member.status() for member in self._members.values()]

    async def call(self, function: Callable[[str, float | None], Awaitable[T]], timeout: float | None) -> T:
        """`function(address, seconds left)` on one encoder, failing over to the others on UNAVAILABLE
        until each was tried once or `timeout` ran out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        await self._resolve_if_needed()
        tried: set[str] = set()
        failure: Unavailable | None = None
        while (member := self._pick(tried)) is not None:
            tried.add(member.address)
            left = _left(deadline)
            if left is not None and left <= 0:
                break
            member.outstanding += 1
            try:
                if self.checks_identity and not member.verified:
                    await self._verify(member, left)
                result = await function(member.address, _left(deadline))
            except _IdentityMismatch as error:
                failure = error
                continue
            except Unavailable as error:
                member.calls[error.code] += 1
                self._mark_down(member, error)
                failure = error
                continue
            except Exception as error:
                member.calls[getattr(error, "code", "UNKNOWN")] += 1
                raise
            finally:
                member.outstanding -= 1
            member.calls["OK"] += 1
            self._mark_up(member)
            return result
        if failure is not None:
            raise failure
        raise DeadlineExceeded("The request's deadline passed while waiting for an encoder.")

    async def check_all(self, timeout: float | None) -> dict[str, Any]:
        """Every encoder's Info, asked at once. The reachable ones must report one identity (an encoder
        that differs is refused with an InvalidArgument naming it); returns the Info of the first reachable
        one (or of one matching the pool's identity, once set). Raises the first failure when none answers."""
        await self._resolve_if_needed()
        members = list(self._members.values())
        answers = await asyncio.gather(
            *(self._info(member.address, timeout) for member in members), return_exceptions=True
        )
        reference: tuple[_Member, dict[str, Any]] | None = None
        failure: BaseException | None = None
        for member, answer in zip(members, answers, strict=True):
            if isinstance(answer, BaseException):
                member.calls[getattr(answer, "code", "UNKNOWN")] += 1
                if not isinstance(answer, Unavailable | DeadlineExceeded):
                    raise answer
                self._mark_down(member, answer)
                failure = failure or answer
                continue
            member.calls["OK"] += 1
            identity = encoder_identity(answer)
            if reference is None and self.identity in (None, identity):
                reference = (member, answer)
            expected = encoder_identity(reference[1]) if reference else self.identity
            if identity != expected:
                other = (
                    f"the encoder at {reference[0].address} serves {describe_identity(reference[1])}"
                    if reference
                    else f"the encoders checked before served {self.identity}"
                )
                raise InvalidArgument(
                    f"The encoder at {member.address} serves {describe_identity(answer)}, but {other}. Every "
                    "encoder address must serve the same model, dtype, quantization, hidden layer and max "
                    f"sequence length (cached text embeddings are keyed by them): restart {member.address} "
                    "with the same settings, or leave it out."
                )
            member.verified = True
            self._mark_up(member)
        if reference is None:
            raise failure or Unavailable("This client has no encoder address left to ask.")
        self.identity = encoder_identity(reference[1])
        for member, answer in zip(members, answers, strict=True):
            if isinstance(answer, BaseException) and len(members) > 1:
                logger.warning("Encoder %s is not reachable yet: %s", member.address, answer)
        return reference[1]

    def _pick(self, tried: set[str]) -> _Member | None:
        now = time.monotonic()
        candidates = [
            member
            for member in self._members.values()
            if member.address not in tried and not (member.refused and member.down_until > now)
        ]
        ready = [member for member in candidates if member.down_until <= now]
        if not ready:  # every one left is down: try the one whose back-off ends first
            ready = sorted(candidates, key=lambda member: member.down_until)[:1]
        if not ready:
            return None
        self._turn += 1
        turn = self._turn
        return min(enumerate(ready), key=lambda pair: (pair[1].outstanding, (pair[0] - turn) % len(ready)))[1]

    async def _verify(self, member: _Member, left: float | None) -> None:
        """Asks `member` its identity before using it; refuses it when it serves another model."""
        probe = PROBE_SECONDS if left is None else min(left, PROBE_SECONDS)
        try:
            info = await self._info(member.address, probe)
        except DeadlineExceeded as error:
            raise Unavailable(
                f"The encoder at {member.address} did not answer in time ({error.message})"
            ) from None
        identity = encoder_identity(info)
        if self.identity is None:
            self.identity = identity
        if identity != self.identity:
            member.refused = (
                f"The encoder at {member.address} now serves {describe_identity(info)}, not the identity "
                f"the other encoders serve ({self.identity}); it is not used until it serves that again."
            )
            member.down_until = time.monotonic() + REFUSED_SECONDS
            logger.error("%s", member.refused)
            raise _IdentityMismatch(member.refused)
        if member.refused:
            logger.info("Encoder %s serves the expected model again; using it.", member.address)
        member.refused = ""
        member.verified = True

    def _mark_down(self, member: _Member, error: Unavailable | DeadlineExceeded) -> None:
        member.failures += 1
        member.verified = False
        member.down_until = time.monotonic() + min(MAX_DOWN_SECONDS, 0.5 * 2 ** (member.failures - 1))
        if len(self._members) > 1:
            logger.warning("Encoder %s is down (%s); using the others.", member.address, error.message)

    def _mark_up(self, member: _Member) -> None:
        if member.failures and len(self._members) > 1:
            logger.info("Encoder %s answers again.", member.address)
        member.failures = 0
        member.down_until = 0.0

    async def _resolve_if_needed(self) -> None:
        """Resolves the `dns:` entries at the first call, and again when every encoder is down."""
        if not self._names:
            return
        now = time.monotonic()
        if self._resolved_at is not None:
            all_down = all(member.down_until > now for member in self._members.values())
            if not all_down or now - self._resolved_at < RESOLVE_INTERVAL_SECONDS:
                return
        self._resolved_at = now
        loop = asyncio.get_running_loop()
        found: list[str] = [entry for entry in self.entries if entry not in self._names]
        for name in self._names:
            host, _, port = name.removeprefix(DNS_PREFIX).rpartition(":")
            try:
                answers = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except OSError as error:
                logger.warning("Cannot resolve the encoder name %s: %s", host, error)
                continue
            for family, *_, address in answers:
                ip = f"[{address[0]}]" if family == socket.AF_INET6 else address[0]
                if f"{ip}:{port}" not in found:
                    found.append(f"{ip}:{port}")
        if not found:
            if self._members:  # keep what the last resolution found
                return
            raise Unavailable(
                f"None of the encoder names in {', '.join(self._names)} resolves to an address. Check the "
                "name, or give HOST:PORT addresses."
            )
        self._members = {address: self._members.get(address) or _Member(address) for address in found}
