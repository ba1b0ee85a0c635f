"""Limits guessing of provision secrets: failed attempts per provision key and per source address.

Kept in memory per core instance (a fixed one-minute window); with N instances the effective
limit is at most N times the setting, which still turns a brute force into a crawl.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from provisioning_common.rate_limit import WindowCounter


class FailureLimiter:
    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._counter = WindowCounter(per_minute, clock=clock)

    def blocked(self, key: str, source: str) -> bool:
        return self._counter.exhausted("k:" + key, "s:" + source if source else "")

    def record_failure(self, key: str, source: str) -> None:
        self._counter.record("k:" + key, "s:" + source if source else "")
