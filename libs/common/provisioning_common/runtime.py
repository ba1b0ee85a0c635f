"""Process start-up shared by every service: logging, uvloop, a stop event set by SIGTERM/SIGINT, and
:func:`run_service`, the one lifecycle of the services without an HTTP port of their own.

A bus-only service's ``__main__`` only says what it is (like a nameko service class; the runner is
nameko's ``ServiceRunner``)::

    async def start(context: Context) -> Running:
        service = CredentialsService(await context.pool(), box)
        return Running(serve=CREDENTIALS, handlers=service.handlers())

    runtime.run_service("credentials", start)

and :func:`run_service` does the rest, in this order: connect what ``start`` asks for (the bus under
the service's name, the Postgres pool), start the service, consume its RPC queue, open the
``HEALTH_PORT`` listener (readiness: bus connected, pool answers, the service's own checks),
announce "<service> ready", wait for SIGTERM; then close the listener, stop the background tasks,
stop consuming and let the requests in flight finish (bounded), run the service's stop hooks (a
gateway drains its listeners), and close the bus and the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import pythonjsonlogger.core
import pythonjsonlogger.json

from . import health, metrics
from .bus import Bus, UndeliveredHook
from .context import current_request_id
from .contract import Handler, Service
from .logs import BatchedStreamHandler, batched_stderr
from .settings import Settings, get_settings

#: Start-up and shutdown lines are logged whatever LOG_LEVEL says: orchestration (devstack, an
#: operator reading the log) waits for "<service> ready".
LIFECYCLE_LOGGER = "provisioning.lifecycle"


def setup_logging(settings: Settings, service: str) -> None:
    """Log to stderr as ``LOG_FORMAT`` says (``text`` or ``json``), at ``LOG_LEVEL``, every record with
    this service's name and the request id in force (:mod:`.context`), control characters escaped
    (:func:`escape_controls`): a device name with a line feed cannot forge a line."""
    formatter = make_formatter(settings.log_format, service)
    # Neither format shows a record's source line, thread or process: skip gathering them for every record
    # (logging's documented optimisations; the caller's frame alone was ~1.3% of a gateway's CPU per provision).
    logging._srcfile = None  # noqa: SLF001 - the documented switch
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # stderr in batches (provisioning_common.logs): a WARNING or worse, and every lifecycle line, at once.
    logging.basicConfig(level=settings.log_level.upper(), handlers=[BatchedStreamHandler(batched_stderr())])
    metrics.set_service(service)
    lifecycle = logging.getLogger(LIFECYCLE_LOGGER)
    lifecycle.setLevel(logging.INFO)
    lifecycle.propagate = False
    if not lifecycle.handlers:
        lifecycle.addHandler(BatchedStreamHandler(batched_stderr(), immediate_level=logging.DEBUG))
    # aiormq logs connection URLs at debug level, and returned or unexpected messages (bodies with
    # tokens) at error level; aio_pika logs every reconnect attempt. The Bus logs one line per
    # outage instead (provisioning_common.outage), so only their real errors pass, without bodies.
    # asyncpg's pool logs each failed reconnect during a database outage with a traceback; the
    # services log the outage once themselves (DatabaseGuard), so asyncpg's line stays one line.
    # (Logger filters do not apply to child loggers: the filter sits on the handlers.)
    for name in ("aiormq", "aio_pika"):
        logging.getLogger(name).setLevel(max(logging.ERROR, logging.getLogger().level))
    for handler in (*logging.getLogger().handlers, *lifecycle.handlers):
        handler.setFormatter(formatter)
        for record_filter in (_library_records, _RECORD_CONTEXT):
            if record_filter not in handler.filters:
                handler.addFilter(record_filter)


# --- log records: context, escaping, the two formats ---------------------------------------------

#: C0 and C1 control characters, DEL, and the Unicode line and paragraph separators.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape_controls(text: str) -> str:
    """``text`` with every control character written out (``\\n``, ``\\r``, ``\\t``, ``\\x1b``, ``\\u2028``):
    one log record stays one line, and a client's text cannot move the cursor or color the terminal."""
    return _CONTROLS.sub(_escaped, text) if _CONTROLS.search(text) else text


