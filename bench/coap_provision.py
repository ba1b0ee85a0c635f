#!/usr/bin/env python3
"""CoAP provisioning load generator: provisions N devices at a given concurrency against a running stack.

    python bench/coap_provision.py --host 127.0.0.1 --port 5683 --admin-url http://127.0.0.1:8081 \\
        -n 5000 -c 64 [--non] [--innoway] [--key K --secret S] [--warmup 200] [--max-seconds 120] [--json]

Without --key/--secret it first creates a fresh device profile (``bench-<run>``, strategy
ALLOW_CREATE_NEW_DEVICES) through the admin API, exactly as bench/http_provision.py does.

Each of the -c workers is one UDP socket, like one device; it provisions one device after another:
POST ``coap://HOST:PORT/api/v1/provision`` (``/api/provision`` with --innoway), confirmable unless
--non, and waits for the answer. One socket per worker because a client, as RFC 7252 §4.7 asks
(NSTART = 1), keeps a single confirmable exchange open per endpoint: a shared socket would send one
request at a time. Latency runs from sending the request to having its answer (retransmissions and
separate responses included).

Two clients (``--client``): ``aiocoap`` (default), one aiocoap client context per worker, a client we did
not write; ``raw``, a minimal RFC 7252 client in this file (CON or NON POST with Uri-Path and
Content-Format, retransmission with the RFC's timing, piggybacked or separate answers, which it
acknowledges), for when the generator shares the machine with the server: it costs a fraction of
aiocoap's CPU per request, so more of the machine is left to the stack being measured.

One process, one asyncio loop (uvloop when importable). See bench/README.md for what the numbers mean.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import aiocoap
from _common import (  # bench/_common.py: python puts the script's directory first on sys.path
    SUCCESS,
    SetupError,
    add_rate_argument,
    add_run_arguments,
    check_run_arguments,
    fmt_ms,
    open_loop,
    pick_runner,
    report,
    resolve_profile,
    run_summary,
    timed,
)
from aiocoap.numbers.codes import Code

_SUCCESS_MARK = b'"status":"SUCCESS"'


@dataclass
class Phase:
    attempted: int = 0
    outcomes: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    success_latencies_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    cpu_user_s: float = 0.0
    cpu_sys_s: float = 0.0


def classify(response: aiocoap.Message | RawAnswer) -> str:
    """SUCCESS; the provisioning status of a 4.00 answer (NOT_FOUND, FAILURE); else ``CoAP <code>``."""
    code = Code(response.code)
    if code is Code.CREATED and _SUCCESS_MARK in response.payload:
        return SUCCESS
    if code is Code.BAD_REQUEST:
        try:
            status = json.loads(response.payload).get("status")
        except (ValueError, AttributeError):
            status = None
        if isinstance(status, str) and status != "FAILURE":
            return status
        if status == "FAILURE":
            return "FAILURE (4.00)"
    return f"CoAP {code.dotted}"


# --- the raw client (--client raw) ------------------------------------------------------------------------

#: RFC 7252 §4.8: ACK_TIMEOUT, ACK_RANDOM_FACTOR, MAX_RETRANSMIT.
ACK_TIMEOUT, ACK_RANDOM_FACTOR, MAX_RETRANSMIT = 2.0, 1.5, 4
CON, NON, ACK, RST = 0, 1, 2, 3
_OPT_URI_PATH, _OPT_CONTENT_FORMAT, _OPT_BLOCK2 = 11, 12, 23


@dataclass
class RawAnswer:
    code: int
    payload: bytes


class RawError(Exception):
    """The server reset the exchange, or answered with something this client does not take (blockwise)."""


def _option(delta: int, value: bytes) -> bytes:
    """One option, ``delta`` after the previous one (deltas and lengths below 269, enough here)."""
    def nibble(n: int) -> tuple[int, bytes]:
        return (n, b"") if n < 13 else (13, bytes([n - 13]))
    d, dx = nibble(delta)
    n, nx = nibble(len(value))
    return bytes([d << 4 | n]) + dx + nx + value


def encode_request(mtype: int, message_id: int, token: bytes, path: str, payload: bytes) -> bytes:
    options = b""
    number = 0
    for segment in path.strip("/").split("/"):
        options += _option(_OPT_URI_PATH - number, segment.encode())
        number = _OPT_URI_PATH
    options += _option(_OPT_CONTENT_FORMAT - number, bytes([50]))  # application/json
    return (bytes([0x40 | mtype << 4 | len(token), Code.POST, message_id >> 8, message_id & 0xFF]) + token
            + options + b"\xff" + payload)


def decode_message(data: bytes) -> tuple[int, int, int, bytes, bytes, bool] | None:
    """(type, code, message id, token, payload, has Block2) of a datagram; None if it is not CoAP."""
    if len(data) < 4 or data[0] >> 6 != 1:
        return None
    mtype, tkl, code = data[0] >> 4 & 3, data[0] & 0x0F, data[1]
    message_id = data[2] << 8 | data[3]
    if tkl > 8 or len(data) < 4 + tkl:
        return None
    token, pos, number, block2 = data[4:4 + tkl], 4 + tkl, 0, False
    while pos < len(data) and data[pos] != 0xFF:
        delta, length = data[pos] >> 4, data[pos] & 0x0F
        pos += 1
        for which in (0, 1):
            n = delta if which == 0 else length
            if n == 13:
                n, pos = data[pos] + 13, pos + 1
            elif n == 14:
                n, pos = (data[pos] << 8 | data[pos + 1]) + 269, pos + 2
            elif n == 15:
                return None
            delta, length = (n, length) if which == 0 else (delta, n)
        number += delta
        block2 = block2 or number == _OPT_BLOCK2
        pos += length
    payload = data[pos + 1:] if pos < len(data) else b""
    return mtype, code, message_id, token, payload, block2


class RawClient(asyncio.DatagramProtocol):
    """One UDP socket, one exchange at a time (NSTART = 1), as a device does."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self._message_id = secrets.randbelow(0x10000)
        self._token = b""
        self._waiting_id = -1
        self._answer: asyncio.Future[RawAnswer] | None = None
        self._acked: asyncio.Event = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: object) -> None:
        decoded = decode_message(data)
        if decoded is None:
            return
        mtype, code, message_id, token, payload, block2 = decoded
        if mtype == CON and self.transport is not None:
            # A separate answer: acknowledge it (an empty ACK with its message id), also a repeat that comes
            # after its exchange ended, else the server sends it again until it gives up.
            self.transport.sendto(bytes([0x60, 0, message_id >> 8, message_id & 0xFF]))
        answer = self._answer
        if answer is None or answer.done():
            return
        if mtype in (ACK, RST):
            if message_id != self._waiting_id:
                return
            if mtype == RST:
                answer.set_exception(RawError("reset"))
                return
            self._acked.set()
            if code == 0:  # empty ACK: the answer follows separately
                return
        if token != self._token:
            return
        if block2:
            answer.set_exception(RawError("blockwise answer"))
        else:
            answer.set_result(RawAnswer(code, payload))

    async def request(self, path: str, payload: bytes, confirmable: bool) -> RawAnswer:
        assert self.transport is not None
        self._message_id = (self._message_id + 1) & 0xFFFF
        self._waiting_id = self._message_id
        self._token = secrets.token_bytes(4)
        self._acked = asyncio.Event()
        self._answer = asyncio.get_running_loop().create_future()
        datagram = encode_request(CON if confirmable else NON, self._message_id, self._token, path, payload)
        self.transport.sendto(datagram)
        if not confirmable:
            return await self._answer
        wait = ACK_TIMEOUT * (1 + (ACK_RANDOM_FACTOR - 1) * secrets.randbelow(1000) / 1000)
        for _ in range(MAX_RETRANSMIT):
            done, _ = await asyncio.wait([self._answer], timeout=wait)
            if done or self._acked.is_set():
                break
            self.transport.sendto(datagram)
            wait *= 2
        return await self._answer


