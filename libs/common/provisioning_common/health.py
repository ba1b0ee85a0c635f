"""``GET /health`` (readiness) and ``GET /live`` (liveness) of every service, answered in one place.

``/health`` answers ``200 {"status":"UP"}`` when every readiness check passes within
``CHECK_TIMEOUT_S``, else ``503 {"status":"DOWN"}``; ``/live`` answers 200 while the process's event
loop does (and every ``live`` check passes: a listener that stopped reading is dead however well the
loop runs), so that a broker outage marks pods unready instead of restarting them; anything else
gets 404. ``GET /metrics`` answers this process's Prometheus metrics (:mod:`.metrics`) on the same
listener. :class:`Probes` decides; two thin doors lead to it:

* :func:`start_health_server` - the ``HEALTH_PORT`` listener of the services without an HTTP port
  of their own (plain asyncio, no dependency), started by :mod:`.runtime`;
* :func:`mount` - the same two routes on an HTTP service's own app (http_gateway, admin_api,
  broker_auth): plain Starlette routes, no FastAPI dependency injection.

``/metrics`` holds counts and latencies by transport, dialect, outcome and bus method: nothing a
client chose and no secret, so it is served wherever ``/health`` is, without a token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from . import metrics

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from .settings import Settings

Check = Callable[[], Awaitable[bool]]
CHECK_TIMEOUT_S = 2.0
HEALTH_PATH, LIVE_PATH, METRICS_PATH = "/health", "/live", "/metrics"
BODY = {200: b'{"status":"UP"}', 503: b'{"status":"DOWN"}', 404: b'{"status":"NOT_FOUND"}'}
_REASON = {200: "OK", 503: "Service Unavailable", 404: "Not Found"}


async def healthy(checks: tuple[Check, ...]) -> bool:
    """Whether every check returns True within ``CHECK_TIMEOUT_S`` (an exception counts as False)."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            return all([await check() for check in checks])
    except Exception:  # noqa: BLE001 - a failing check is an unhealthy service, not a crash
        return False


@dataclass(frozen=True)
class Probes:
    """What ``/health`` (``ready``) and ``/live`` (``live``) ask.

    ``live`` checks are for what a restart would cure (a listener the event loop no longer reads),
    never for a dependency (broker, Postgres): those belong to readiness, or an outage would restart
    every pod.
    """

    ready: tuple[Check, ...] = ()
    live: tuple[Check, ...] = ()

    async def status(self, method: str, path: str) -> int:
        """The HTTP status of ``method path``: 200 or 503 for the two probes, else 404."""
        if method not in ("GET", "HEAD"):
            return 404
        if path == HEALTH_PATH:
            return 200 if await healthy(self.ready) else 503
        if path == LIVE_PATH:
            # The event loop answers (and the service's own listeners do), whatever the broker does.
            return 200 if await healthy(self.live) else 503
        return 404


async def start_health_server(host: str, port: int, *checks: Check, live: tuple[Check, ...] = ()) -> asyncio.Server:
    """Serve ``GET /health`` (``checks``) and ``/live`` (``live``) on ``host:port`` until the server is closed."""
    probes = Probes(checks, live)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = (await reader.readline()).split()
                while (await reader.readline()).strip():  # skip the headers
                    pass
            method, target = (request[0], request[1]) if len(request) == 3 else (b"", b"")
            path = target.split(b"?")[0].decode("latin-1")
            if path == METRICS_PATH and method in (b"GET", b"HEAD"):
                status, content, content_type = 200, *metrics.render()
            else:
                status = await probes.status(method.decode("latin-1"), path)
                content, content_type = BODY[status], "application/json"
            body = b"" if method == b"HEAD" else content
            writer.write(f"HTTP/1.1 {status} {_REASON[status]}\r\nContent-Type: {content_type}\r\n"
                         f"Content-Length: {len(content)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (OSError, TimeoutError, ValueError):  # ValueError: a line longer than the stream's limit
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)


async def start_if_configured(
    settings: Settings, *checks: Check, live: tuple[Check, ...] = ()
) -> asyncio.Server | None:
    """The health listener on ``BIND_HOST:HEALTH_PORT``, or None when ``HEALTH_PORT`` is 0."""
    if not settings.health_port:
        return None
    return await start_health_server(settings.bind_host, settings.health_port, *checks, live=live)


def mount(app: Starlette, *checks: Check, live: tuple[Check, ...] = ()) -> None:
    """Answer ``/health`` (``checks``) and ``/live`` (``live``) on ``app`` (a FastAPI or Starlette app)."""
    from starlette.requests import Request
    from starlette.responses import Response

    probes = Probes(checks, live)

    async def probe(request: Request) -> Response:
        status = await probes.status(request.method, request.url.path)
        return Response(BODY[status], status_code=status, media_type="application/json")

    async def scrape(request: Request) -> Response:
        content, content_type = metrics.render()
        return Response(content, media_type=content_type)

    for path in (HEALTH_PATH, LIVE_PATH):
        app.add_route(path, probe, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_route(METRICS_PATH, scrape, methods=["GET", "HEAD"], include_in_schema=False)


class _Connected(Protocol):
    @property
    def is_connected(self) -> bool: ...


def bus_check(bus: _Connected) -> Check:
    """Healthy while the process's RabbitMQ connection and channel are open (a ``Bus``, or a
    ``BusSession`` whose bus its application's start-up connects)."""

    async def check() -> bool:
        return bool(bus.is_connected)

    return check


def pool_check(pool: Any) -> Check:
    """Healthy while the asyncpg pool answers ``SELECT 1`` (waits for a free connection, bounded).

    ``pool`` may be a zero-argument function returning the pool, for one an ASGI lifespan opens.
    """

    async def check() -> bool:
        target = pool() if callable(pool) else pool
        return bool(await target.fetchval("SELECT 1") == 1)

    return check