class _RecordContext(logging.Filter):
    """On our handlers: renders the message with its control characters escaped (idempotent: backslashes
    are kept), and adds the request id in force (``request_id``, and ``request_tag`` for the text format)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - arguments that do not fit the format: logging's handleError reports it
            message = None
        if message is not None:
            escaped = escape_controls(message)
            if escaped is not message or record.args:
                record.msg, record.args = escaped, None
        request_id = getattr(record, "request_id", None) or current_request_id()
        record.request_id = request_id
        record.request_tag = f" [{request_id}]" if request_id else ""
        return True


_RECORD_CONTEXT = _RecordContext()


class TextFormatter(logging.Formatter):
    """``<time> <service> <LEVEL> <logger> [<request id>]: <message>``; a traceback's lines are escaped
    and indented, so that none of them can pass for a record of its own."""

    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s {service} %(levelname)s %(name)s%(request_tag)s: %(message)s",
                         defaults={"request_tag": ""})

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - logging's name
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("    " + escape_controls(line) for line in text.split("\n"))


class JsonFormatter(pythonjsonlogger.json.JsonFormatter):
    """One JSON object per record: ``time`` (ISO 8601, UTC), ``level``, ``service``, ``logger``, ``message``,
    ``request_id`` (when in a request), ``exc_info`` (a traceback), and any ``extra`` fields."""

    def __init__(self, service: str) -> None:
        super().__init__(
            ["levelname", "name", "message"],
            rename_fields={"levelname": "level", "name": "logger"},
            static_fields={"service": service},
            reserved_attrs=[*pythonjsonlogger.core.RESERVED_ATTRS, "request_tag", "request_id", "color_message"],
            timestamp="time",
        )

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        ordered = {"time": log_data.pop("time"), "level": log_data.pop("level"), "service": log_data.pop("service"),
                   "logger": log_data.pop("logger"), "message": log_data.pop("message")}
        ordered.update(log_data)
        return ordered

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        super().add_fields(log_data, record, message_dict)
        request_id = getattr(record, "request_id", None)
        if request_id:
            log_data["request_id"] = request_id


def make_formatter(log_format: str, service: str) -> logging.Formatter:
    """The formatter of ``LOG_FORMAT`` (``text`` or ``json``)."""
    return JsonFormatter(service) if log_format == "json" else TextFormatter(service)


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


def freeze_startup_heap() -> None:
    """Keep what start-up made (modules, classes, pydantic's validators, the libraries' tables) out of every later
    garbage collection.

    A full (generation 2) collection walks every object the collector tracks, and it runs on the event loop's
    thread: with a service's start-up heap each one stalled the loop for 45-78 ms (measured in the core and the
    MQTT gateway), which every request in flight waited out; frozen, the core's take 3-4 ms.
    ``gc.freeze`` moves the objects alive now into a generation no collection visits; they live for the whole
    process anyway. Called once, before the event loop starts; the garbage made so far is collected first.
    """
    gc.collect()
    gc.freeze()


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

    freeze_startup_heap()
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
    freeze_startup_heap()
    serve(
        app,
        host=settings.bind_host,
        port=port,
        settings=settings,
        access_log=access_log,
        timeout_graceful_shutdown=int(settings.provision_timeout_s + settings.bus_reply_grace_s) + 5,
    )


# --- the bus-only services' lifecycle -----------------------------------------------------------


class Context:
    """What a service's ``start`` gets: the settings, and connections opened when first asked for
    (and closed by the runner, last opened first closed, after the service stopped)."""

    def __init__(self, name: str, settings: Settings, resources: contextlib.AsyncExitStack) -> None:
        self.name = name
        self.settings = settings
        self._resources = resources
        self._bus: Bus | None = None
        self._pool: Any = None
        #: Readiness checks of what was opened (bus connected, pool answering).
        self.checks: list[health.Check] = []

    async def bus(self) -> Bus:
        """The process's bus connection, named after the service."""
        if self._bus is None:
            self._bus = await Bus.connect(self.settings, self.name)
            self._resources.push_async_callback(self._bus.close)
            self.checks.append(health.bus_check(self._bus))
        return self._bus

    async def pool(self) -> Any:
        """The Postgres pool (``DB_POOL_MIN``..``DB_POOL_MAX`` connections), after pending migrations."""
        if self._pool is None:
            from .db.migrate import create_pool

            settings = self.settings
            self._pool = await create_pool(
                settings.database_url.get_secret_value(), min_size=settings.db_pool_min, max_size=settings.db_pool_max
            )
            self._resources.push_async_callback(self._pool.close)
            self.checks.append(health.pool_check(self._pool))
        return self._pool


