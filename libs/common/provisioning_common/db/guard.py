"""Database outages as answers, not tracebacks: the one place that says what "Postgres is down" looks like."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import TypeVar

import asyncpg

from ..bus import Unavailable
from ..outage import OutageLog

T = TypeVar("T")

#: What a lost, restarting or overloaded database raises (an outage, not a bug).
DB_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    # A pooled connection left mid-operation by a server that went away ("cannot switch to state
    # ...; another operation is in progress"), seen when Postgres restarts under load.
    asyncpg.InternalClientError,
)


class DatabaseGuard:
    """Runs a handler's database work; an outage becomes :class:`Unavailable` ("retry later" to the
    caller) and one WARNING per outage, with one line when the database answers again."""

    def __init__(self, logger: logging.Logger) -> None:
        self._outage = OutageLog(logger, "Postgres")

    async def run(self, work: Awaitable[T]) -> T:
        try:
            result = await work
        except DB_UNAVAILABLE as exc:
            self._outage.failed(type(exc).__name__)
            raise Unavailable("database unavailable") from None
        if self._outage.down:
            self._outage.recovered()
        return result
