"""Password hashes run a few at a time, and a request whose deadline passed while it waited hashes nothing."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from credentials import service
from provisioning_common import bus


async def test_at_most_hashes_at_once_run_and_the_others_wait_their_turn() -> None:
    running = 0
    most = 0
    lock = threading.Lock()
    release = threading.Event()

    def slow_hash(value: str) -> str:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        release.wait(5)
        with lock:
            running -= 1
        return value.upper()

    count = service.HASHES_AT_ONCE + 3
    calls = [asyncio.ensure_future(service.hash_off_loop(slow_hash, f"p{i}")) for i in range(count)]
    # The first HASHES_AT_ONCE are hashing (a positive signal that the others could have started too)...
    for _ in range(200):
        if running == service.HASHES_AT_ONCE:
            break
        await asyncio.sleep(0.01)
    assert running == service.HASHES_AT_ONCE
    await asyncio.sleep(0.1)
    assert running == service.HASHES_AT_ONCE  # ...and the rest wait for a slot, not in the thread pool
    release.set()
    assert await asyncio.gather(*calls) == [f"P{i}" for i in range(count)]
    assert most == service.HASHES_AT_ONCE


async def test_a_request_past_its_deadline_hashes_nothing() -> None:
    hashed: list[str] = []

    def record(value: str) -> str:
        hashed.append(value)
        return value

    assert await service.hash_off_loop(record, "in time") == "in time"  # hashes when there is time left
    token = bus._deadline.set(time.time() - 0.01)  # noqa: SLF001 - the deadline a handled request runs under
    try:
        with pytest.raises(bus.DeadlineExceeded):
            await service.hash_off_loop(record, "too late")
    finally:
        bus._deadline.reset(token)  # noqa: SLF001
    assert hashed == ["in time"]
