"""Process start-up shared by every service: logging, uvloop, and a stop event set by SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable

from .settings import Settings, get_settings


def setup_logging(settings: Settings, service: str) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
    )
    # aiormq logs connection URLs at debug level; keep credentials out of logs.
    logging.getLogger("aiormq").setLevel(max(logging.INFO, logging.getLogger().level))


def run(service: str, main: Callable[[Settings, asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(settings, stop)`` on uvloop; ``stop`` is set on SIGTERM or SIGINT."""
    settings = get_settings()
    setup_logging(settings, service)

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(settings, stop)

    try:
        import uvloop

        uvloop.run(runner())
    except ImportError:  # pragma: no cover - uvloop is a dependency of uvicorn[standard]
        asyncio.run(runner())
