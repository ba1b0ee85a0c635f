"""The PROXY protocol (HAProxy's, versions 1 and 2) in front of MQTT connections (``MQTT_PROXY_PROTOCOL``).

A TCP load balancer (AWS NLB, GCP, Azure, HAProxy, nginx stream, Traefik, ...) that forwards connections
hides the client's address: every device seems to come from the balancer, and the per-source rate limits
would put them all in one bucket. With the setting on, each connection must begin with the balancer's
PROXY header, whose source address then is the connection's peer address; a connection without a valid
header is closed before anything else is read (so a client reaching the gateway directly cannot choose
its own address: only turn the setting on when every connection comes through the balancer). A ``LOCAL``
(v2) or ``UNKNOWN`` (v1) header, as balancers send for their own health checks, keeps the real peer.

Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import asyncio
import ipaddress

V1_PREFIX = b"PROXY"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Longest v1 header, CRLF included (spec 2.1).
V1_MAX = 107
#: Largest v2 address block we accept (addresses plus TLVs; balancers send well under this).
V2_MAX_BODY = 2048


class ProxyHeaderError(Exception):
    """The connection did not start with a valid PROXY header."""


def parse(data: bytes) -> tuple[int, str | None] | None:
    """``(header length, "ip:port" of the client or None for LOCAL/UNKNOWN)`` once ``data`` holds a whole
    header; None while it could still become one; raises :class:`ProxyHeaderError` otherwise."""
    if data[:5] == V1_PREFIX[: len(data[:5])] and not data.startswith(V2_SIGNATURE[:1]):
        return _parse_v1(data)
    if data[:12] == V2_SIGNATURE[: len(data[:12])]:
        return _parse_v2(data)
    raise ProxyHeaderError("no PROXY protocol header")


def _parse_v1(data: bytes) -> tuple[int, str | None] | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 header too long")
        return None
    parts = data[:end].split(b" ")
    if parts[0] != V1_PREFIX or len(parts) < 2:
        raise ProxyHeaderError("malformed PROXY v1 header")
    if parts[1] == b"UNKNOWN":
        return end + 2, None
    if parts[1] not in (b"TCP4", b"TCP6") or len(parts) != 6:
        raise ProxyHeaderError("malformed PROXY v1 header")
    try:
        source = ipaddress.ip_address(parts[2].decode("ascii"))
        port = int(parts[4])
    except ValueError:
        raise ProxyHeaderError("malformed PROXY v1 address") from None
    if source.version != (4 if parts[1] == b"TCP4" else 6) or not 0 <= port <= 65535:
        raise ProxyHeaderError("malformed PROXY v1 address")
    return end + 2, f"{source}:{port}"


def _parse_v2(data: bytes) -> tuple[int, str | None] | None:
    if len(data) < 16:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    family = data[13] >> 4
    length = int.from_bytes(data[14:16], "big")
    if version != 2 or command not in (0, 1) or length > V2_MAX_BODY:
        raise ProxyHeaderError("unsupported PROXY v2 header")
    if len(data) < 16 + length:
        return None
    body = data[16 : 16 + length]
    if command == 0:  # LOCAL: the balancer's own connection (health check)
        return 16 + length, None
    if family == 1 and length >= 12:  # AF_INET: src, dst, src port, dst port
        return 16 + length, f"{ipaddress.IPv4Address(body[:4])}:{int.from_bytes(body[8:10], 'big')}"
    if family == 2 and length >= 36:  # AF_INET6
        return 16 + length, f"{ipaddress.IPv6Address(body[:16])}:{int.from_bytes(body[32:34], 'big')}"
    if family in (0, 3):  # AF_UNSPEC, AF_UNIX: no address we can use
        return 16 + length, None
    raise ProxyHeaderError("malformed PROXY v2 address")


async def read_header(reader: asyncio.StreamReader) -> str | None:
    """Read exactly the PROXY header from ``reader`` (nothing of what follows); the client's "ip:port" or None.

    Raises :class:`ProxyHeaderError`, or the reader's errors when the connection ends first."""
    start = await reader.readexactly(5)
    if start == V1_PREFIX:
        header = start
        while not header.endswith(b"\r\n"):  # byte by byte: nothing after the header may be consumed
            if len(header) >= V1_MAX:
                raise ProxyHeaderError("PROXY v1 header too long")
            header += await reader.readexactly(1)
    else:
        if not V2_SIGNATURE.startswith(start):  # e.g. a CONNECT straight from a client: no need to wait for more
            raise ProxyHeaderError("no PROXY protocol header")
        header = start + await reader.readexactly(7)
        if not header.startswith(V2_SIGNATURE):
            raise ProxyHeaderError("no PROXY protocol header")
        header += await reader.readexactly(4)
        length = int.from_bytes(header[14:16], "big")
        if length > V2_MAX_BODY:
            raise ProxyHeaderError("PROXY v2 header too long")
        header += await reader.readexactly(length)
    parsed = parse(header)
    if parsed is None or parsed[0] != len(header):
        raise ProxyHeaderError("malformed PROXY header")
    return parsed[1]
