"""Bounded CoAP state (state.py): deduplication, block-wise transfers and requests in progress stay within
their caps, evict oldest first (per source first), expire, and garbage is answered on sight with no body
larger than itself and nothing kept."""

from __future__ import annotations

import asyncio
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import ACK, CON, NON
from coap_gateway.server import CoapGateway
from coap_gateway.state import ExchangeTable, InProgress, TransferTable, datagram_size, fit_to
from provisioning_common.settings import Settings

from .test_listener import PROVISION, Client, SlowApi, free_udp_port, message


class Remote:
    def __init__(self, host: str, port: int = 5683) -> None:
        self.sockaddr = (host, port, 0, 0)

    def __hash__(self) -> int:
        return hash(self.sockaddr)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Remote) and other.sockaddr == self.sockaddr


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def wire(code: Code, mtype: Any, mid: int, token: bytes = b"t", payload: bytes = b"") -> aiocoap.Message:
    """A message as it is on the wire (aiocoap deprecates passing type, id and token to the constructor)."""
    m = aiocoap.Message(code=code, payload=payload)
    m.mtype, m.mid, m.token = mtype, mid, token
    return m


def request(remote: Remote, mid: int, mtype: Any = CON) -> aiocoap.Message:
    m = wire(Code.POST, mtype, mid)
    m.remote = remote
    return m


def test_exchange_table_caps_per_source_then_in_all() -> None:
    clock = Clock()
    table = ExchangeTable(247, max_total=5, max_per_source=3, clock=clock)
    a, b = Remote("::ffff:10.0.0.1"), Remote("10.0.0.2")
    for mid in range(4):  # the fourth from a evicts a's oldest
        assert table.deduplicate(request(a, mid)) is False
    assert (len(table), table.held_by("10.0.0.1"), table.evicted) == (3, 3, 1)
    assert table.deduplicate(request(a, 0)) is False  # forgotten: processed again (and evicts a's mid 1)
    assert table.deduplicate(request(a, 3)) is True  # still remembered: a duplicate
    for mid in range(3):
        table.deduplicate(request(b, mid))
    assert len(table) == 5 and table.held_by("10.0.0.2") == 3  # b's third evicted a's oldest in all
    assert table.duplicates == 1


def test_exchange_table_expires_and_replays_the_stored_answer() -> None:
    clock = Clock()
    table = ExchangeTable(247, max_total=100, max_per_source=100, clock=clock)
    sent: list[bytes] = []

    class Manager:
        message_interface = type("I", (), {"send": staticmethod(lambda m: sent.append(m.encode()))})()

        @staticmethod
        def _next_message_id() -> int:
            return 7

    table.install(Manager())
    remote = Remote("10.0.0.1")
    assert table.deduplicate(request(remote, 1)) is False
    answer = wire(Code.CREATED, ACK, 1, payload=b"ok")
    answer.remote = remote
    table.store_answer(answer)
    assert table.deduplicate(request(remote, 1)) is True and sent == [answer.encode()]
    assert table.deduplicate(request(remote, 1, NON)) is True and len(sent) == 1  # a NON duplicate: dropped
    clock.now = 247
    assert table.deduplicate(request(remote, 2)) is False and len(table) == 1  # mid 1 expired
    table.forget(remote, 2)
    assert len(table) == 0 and table.sources == 0


def test_transfer_table_is_lru_per_source_then_in_all_and_idles_out() -> None:
    clock = Clock()
    table = TransferTable(93, max_total=4, max_per_source=2, clock=clock)

    def key(host: str, n: int) -> tuple[Any, ...]:
        return (((host, 1, 0, 0), None), Code.POST, n)

    table[key("10.0.0.1", 1)] = "a1"
    table[key("10.0.0.1", 2)] = "a2"
    assert table[key("10.0.0.1", 1)] == "a1"  # used: a2 is now a's least recent
    table[key("10.0.0.1", 3)] = "a3"
    assert key("10.0.0.1", 2) not in table and table.evicted == 1
    table[key("10.0.0.2", 1)] = "b1"
    table[key("10.0.0.2", 2)] = "b2"
    table[key("10.0.0.3", 1)] = "c1"  # full: the least recently used of all (a1) goes
    assert key("10.0.0.1", 1) not in table and len(table) == 4
    clock.now = 93
    assert table.pop(key("10.0.0.3", 1)) == "c1"
    table[key("10.0.0.4", 1)] = "d1"  # the rest idled out
    assert len(table) == 1


