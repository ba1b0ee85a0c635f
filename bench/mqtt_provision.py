#!/usr/bin/env python3
"""MQTT provisioning load generator: provisions N devices at a given concurrency against a running stack.

    python bench/mqtt_provision.py --host 127.0.0.1 --port 1883 --admin-url http://127.0.0.1:8081 \\
        -n 5000 -c 64 [--hold 2000] [--key K --secret S] [--warmup 200] [--max-seconds 120] [--json]

Without --key/--secret it first creates a fresh device profile (``bench-<run>``, strategy
ALLOW_CREATE_NEW_DEVICES) through the admin API, exactly as bench/http_provision.py does.

Each of the -c workers provisions one device after another, each over a new connection, as real
devices do: TCP connect, CONNECT (username ``provision``), wait for CONNACK, then SUBSCRIBE
``/provision/response`` QoS 1 and PUBLISH QoS 1 ``/provision/request`` in one write (as
ThingsBoard's example client does from on_connect), read SUBACK, PUBACK and the response PUBLISH,
acknowledge the response when it is QoS 1, DISCONNECT. Latency runs from the start of the TCP
connect to the response PUBLISH. --hold N keeps N further idle connections open during the run and
checks with PINGREQ at the end that they are still alive.

One process, one asyncio loop (uvloop when importable) on asyncio streams, with the project's own
MQTT packet code (provisioning_common.mqtt_packets and .mqtt_client_packets, from the installed
project: pip install -e .): paho-mqtt's select() loop costs far more CPU per connection and cannot go
past 1024 file descriptors. Standard library only besides that (plus uvloop). See bench/README.md
for what the numbers mean.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from _common import (  # bench/_common.py: python puts the script's directory first on sys.path
    SUCCESS,
    SetupError,
    add_rate_argument,
    add_run_arguments,
    check_run_arguments,
    fmt_ms,
    latency_summary,
    open_loop,
    pick_runner,
    report,
    resolve_profile,
    run_summary,
    timed,
)

# The project's own MQTT packet code (pip install -e . puts it on the path): the wire format both sides
# share, and what only a client sends.
from provisioning_common import mqtt_client_packets as client_codec
from provisioning_common import mqtt_packets as codec
from provisioning_common.mqtt_topics import GATEWAY_REQUEST_TOPIC as REQUEST_TOPIC
from provisioning_common.mqtt_topics import GATEWAY_RESPONSE_TOPIC as RESPONSE_TOPIC

PROVISION_USER = "provision"  # ThingsBoard's provisioning username (provisioning_common.device_auth.PROVISION)
LEVEL = 4  # MQTT 3.1.1
KEEP_ALIVE_S = 60  # provisioning connections (they last milliseconds)
HOLD_KEEP_ALIVE_S = 300  # idle --hold connections: the gateway drops them after 1.5x this without a packet
HOLD_PARALLEL = 256  # held connections being opened at once (keeps the accept queue short)
HOLD_CHECK_S = 10.0  # cap on the final PINGREQ round over the held connections
MAX_PACKET = 1024 * 1024  # largest packet accepted from the server
FD_MARGIN = 64  # file descriptors kept for the loop, the admin call, stdio...

SUBSCRIBE_ID, PUBLISH_ID = 1, 2
_SUBSCRIBE = client_codec.encode_subscribe(SUBSCRIBE_ID, [(RESPONSE_TOPIC, 1)], protocol_level=LEVEL)
_DISCONNECT = client_codec.encode_disconnect_client()
_PINGREQ = client_codec.encode_pingreq()
_CONNACK, _SUBACK, _PINGRESP = codec.PacketType.CONNACK, codec.PacketType.SUBACK, codec.PacketType.PINGRESP
_SUCCESS_MARK = b'"status":"SUCCESS"'


class ClientProtocolError(Exception):
    """The server's packets are well formed but not what a provisioning client expects."""


# --------------------------------------------------------------------------------------------
# the MQTT client