@dataclass
class Running:
    """A started service, as its ``start`` returns it: what the runner serves, checks and stops."""

    #: The RPC service whose queue is consumed, with ``handlers`` (one per declared method).
    serve: Service | None = None
    handlers: Sequence[Handler] = ()
    on_undelivered: UndeliveredHook | None = None
    #: More RPC services this process serves, each on its own queue and consumer channel (its own
    #: prefetch window), e.g. provisioning-core's device_api beside its provisioning queue.
    also_serve: Sequence[tuple[Service, Sequence[Handler]]] = ()
    #: Readiness checks besides the bus and the pool, and liveness checks (see :mod:`.health`).
    checks: tuple[health.Check, ...] = ()
    live: tuple[health.Check, ...] = ()
    #: Run as tasks until the service stops (then cancelled, first).
    background: Sequence[Coroutine[Any, Any, None]] = ()
    #: Awaited in order once nothing new is consumed (a gateway closes and drains its listeners).
    stop: Sequence[Callable[[], Awaitable[None]]] = ()
    #: The detail of the "<service> ready" line; by default "on queue <queue>" for an RPC service.
    #: None: the service logs that line itself (when it really is ready, e.g. once subscribed).
    ready: str | None = ""


Start = Callable[[Context], Awaitable[Running]]

#: How long a stopping service waits for the RPC requests it holds (then they are redelivered).
DRAIN_TIMEOUT_S = 10.0


def run_service(name: str, start: Start, *, stdlib_loop: bool = False) -> None:
    """Run a bus-only service until SIGTERM (see the module's docstring); ``stdlib_loop`` as in :func:`run`."""

    async def main(settings: Settings, stop: asyncio.Event) -> None:
        await serve_until(name, start, settings, stop)

    run(name, main, stdlib_loop=stdlib_loop)


async def serve_until(name: str, start: Start, settings: Settings, stop: asyncio.Event) -> None:
    """The lifecycle of :func:`run_service` on a running loop, until ``stop`` is set."""
    async with contextlib.AsyncExitStack() as resources:
        context = Context(name, settings, resources)
        service = await start(context)
        try:
            served: Bus | None = None
            if service.serve is not None:
                served = await context.bus()
                await served.serve(service.serve, service.handlers, on_undelivered=service.on_undelivered)
            for other, handlers in service.also_serve:
                served = await context.bus()
                await served.serve(other, handlers)
            listener = await health.start_if_configured(settings, *context.checks, *service.checks, live=service.live)
        except BaseException:
            for coroutine in service.background:
                coroutine.close()  # never started
            raise
        tasks = [asyncio.create_task(coroutine) for coroutine in service.background]
        ready = service.ready
        if ready == "" and service.serve is not None:
            ready = f"on queue {settings.queue(service.serve.name)}"
            for other, _ in service.also_serve:
                ready += f", {settings.queue(other.name)}"
        if ready is not None:
            announce_ready(name, ready)
        await stop.wait()
        if listener is not None:
            listener.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if served is not None:
            await served.stop_consuming(DRAIN_TIMEOUT_S)
        for hook in service.stop:
            await hook()
