"""The HEALTH_PORT listener: /health follows its checks (bounded), /live only the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from provisioning_common import health
from provisioning_common.settings import Settings


async def get(port: int, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def http_get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: probe\r\nUser-Agent: kube-probe/1.32\r\n\r\n".encode()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., asyncio.Future[int]]]:
    servers: list[asyncio.Server] = []

    async def start(*checks: health.Check) -> int:
        server = await health.start_health_server("127.0.0.1", 0, *checks)
        servers.append(server)
        return server.sockets[0].getsockname()[1]

    yield start  # type: ignore[misc]
    for server in servers:
        server.close()
        await server.wait_closed()


def check(result: bool | Exception | None = None, delay: float = 0.0) -> health.Check:
    async def run() -> bool:
        await asyncio.sleep(delay)
        if isinstance(result, Exception):
            raise result
        return bool(result)

    return run


async def test_up_when_every_check_passes(serve) -> None:
    port = await serve(check(True), check(True))
    assert await get(port, http_get("/health")) == (200, b'{"status":"UP"}')
    assert await get(port, http_get("/health?probe=1")) == (200, b'{"status":"UP"}')


@pytest.mark.parametrize("failing", [check(False), check(RuntimeError("pool closed")), check(True, delay=30)])
async def test_down_when_a_check_fails_raises_or_hangs(serve, failing, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health, "CHECK_TIMEOUT_S", 0.2)
    port = await serve(check(True), failing)
    assert await get(port, http_get("/health")) == (503, b'{"status":"DOWN"}')


async def test_live_answers_whatever_the_checks_say(serve) -> None:
    port = await serve(check(False))
    assert await get(port, http_get("/live")) == (200, b'{"status":"UP"}')


async def test_head_has_no_body_and_other_requests_get_404(serve) -> None:
    port = await serve(check(True))
    status, body = await get(port, http_get("/health", "HEAD"))
    assert (status, body) == (200, b"")
    assert (await get(port, http_get("/healthz")))[0] == 404  # /metrics: tests/unit/common/test_metrics.py
    assert (await get(port, http_get("/health", "POST")))[0] == 404
    assert (await get(port, b"garbage\r\n\r\n"))[0] == 404
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"G" * 70_000)  # no newline, past the stream limit: closed without an answer
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    assert await get(port, http_get("/health")) == (200, b'{"status":"UP"}')


async def test_a_silent_client_does_not_stop_the_listener(serve) -> None:
    port = await serve(check(True))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)  # says nothing
    assert await get(port, http_get("/health")) == (200, b'{"status":"UP"}')
    writer.close()


async def test_off_unless_health_port_is_set() -> None:
    assert await health.start_if_configured(Settings(health_port=0), check(True)) is None
    from tests.ports import free_port

    port = free_port()
    server = await health.start_if_configured(Settings(health_port=port, bind_host="127.0.0.1"), check(True))
    assert server is not None
    try:
        assert await get(port, http_get("/health")) == (200, b'{"status":"UP"}')
    finally:
        server.close()


async def test_bus_and_pool_checks() -> None:
    class FakeBus:
        is_connected = True

    class FakePool:
        def __init__(self, fail: bool) -> None:
            self.fail = fail

        async def fetchval(self, query: str) -> int:
            if self.fail:
                raise ConnectionError("gone")
            return 1

    bus = FakeBus()
    assert await health.healthy((health.bus_check(bus), health.pool_check(FakePool(False))))
    assert not await health.healthy((health.bus_check(bus), health.pool_check(FakePool(True))))
    bus.is_connected = False
    assert not await health.healthy((health.bus_check(bus),))