async def open_raw_client(host: str, port: int) -> RawClient:
    _, protocol = await asyncio.get_running_loop().create_datagram_endpoint(RawClient, remote_addr=(host, port))
    return protocol


class RequestFactory:
    def __init__(self, uri: str, path: str, innoway: bool, key: str, secret: str, non: bool) -> None:
        self.uri, self.path, self.innoway, self.key, self.secret, self.non = uri, path, innoway, key, secret, non
        self.tuning = aiocoap.Unreliable if non else aiocoap.Reliable

    def body(self, name: str) -> bytes:
        if self.innoway:
            body = {"device_name": name, "provision_key": self.key, "provision_secret": self.secret}
        else:
            body = {"deviceName": name, "provisionDeviceKey": self.key, "provisionDeviceSecret": self.secret}
        return json.dumps(body).encode()

    async def send(self, client: aiocoap.Context | RawClient, name: str) -> aiocoap.Message | RawAnswer:
        if isinstance(client, RawClient):
            return await client.request(self.path, self.body(name), confirmable=not self.non)
        message = aiocoap.Message(code=Code.POST, uri=self.uri, payload=self.body(name), transport_tuning=self.tuning)
        return await client.request(message).response


async def run_phase(contexts: list[aiocoap.Context] | list[RawClient], count: int, name_of,
                    factory: RequestFactory, timeout: float, deadline: float, phase: Phase) -> None:
    loop = asyncio.get_running_loop()
    numbers = itertools.count()

    async def worker(context: aiocoap.Context | RawClient) -> None:
        while True:
            i = next(numbers)
            if i >= count or loop.time() >= deadline:
                return
            if not await attempt(context, name_of(i), factory, timeout, deadline, phase):
                await asyncio.sleep(0.05)  # an unreachable server would otherwise burn through -n at once

    await timed(phase, asyncio.gather(*(worker(c) for c in contexts)))


