#!/usr/bin/env python3
"""CoAP garbage flood: the gateway's memory (RSS) before and after N unauthenticated datagrams, and how fast
it reads them; optionally one real provision in the middle of the flood.

    python bench/coap_flood.py --host 127.0.0.1 --port 5683 [--pid PID] -n 100000 [--sources 8] \\
        [--mix tiny=40,random=10,unknown=10,block1=35,token=5] [--provision --admin-url URL] [--json]

Each of ``--sources`` UDP sockets is bound to its own loopback address (127.0.0.1, 127.0.0.2, ...: sources
a UDP attacker could forge) and sends its share of the datagrams in windows of ``--window``, each window
closed by a CoAP ping whose RST says the gateway has read everything before it (so the count is what the
gateway read, not what the kernel dropped). Kinds of garbage (``--mix``, weights):

* ``tiny``: a 4-byte confirmable GET without a path (answered 4.04, no body);
* ``random``: 0-64 random bytes (mostly not CoAP);
* ``unknown``: a POST to an unknown path with a small body (4.04);
* ``block1``: the first block (1024 random bytes, more to come) of a Block1 provision request to a path
  of its own (``/api/v1/<random>/provision``; 2.31 Continue): a block-wise transfer the gateway holds;
* ``token``: telemetry for a random access token (4.01 after the credentials service is asked).

The gateway's process is ``--pid``, else the process owning the UDP port (looked up in /proc: run it
as the same user). RSS is /proc/<pid>/status VmRSS, the peak VmHWM. ``--provision`` provisions one device
through aiocoap in the middle of the flood (a fresh profile from the admin API, or ``--key/--secret``)
and says whether it succeeded. Standard library and aiocoap only. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import sys
import time
from collections import Counter
from pathlib import Path

from _common import SetupError, resolve_profile  # bench/_common.py

KINDS = ("tiny", "random", "unknown", "block1", "token")
DEFAULT_MIX = "tiny=40,random=10,unknown=10,block1=35,token=5"
PING_MID = 0xFFFF  # each window's barrier (a ping's message id is never a request's here)


def encode(mtype: int, code: int, mid: int, token: bytes, options: list[tuple[int, bytes]],
           payload: bytes = b"") -> bytes:
    """RFC 7252 §3, options sorted, values under 269 bytes."""
    out, last = bytearray([0x40 | mtype << 4 | len(token), code]) + mid.to_bytes(2, "big") + token, 0
    for number, value in sorted(options, key=lambda o: o[0]):
        delta = number - last
        d_nib, d_ext = (delta, b"") if delta < 13 else (13, bytes([delta - 13]))
        l_nib, l_ext = (len(value), b"") if len(value) < 13 else (13, bytes([len(value) - 13]))
        out.append(d_nib << 4 | l_nib)
        out += d_ext + l_ext + value
        last = number
    return bytes(out) + (b"\xff" + payload if payload else b"")


def path(*segments: str) -> list[tuple[int, bytes]]:
    return [(11, s.encode()) for s in segments]


def garbage(kind: str, mid: int, rng: random.Random) -> bytes:
    token = rng.randbytes(4)
    if kind == "tiny":
        return bytes([0x40, 0x01]) + mid.to_bytes(2, "big")
    if kind == "random":
        data = bytearray(rng.randbytes(rng.randrange(0, 65)))
        if len(data) >= 4:
            data[2:4] = mid.to_bytes(2, "big")
        return bytes(data)
    if kind == "unknown":
        return encode(0, 2, mid, token, path("x", rng.randbytes(4).hex()), b"{}")
    if kind == "block1":
        block1 = bytes([0x0E])  # number 0, more, szx 6 (1024 bytes)
        # ThingsBoard's /api/v1/<anything>/provision: each path its own transfer (one per endpoint and path).
        where = path("api", "v1", rng.randbytes(6).hex(), "provision")
        return encode(0, 2, mid, token, where + [(27, block1)], rng.randbytes(1024))
    if kind == "token":
        return encode(0, 2, mid, token, path("api", "v1", secrets.token_hex(10), "telemetry"), b'{"t":1}')
    raise ValueError(kind)


def parse_mix(text: str) -> list[tuple[str, int]]:
    mix = []
    for item in text.split(","):
        name, _, weight = item.partition("=")
        if name.strip() not in KINDS or not weight.strip().isdigit():
            raise SetupError(f"--mix: {item!r} is not KIND=WEIGHT with KIND in {', '.join(KINDS)}")
        mix.append((name.strip(), int(weight)))
    return mix


def gateway_pid(port: int) -> int:
    """The process owning UDP ``port`` (/proc/net/udp{,6} → socket inode → /proc/*/fd)."""
    inodes = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(pid)
        except OSError:
            continue
    raise SetupError(f"no process of this user owns UDP port {port}; give --pid")


def memory_kb(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values


class Flooder(asyncio.DatagramProtocol):
    """One socket: sends windows of garbage, each closed by a ping; counts the answers by code."""

    def __init__(self) -> None:
        self.codes: Counter[str] = Counter()
        self.pong = asyncio.Event()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: object) -> None:
        if len(data) < 4:
            return
        if data[0] >> 4 & 3 == 3 and data[2:4] == PING_MID.to_bytes(2, "big"):
            self.pong.set()
            return
        self.codes[f"{data[1] >> 5}.{data[1] & 31:02d}"] += 1

    def error_received(self, exc: Exception) -> None:
        self.codes[f"error {type(exc).__name__}"] += 1


async def flood_from(host: str, port: int, source: str, count: int, window: int, mix: list[tuple[str, int]],
                     seed: int) -> tuple[Counter[str], Counter[str], int]:
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    kinds, weights = zip(*mix, strict=True)
    transport, flooder = await loop.create_datagram_endpoint(Flooder, local_addr=(source, 0), remote_addr=(host, port))
    sent: Counter[str] = Counter()
    lost_barriers = 0
    try:
        mid = rng.randrange(0x10000)
        done = 0
        while done < count:
            for _ in range(min(window, count - done)):
                kind = rng.choices(kinds, weights)[0]
                mid = (mid + 1) % 0xFFFF  # never PING_MID
                transport.sendto(garbage(kind, mid, rng))
                sent[kind] += 1
                done += 1
            flooder.pong.clear()
            transport.sendto(bytes([0x40, 0x00]) + PING_MID.to_bytes(2, "big"))
            try:
                await asyncio.wait_for(flooder.pong.wait(), 2.0)
            except TimeoutError:
                lost_barriers += 1  # the ping (or its RST) was lost: go on
        await asyncio.sleep(0.5)  # late answers (4.01 after the credentials service)
    finally:
        transport.close()
    return sent, flooder.codes, lost_barriers


async def provision_once(host: str, port: int, key: str, secret: str) -> tuple[str, float]:
    import aiocoap

    context = await aiocoap.Context.create_client_context(transports=["udp6"], loggername="coap-flood-device")
    started = time.monotonic()
    try:
        body = json.dumps({"deviceName": f"flood-{secrets.token_hex(4)}", "provisionDeviceKey": key,
                           "provisionDeviceSecret": secret}).encode()
        request = aiocoap.Message(code=aiocoap.POST, uri=f"coap://{host}:{port}/api/v1/provision", payload=body)
        response = await asyncio.wait_for(context.request(request).response, 60)
        status = json.loads(response.payload).get("status", "?") if response.payload else "-"
        return f"{response.code} {status}", time.monotonic() - started
    except Exception as exc:  # report, do not crash the bench
        return f"failed: {type(exc).__name__} {exc}", time.monotonic() - started
    finally:
        await context.shutdown()


async def run(args: argparse.Namespace, pid: int, profile: tuple[str, str] | None) -> dict:
    mix = parse_mix(args.mix)
    sources = [f"127.0.0.{i + 1}" for i in range(args.sources)]
    before = memory_kb(pid)
    share = [args.requests // len(sources) + (i < args.requests % len(sources)) for i in range(len(sources))]
    started = time.monotonic()
    floods = [asyncio.create_task(flood_from(args.host, args.port, source, n, args.window, mix, args.seed + i))
              for i, (source, n) in enumerate(zip(sources, share, strict=True))]
    device = None
    if profile is not None:
        await asyncio.sleep(1.0)  # mid-flood
        device = await provision_once(args.host, args.port, *profile)
    results = await asyncio.gather(*floods)
    elapsed = time.monotonic() - started - 0.5
    after = memory_kb(pid)
    sent: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    lost = 0
    for s, c, n in results:
        sent.update(s)
        codes.update(c)
        lost += n
    total = sum(sent.values())
    return {
        "datagrams": total, "sent_by_kind": dict(sent), "answers_by_code": dict(codes), "lost_barriers": lost,
        "elapsed_s": round(elapsed, 2), "datagrams_per_s": round(total / elapsed) if elapsed > 0 else None,
        "rss_before_kb": before.get("VmRSS"), "rss_after_kb": after.get("VmRSS"), "rss_peak_kb": after.get("VmHWM"),
        "rss_growth_kb": after.get("VmRSS", 0) - before.get("VmRSS", 0), "pid": pid, "sources": len(sources),
        "provision_during_flood": None if device is None else {"answer": device[0], "seconds": round(device[1], 2)},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Flood the CoAP gateway with garbage; print its RSS and datagrams/s.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5683, help="COAP_PORT (default %(default)s)")
    p.add_argument("--pid", type=int, help="the gateway's process (default: the owner of the UDP port)")
    p.add_argument("-n", "--requests", type=int, default=100_000, help="datagrams (default %(default)s)")
    p.add_argument("--sources", type=int, default=8, help="sockets, one loopback address each (default %(default)s)")
    p.add_argument("--window", type=int, default=256, help="datagrams between two pings (default %(default)s)")
    p.add_argument("--mix", default=DEFAULT_MIX, help="KIND=WEIGHT,... (default %(default)s)")
    p.add_argument("--seed", type=int, default=20261130)
    p.add_argument("--provision", action="store_true", help="provision one device during the flood")
    p.add_argument("--admin-url", default="http://127.0.0.1:8081")
    p.add_argument("--admin-token")
    p.add_argument("--key")
    p.add_argument("--secret")
    p.add_argument("--json", action="store_true", help="one JSON line on stdout")
    args = p.parse_args(argv)
    if args.requests < 1 or not 1 <= args.sources <= 254 or args.window < 1:
        p.error("-n, --window >= 1, 1 <= --sources <= 254")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        pid = args.pid or gateway_pid(args.port)
        profile = None
        if args.provision:
            key, secret, _ = resolve_profile(args.key, args.secret, args.admin_url, args.admin_token,
                                             secrets.token_hex(4))
            profile = (key, secret)
        result = asyncio.run(run(args, pid, profile))
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, separators=(",", ":")))
    else:
        mb = 1024
        print(f"CoAP flood: {result['datagrams']} datagrams from {result['sources']} sources in "
              f"{result['elapsed_s']} s = {result['datagrams_per_s']} datagrams/s "
              f"({result['lost_barriers']} pings unanswered)")
        print(f"  sent      {result['sent_by_kind']}")
        print(f"  answers   {result['answers_by_code']}")
        print(f"  RSS       before {result['rss_before_kb'] / mb:.1f} MB, after {result['rss_after_kb'] / mb:.1f} MB"
              f" (growth {result['rss_growth_kb'] / mb:+.1f} MB), peak {result['rss_peak_kb'] / mb:.1f} MB"
              f" (pid {result['pid']})")
        if result["provision_during_flood"] is not None:
            print(f"  provision during the flood: {result['provision_during_flood']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
