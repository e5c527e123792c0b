import asyncio
import threading

import pytest

from zimage_split.encoder_service.batching import MicroBatcher


def test_concurrent_items_share_a_batch_and_keep_their_order() -> None:
    sizes: list[int] = []
    release = threading.Event()

    def run(items):  # type: ignore[no-untyped-def]
        release.wait(5)
        sizes.append(len(items))
        return [item * 10 for item in items]

    async def main() -> list[int]:
        batcher: MicroBatcher[int, int] = MicroBatcher(run, max_batch_size=4, max_wait_seconds=0.05)
        batcher.start()
        try:
            tasks = [asyncio.ensure_future(batcher.submit(i)) for i in range(10)]
            await asyncio.sleep(0.01)
            release.set()
            return list(await asyncio.gather(*tasks))
        finally:
            await batcher.stop()

    assert asyncio.run(main()) == [i * 10 for i in range(10)]
    assert max(sizes) == 4 and sum(sizes) == 10 and len(sizes) <= 4


def test_a_failing_batch_fails_its_callers_only() -> None:
    def run(items):  # type: ignore[no-untyped-def]
        if 0 in items:
            raise ValueError("boom")
        return items

    async def main() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(run, max_batch_size=1, max_wait_seconds=0)
        batcher.start()
        try:
            with pytest.raises(ValueError, match="boom"):
                await batcher.submit(0)
            assert await batcher.submit(5) == 5
        finally:
            await batcher.stop()

    asyncio.run(main())