async def attempt(context: aiocoap.Context | RawClient, name: str, factory: RequestFactory, timeout: float,
                  deadline: float, phase: Phase, due: float | None = None) -> bool:
    """Provision device ``name`` from ``context`` and record what happened in ``phase`` (latency from ``due``
    when given, the open loop's time the request was due); False when the request failed (no answer)."""
    loop = asyncio.get_running_loop()
    phase.attempted += 1
    t0 = time.perf_counter() if due is None else due
    try:
        async with asyncio.timeout(max(0.001, min(timeout, deadline - loop.time()))):
            response = await factory.send(context, name)
    except TimeoutError:
        phase.errors["stopped by --max-seconds" if loop.time() >= deadline else "timeout"] += 1
        return True
    except (aiocoap.error.Error, RawError, OSError) as exc:
        phase.errors[type(exc).__name__] += 1
        return False
    elapsed_ms = (time.perf_counter() - t0) * 1000.0
    outcome = classify(response)
    phase.outcomes[outcome] += 1
    phase.latencies_ms.append(elapsed_ms)
    if outcome == SUCCESS:
        phase.success_latencies_ms.append(elapsed_ms)
    return True


async def run_open_loop(contexts: list[aiocoap.Context] | list[RawClient], count: int, rate: float, name_of,
                        factory: RequestFactory, timeout: float, deadline: float, phase: Phase) -> None:
    """:func:`_common.open_loop` over ``contexts``: a due request takes an idle socket, waiting for one when all
    are busy (NSTART = 1)."""
    idle: asyncio.Queue[aiocoap.Context | RawClient] = asyncio.Queue()
    for context in contexts:
        idle.put_nowait(context)

    async def one(i: int, due: float) -> None:
        context = await idle.get()
        try:
            await attempt(context, name_of(i), factory, timeout, deadline, phase, due)
        finally:
            idle.put_nowait(context)

    await timed(phase, open_loop(count, rate, deadline, one))


async def bench(args: argparse.Namespace, key: str, secret: str, run_id: str) -> dict:
    path = "/api/provision" if args.innoway else "/api/v1/provision"
    host = f"[{args.host}]" if ":" in args.host else args.host
    uri = f"coap://{host}:{args.port}{path}"
    factory = RequestFactory(uri, path, args.innoway, key, secret, args.non)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.max_seconds

    workers = max(1, min(args.concurrency, max(args.requests, args.warmup)))
    contexts: list[aiocoap.Context] | list[RawClient]
    if args.client == "raw":
        contexts = [await open_raw_client(args.host, args.port) for _ in range(workers)]
    else:
        contexts = [await aiocoap.Context.create_client_context(transports=["udp6"]) for _ in range(workers)]
    try:
        warm = Phase()
        if args.warmup > 0:
            await run_phase(contexts, args.warmup, lambda i: f"bench-{run_id}-w{i}", factory,
                            args.timeout, deadline, warm)
            if not warm.outcomes and warm.errors:
                reason = ", ".join(f"{k} x{v}" for k, v in warm.errors.items())
                raise SetupError(f"no answer from {uri} during the warm-up: {reason}")
        measured = Phase()
        if args.requests > 0 and loop.time() < deadline:
            if args.rate:
                await run_open_loop(contexts, args.requests, args.rate, lambda i: f"bench-{run_id}-{i}", factory,
                                    args.timeout, deadline, measured)
            else:
                await run_phase(contexts, args.requests, lambda i: f"bench-{run_id}-{i}", factory,
                                args.timeout, deadline, measured)
    finally:
        for context in contexts:
            if isinstance(context, RawClient) and context.transport is not None:
                context.transport.close()
        await asyncio.gather(*(c.shutdown() for c in contexts if not isinstance(c, RawClient)),
                             return_exceptions=True)

    elapsed = measured.elapsed_s
    cpu = measured.cpu_user_s + measured.cpu_sys_s
    timeouts = measured.errors.get("timeout", 0)
    return {
        "url": uri,
        "dialect": "innoway" if args.innoway else "thingsboard",
        "message_type": "NON" if args.non else "CON",
        "client": args.client,
        "offered_rate_per_s": args.rate,
        **run_summary(run_id=run_id, loop=loop, requested=args.requests, concurrency=workers,
                      warmup_requested=args.warmup, warm=warm, measured=measured),
        "other_status": sum(v for k, v in measured.outcomes.items() if k != SUCCESS and not k.startswith("CoAP ")),
        "coap_errors": sum(v for k, v in measured.outcomes.items() if k.startswith("CoAP ")),
        "no_answer": sum(measured.errors.values()),
        "timeouts": timeouts,
        "errors": dict(measured.errors.most_common()),
        "not_sent": max(0, args.requests - measured.attempted),
        "stopped_by_max_seconds": measured.attempted < args.requests or "stopped by --max-seconds" in measured.errors,
        "generator_cpu_s": round(cpu, 3),
        "generator_cpu_user_s": round(measured.cpu_user_s, 3),
        "generator_cpu_sys_s": round(measured.cpu_sys_s, 3),
        "generator_cpu_pct_of_one_core": round(100.0 * cpu / elapsed, 1) if elapsed > 0 else 0.0,
        "generator_cpu_us_per_request": round(1e6 * cpu / measured.attempted, 1) if measured.attempted else None,
        "cpu_count": os.cpu_count(),
    }


