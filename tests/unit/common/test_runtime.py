"""The ready line is logged whatever LOG_LEVEL says: devstack and operators wait for it; the one
lifecycle of the bus-only services (start, serve, health, ready, then drain and close in order)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys

import pytest
from provisioning_common import runtime
from provisioning_common.contract import ContractError, Service
from provisioning_common.settings import Settings
from pydantic import BaseModel

from tests.ports import free_port

from .fake_broker import connect, install


def test_ready_line_survives_a_quiet_log_level(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    lifecycle = logging.getLogger(runtime.LIFECYCLE_LOGGER)
    saved_lifecycle = list(lifecycle.handlers)
    try:
        root.handlers.clear()
        lifecycle.handlers.clear()
        runtime.setup_logging(Settings(log_level="WARNING"), "unit_service")
        logging.getLogger("some.module").info("ordinary info line")
        runtime.announce_ready("unit_service", "on queue q")
        err = capsys.readouterr().err
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        lifecycle.handlers[:] = saved_lifecycle
    assert "unit_service ready on queue q" in err
    assert "ordinary info line" not in err


def test_library_records_keep_bodies_and_tracebacks_out_of_the_log(capsys: pytest.CaptureFixture[str]) -> None:
    """aiormq logs returned messages (bodies with tokens) at error level; asyncpg logs each failed
    pool reconnect with a traceback. Neither reaches the log as such."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))

    class Returned:
        body = b'{"credentials_value":"SECRET-TOKEN-123"}'
        header = None

    try:
        root.handlers.clear()
        runtime.setup_logging(Settings(log_level="INFO"), "unit_service")
        logging.getLogger("aiormq.channel").error("Unhandled message %r returning", Returned())
        logging.getLogger("aiormq.channel").error("plain aiormq error")
        try:
            raise ConnectionRefusedError("refused")
        except ConnectionRefusedError:
            logging.getLogger("asyncpg.pool").warning("Failed to restore the pool connection floor", exc_info=True)
        err = capsys.readouterr().err
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        for name in ("aiormq", "aio_pika"):
            logging.getLogger(name).setLevel(logging.NOTSET)
    assert "SECRET-TOKEN-123" not in err and "returning" not in err
    assert "plain aiormq error" in err  # the library's own errors still pass
    assert "Failed to restore the pool connection floor (ConnectionRefusedError)" in err
    assert "Traceback" not in err


class Ping(BaseModel):
    text: str


RUNNER = Service("unit_runner")
ECHO = RUNNER.rpc("echo", Ping, Ping)


async def _get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: probe\r\n\r\n".encode())
    status = (await reader.read()).split(b"\r\n", 1)[0]
    writer.close()
    return status


async def test_the_runner_serves_checks_announces_then_stops_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    broker, named = install(monkeypatch)
    events: list[str] = []
    monkeypatch.setattr(runtime, "announce_ready", lambda name, detail="": events.append(f"{name} ready {detail}"))
    broker_up = True

    async def echo(request: Ping) -> Ping:
        return request

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            events.append("background cancelled")

    async def stopped() -> None:
        events.append(f"stop hook ({broker.closed} connections closed)")

    async def broker_check() -> bool:
        return broker_up

    async def start(context: runtime.Context) -> runtime.Running:
        return runtime.Running(serve=RUNNER, handlers=[ECHO.handler(echo)], checks=(broker_check,),
                               background=[forever()], stop=[stopped])

    port, stop = free_port(), asyncio.Event()
    settings = Settings(bus_namespace="unit.", health_port=port, bind_host="127.0.0.1")
    service = asyncio.create_task(runtime.serve_until("unit_runner", start, settings, stop))
    while not events:
        await asyncio.sleep(0.01)
    assert events == ["unit_runner ready on queue unit.unit_runner"]
    assert named["client_properties"] == {"connection_name": "unit_runner"}
    client = await connect("unit_client")
    assert await client.call(ECHO, Ping(text="hi")) == Ping(text="hi")
    assert await _get(port, "/health") == b"HTTP/1.1 200 OK"
    broker_up = False
    assert await _get(port, "/health") == b"HTTP/1.1 503 Service Unavailable"
    assert await _get(port, "/live") == b"HTTP/1.1 200 OK"
    stop.set()
    await asyncio.wait_for(service, 5)
    # Background tasks end first, the service's stop hooks run with the bus still open, the bus closes last.
    assert events[1:] == ["background cancelled", "stop hook (0 connections closed)"]
    assert broker.closed == 1 and "unit.unit_runner" not in broker.consumers
    with pytest.raises(OSError):
        await _get(port, "/health")


async def test_a_service_that_does_not_serve_its_contract_does_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    broker, _ = install(monkeypatch)

    async def forever() -> None:
        await asyncio.Event().wait()

    async def start(context: runtime.Context) -> runtime.Running:
        return runtime.Running(serve=RUNNER, handlers=[], background=[forever()])

    with pytest.raises(ContractError, match="unit_runner does not serve echo"):
        await runtime.serve_until("unit_runner", start, Settings(bus_namespace="unit."), asyncio.Event())
    assert broker.closed == 1  # what was opened is closed


def test_a_service_runs_with_its_start_up_heap_out_of_the_collectors_sight() -> None:
    """``runtime.run`` freezes what start-up made before the loop starts, so that no full garbage collection walks
    it again (each one stalled a gateway's loop for 20-90 ms); what the service makes later is collected."""
    script = (
        "import asyncio, gc, sys\n"
        "from provisioning_common import runtime\n"
        "async def main(settings, stop):\n"
        "    before = gc.get_freeze_count()\n"
        "    garbage = [[] for _ in range(1000)]\n"
        "    for item in garbage: item.append(item)  # cycles made after start-up\n"
        "    del garbage, item\n"
        "    print(before, gc.get_freeze_count(), gc.collect() >= 1000, flush=True)\n"
        "runtime.run('probe', main)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    frozen, still_frozen, collected = done.stdout.split()
    assert int(frozen) > 10_000 and still_frozen == frozen and collected == "True"