class RequestFactory:
    """Packets of one provision; only the device name varies."""

    def __init__(self, key: str, secret: str) -> None:
        self._prefix = b'{"deviceName":'
        self._suffix = (',"provisionDeviceKey":' + json.dumps(key)
                        + ',"provisionDeviceSecret":' + json.dumps(secret) + "}").encode()

    def connect(self, device_name: str) -> bytes:
        return client_codec.encode_connect(device_name, username=PROVISION_USER, keep_alive=KEEP_ALIVE_S,
                                    protocol_level=LEVEL)

    def request(self, device_name: str) -> bytes:
        """SUBSCRIBE to the response topic and PUBLISH the request, in one write."""
        payload = self._prefix + json.dumps(device_name).encode() + self._suffix
        return _SUBSCRIBE + codec.encode_publish(REQUEST_TOPIC, payload, qos=1, packet_id=PUBLISH_ID,
                                                 protocol_level=LEVEL)


async def read_packet(reader: asyncio.StreamReader, waiting_for: str) -> codec.Packet:
    try:
        return await codec.read_packet(reader, max_packet_size=MAX_PACKET, protocol_level=LEVEL)
    except asyncio.IncompleteReadError:
        raise EOFError(f"server closed the connection before {waiting_for}") from None


def check_connack(packet: codec.Packet) -> None:
    if not isinstance(packet, codec.OtherPacket) or packet.packet_type != _CONNACK:
        raise ClientProtocolError(f"{_packet_name(packet)} instead of CONNACK")
    if len(packet.body) != 2:
        raise ClientProtocolError("malformed CONNACK")
    if packet.body[1] != 0:
        raise ClientProtocolError(f"CONNACK refused (return code {packet.body[1]})")


def _packet_name(packet: codec.Packet) -> str:
    if isinstance(packet, codec.OtherPacket):
        return packet.packet_type.name
    return type(packet).__name__.upper()


@dataclass(slots=True)
class Answer:
    payload: bytes
    latency_ms: float
    connack_ms: float
    puback_seen: bool


async def provision_once(host: str, port: int, connect: bytes, request: bytes) -> Answer:
    """One device's whole provisioning session on a new connection. Raises OSError, EOFError,
    codec.ProtocolError, ClientProtocolError (and TimeoutError/CancelledError from the caller's timeout)."""
    perf = time.perf_counter
    t0 = perf()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(connect)
        check_connack(await read_packet(reader, "CONNACK"))
        t_connack = perf()
        writer.write(request)
        puback_seen = False
        while True:
            packet = await read_packet(reader, "the response" if puback_seen else "PUBACK and the response")
            if isinstance(packet, codec.Publish):
                if packet.topic != RESPONSE_TOPIC:
                    raise ClientProtocolError(f"PUBLISH on {packet.topic!r} instead of {RESPONSE_TOPIC}")
                t_answer = perf()
                if packet.qos == 1 and packet.packet_id is not None:
                    writer.write(codec.encode_puback(packet.packet_id, protocol_level=LEVEL) + _DISCONNECT)
                else:
                    writer.write(_DISCONNECT)
                return Answer(packet.payload, (t_answer - t0) * 1000.0, (t_connack - t0) * 1000.0, puback_seen)
            if isinstance(packet, codec.PubAck):
                if packet.packet_id != PUBLISH_ID:
                    raise ClientProtocolError(f"PUBACK for unknown packet id {packet.packet_id}")
                puback_seen = True
            elif isinstance(packet, codec.OtherPacket) and packet.packet_type == _SUBACK:
                body = packet.body
                if len(body) != 3 or body[:2] != SUBSCRIBE_ID.to_bytes(2, "big"):
                    raise ClientProtocolError("malformed SUBACK")
                if body[2] > 1:
                    raise ClientProtocolError(f"SUBACK refused {RESPONSE_TOPIC} (code 0x{body[2]:02x})")
            elif isinstance(packet, codec.OtherPacket) and packet.packet_type == _PINGRESP:
                continue
            else:
                raise ClientProtocolError(f"unexpected {_packet_name(packet)} before the response")
    finally:
        writer.close()  # flushes PUBACK + DISCONNECT first


