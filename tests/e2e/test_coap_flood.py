"""Bounded CoAP state under a garbage flood (issue 13), against the real gateway process.

100,000 unauthenticated datagrams from four sockets on four loopback addresses (sources a UDP attacker
could forge): 4-byte requests without a path, random bytes, POSTs to unknown paths, first blocks of
Block1 provision requests (each to a path of its own: a transfer the gateway must hold), and telemetry for
random tokens (4.01 after the credentials service). Each socket sends in windows closed by a CoAP ping
whose RST says the gateway has read the window (so the kernel drops nothing and the whole flood is read).
The gateway runs with small caps, so that the flood goes far past them.

Asserted (behaviour, no timing): the gateway's RSS grows by less than the bound README "CoAP" documents
for these caps; its own counters (logged when it stops) show the tables held no more than their caps and
evicted the rest; every answer is no larger than its request (no reflection); a real device provisions
over CoAP (libcoap's coap-client) in the middle of the flood; no traceback. Numbers: bench/coap_flood.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from devstack import Stack

from .conftest import Admin, Env

SERVICES = ["credentials", "provisioning_core", "admin_api", "coap_gateway"]
COAP_CLIENT = shutil.which("coap-client-notls") or shutil.which("coap-client")
DATAGRAMS = int(os.environ.get("COAP_FLOOD_DATAGRAMS", "100000"))
SOURCES = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")
WINDOW = 32
PING_MID = 0xFFFF
#: Small caps, so that the flood goes far past them.
CAPS = {"COAP_MAX_EXCHANGES": 4000, "COAP_MAX_EXCHANGES_PER_SOURCE": 1500,
        "COAP_MAX_BLOCKWISE_TRANSFERS": 400, "COAP_MAX_BLOCKWISE_TRANSFERS_PER_SOURCE": 150}
#: README "CoAP": the state held is at most ~1.5 KB per exchange and ~8 KB per transfer (its blocks' bytes
#: besides) of each direction, plus a fixed allowance for what the Python allocator keeps around.
KB_PER_EXCHANGE, KB_PER_TRANSFER, ALLOWANCE_KB = 1.5, 8, 12 * 1024
BOUND_KB = (KB_PER_EXCHANGE * CAPS["COAP_MAX_EXCHANGES"] + 2 * KB_PER_TRANSFER * CAPS["COAP_MAX_BLOCKWISE_TRANSFERS"]
            + ALLOWANCE_KB)


@pytest.fixture(scope="module")
def stack(env: Env) -> Iterator[Stack]:
    assert COAP_CLIENT, "libcoap's coap-client is needed (Debian: libcoap3-bin, which .ci/run installs)"
    running = Stack(env.variables(**{k: str(v) for k, v in CAPS.items()}), SERVICES).start(timeout=60)
    try:
        yield running
    finally:
        running.stop()


def encode(code: int, mid: int, token: bytes, path: tuple[str, ...], extra: list[tuple[int, bytes]] | None = None,
           payload: bytes = b"") -> bytes:
    """A confirmable request (RFC 7252 §3); path segments and option values under 13 bytes... or 13-268."""
    out, last = bytearray([0x40 | len(token), code]) + mid.to_bytes(2, "big") + token, 0
    for number, value in sorted([(11, s.encode()) for s in path] + (extra or []), key=lambda o: o[0]):
        delta, size = number - last, len(value)
        out.append((delta if delta < 13 else 13) << 4 | (size if size < 13 else 13))
        out += (bytes([delta - 13]) if delta >= 13 else b"") + (bytes([size - 13]) if size >= 13 else b"") + value
        last = number
    return bytes(out) + (b"\xff" + payload if payload else b"")


def garbage(rng: random.Random, mid: int) -> tuple[str, bytes]:
    roll, token = rng.random(), rng.randbytes(4)
    if roll < 0.6:
        return "tiny", bytes([0x40, 0x01]) + mid.to_bytes(2, "big")
    if roll < 0.7:
        data = bytearray(rng.randbytes(rng.randrange(0, 65)))
        if len(data) >= 4:
            data[2:4] = mid.to_bytes(2, "big")
        return "random", bytes(data)
    if roll < 0.83:
        return "unknown", encode(2, mid, token, ("x", rng.randbytes(4).hex()), payload=b"{}")
    if roll < 0.98:
        return "block1", encode(2, mid, token, ("api", "v1", rng.randbytes(6).hex(), "provision"),
                                [(27, b"\x0e")], rng.randbytes(1024))  # block 0, more, 1024 bytes
    return "token", encode(2, mid, token, ("api", "v1", secrets.token_hex(10), "telemetry"), payload=b'{"t":1}')


class Flooder(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.pong = asyncio.Event()
        self.codes: Counter[str] = Counter()
        #: Request sizes by token (each request has its own 4-byte token), and answers larger than theirs.
        self.sizes: dict[bytes, int] = {}
        self.reflections: list[tuple[int, bytes]] = []

    def datagram_received(self, data: bytes, addr: object) -> None:
        if len(data) >= 4 and data[0] >> 4 & 3 == 3 and data[2:4] == PING_MID.to_bytes(2, "big"):
            self.pong.set()
            return
        self.codes[f"{data[1] >> 5}.{data[1] & 31:02d}" if len(data) > 1 else "short"] += 1
        request_size = self.sizes.get(data[4:4 + (data[0] & 0x0F)]) if data[0] & 0x0F == 4 else None
        if request_size is not None and len(data) > request_size:
            self.reflections.append((request_size, data))


async def flood(port: int, source: str, count: int, seed: int) -> tuple[Counter[str], Flooder, int]:
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    transport, flooder = await loop.create_datagram_endpoint(Flooder, local_addr=(source, 0),
                                                             remote_addr=("127.0.0.1", port))
    sent: Counter[str] = Counter()
    lost = 0
    try:
        for start in range(0, count, WINDOW):
            for i in range(start, min(start + WINDOW, count)):
                kind, datagram = garbage(rng, i % PING_MID)
                if kind != "random" and kind != "tiny":
                    flooder.sizes[datagram[4:8]] = len(datagram)
                transport.sendto(datagram)
                sent[kind] += 1
            flooder.pong.clear()
            transport.sendto(bytes([0x40, 0x00]) + PING_MID.to_bytes(2, "big"))
            try:
                await asyncio.wait_for(flooder.pong.wait(), 5)
            except TimeoutError:
                lost += 1
        await asyncio.sleep(0.5)
    finally:
        transport.close()
    return sent, flooder, lost


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def provision_with_coap_client(env: Env, key: str, secret: str) -> dict:
    body = json.dumps({"deviceName": f"flood-{secrets.token_hex(4)}", "provisionDeviceKey": key,
                       "provisionDeviceSecret": secret})
    assert COAP_CLIENT is not None
    result = await asyncio.to_thread(
        subprocess.run, [COAP_CLIENT, "-m", "post", "-t", "50", "-B", "30", "-e", body,
                         f"coap://127.0.0.1:{env.coap_port}/api/v1/provision"],
        capture_output=True, text=True, timeout=60)
    return json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {"stderr": result.stderr}


async def test_memory_stays_bounded_under_a_garbage_flood(env: Env, stack: Stack, admin: Admin) -> None:
    profile = admin.create_profile()
    gateway = stack["coap_gateway"]
    assert gateway.proc is not None
    pid = gateway.proc.pid
    before = rss_kb(pid)
    share = DATAGRAMS // len(SOURCES)
    floods = [asyncio.create_task(flood(env.coap_port, source, share, 7 + i)) for i, source in enumerate(SOURCES)]
    await asyncio.sleep(2)  # in the middle of the flood: a real device provisions
    device = await provision_with_coap_client(env, profile["provisionDeviceKey"], profile["provisionDeviceSecret"])
    results = await asyncio.gather(*floods)
    after = rss_kb(pid)

    sent = sum((r[0] for r in results), Counter())
    codes = sum((r[1].codes for r in results), Counter())
    print(f"\nflood: {DATAGRAMS} datagrams {dict(sent)}, answers {dict(codes)}, pings lost "
          f"{sum(r[2] for r in results)}; RSS {before} kB -> {after} kB (+{after - before} kB,"
          f" bound {BOUND_KB:.0f} kB); device {device}")
    assert device.get("status") == "SUCCESS" and device.get("credentialsType") == "ACCESS_TOKEN", device
    assert sum(sent.values()) == DATAGRAMS
    assert set(codes) <= {"4.04", "2.31", "4.01", "4.00", "4.05", "4.08", "4.13", "4.29", "0.00"}, codes
    reflections = [reflection for r in results for reflection in r[1].reflections]
    assert reflections == [], (len(reflections), reflections[:3])  # no answer larger than its request
    assert after - before < BOUND_KB

    # The gateway's own counters, logged when it stops.
    gateway.signal(signal.SIGTERM)
    await asyncio.to_thread(gateway.proc.wait, 30)
    output = gateway.output
    summary = re.search(r"CoAP state: (.*)", output)
    assert summary is not None, output[-2000:]
    counters = {k: v for k, v in re.findall(r"(\w+)=(\d+)", summary.group(1))}
    print("gateway:", summary.group(1))
    read = int(counters["requests"]) + int(counters["refused_on_sight"]) + int(counters["malformed"])
    assert read >= DATAGRAMS * 0.85  # all but random bytes that parse as responses, ACKs or pings
    assert int(counters["exchanges_evicted"]) > 0 and int(counters["transfers_evicted"]) > 0
    assert int(counters["refused_on_sight"]) >= sent["tiny"]
    assert "Traceback" not in stack.output()
