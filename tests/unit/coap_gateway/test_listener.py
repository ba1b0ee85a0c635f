"""The CoAP gateway's UDP listener with a real aiocoap server context (a stub instead of the bus):
malformed datagrams are counted and summarized, never logged one by one; the liveness ping; and why
the gateway runs on asyncio's selector loop (uvloop stops reading after an ICMP error)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiocoap
import pytest
import uvloop
from aiocoap.numbers.codes import Code
from coap_gateway import malformed as malformed_module
from coap_gateway.server import CoapGateway, ping_target, route
from provisioning_common.models import Dialect, ProvisionResult
from provisioning_common.settings import Settings
from provisioning_common.transport_api import OutcomeKind, ProvisionOutcome

from tests.ports import free_udp_port


class SlowApi:
    """TransportApi stand-in: NOT_FOUND after ``delay`` seconds (past the 0.5 s piggyback delay: a separate
    answer), or the exception ``fail`` raised from the provisioning call."""

    def __init__(self, delay: float = 0.0, fail: Exception | None = None) -> None:
        self.delay, self.fail = delay, fail

    async def provision(self, payload: bytes, **_: Any) -> ProvisionOutcome:
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return ProvisionOutcome(OutcomeKind.ANSWERED, Dialect.THINGSBOARD, b'{"status":"NOT_FOUND"}',
                                ProvisionResult.not_found())


def message(path: tuple[str, ...], payload: bytes = b"", *, mid: int = 1, mtype: int = 0, code: int = 2,
            token: bytes = b"tk") -> bytes:
    """A CoAP datagram encoded by hand (aiocoap's encoder refuses non-UTF-8 options)."""
    options, last = bytearray(), 0
    for segment in path:
        options.append((11 - last) << 4 | len(segment))  # Uri-Path, values under 13 bytes
        options += segment
        last = 11
    head = bytes([0x40 | mtype << 4 | len(token), code]) + mid.to_bytes(2, "big") + token
    return head + bytes(options) + (b"\xff" + payload if payload else b"")


PING = b"\x40\x00\x12\x34"
PROVISION = (b"api", b"v1", b"provision")


class Client:
    """A non-blocking UDP client on the test's event loop (the gateway runs on the same loop)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def recv(self, timeout: float = 5.0) -> bytes:
        async with asyncio.timeout(timeout):
            return await asyncio.get_running_loop().sock_recv(self.sock, 4096)

    async def barrier(self) -> None:
        """A CoAP ping whose RST says the listener has read everything this client sent before it."""
        await self.send(PING)
        while (await self.recv())[:4] != b"\x70\x00\x12\x34":
            pass

    def close(self) -> None:
        self.sock.close()


def _settings(port: int) -> Settings:
    return Settings(coap_port=port, bind_host="127.0.0.1")


@pytest.fixture
async def gateway() -> AsyncIterator[CoapGateway]:
    running = CoapGateway(SlowApi(fail=RuntimeError("our bug")), _settings(free_udp_port()))  # type: ignore[arg-type]
    await running.start()
    try:
        yield running
    finally:
        await running.stop(drain_timeout=1)


async def test_malformed_datagrams_are_counted_and_summarized_without_a_traceback(
    gateway: CoapGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    client = Client(gateway._settings.coap_port)
    try:
        await client.send(message((b"api", b"\xff\xfe"), b"{}"))  # Uri-Path not UTF-8: UnicodeDecodeError
        await client.send(message((b"api", b"v1", b"provision\xe9"), b"{}", mid=2))
        await client.send(b"\x80\x02\x00\x03")  # version 2: unparsable
        await client.send(message(PROVISION, b"{}", mid=4, mtype=2))  # a request sent as an ACK
        await client.barrier()
        assert gateway.malformed.total == 4
        # The listener goes on: a well-formed request to an unknown path is answered 4.04.
        await client.send(message((b"nope",), mid=5))
        answer = aiocoap.Message.decode(await client.recv())
        assert answer.code is Code.NOT_FOUND
    finally:
        client.close()
    assert not [r for r in caplog.records if r.name in ("asyncio", "coap-server") and r.levelno >= logging.WARNING]
    assert not [r for r in caplog.records if r.exc_info]
    gateway.malformed.flush()
    summaries = [r.getMessage() for r in caplog.records if r.name == "coap_gateway.malformed"]
    assert len(summaries) == 1 and summaries[0].startswith("4 malformed CoAP datagrams dropped in the last ")
    assert "option not UTF-8: 2" in summaries[0] and "unparsable: 1" in summaries[0]
    assert "type and code do not fit: 1" in summaries[0]
    gateway.malformed.flush()  # nothing new: no second line
    assert len([r for r in caplog.records if r.name == "coap_gateway.malformed"]) == 1


async def test_our_own_errors_stay_visible(gateway: CoapGateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    client = Client(gateway._settings.coap_port)
    try:
        await client.send(message(PROVISION, b'{"provisionDeviceKey":"k"}', mid=9))
        answer = aiocoap.Message.decode(await client.recv())
    finally:
        client.close()
    assert answer.code is Code.INTERNAL_SERVER_ERROR  # the stub's RuntimeError, raised in our handler
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and errors[0].exc_info and "our bug" in str(errors[0].exc_info[1])
    assert gateway.malformed.total == 0


def test_only_exceptions_from_aiocoaps_datagram_handler_are_counted() -> None:
    with pytest.raises(TypeError) as ours:
        route(None)  # type: ignore[arg-type]  # raised in coap_gateway.server
    assert not malformed_module.from_aiocoap_datagram_handler(ours.value)
    with pytest.raises(UnicodeDecodeError) as decode:
        aiocoap.Message.decode(message((b"\xff",)))  # aiocoap, but not through the datagram handler
    assert not malformed_module.from_aiocoap_datagram_handler(decode.value)

    seen: list[dict[str, Any]] = []
    counter = malformed_module.MalformedDatagrams()
    counter._previous_handler = lambda loop, context: seen.append(context)
    counter.exception_handler(None, {"message": "elsewhere", "exception": ours.value})  # type: ignore[arg-type]
    assert [c["message"] for c in seen] == ["elsewhere"] and counter.total == 0


def test_summary_interval_is_a_minute() -> None:
    assert malformed_module.SUMMARY_INTERVAL_S == 60


async def test_listener_answers_until_its_socket_leaves_the_loop(gateway: CoapGateway) -> None:
    assert await gateway.listener_answers()
    loop = asyncio.get_running_loop()
    assert gateway._context is not None
    interface = gateway._context.request_interfaces[0].token_interface.message_interface
    fd = interface.transport.get_extra_info("socket").fileno()
    loop.remove_reader(fd)  # what uvloop did after an ICMP error: the socket is open, nothing reads it
    try:
        assert not await gateway.listener_answers()
    finally:
        loop.add_reader(fd, interface.transport._read_ready)


async def test_listener_answers_is_false_once_stopped() -> None:
    stopped = CoapGateway(SlowApi(), _settings(free_udp_port()))  # type: ignore[arg-type]
    await stopped.start()
    await stopped.stop(drain_timeout=0.1)
    assert not await stopped.listener_answers()


@pytest.mark.parametrize(("bind_host", "target"), [("0.0.0.0", "127.0.0.1"), ("::", "127.0.0.1"), ("", "127.0.0.1"),
                                                    ("10.1.2.3", "10.1.2.3"), ("::1", "::1")])
def test_ping_target(bind_host: str, target: str) -> None:
    assert ping_target(bind_host, 5683) == (target, 5683)


# --- why the gateway runs on asyncio's selector loop ----------------------------------------------------


async def _client_gone_then_ping(port: int) -> bool:
    """A confirmable request whose client closes its socket after the empty ACK; its separate answer then
    meets a closed port (ICMP port unreachable). Returns whether the listener still answers a ping."""
    gateway = CoapGateway(SlowApi(delay=0.8), _settings(port))  # type: ignore[arg-type]
    await gateway.start()
    try:
        assert await gateway.listener_answers()
        gone = Client(port)
        await gone.send(message(PROVISION, b"{}", mid=77))
        assert (await gone.recv())[:4] == b"\x60\x00\x00\x4d"  # empty ACK: the answer will come separately
        gone.close()
        witness = Client(port)  # sent after the first: its separate answer leaves after the first one's
        await witness.send(message(PROVISION, b"{}", mid=78))
        while (await witness.recv())[1] != int(Code.BAD_REQUEST):  # its separate 4.00
            pass
        witness.close()
        await asyncio.sleep(0)  # the loop has seen the ICMP error (POLLERR) by now either way
        return await gateway.listener_answers()
    finally:
        await gateway.stop(drain_timeout=1)


def _run_on(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> bool:
    result: list[bool] = []

    def run() -> None:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            result.append(runner.run(_client_gone_then_ping(free_udp_port())))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert result, "scenario did not finish"
    return result[0]


def test_selector_loop_keeps_reading_after_an_icmp_error() -> None:
    assert _run_on(asyncio.SelectorEventLoop)


def test_uvloop_stops_reading_after_an_icmp_error() -> None:
    """The root cause, kept as a canary: libuv stops a uv_poll handle on POLLERR (uv__poll_io) and uvloop
    closes it (UVPoll._fatal_error); the ICMP error aiocoap's udp6 asks for (IP_RECVERR) is a POLLERR.
    The liveness ping sees it. If this fails, uvloop changed: the gateway could go back to it."""
    assert not _run_on(uvloop.new_event_loop)


async def test_live_is_down_while_the_listener_does_not_read(gateway: CoapGateway) -> None:
    from provisioning_common import health

    server = await health.start_health_server("127.0.0.1", 0, live=(gateway.listener_answers,))
    port = server.sockets[0].getsockname()[1]

    async def live() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /live HTTP/1.1\r\nHost: probe\r\n\r\n")
        data = await reader.read()
        writer.close()
        return data.split(b"\r\n", 1)[0]

    loop = asyncio.get_running_loop()
    assert gateway._context is not None
    interface = gateway._context.request_interfaces[0].token_interface.message_interface
    fd = interface.transport.get_extra_info("socket").fileno()
    try:
        assert await live() == b"HTTP/1.1 200 OK"
        loop.remove_reader(fd)
        assert await live() == b"HTTP/1.1 503 Service Unavailable"
    finally:
        loop.add_reader(fd, interface.transport._read_ready)
        server.close()
        await server.wait_closed()


async def test_a_cached_answer_served_again_is_a_new_message(caplog: pytest.LogCaptureFixture) -> None:
    """aiocoap's Block2 cache returns the cached answer itself for a later block asked in a size that holds
    it all; the second time, it has been sent already. Without a copy aiocoap warned ("Message ID set on
    to-be-sent message") per request and answered a NON request with an ACK."""
    caplog.set_level(logging.INFO)

    def with_block2(mid: int, mtype: int, number: int, szx: int) -> bytes:
        value = number << 4 | szx
        option = value.to_bytes((value.bit_length() + 7) // 8, "big")
        request = message(PROVISION, mid=mid, mtype=mtype, token=bytes([mid]))
        return request + bytes([(23 - 11) << 4 | len(option)]) + option + b"\xff{}"  # Block2 after Uri-Path

    served = CoapGateway(SlowApi(), _settings(free_udp_port()))  # type: ignore[arg-type]
    await served.start()
    client = Client(served._settings.coap_port)
    types = []
    try:
        # 16-byte blocks: the 22-byte answer is cached; then block 1 in 1024-byte blocks, three times.
        for mid, mtype, number, szx in ((1, 0, 0, 0), (2, 0, 1, 6), (3, 1, 1, 6), (4, 0, 1, 6)):
            await client.send(with_block2(mid, mtype, number, szx))
            answer = await client.recv()
            assert answer[1] == int(Code.BAD_REQUEST)  # the stub's NOT_FOUND
            types.append((answer[0] >> 4) & 3)
    finally:
        client.close()
        await served.stop(drain_timeout=1)
    assert types == [2, 2, 1, 2]  # ACK (piggybacked), ACK, NON for the NON request, ACK
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
