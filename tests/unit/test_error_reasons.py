"""Typed errors keep their machine-readable reason across the wire, pickling (Ray) and the SDK's retries."""

from __future__ import annotations

import asyncio
import pickle

import grpc
import pytest
from grpc import aio

from zimage_split.client import AsyncClient
from zimage_split.client.errors import from_rpc_error, typed_errors
from zimage_split.common.errors import (
    BUSY,
    EMBEDDING_UNKNOWN,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from zimage_split.common.interceptors import ORIGIN_KEY, REASON_KEY, RETRY_AFTER_KEY


def rpc_error(code: grpc.StatusCode, *trailing: tuple[str, str], details: str = "advice") -> aio.AioRpcError:
    return aio.AioRpcError(code, aio.Metadata(), aio.Metadata(*trailing), details=details)


def test_the_reason_of_a_status_the_service_chose_comes_back() -> None:
    error = from_rpc_error(
        rpc_error(grpc.StatusCode.NOT_FOUND, (ORIGIN_KEY, "NOT_FOUND"), (REASON_KEY, EMBEDDING_UNKNOWN)),
        "generator here",
    )
    assert isinstance(error, NotFound) and error.reason == EMBEDDING_UNKNOWN and error.message == "advice"


def test_a_status_without_a_reason_or_origin_has_none() -> None:
    chosen = from_rpc_error(rpc_error(grpc.StatusCode.NOT_FOUND, (ORIGIN_KEY, "NOT_FOUND")), "generator here")
    transport = from_rpc_error(rpc_error(grpc.StatusCode.UNAVAILABLE, (REASON_KEY, BUSY)), "generator here")
    assert chosen.reason == "" and transport.reason == ""


def test_typed_errors_raises_the_typed_error_with_its_reason_and_retry_hint() -> None:
    failure = rpc_error(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        (ORIGIN_KEY, "RESOURCE_EXHAUSTED"),
        (REASON_KEY, BUSY),
        (RETRY_AFTER_KEY, "1500"),
    )
    with pytest.raises(ResourceExhausted) as raised, typed_errors("generator here"):
        raise failure
    assert (raised.value.reason, raised.value.retry_after_seconds) == (BUSY, 1.5)
    assert raised.value.__suppress_context__


def test_reasons_survive_pickling_as_errors_from_ray_replicas_do() -> None:
    error = pickle.loads(pickle.dumps(ResourceExhausted("full", retry_after_seconds=2.0, reason=BUSY)))
    assert (error.message, error.retry_after_seconds, error.reason) == ("full", 2.0, BUSY)


def busy_retries(failures: list[Exception], retries: int = 3) -> tuple[str | Exception, int]:
    """Runs a call that raises `failures` in turn, then succeeds; returns the outcome and the tries."""
    tries = 0

    async def call() -> str:
        nonlocal tries
        tries += 1
        if failures:
            raise failures.pop(0)
        return "done"

    async def run() -> str | Exception:
        client = AsyncClient(generator="127.0.0.1:1", busy_retries=retries)
        try:
            return await client._with_busy_retries(call)
        except Exception as error:
            return error

    return asyncio.run(run()), tries


def test_busy_generators_are_retried_by_reason_whatever_the_message() -> None:
    busy = ResourceExhausted("Reworded: no room at the moment.", retry_after_seconds=0.01, reason=BUSY)
    assert busy_retries([busy, busy]) == ("done", 3)


def test_other_resource_exhaustion_is_not_retried() -> None:
    too_large = ResourceExhausted("The decoded image needs more than the whole image store.")
    outcome, tries = busy_retries([too_large])
    assert outcome is too_large and tries == 1
    outage = Unavailable("down", reason=BUSY)  # only RESOURCE_EXHAUSTED is a full queue
    assert busy_retries([outage]) == (outage, 1)
