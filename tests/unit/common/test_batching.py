"""batching.Batcher: a lone item goes at once, items arriving meanwhile go together, results reach their callers."""

from __future__ import annotations

import asyncio

import pytest
from provisioning_common.batching import Batcher


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.fail: Exception | None = None

    async def run(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(items)
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]


async def test_a_lone_item_goes_at_once_and_the_rest_gather_behind_it() -> None:
    recorder = Recorder()
    batcher: Batcher[int, int] = Batcher(recorder.run, max_batch=3, name="test")
    first = asyncio.create_task(batcher.submit(0))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert recorder.batches == [[0]]  # out alone, without waiting for company
    rest = [asyncio.create_task(batcher.submit(i)) for i in (2, 4, 6, 8)]
    await asyncio.sleep(0)
    recorder.gate.set()
    assert await first == 0
    assert await asyncio.gather(*rest) == [20, 40, 60, 80]
    assert recorder.batches == [[0], [2, 4, 6], [8]]  # at most max_batch each, in arrival order


async def test_each_caller_gets_its_own_exception_and_a_failed_batch_fails_all_of_it() -> None:
    recorder = Recorder()
    recorder.gate.set()
    batcher: Batcher[int, int] = Batcher(recorder.run, max_batch=8, name="test")
    results = await asyncio.gather(*(batcher.submit(i) for i in (1, 2, 3)), return_exceptions=True)
    assert [str(r) if isinstance(r, Exception) else r for r in results] == ["odd 1", 20, "odd 3"]
    recorder.fail = ConnectionError("database gone")
    gone = await asyncio.gather(*(batcher.submit(i) for i in (4, 6)), return_exceptions=True)
    assert [type(r) for r in gone] == [ConnectionError, ConnectionError]
    recorder.fail = None
    assert await batcher.submit(6) == 60  # and the next batch goes on


async def test_max_batch_one_runs_each_item_alone_and_concurrently() -> None:
    recorder = Recorder()
    batcher: Batcher[int, int] = Batcher(recorder.run, max_batch=1, name="test")
    tasks = [asyncio.create_task(batcher.submit(i)) for i in (2, 4, 6)]
    await asyncio.sleep(0)
    assert recorder.batches == [[2], [4], [6]]  # all three in flight at once
    recorder.gate.set()
    assert await asyncio.gather(*tasks) == [20, 40, 60]
    with pytest.raises(ValueError, match="odd 5"):
        await batcher.submit(5)
