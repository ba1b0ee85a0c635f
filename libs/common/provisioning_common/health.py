"""Optional ``GET /health`` listener (``HEALTH_PORT``) for the services without an HTTP port of their own.

``/health`` (readiness) answers ``200 {"status":"UP"}`` when every check passes within
``CHECK_TIMEOUT_S``, else ``503 {"status":"DOWN"}``; ``/live`` (liveness) answers 200 while the
process's event loop does (and every ``live`` check passes: a listener that stopped reading is
dead however well the loop runs), so that a broker outage marks pods unready instead of restarting
them; anything else gets 404. Plain asyncio, no dependency: Kubernetes probes and a compose
``healthcheck`` need nothing more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

Check = Callable[[], Awaitable[bool]]
CHECK_TIMEOUT_S = 2.0
_BODY = {200: b'{"status":"UP"}', 503: b'{"status":"DOWN"}', 404: b'{"status":"NOT_FOUND"}'}
_REASON = {200: "OK", 503: "Service Unavailable", 404: "Not Found"}


async def healthy(checks: tuple[Check, ...]) -> bool:
    """Whether every check returns True within ``CHECK_TIMEOUT_S`` (an exception counts as False)."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            return all([await check() for check in checks])
    except Exception:  # noqa: BLE001 - a failing check is an unhealthy service, not a crash
        return False


async def start_health_server(host: str, port: int, *checks: Check, live: tuple[Check, ...] = ()) -> asyncio.Server:
    """Serve ``GET /health`` (``checks``) and ``/live`` (``live``) on ``host:port`` until the server is closed.

    ``live`` checks are for what a restart would cure (a listener the event loop no longer reads), never
    for a dependency (broker, Postgres): those belong to readiness, or an outage would restart every pod.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = (await reader.readline()).split()
                while (await reader.readline()).strip():  # skip the headers
                    pass
            target = request[1].split(b"?")[0] if len(request) == 3 else b""
            known = request[:1] in ([b"GET"], [b"HEAD"])
            status = 404
            if known and target == b"/health":
                status = 200 if await healthy(checks) else 503
            elif known and target == b"/live":
                # The event loop answers (and the service's own listeners do), whatever the broker does.
                status = 200 if await healthy(live) else 503
            body = b"" if request[:1] == [b"HEAD"] else _BODY[status]
            writer.write(f"HTTP/1.1 {status} {_REASON[status]}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(_BODY[status])}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (OSError, TimeoutError, ValueError):  # ValueError: a line longer than the stream's limit
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)


def bus_check(bus: Any) -> Check:
    """Healthy while the process's RabbitMQ connection and channel are open."""

    async def check() -> bool:
        return bool(bus.is_connected)

    return check


def pool_check(pool: Any) -> Check:
    """Healthy while the asyncpg pool answers ``SELECT 1`` (waits for a free connection, bounded)."""

    async def check() -> bool:
        return await pool.fetchval("SELECT 1") == 1

    return check


async def start_if_configured(settings: Any, *checks: Check, live: tuple[Check, ...] = ()) -> asyncio.Server | None:
    """The health listener on ``BIND_HOST:HEALTH_PORT``, or None when ``HEALTH_PORT`` is 0."""
    if not settings.health_port:
        return None
    return await start_health_server(settings.bind_host, settings.health_port, *checks, live=live)
