"""One WARNING per outage of a dependency, not one per request that noticed it.

When Postgres or RabbitMQ goes away under load, thousands of requests fail within seconds;
logging each (with a traceback) buries the one line an operator needs. An :class:`OutageLog`
logs the first failure as a WARNING, counts the rest, and logs one INFO line with the count and
the duration when the dependency answers again.
"""

from __future__ import annotations

import logging
import time


class OutageLog:
    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._log = logger
        self._what = what
        self._since: float | None = None
        self._count = 0

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, reason: str) -> None:
        """Record one failure; only the first of an outage is logged. ``reason`` must hold no secret."""
        self._count += 1
        if self._since is None:
            self._since = time.monotonic()
            self._log.warning("%s unavailable: %s; answering 'retry later' until it is back", self._what, reason)

    def recovered(self) -> None:
        """The dependency answered again: log the outage's length and how many requests it failed."""
        if self._since is None:
            return
        self._log.warning(
            "%s available again after %.1f s (%d failures during the outage)",
            self._what, time.monotonic() - self._since, self._count,
        )
        self._since = None
        self._count = 0