def classify(payload: bytes) -> str:
    """SUCCESS, another provisioning status (NOT_FOUND, FAILURE...), or a description."""
    if _SUCCESS_MARK in payload:
        return SUCCESS
    try:
        value = json.loads(payload).get("status")
    except (ValueError, AttributeError):
        return "response without JSON status"
    return str(value) if isinstance(value, str) and value else "response without JSON status"


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, BrokenPipeError):
        return "broken pipe"
    if isinstance(exc, EOFError):
        return str(exc) or "server closed the connection"
    if isinstance(exc, (codec.ProtocolError, ClientProtocolError)):
        return str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


# --------------------------------------------------------------------------------------------
# phases


@dataclass
class Phase:
    """What one phase (warm-up or measured) saw."""

    outcomes: Counter = field(default_factory=Counter)  # responses, by provisioning status
    protocol_errors: Counter = field(default_factory=Counter)
    connection_errors: Counter = field(default_factory=Counter)
    timeouts: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    success_latencies_ms: list[float] = field(default_factory=list)
    connack_ms: list[float] = field(default_factory=list)
    no_puback: int = 0
    attempted: int = 0
    elapsed_s: float = 0.0
    cpu_user_s: float = 0.0
    cpu_sys_s: float = 0.0


async def _attempt(host: str, port: int, name: str, factory: RequestFactory, timeout: float, deadline: float,
                   phase: Phase, due: float | None = None) -> bool:
    """Provision device ``name`` on a new connection and record what happened in ``phase`` (latency from
    ``due`` when given, the open loop's time the request was due); False on a connection error."""
    loop = asyncio.get_running_loop()
    connect, request = factory.connect(name), factory.request(name)
    phase.attempted += 1
    waited_ms = 0.0 if due is None else (time.perf_counter() - due) * 1000.0
    try:
        async with asyncio.timeout_at(min(loop.time() + timeout, deadline)):
            answer = await provision_once(host, port, connect, request)
    except TimeoutError:
        phase.timeouts["stopped by --max-seconds" if loop.time() >= deadline else "timeout"] += 1
        return True
    except (codec.ProtocolError, ClientProtocolError) as exc:
        phase.protocol_errors[_error_name(exc)] += 1
        return True
    except (OSError, EOFError) as exc:
        phase.connection_errors[_error_name(exc)] += 1
        return False
    outcome = classify(answer.payload)
    phase.outcomes[outcome] += 1
    phase.latencies_ms.append(answer.latency_ms + waited_ms)
    phase.connack_ms.append(answer.connack_ms)
    if not answer.puback_seen:
        phase.no_puback += 1
    if outcome == SUCCESS:
        phase.success_latencies_ms.append(answer.latency_ms + waited_ms)
    return True


async def run_phase(host: str, port: int, workers: int, count: int, make_name, factory: RequestFactory,
                    timeout: float, deadline: float, phase: Phase) -> None:
    """Provision ``count`` devices with ``workers`` concurrent sessions until done or ``deadline``."""
    loop = asyncio.get_running_loop()
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        failures_in_a_row = 0
        while next_index < count and loop.time() < deadline:
            i = next_index
            next_index += 1
            if await _attempt(host, port, make_name(i), factory, timeout, deadline, phase):
                failures_in_a_row = 0
            else:
                failures_in_a_row += 1
                # a refused/reset server would otherwise burn through every request in a moment
                await asyncio.sleep(min(0.05 * failures_in_a_row, 1.0))

    await timed(phase, asyncio.gather(*(worker() for _ in range(workers))))


async def run_open_loop(host: str, port: int, workers: int, count: int, rate: float, make_name,
                        factory: RequestFactory, timeout: float, deadline: float, phase: Phase) -> None:
    """:func:`_common.open_loop`: device ``i``'s session starts when due, or when one of the ``workers`` session
    slots frees up if all are busy (that wait counts in its latency)."""
    slots = asyncio.Semaphore(workers)

    async def one(i: int, due: float) -> None:
        async with slots:
            await _attempt(host, port, make_name(i), factory, timeout, deadline, phase, due)

    await timed(phase, open_loop(count, rate, deadline, one))