def render_human(result: dict, profile_note: str) -> str:
    def lat(summary: dict) -> str:
        return (f"p50 {fmt_ms(summary['p50'])}  p95 {fmt_ms(summary['p95'])}  p99 {fmt_ms(summary['p99'])}"
                f"  max {fmt_ms(summary['max'])}")

    outcomes = "  ".join(f"{k} {v}" for k, v in result["outcomes"].items()) or "none"
    errors = "  ".join(f"{k} {v}" for k, v in result["errors"].items()) or "none"
    warm = result["warmup"]
    return "\n".join([
        f"CoAP provisioning benchmark: POST {result['url']} ({result['dialect']} dialect,"
        f" {result['message_type']}, {result['client']} client, {result['event_loop']})",
        f"  run {result['run']}; {profile_note}",
        f"  requests      {result['attempted']} sent of {result['requested']} by {result['concurrency']} workers"
        f" (one UDP socket each); warm-up {warm['attempted']} ({warm['success']} SUCCESS) not counted",
        *([f"  offered       {result['offered_rate_per_s']:g}/s open loop (latency from when each request was due,"
           " waiting for a free socket included)"] if result["offered_rate_per_s"] else []),
        f"  elapsed       {result['elapsed_s']:.2f} s" + ("   (stopped by --max-seconds)"
                                                        if result["stopped_by_max_seconds"] else ""),
        f"  provisions/s  {result['provisions_per_s']:.1f}   (SUCCESS answers per second;"
        f" all responses {result['responses_per_s']:.1f}/s)",
        f"  latency ms    {lat(result['latency_ms'])}   (SUCCESS answers)",
        f"                {lat(result['latency_all_responses_ms'])}   (every CoAP response)",
        f"  outcomes      {outcomes}",
        f"                SUCCESS {result['success']} / other status {result['other_status']}"
        f" / CoAP errors {result['coap_errors']} / no answer {result['no_answer']}",
        f"  no answer     {errors}",
        f"  generator CPU {result['generator_cpu_s']:.2f} s (user {result['generator_cpu_user_s']:.2f}"
        f" + sys {result['generator_cpu_sys_s']:.2f}) = {result['generator_cpu_pct_of_one_core']:.0f}% of one core,"
        f" {result['generator_cpu_us_per_request'] or 0:.0f} us/request; this machine has {result['cpu_count']}"
        " cores shared with the server",
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Provision N devices over CoAP at a given concurrency and report throughput and latency.")
    p.add_argument("--host", default="127.0.0.1", help="CoAP gateway host (default %(default)s)")
    p.add_argument("--port", type=int, default=5683, help="CoAP gateway UDP port, COAP_PORT (default %(default)s)")
    p.add_argument("--non", action="store_true", help="non-confirmable requests (default: confirmable)")
    p.add_argument("--client", choices=("aiocoap", "raw"), default="aiocoap",
                   help="aiocoap, or this file's minimal RFC 7252 client, cheaper on a shared machine"
                        " (default %(default)s)")
    p.add_argument("--innoway", action="store_true",
                   help="Innoway dialect: snake_case body to /api/provision (default: ThingsBoard, /api/v1/provision)")
    add_run_arguments(p, concurrency_help='workers, one UDP socket and one request in flight each')
    add_rate_argument(p, concurrency_is="sockets")
    args = p.parse_args(argv)
    check_run_arguments(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_id = secrets.token_hex(4)
    try:
        key, secret, profile_note = resolve_profile(args.key, args.secret, args.admin_url, args.admin_token, run_id)
        result = pick_runner(args.no_uvloop)(bench(args, key, secret, run_id))
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

    return report(result, render_human(result, profile_note), args.json, args.requests)


if __name__ == "__main__":
    sys.exit(main())
