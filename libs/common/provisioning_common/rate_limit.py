"""The two rate-limit mechanisms; what is limited, and how much, is decided where they are used.

* :class:`WindowCounter`: named counters in fixed one-minute windows, in one process's memory, with a cap
  on how many names one window tracks so that a flood of spoofed sources cannot grow memory. The gateways
  count malformed requests and wrong device tokens per source with it.
* Token buckets shared by every instance (GCRA: one timestamp per bucket): :class:`Bucket`, the algorithm
  :func:`admit_in_order`, and its stores, :class:`PostgresStore` (``rate_limit_buckets``, migrations 0007
  and 0009: one transaction per batch of concurrent requests) and :class:`MemoryStore` (tests).
  provisioning-core's provisioning limits (``provisioning_core.rate_limit``) are buckets.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import asyncpg

from .batching import Batcher
from .db import repository


class WindowCounter:
    def __init__(
        self, per_minute: int, *, clock: Callable[[], float] = time.monotonic, max_names: int = 100_000
    ) -> None:
        self._limit = per_minute
        self._clock = clock
        self._max_names = max_names
        self._window = -1
        self._counts: dict[str, int] = {}

    def _roll(self) -> None:
        window = int(self._clock() // 60)
        if window != self._window:
            self._window = window
            self._counts.clear()

    def exhausted(self, *names: str) -> bool:
        """Whether any of ``names`` (empty ones ignored) has used up this minute's budget."""
        self._roll()
        return any(name and self._counts.get(name, 0) >= self._limit for name in names)

    def record(self, *names: str) -> None:
        """Count one failure against each of ``names`` (empty ones ignored)."""
        self._roll()
        for name in names:
            if not name or (name not in self._counts and len(self._counts) >= self._max_names):
                continue
            self._counts[name] = self._counts.get(name, 0) + 1


def address_key(address: str) -> str:
    """A client address as a bucket name: IPv6 per /64 (one host's usual allocation), IPv4-mapped IPv6 as the
    IPv4 address; anything that is not an IP address (the MQTT bridge's ``mqtt-client:<id>``) as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ipaddress.IPv6Network((ip, 64), strict=False)) if ip.version == 6 else str(ip)


@dataclass(frozen=True)
class Bucket:
    """One token bucket: ``capacity`` tokens refilled over ``period_s`` seconds."""

    name: str
    capacity: int
    period_s: float

    @property
    def emission_s(self) -> float:
        """Seconds per token."""
        return self.period_s / self.capacity


Request = tuple[list[Bucket], list[Bucket]]
"""One request's buckets: ``(check, take)``: every one must have room; the ``take`` ones are then taken."""


def admit_in_order(requests: Sequence[Request], tat: dict[str, float], now: float) -> list[tuple[int, float]]:
    """GCRA for ``requests`` in order against the buckets' theoretical arrival times ``tat`` (updated in place).

    The one implementation of the algorithm, for both stores. Each request is all-or-nothing: every bucket
    it names must have room for one more (``greatest(tat, now) + emission <= now + period``), and then
    each ``take`` bucket is advanced by one emission interval. Returns per request (0 admitted | 1 a
    ``check`` bucket | 2 a ``take`` bucket is empty, seconds until the refusing buckets have room).
    """
    verdicts: list[tuple[int, float]] = []
    for check, take in requests:
        refused, retry = 0, 0.0
        for code, buckets in ((1, check), (2, take)):
            for b in buckets:
                after = max(tat.get(b.name, 0.0), now) + b.emission_s
                if after > now + b.period_s + 1e-6:
                    refused = refused or code
                    retry = max(retry, after - b.period_s - now)
        if not refused:
            for b in take:
                tat[b.name] = max(tat.get(b.name, 0.0), now) + b.emission_s
        verdicts.append((refused, retry))
    return verdicts


class Store(Protocol):
    """Where buckets live: check ``check`` (not taken) and take ``take`` in one atomic step."""

    async def admit(self, check: list[Bucket], take: list[Bucket]) -> tuple[int, float]:
        """(0 admitted | 1 a ``check`` bucket | 2 a ``take`` bucket is empty, seconds until room)."""


class PostgresStore:
    """The shared store (``rate_limit_buckets``, migration 0007), one transaction per *batch* of requests.

    Concurrent requests wait while a batch is in flight and go together in the next one (at most
    ``max_batch``): the batch's bucket rows are locked in name order (no deadlocks between instances)
    and read with the database's clock, :func:`admit_in_order` decides every request of the batch in
    arrival order, and the new times are written back before the locks are released. So every core
    instance still shares one exact budget, while a hot row (a profile's provisions bucket) is locked
    once per batch instead of once per request, which had capped provisioning at ~290/s.
    """

    def __init__(self, pool: asyncpg.Pool, *, max_batch: int = 256) -> None:
        self._pool = pool
        self._batches: Batcher[Request, tuple[int, float]] = Batcher(self._decide, max_batch=max_batch,
                                                                     name="rate_limit")

    async def admit(self, check: list[Bucket], take: list[Bucket]) -> tuple[int, float]:
        return await self._batches.submit((check, take))

    async def _decide(self, requests: list[Request]) -> list[tuple[int, float]]:
        verdicts: list[tuple[int, float]] = []

        def decide(tat: dict[str, float], now: float) -> dict[str, float]:
            verdicts[:] = admit_in_order(requests, tat, now)
            return tat

        take = sorted({b.name for _, taken in requests for b in taken})
        check = sorted({b.name for checked, _ in requests for b in checked} - set(take))
        await repository.rate_limit_batch(self._pool, take, check, decide)
        return verdicts

    async def purge(self) -> int:
        return await repository.purge_rate_limits(self._pool)


class MemoryStore:
    """The same algorithm in one process's memory (unit tests)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.tat: dict[str, float] = {}

    async def admit(self, check: list[Bucket], take: list[Bucket]) -> tuple[int, float]:
        return admit_in_order([(check, take)], self.tat, self._clock())[0]
