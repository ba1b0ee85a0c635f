"""Process start-up shared by every service: logging, uvloop, and a stop event set by SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable

from .settings import Settings, get_settings

#: Start-up and shutdown lines are logged whatever LOG_LEVEL says: orchestration (devstack, an
#: operator reading the log) waits for "<service> ready".
LIFECYCLE_LOGGER = "provisioning.lifecycle"


def setup_logging(settings: Settings, service: str) -> None:
    log_format = f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr, format=log_format)
    lifecycle = logging.getLogger(LIFECYCLE_LOGGER)
    lifecycle.setLevel(logging.INFO)
    lifecycle.propagate = False
    if not lifecycle.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(log_format))
        lifecycle.addHandler(handler)
    # aiormq logs connection URLs at debug level, and returned or unexpected messages (bodies with
    # tokens) at error level; aio_pika logs every reconnect attempt. The Bus logs one line per
    # outage instead (provisioning_common.outage), so only their real errors pass, without bodies.
    # asyncpg's pool logs each failed reconnect during a database outage with a traceback; the
    # services log the outage once themselves (DatabaseGuard), so asyncpg's line stays one line.
    # (Logger filters do not apply to child loggers: the filter sits on the handlers.)
    for name in ("aiormq", "aio_pika"):
        logging.getLogger(name).setLevel(max(logging.ERROR, logging.getLogger().level))
    for handler in logging.getLogger().handlers:
        if _library_records not in handler.filters:
            handler.addFilter(_library_records)


def _library_records(record: logging.LogRecord) -> bool:
    """Drop AMQP library records that would print a message (its body may carry credentials), and
    turn a database library's exception into a short suffix instead of a traceback."""
    if record.name.startswith(("aiormq", "aio_pika")):
        args = record.args if isinstance(record.args, tuple) else (record.args,)
        return not any(hasattr(arg, "body") or hasattr(arg, "header") for arg in args)
    if record.name.startswith("asyncpg") and record.exc_info and record.exc_info[1] is not None:
        record.msg = f"{record.msg} ({type(record.exc_info[1]).__name__})"
        record.exc_info = None
        record.exc_text = None
    return True


def announce_ready(service: str, detail: str = "") -> None:
    """Log "<service> ready ..." even when LOG_LEVEL hides INFO (devstack waits for this line)."""
    separator = "" if not detail or detail[0] in ":;," else " "
    logging.getLogger(LIFECYCLE_LOGGER).info("%s ready%s%s", service, separator, detail)


def run(
    service: str, main: Callable[[Settings, asyncio.Event], Awaitable[None]], *, stdlib_loop: bool = False
) -> None:
    """Run ``main(settings, stop)`` on uvloop; ``stop`` is set on SIGTERM or SIGINT.

    ``stdlib_loop`` runs it on asyncio's own selector loop instead, for a service whose library
    relies on that loop's semantics: the CoAP gateway (aiocoap's ``udp6`` transport reads ICMP errors
    after a POLLERR, which libuv's poll handles treat as fatal; see ``coap_gateway.__main__``).
    """
    settings = get_settings()
    setup_logging(settings, service)

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(settings, stop)

    if stdlib_loop:
        asyncio.run(runner())
        return
    try:
        import uvloop

        uvloop.run(runner())
    except ImportError:  # pragma: no cover - uvloop is a dependency of uvicorn[standard]
        asyncio.run(runner())


def serve_http(app: object, port: int, settings: Settings, *, access_log: bool = False) -> None:
    """Run an ASGI app with uvicorn (uvloop + httptools) the way every HTTP service of ours runs.

    On SIGTERM uvicorn stops accepting and lets requests in flight finish (they wait for the bus
    at most PROVISION_TIMEOUT_S); it then re-raises SIGTERM, which would end the process with 143,
    so a finished shutdown exits 0 instead (compose and Kubernetes read it as a clean stop).
    Slow, idle and hostile clients meet the HTTP_* limits of provisioning_common.http_limits.
    """
    from .http_limits import serve

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(
        app,
        host=settings.bind_host,
        port=port,
        settings=settings,
        access_log=access_log,
        timeout_graceful_shutdown=int(settings.provision_timeout_s + settings.bus_reply_grace_s) + 5,
    )
