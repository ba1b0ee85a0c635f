"""PROXY protocol v1/v2 headers (MQTT_PROXY_PROTOCOL): what is accepted, what closes the connection."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from mqtt_gateway.proxy_protocol import V2_SIGNATURE, ProxyHeaderError, parse, read_header


def v2(command: int = 1, family: int = 1, body: bytes | None = None) -> bytes:
    if body is None:
        body = (ipaddress.IPv4Address("198.51.100.7").packed + ipaddress.IPv4Address("10.0.0.1").packed
                + (40000).to_bytes(2, "big") + (1883).to_bytes(2, "big"))
    return V2_SIGNATURE + bytes([0x20 | command, family << 4 | 1]) + len(body).to_bytes(2, "big") + body


def test_v1_headers() -> None:
    header = b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 1883\r\n"
    assert parse(header + b"\x10rest") == (len(header), "198.51.100.7:40000")
    assert parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n")[1] == "2001:db8::1:1"  # type: ignore[index]
    assert parse(b"PROXY UNKNOWN\r\n") == (15, None)
    assert parse(b"PROXY TCP4 198.51") is None  # more to come


def test_v2_headers() -> None:
    assert parse(v2()) == (28, "198.51.100.7:40000")
    assert parse(v2(command=0, body=b"")) == (16, None)  # LOCAL: the balancer's health check
    six = ipaddress.IPv6Address("2001:db8::7").packed + bytes(16) + (5).to_bytes(2, "big") + bytes(2)
    assert parse(v2(family=2, body=six)) == (52, "2001:db8::7:5")
    assert parse(v2()[:20]) is None


@pytest.mark.parametrize("data", [
    b"\x10\x0c\x00\x04MQTT",  # a CONNECT without a header
    b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n",
    b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n",
    b"PROXY " + b"x" * 200,
    V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
    V2_SIGNATURE + b"\x21\x11\xff\xff",  # too long
])
def test_anything_else_is_refused(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data)


async def test_read_header_consumes_exactly_the_header() -> None:
    for header, address in ((b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 1883\r\n", "198.51.100.7:40000"),
                            (v2(), "198.51.100.7:40000"), (b"PROXY UNKNOWN\r\n", None)):
        reader = asyncio.StreamReader()
        reader.feed_data(header + b"\x10\x0cCONNECT")
        assert await read_header(reader) == address
        assert await reader.read(100) == b"\x10\x0cCONNECT"
    reader = asyncio.StreamReader()
    reader.feed_data(b"\x10\x0c\x00\x04MQTT\x04")
    with pytest.raises(ProxyHeaderError):
        await read_header(reader)
