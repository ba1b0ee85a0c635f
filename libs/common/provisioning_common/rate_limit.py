"""Counting failures in fixed one-minute windows: the one counter behind every failure limit.

The core counts wrong secrets per provision key and per source; each gateway counts malformed
requests per source. Both are the same thing: named counters that reset every minute, with a cap
on how many names one window tracks so that a flood of spoofed sources cannot grow memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable


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
