"""Limits guessing of provision secrets: failed attempts per provision key and per source address.

Kept in memory per core instance (a fixed one-minute window); with N instances the effective
limit is at most N times the setting, which still turns a brute force into a crawl.
"""

from __future__ import annotations

import time


class FailureLimiter:
    def __init__(self, per_minute: int, *, clock: "callable[[], float]" = time.monotonic) -> None:  # type: ignore[valid-type]
        self._limit = per_minute
        self._clock = clock
        self._window = 0
        self._counts: dict[str, int] = {}

    def _roll(self) -> None:
        window = int(self._clock() // 60)
        if window != self._window:
            self._window = window
            self._counts.clear()

    def blocked(self, key: str, source: str) -> bool:
        self._roll()
        return (
            self._counts.get("k:" + key, 0) >= self._limit
            or bool(source) and self._counts.get("s:" + source, 0) >= self._limit
        )

    def record_failure(self, key: str, source: str) -> None:
        self._roll()
        for name in ("k:" + key, "s:" + source if source else None):
            if name:
                self._counts[name] = self._counts.get(name, 0) + 1
