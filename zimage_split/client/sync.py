"""Client: the blocking face of AsyncClient, run on a private event-loop thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import threading
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

from zimage_split.client.aio import AsyncClient
from zimage_split.common.security import ClientSecurity
from zimage_split.common.vocabulary import DEFAULT_TIMEOUT_SECONDS, GENERATOR_PORT

P = ParamSpec("P")
R = TypeVar("R")


def _settle(done: concurrent.futures.Future[R], task: asyncio.Task[R]) -> None:
    if task.cancelled():
        done.cancel()
    elif (error := task.exception()) is not None:
        done.set_exception(error)
    else:
        done.set_result(task.result())


# Typed with the AsyncClient method's parameters (P), so editors and type checkers show Client.generate's
# real signature.
def _blocking(
    method: Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[Client, P], R]:
    @functools.wraps(method)
    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._run(method(self._async, *args, **kwargs))

    return call


def _blocking_iterator(
    method: Callable[Concatenate[AsyncClient, P], AsyncGenerator[R, None]],
) -> Callable[Concatenate[Client, P], Iterator[R]]:
    @functools.wraps(method)
    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[R]:
        results = method(self._async, *args, **kwargs)

        async def next_result() -> R:
            return await anext(results)

        try:
            while True:
                try:
                    yield self._run(next_result())
                except StopAsyncIteration:
                    return
        finally:
            self._run(results.aclose())

    return call


class Client:
    """Blocking client for the generator and encoder services; same methods as AsyncClient.

    Example:
        >>> from zimage_split.client import Client
        >>> with Client(generator="localhost:50052", encoder="localhost:50051") as client:
        ...     image = client.generate("a lighthouse at dusk", seed=7, width=512, height=512)
        ...     image.save("lighthouse.png")
        ...     embeddings = client.encode(["a lighthouse at dusk"])
        ...     same = client.generate(embeddings=embeddings[0], seed=7, width=512, height=512)
        ...     # doctest: +SKIP
    """

    def __init__(
        self,
        generator: str | None = f"localhost:{GENERATOR_PORT}",
        encoder: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        busy_retries: int = 0,
        security: ClientSecurity | None = None,
    ) -> None:
        self._async = AsyncClient(
            generator, encoder, timeout=timeout, busy_retries=busy_retries, security=security
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="zsplit-client", daemon=True)
        self._thread.start()

    def _run(self, coroutine: Coroutine[Any, Any, R]) -> R:
        # The call runs in a copy of the caller's context, so its request id (request_scope) and its
        # OpenTelemetry span carry over to the calls it makes.
        done: concurrent.futures.Future[R] = concurrent.futures.Future()

        def start() -> None:
            task = self._loop.create_task(coroutine)
            task.add_done_callback(lambda finished: _settle(done, finished))

        self._loop.call_soon_threadsafe(start, context=contextvars.copy_context())
        return done.result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._async.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    encode = _blocking(AsyncClient.encode)
    upload = _blocking(AsyncClient.upload)
    upload_image = _blocking(AsyncClient.upload_image)
    list_loras = _blocking(AsyncClient.list_loras)
    generate = _blocking(AsyncClient.generate)
    generate_images = _blocking(AsyncClient.generate_images)
    # AsyncClient.generate_many as a blocking iterator.
    generate_many = _blocking_iterator(AsyncClient.generate_many)
    encoder_info = _blocking(AsyncClient.encoder_info)
    check_encoders = _blocking(AsyncClient.check_encoders)
    generator_info = _blocking(AsyncClient.generator_info)