@dataclass
class Held:
    """The --hold connections: opened before the run, checked with PINGREQ after it."""

    requested: int = 0
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)
    open_errors: Counter = field(default_factory=Counter)
    open_s: float = 0.0
    alive_at_end: int = 0
    check_errors: Counter = field(default_factory=Counter)

    def close_all(self) -> None:
        for _, writer in self.conns:
            try:
                writer.write(_DISCONNECT)
                writer.close()
            except Exception:  # noqa: BLE001 - closing a broken transport must not raise
                pass


async def open_held(host: str, port: int, held: Held, run_id: str, timeout: float, deadline: float) -> None:
    """Open ``held.requested`` idle provisioning connections (CONNECT + CONNACK), HOLD_PARALLEL at a time."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(HOLD_PARALLEL)

    async def one(i: int) -> None:
        async with gate:
            if loop.time() >= deadline:
                held.open_errors["stopped by --max-seconds"] += 1
                return
            writer = None
            try:
                async with asyncio.timeout_at(min(loop.time() + timeout, deadline)):
                    reader, writer = await asyncio.open_connection(host, port)
                    writer.write(client_codec.encode_connect(f"bench-{run_id}-hold{i}", username=PROVISION_USER,
                                                      keep_alive=HOLD_KEEP_ALIVE_S, protocol_level=LEVEL))
                    check_connack(await read_packet(reader, "CONNACK"))
            except TimeoutError:
                held.open_errors["timeout"] += 1
            except (OSError, EOFError, codec.ProtocolError, ClientProtocolError) as exc:
                held.open_errors[_error_name(exc)] += 1
            else:
                held.conns.append((reader, writer))
                return
            if writer is not None:
                writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(held.requested)))
    held.open_s = time.perf_counter() - t0


async def check_held(held: Held, timeout: float) -> None:
    """PINGREQ on every held connection; count those that answer PINGRESP within ``timeout``."""

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(timeout):
                if writer.is_closing():
                    raise EOFError("connection already closed")
                writer.write(_PINGREQ)
                while True:
                    packet = await read_packet(reader, "PINGRESP")
                    if isinstance(packet, codec.OtherPacket) and packet.packet_type == _PINGRESP:
                        held.alive_at_end += 1
                        return
                    raise ClientProtocolError(f"{_packet_name(packet)} instead of PINGRESP")
        except TimeoutError:
            held.check_errors["no PINGRESP in time"] += 1
        except (OSError, EOFError, RuntimeError, codec.ProtocolError, ClientProtocolError) as exc:
            held.check_errors[_error_name(exc)] += 1

    await asyncio.gather(*(one(r, w) for r, w in held.conns))


async def probe(host: str, port: int, timeout: float) -> None:
    """One CONNECT/CONNACK/DISCONNECT, so that an unreachable gateway fails before a profile is created."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(client_codec.encode_connect("bench-probe", username=PROVISION_USER, protocol_level=LEVEL))
            check_connack(await read_packet(reader, "CONNACK"))
            writer.write(_DISCONNECT)
    except TimeoutError:
        raise SetupError(f"no CONNACK from {host}:{port} within {timeout:g} s") from None
    except (OSError, EOFError, codec.ProtocolError, ClientProtocolError) as exc:
        raise SetupError(f"cannot provision over MQTT at {host}:{port}: {_error_name(exc)}") from None
    finally:
        if writer is not None:
            writer.close()


# --------------------------------------------------------------------------------------------
# the run


def raise_fd_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; returns the (soft, hard) now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


