"""Device profiles by provision key, cached for a short time.

Thousands of devices of one profile provision within seconds of each other; reading the same
profile row for each costs a round trip. An admin change (new secret, strategy, deletion) is
seen by every core instance within ``ttl_s``. Unknown keys are cached too, which also blunts
brute-force probing of keys.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import asyncpg
from provisioning_common.db import repository


class ProfileCache:
    def __init__(self, pool: asyncpg.Pool, ttl_s: float, *, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._pool = pool
        self._ttl = ttl_s
        self._max = max_entries
        self._clock = clock
        self._entries: dict[str, tuple[float, repository.ProfileRow | None]] = {}

    async def get(self, key: str) -> repository.ProfileRow | None:
        now = self._clock()
        hit = self._entries.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        profile = await repository.profile_by_key(self._pool, key)
        if self._ttl > 0:
            if len(self._entries) >= self._max:
                self._entries.clear()
            self._entries[key] = (now + self._ttl, profile)
        return profile
