"""EncoderPool without servers: address lists, spreading, failover to another encoder, identity refusals."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from zimage_split.common.encoder_pool import EncoderPool, encoder_identity, parse_encoder_addresses
from zimage_split.common.errors import InvalidArgument, Unavailable
from zimage_split.dit_service.config import GeneratorConfig

INFO = {"model_id": "tiny", "dtype": "float32", "hidden_layer": -2, "max_sequence_length": 512}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:50051", ("127.0.0.1:50051",)),
        (" a:1 ,b:2,  c:3 ", ("a:1", "b:2", "c:3")),
        ("[::1]:50051,dns:encoders.internal:50051", ("[::1]:50051", "dns:encoders.internal:50051")),
    ],
)
def test_address_lists_parse(value: str, expected: tuple[str, ...]) -> None:
    assert parse_encoder_addresses(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("a:1,,b:2", "hold an empty entry"),
        ("a:1,", "hold an empty entry"),
        ("", "hold an empty entry"),
        ("a:1, a:1", "name a:1 twice"),
        ("a:1,b:", "'b:' is not HOST:PORT"),
        ("a:0", "'a:0' is not HOST:PORT"),
        ("a:http", "'a:http' is not HOST:PORT"),
        (":50051", "':50051' is not HOST:PORT"),
    ],
)
def test_bad_address_lists_are_refused_saying_why(value: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_encoder_addresses(value)


def test_the_generator_config_checks_its_encoder_list() -> None:
    assert GeneratorConfig(model="tiny", encoder="a:1,b:2").encoder == "a:1,b:2"
    with pytest.raises(InvalidArgument, match="twice"):
        GeneratorConfig(model="tiny", encoder="a:1,a:1")


class FakeEncoders:
    """Info and a call per address; `down` addresses fail UNAVAILABLE, `identities` override the Info."""

    def __init__(
        self, *, down: frozenset[str] = frozenset(), identities: dict[str, dict[str, Any]] | None = None
    ) -> None:
        self.down = set(down)
        self.identities = identities or {}
        self.calls: list[str] = []
        self.infos: list[str] = []

    async def info(self, address: str, timeout: float | None) -> dict[str, Any]:
        self.infos.append(address)
        if address in self.down:
            raise Unavailable(f"{address} is down")
        return self.identities.get(address, INFO)

    async def encode(self, address: str, timeout: float | None) -> str:
        self.calls.append(address)
        if address in self.down:
            raise Unavailable(f"{address} is down")
        return address


def test_calls_spread_over_the_encoders() -> None:
    fake = FakeEncoders()
    pool = EncoderPool("a:1,b:2,c:3", fake.info)

    async def run() -> list[str]:
        return [await pool.call(fake.encode, 10) for _ in range(6)]

    assert sorted(asyncio.run(run())) == ["a:1", "a:1", "b:2", "b:2", "c:3", "c:3"]


def test_a_failed_call_moves_to_another_encoder_and_the_down_one_is_skipped() -> None:
    fake = FakeEncoders(down={"a:1"})
    pool = EncoderPool("a:1,b:2", fake.info)

    async def run() -> list[str]:
        return [await pool.call(fake.encode, 10) for _ in range(6)]

    assert asyncio.run(run()) == ["b:2"] * 6
    # The down one was asked once (its identity check failed), then left alone during its back-off.
    assert fake.infos.count("a:1") == 1
    assert {status.address: status.healthy for status in pool.statuses()} == {"a:1": False, "b:2": True}


def test_every_encoder_down_raises_unavailable() -> None:
    fake = FakeEncoders(down={"a:1", "b:2"})
    pool = EncoderPool("a:1,b:2", fake.info)
    with pytest.raises(Unavailable, match="is down"):
        asyncio.run(pool.call(fake.encode, 10))


def test_one_address_is_always_tried_and_never_probed() -> None:
    fake = FakeEncoders(down={"a:1"})
    pool = EncoderPool("a:1", fake.info)

    async def run() -> None:
        for _ in range(3):
            with pytest.raises(Unavailable):
                await pool.call(fake.encode, 10)

    asyncio.run(run())
    assert fake.calls == ["a:1"] * 3
    assert fake.infos == []


def test_an_encoder_of_another_model_is_refused_at_the_check_and_later() -> None:
    other = {**INFO, "max_sequence_length": 256}
    fake = FakeEncoders(identities={"b:2": other})
    with pytest.raises(InvalidArgument) as refused:
        asyncio.run(EncoderPool("a:1,b:2", fake.info).check_all(10))
    assert "The encoder at b:2 serves" in refused.value.message
    assert "max_sequence_length 256" in refused.value.message
    assert "the encoder at a:1 serves" in refused.value.message

    # One that changes model after the check (a restart) is not used again.
    fake = FakeEncoders()
    pool = EncoderPool("a:1,b:2", fake.info)

    async def run() -> list[str]:
        assert encoder_identity(await pool.check_all(10)) == encoder_identity(INFO)
        fake.down.add("b:2")
        await pool.call(fake.encode, 10)
        await pool.call(fake.encode, 10)  # b:2 fails here, if not before, and is marked down
        fake.down.discard("b:2")
        fake.identities["b:2"] = other
        for status in pool._members.values():  # its back-off is over
            status.down_until = 0.0
        return [await pool.call(fake.encode, 10) for _ in range(4)]

    assert asyncio.run(run()) == ["a:1"] * 4
    assert not {status.address: status.healthy for status in pool.statuses()}["b:2"]


def test_a_dns_name_stands_for_every_address_it_resolves_to() -> None:
    fake = FakeEncoders()
    pool = EncoderPool("dns:localhost:50051", fake.info)
    assert pool.statuses() == []  # resolved at the first call, not when the client is built
    asyncio.run(pool.call(fake.encode, 10))
    addresses = {status.address for status in pool.statuses()}
    assert "127.0.0.1:50051" in addresses
    assert addresses <= {"127.0.0.1:50051", "[::1]:50051"}