async def bench(args: argparse.Namespace, run_id: str) -> tuple[dict, str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.max_seconds
    await probe(args.host, args.port, min(args.timeout, 10.0))

    # Blocking urllib call, made before any load: fine here.
    key, secret, profile_note = resolve_profile(args.key, args.secret, args.admin_url, args.admin_token, run_id)
    factory = RequestFactory(key, secret)

    held = Held(requested=args.hold)
    try:
        if args.hold:
            await open_held(args.host, args.port, held, run_id, args.timeout, deadline)
        workers = max(1, min(args.concurrency, max(args.requests, args.warmup)))
        warm = Phase()
        if args.warmup > 0 and loop.time() < deadline:
            await run_phase(args.host, args.port, workers, args.warmup, lambda i: f"bench-{run_id}-w{i}",
                            factory, args.timeout, deadline, warm)
        measured = Phase()
        if args.requests > 0 and loop.time() < deadline:
            if args.rate:
                await run_open_loop(args.host, args.port, workers, args.requests, args.rate,
                                    lambda i: f"bench-{run_id}-{i}", factory, args.timeout, deadline, measured)
            else:
                await run_phase(args.host, args.port, workers, args.requests, lambda i: f"bench-{run_id}-{i}",
                                factory, args.timeout, deadline, measured)
        if held.conns:
            await check_held(held, min(args.timeout, HOLD_CHECK_S))
    finally:
        held.close_all()
    await asyncio.sleep(0.05)  # let the transports flush their DISCONNECTs and close

    completed = sum(measured.outcomes.values())
    successes = measured.outcomes.get(SUCCESS, 0)
    elapsed = measured.elapsed_s
    cpu = measured.cpu_user_s + measured.cpu_sys_s
    protocol_errors = sum(measured.protocol_errors.values())
    connection_errors = sum(measured.connection_errors.values())
    timeouts = sum(measured.timeouts.values())
    result = {
        "target": f"mqtt://{args.host}:{args.port}",
        "offered_rate_per_s": args.rate,
        "topic": REQUEST_TOPIC,
        **run_summary(run_id=run_id, loop=loop, requested=args.requests, concurrency=workers,
                      warmup_requested=args.warmup, warm=warm, measured=measured),
        "connack_latency_ms": latency_summary(measured.connack_ms),
        "other_status": completed - successes,
        "protocol_errors": protocol_errors,
        "connection_errors": connection_errors,
        "timeouts": timeouts,
        "errors": {
            "protocol": dict(measured.protocol_errors.most_common()),
            "connection": dict(measured.connection_errors.most_common()),
            "timeout": dict(measured.timeouts.most_common()),
        },
        "responses_without_puback": measured.no_puback,
        "not_sent": max(0, args.requests - measured.attempted),
        "stopped_by_max_seconds": measured.attempted < args.requests or "stopped by --max-seconds" in measured.timeouts,
        "hold": {
            "requested": held.requested,
            "opened": len(held.conns),
            "open_errors": dict(held.open_errors.most_common()),
            "open_s": round(held.open_s, 3),
            "alive_at_end": held.alive_at_end,
            "check_errors": dict(held.check_errors.most_common()),
            "keep_alive_s": HOLD_KEEP_ALIVE_S,
        },
        "generator_cpu_s": round(cpu, 3),
        "generator_cpu_user_s": round(measured.cpu_user_s, 3),
        "generator_cpu_sys_s": round(measured.cpu_sys_s, 3),
        "generator_cpu_pct_of_one_core": round(100.0 * cpu / elapsed, 1) if elapsed > 0 else 0.0,
        "generator_cpu_us_per_request": round(1e6 * cpu / measured.attempted, 1) if measured.attempted else None,
        "cpu_count": os.cpu_count(),
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }
    return result, profile_note


def render_human(result: dict, profile_note: str) -> str:
    def lat(summary: dict) -> str:
        return (f"p50 {fmt_ms(summary['p50'])}  p95 {fmt_ms(summary['p95'])}  p99 {fmt_ms(summary['p99'])}"
                f"  max {fmt_ms(summary['max'])}")

    def counts(counter: dict) -> str:
        return "  ".join(f"{k} {v}" for k, v in counter.items())

    outcomes = counts(result["outcomes"]) or "none"
    errors = [f"{kind}: {counts(c)}" for kind, c in result["errors"].items() if c]
    warm = result["warmup"]
    hold = result["hold"]
    lines = [
        f"MQTT provisioning benchmark: {result['target']}, PUBLISH {result['topic']} QoS 1"
        f" (MQTT 3.1.1, {result['event_loop']})",
        f"  run {result['run']}; {profile_note}",
        f"  provisions    {result['attempted']} started of {result['requested']} by {result['concurrency']} workers,"
        f" a new connection each; warm-up {warm['attempted']} ({warm['success']} SUCCESS) not counted",
        *([f"  offered       {result['offered_rate_per_s']:g}/s open loop (latency from when each provision was"
           " due, waiting for a free session slot included)"] if result["offered_rate_per_s"] else []),
        f"  elapsed       {result['elapsed_s']:.2f} s" + ("   (stopped by --max-seconds)"
                                                        if result["stopped_by_max_seconds"] else ""),
        f"  provisions/s  {result['provisions_per_s']:.1f}   (SUCCESS answers per second;"
        f" all responses {result['responses_per_s']:.1f}/s)",
        f"  latency ms    {lat(result['latency_ms'])}   (SUCCESS answers, TCP connect to response)",
        f"                {lat(result['latency_all_responses_ms'])}   (every response)",
        f"                {lat(result['connack_latency_ms'])}   (TCP connect to CONNACK, every response)",
        f"  outcomes      {outcomes}",
        f"                SUCCESS {result['success']} / other status {result['other_status']}"
        f" / protocol errors {result['protocol_errors']} / connection errors {result['connection_errors']}"
        f" / timeouts {result['timeouts']}",
        f"  errors        {errors[0] if errors else 'none'}",
        *(f"                {line}" for line in errors[1:]),
    ]
    if hold["requested"]:
        line = (f"  held          {hold['opened']} of {hold['requested']} idle connections opened in"
                f" {hold['open_s']:.1f} s (keep-alive {hold['keep_alive_s']} s);"
                f" {hold['alive_at_end']} of {hold['opened']} still open at the end (PINGRESP)")
        lines.append(line)
        if hold["open_errors"]:
            lines.append(f"                not opened: {counts(hold['open_errors'])}")
        if hold["check_errors"]:
            lines.append(f"                lost: {counts(hold['check_errors'])}")
    else:
        lines.append("  held          none (--hold 0)")
    lines.append(
        f"  generator CPU {result['generator_cpu_s']:.2f} s (user {result['generator_cpu_user_s']:.2f}"
        f" + sys {result['generator_cpu_sys_s']:.2f}) = {result['generator_cpu_pct_of_one_core']:.0f}% of one core,"
        f" {result['generator_cpu_us_per_request'] or 0:.0f} us/provision; this machine has {result['cpu_count']}"
        " cores shared with the server")
    if result["responses_without_puback"]:
        lines.append(f"  note          {result['responses_without_puback']} responses came before the PUBACK"
                     " of their request (or without one)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Provision N devices over MQTT at a given concurrency and report throughput and latency.")
    p.add_argument("--host", default="127.0.0.1", help="MQTT gateway host (default %(default)s)")
    p.add_argument("--port", type=int, default=1883, help="MQTT gateway plain-TCP port (default %(default)s)")
    p.add_argument("--hold", type=int, default=0,
                   help="idle MQTT connections opened before the run and kept open during it (default %(default)s)")
    add_run_arguments(p, concurrency_help="concurrent provisioning sessions, a new connection per provision",
                      unit="provisions",
                      max_seconds_help="hard cap on the run, opening held connections and warm-up included",
                      timeout_help="per-provision timeout in seconds, TCP connect to response")
    add_rate_argument(p, concurrency_is="sessions")
    args = p.parse_args(argv)
    if args.hold < 0:
        p.error("--hold must not be negative")
    check_run_arguments(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_id = secrets.token_hex(4)
    soft, hard = raise_fd_limit()
    try:
        needed = args.hold + min(args.concurrency, max(args.requests, args.warmup, 1)) + FD_MARGIN
        if soft != resource.RLIM_INFINITY and needed > soft:
            raise SetupError(f"--hold {args.hold} with -c {args.concurrency} needs about {needed} file descriptors;"
                             f" this process may open {soft} (hard limit {hard}): raise `ulimit -n` or lower --hold")
        result, profile_note = pick_runner(args.no_uvloop)(bench(args, run_id))
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

    return report(result, render_human(result, profile_note), args.json, args.requests)


if __name__ == "__main__":
    sys.exit(main())