def test_in_progress() -> None:
    busy = InProgress(max_total=3, max_per_source=2)
    assert busy.enter("a") is None and busy.enter("a") is None
    assert busy.enter("a") == "source"
    assert busy.enter("b") is None and busy.enter("c") == "total"
    busy.leave("a")
    assert busy.enter("c") is None and (busy.refused_source, busy.refused_total) == (1, 1)


def test_fit_to_leaves_out_an_error_body_larger_than_the_request() -> None:
    small = wire(Code.GET, CON, 1, b"")
    big = wire(Code.GET, CON, 1, b"", b"x" * 200)
    for req, kept in ((small, False), (big, True)):
        answer = fit_to(req, aiocoap.Message(code=Code.NOT_FOUND, payload=b'{"errorMsg":"no","status":"FAILURE"}',
                                             content_format=50))
        assert bool(answer.payload) is kept and (answer.opt.content_format == 50) is kept
    created = fit_to(small, aiocoap.Message(code=Code.CREATED, payload=b"y" * 100))
    assert created.payload == b"y" * 100
    received = aiocoap.Message.decode(message(PROVISION, b"z" * 50, token=b"tk"))  # aiocoap cannot encode it
    assert datagram_size(received) == len(message(PROVISION, b"z" * 50, token=b"tk")) == 4 + 2 + 17 + 1 + 50


async def test_garbage_is_answered_on_sight_and_leaves_nothing(caplog: pytest.LogCaptureFixture) -> None:
    port = free_udp_port()
    gateway = CoapGateway(SlowApi(), Settings(coap_port=port, bind_host="127.0.0.1", coap_max_exchanges=10,
                                              coap_max_exchanges_per_source=10))
    await gateway.start()
    client = Client(port)
    try:
        await client.send(b"\x40\x01\x12\x34")  # CON GET, no token, no path
        assert await client.recv() == b"\x60\x84\x12\x34"  # ACK 4.04, nothing else
        await client.send(b"\x50\x01\x12\x35")  # the same as NON: a NON 4.04
        answer = await client.recv()
        assert answer[0] == 0x50 and answer[1] == 0x84 and len(answer) == 4
        await client.send(message((b"nope",), b"x" * 300, mid=9))  # larger than the body: the body comes
        assert b"Unknown resource" in await client.recv()
        await client.send(message(PROVISION, b'{"provisionDeviceKey":"k","provisionDeviceSecret":"s"}', mid=10))
        assert (await client.recv())[1] == 0x80  # processed: 4.00 from the (stub) core
        assert (gateway.exchanges.refused_on_sight, gateway.exchanges.requests, len(gateway.exchanges)) == (3, 1, 1)
        for mid in range(11, 30):  # more than the cap: the oldest forgotten, never refused
            await client.send(message(PROVISION, b'{"provisionDeviceKey":"k"}', mid=mid))
            await client.recv()
        assert len(gateway.exchanges) == 10 and gateway.exchanges.evicted == 10
        gateway._reported_at -= 61  # a minute later: the caps reached are reported once
        gateway._sweep()
        gateway._sweep()
        reports = [r.getMessage() for r in caplog.records if "CoAP state at its caps" in r.getMessage()]
        assert len(reports) == 1 and "10 requests forgotten before EXCHANGE_LIFETIME" in reports[0]
    finally:
        client.sock.close()
        await gateway.stop(drain_timeout=1)
    await asyncio.sleep(0)
