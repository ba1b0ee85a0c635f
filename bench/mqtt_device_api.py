#!/usr/bin/env python3
"""MQTT device API load: many connected devices on one MQTT gateway, their telemetry/attribute throughput,
and server-side RPC round trips through the admin API. Prints numbers; asserts nothing.

    python bench/mqtt_device_api.py --host 127.0.0.1 --port 1883 --admin-url http://127.0.0.1:8081 \\
        --devices 10000 --duration 30 [--attributes-every 5] [--rpc 2000] [--rpc-concurrency 32] \\
        [--tokens-file .local/bench-devices.jsonl] [--json]

Phases (each one timed):

1. **devices**: ``--devices`` devices are provisioned over MQTT (a fresh profile ``bench-<run>`` made
   through the admin API), or read back from ``--tokens-file`` when it holds enough of them (a run
   writes the devices it provisioned there, so the next run skips this phase).
2. **connect**: every device opens its own session, as ThingsBoard's SDK does: CONNECT with its token,
   SUBSCRIBE to the SDK's four filters at QoS 1, SUBACK. The sessions stay open to the end.
3. **idle RPC**: ``--rpc`` server-side RPCs, ``--rpc-concurrency`` at a time, each to a random connected
   device, through ``POST /api/devices/{id}/rpc`` (two-way); every device answers at once on
   ``v1/devices/me/rpc/response/{id}``. Round trip = the admin API call's wall time.
4. **load**: for ``--duration`` seconds (after ``--warmup``) ``--inflight`` QoS 1 messages are in flight at
   all times, each published by a device picked at random among those not waiting for a PUBACK (so no
   device comes near its rate limit): telemetry, and every ``--attributes-every``-th one client
   attributes (stored by device_api in Postgres). Throughput = PUBACKs per second; meanwhile the same
   RPC round trips run again, to devices that are busy publishing.

One process, one asyncio loop (uvloop when importable), the project's own MQTT packet code
(``provisioning_common.mqtt_packets`` / ``.mqtt_client_packets``), standard library otherwise; the
descriptor limit is raised to its hard value (10,000 devices need about 10,100 descriptors here, and as
many in the gateway: run it with MQTT_MAX_CONNECTIONS above --devices).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import SetupError, cpu_times, create_profile, find_admin_token, fmt_ms, latency_summary, pick_runner
from mqtt_provision import RequestFactory, classify, provision_once
from provisioning_common import mqtt_client_packets as client_codec
from provisioning_common import mqtt_packets as codec

LEVEL = 4  # MQTT 3.1.1
KEEP_ALIVE_S = 300
MAX_PACKET = 1 << 20
FD_MARGIN = 128
SDK_FILTERS = ["v1/devices/me/attributes", "v1/devices/me/attributes/response/+", "v1/devices/me/rpc/request/+",
               "v1/devices/me/rpc/response/+"]
TELEMETRY = "v1/devices/me/telemetry"
ATTRIBUTES = "v1/devices/me/attributes"
RPC_REQUEST = "v1/devices/me/rpc/request/"
RPC_RESPONSE = "v1/devices/me/rpc/response/"
_SUBSCRIBE = client_codec.encode_subscribe(1, [(f, 1) for f in SDK_FILTERS], protocol_level=LEVEL)
_DISCONNECT = client_codec.encode_disconnect_client()


@dataclass
class Device:
    name: str
    token: str
    id: str = ""


# --- one connected device ----------------------------------------------------------------------------


class Session:
    """A device's MQTT session: a reader task acknowledges what the gateway sends and answers its RPCs."""

    def __init__(self, device: Device, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.device = device
        self.reader, self.writer = reader, writer
        #: Our QoS 1 publishes awaiting a PUBACK (None: an RPC answer nobody waits for).
        self.acks: dict[int, asyncio.Future[int] | None] = {}
        self.next_id = 1  # 1 was the SUBSCRIBE
        self.rpcs_answered = 0
        self.closed = False
        self.task: asyncio.Task[None] | None = None

    def packet_id(self) -> int:
        while True:
            self.next_id = self.next_id % 0xFFFF + 1
            if self.next_id not in self.acks:
                return self.next_id

    async def publish(self, topic: str, payload: bytes) -> int:
        """QoS 1 PUBLISH; returns once the PUBACK came (its reason code)."""
        pid = self.packet_id()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.acks[pid] = future
        self.writer.write(codec.encode_publish(topic, payload, qos=1, packet_id=pid, protocol_level=LEVEL))
        return await future

    async def run(self) -> None:
        try:
            while True:
                packet = await codec.read_packet(self.reader, max_packet_size=MAX_PACKET, protocol_level=LEVEL)
                if isinstance(packet, codec.PubAck):
                    future = self.acks.pop(packet.packet_id, None)
                    if future is not None and not future.done():
                        future.set_result(packet.reason_code)
                elif isinstance(packet, codec.Publish):
                    if packet.qos == 1 and packet.packet_id is not None:
                        self.writer.write(codec.encode_puback(packet.packet_id, protocol_level=LEVEL))
                    if packet.topic.startswith(RPC_REQUEST):
                        # The firmware answers at once; its PUBACK is awaited by nobody.
                        pid = self.packet_id()
                        self.acks[pid] = None
                        answer = b'{"ok":true,"echo":' + packet.payload + b"}"
                        self.writer.write(codec.encode_publish(RPC_RESPONSE + packet.topic[len(RPC_REQUEST):], answer,
                                                               qos=1, packet_id=pid, protocol_level=LEVEL))
                        self.rpcs_answered += 1
        except (asyncio.IncompleteReadError, ConnectionError, codec.ProtocolError, OSError):
            pass
        finally:
            self.closed = True
            for future in self.acks.values():
                if future is not None and not future.done():
                    future.set_exception(ConnectionError("session closed"))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(_DISCONNECT)
            self.writer.close()
        if self.task is not None:
            self.task.cancel()


async def open_session(host: str, port: int, device: Device, timeout: float) -> Session:
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(client_codec.encode_connect(device.name, username=device.token, keep_alive=KEEP_ALIVE_S,
                                                     protocol_level=LEVEL) + _SUBSCRIBE)
            connack = await codec.read_packet(reader, max_packet_size=MAX_PACKET, protocol_level=LEVEL)
            if not (isinstance(connack, codec.OtherPacket) and connack.packet_type == codec.PacketType.CONNACK
                    and connack.body[-1:] == b"\x00"):
                raise ConnectionError(f"not accepted: {connack!r}")
            suback = await codec.read_packet(reader, max_packet_size=MAX_PACKET, protocol_level=LEVEL)
            if not (isinstance(suback, codec.OtherPacket) and suback.packet_type == codec.PacketType.SUBACK
                    and suback.body[2:] == b"\x01\x01\x01\x01"):
                raise ConnectionError(f"subscriptions not granted: {suback!r}")
        except BaseException:
            writer.close()
            raise
    session = Session(device, reader, writer)
    session.task = asyncio.create_task(session.run())
    return session


# --- phases ----------------------------------------------------------------------------------------------


def admin_get(admin_url: str, token: str, path: str) -> Any:
    request = urllib.request.Request(admin_url.rstrip("/") + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


async def provision_devices(args: argparse.Namespace, run_id: str, admin_token: str) -> tuple[list[Device], dict]:
    """``--devices`` fresh devices over MQTT provisioning (64 at a time), with their ids from the admin API."""
    profile_id, key, secret = create_profile(args.admin_url, admin_token, f"bench-{run_id}")
    factory = RequestFactory(key, secret)
    devices: list[Device] = []
    failures: Counter[str] = Counter()
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < args.devices:
            i = next_index
            next_index += 1
            name = f"bench-{run_id}-{i:05d}"
            try:
                answer = await asyncio.wait_for(
                    provision_once(args.host, args.port, factory.connect(name), factory.request(name)), 30)
            except (OSError, EOFError, TimeoutError, codec.ProtocolError) as exc:
                failures[type(exc).__name__] += 1
                continue
            if classify(answer.payload) != "SUCCESS":
                failures[classify(answer.payload)] += 1
                continue
            devices.append(Device(name, json.loads(answer.payload)["credentialsValue"]))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(64)))
    elapsed = time.perf_counter() - started
    ids: dict[str, str] = {}
    page = 0
    while True:
        listing = await asyncio.to_thread(admin_get, args.admin_url, admin_token,
                                          f"/api/devices?deviceProfileId={profile_id}&pageSize=1000&page={page}")
        ids.update({d["name"]: d["id"] for d in listing["data"]})
        if not listing.get("hasNext"):
            break
        page += 1
    for device in devices:
        device.id = ids.get(device.name, "")
    return [d for d in devices if d.id], {"provisioned": len(devices), "seconds": round(elapsed, 1),
                                          "per_s": round(len(devices) / elapsed, 1) if elapsed else 0.0,
                                          "failures": dict(failures)}


async def connect_all(args: argparse.Namespace, devices: list[Device]) -> tuple[list[Session], dict]:
    gate = asyncio.Semaphore(args.connect_parallel)
    sessions: list[Session] = []
    failures: Counter[str] = Counter()
    latencies: list[float] = []

    async def one(device: Device) -> None:
        async with gate:
            started = time.perf_counter()
            try:
                sessions.append(await open_session(args.host, args.port, device, 30))
            except (OSError, EOFError, TimeoutError, codec.ProtocolError, asyncio.IncompleteReadError) as exc:
                failures[str(exc)[:80] or type(exc).__name__] += 1
                return
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(one(d) for d in devices))
    elapsed = time.perf_counter() - started
    return sessions, {"connected": len(sessions), "seconds": round(elapsed, 1),
                      "per_s": round(len(sessions) / elapsed, 1) if elapsed else 0.0,
                      "connect_ms": latency_summary(latencies), "failures": dict(failures)}


class AdminHttp:
    """A minimal keep-alive HTTP/1.1 client for POST /api/devices/{id}/rpc (one request at a time)."""

    def __init__(self, url: str, token: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.token = token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {self.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and "close" in value.lower():
                close = True
        data = await self.reader.readexactly(length)
        if close:
            self.writer.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def rpc_round_trips(args: argparse.Namespace, admin_token: str, sessions: list[Session], count: int,
                          stop: asyncio.Event | None = None, concurrency: int | None = None) -> dict:
    """``count`` two-way RPCs through the admin API (or until ``stop``), ``concurrency`` at a time."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    remaining = count
    rng = random.Random(7)

    async def worker() -> None:
        nonlocal remaining
        http = AdminHttp(args.admin_url, admin_token)
        try:
            while remaining > 0 and not (stop is not None and stop.is_set()):
                remaining -= 1
                session = rng.choice(sessions)
                body = json.dumps({"method": "benchPing", "params": {"t": time.time()}, "timeout": 10_000}).encode()
                started = time.perf_counter()
                try:
                    status, _ = await http.post(f"/api/devices/{session.device.id}/rpc", body)
                except (OSError, EOFError, ValueError, IndexError, asyncio.IncompleteReadError):
                    statuses[0] += 1
                    http.close()
                    http = AdminHttp(args.admin_url, admin_token)
                    continue
                statuses[status] += 1
                if status == 200:
                    latencies.append((time.perf_counter() - started) * 1000)
        finally:
            http.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency or args.rpc_concurrency)))
    elapsed = time.perf_counter() - started
    return {"calls": sum(statuses.values()), "statuses": {str(k): v for k, v in statuses.items()},
            "seconds": round(elapsed, 1), "per_s": round(len(latencies) / elapsed, 1) if elapsed else 0.0,
            "round_trip_ms": latency_summary(latencies)}


@dataclass
class Load:
    telemetry: int = 0
    attributes: int = 0
    refused: Counter[int] = field(default_factory=Counter)
    lost_sessions: int = 0
    latencies: list[float] = field(default_factory=list)


async def sustained_load(args: argparse.Namespace, sessions: list[Session], stop: asyncio.Event, load: Load) -> None:
    """``--inflight`` messages in flight at all times, each from a device picked at random among those not
    waiting for a PUBACK (so every device stays far below its rate limit): the gateway's sustained rate."""
    idle = list(range(len(sessions)))
    rng = random.Random(11)
    seq = 0
    telemetry_prefix = b'{"temperature":21.5,"humidity":40,"seq":'

    async def worker() -> None:
        nonlocal seq
        while not stop.is_set() and idle:
            index = idle.pop(rng.randrange(len(idle)))
            session = sessions[index]
            seq += 1
            is_attributes = args.attributes_every > 0 and seq % args.attributes_every == 0
            started = time.perf_counter()
            try:
                if is_attributes:
                    code = await session.publish(ATTRIBUTES, b'{"fw":"1.%d","uptime":%d}' % (seq % 10, seq))
                else:
                    code = await session.publish(TELEMETRY, telemetry_prefix + str(seq).encode() + b"}")
            except ConnectionError:
                load.lost_sessions += 1
                continue  # that device is gone: not put back
            load.latencies.append((time.perf_counter() - started) * 1000)
            if code:
                load.refused[code] += 1
            elif is_attributes:
                load.attributes += 1
            else:
                load.telemetry += 1
            idle.append(index)

    await asyncio.gather(*(worker() for _ in range(args.inflight)))


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def load_tokens(path: Path | None, count: int) -> list[Device]:
    if path is None or not path.exists():
        return []
    devices = [Device(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    return devices[:count] if len(devices) >= count else []


async def bench(args: argparse.Namespace, run_id: str) -> dict:
    admin_token = find_admin_token(args.admin_token)
    if not admin_token:
        raise SetupError("no admin token: pass --admin-token or set ADMIN_API_TOKEN")
    result: dict[str, Any] = {"target": f"mqtt://{args.host}:{args.port}", "run": run_id,
                              "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
                              "devices_requested": args.devices, "cpu_count": os.cpu_count(),
                              "rpc_concurrency": args.rpc_concurrency}
    tokens_file = Path(args.tokens_file) if args.tokens_file else None
    devices = load_tokens(tokens_file, args.devices)
    if devices:
        result["devices"] = {"from_tokens_file": len(devices)}
    else:
        devices, result["devices"] = await provision_devices(args, run_id, admin_token)
        if tokens_file is not None:
            tokens_file.parent.mkdir(parents=True, exist_ok=True)
            tokens_file.write_text("".join(json.dumps(d.__dict__) + "\n" for d in devices))
    print(f"devices: {result['devices']}", file=sys.stderr, flush=True)

    sessions, result["connect"] = await connect_all(args, devices)
    print(f"connect: {result['connect']}", file=sys.stderr, flush=True)
    if not sessions:
        raise SetupError("no device could connect")
    try:
        result["rpc_serial"] = await rpc_round_trips(args, admin_token, sessions, args.rpc_serial, concurrency=1)
        print(f"rpc one at a time: {result['rpc_serial']}", file=sys.stderr, flush=True)
        result["rpc_idle"] = await rpc_round_trips(args, admin_token, sessions, args.rpc)
        print(f"rpc idle: {result['rpc_idle']}", file=sys.stderr, flush=True)

        stop = asyncio.Event()
        load = Load()
        user0, sys0 = cpu_times()
        started = time.perf_counter()
        load_task = asyncio.create_task(sustained_load(args, sessions, stop, load))
        await asyncio.sleep(args.warmup)
        base_t, base_a = load.telemetry, load.attributes
        load.latencies.clear()
        measured_from = time.perf_counter()
        rpc_task = asyncio.create_task(rpc_round_trips(args, admin_token, sessions, args.rpc, stop))
        await asyncio.sleep(args.duration)
        window = time.perf_counter() - measured_from
        telemetry, attributes = load.telemetry - base_t, load.attributes - base_a
        latencies = list(load.latencies)
        stop.set()
        result["rpc_under_load"] = await rpc_task
        # Devices finish the message they are waiting on; whatever is still unacknowledged after 10 s is
        # abandoned (an overloaded gateway may hold a long backlog).
        done, _ = await asyncio.wait([load_task], timeout=10)
        if not done:
            load_task.cancel()
            await asyncio.gather(load_task, return_exceptions=True)
        user1, sys1 = cpu_times()
        alive = sum(1 for s in sessions if not s.closed)
        result["load"] = {
            "seconds": round(window, 1), "warmup_s": args.warmup, "inflight": args.inflight,
            "telemetry_per_s": round(telemetry / window, 1), "attributes_per_s": round(attributes / window, 1),
            "messages_per_s": round((telemetry + attributes) / window, 1),
            "telemetry": telemetry, "attributes": attributes,
            "refused": {f"0x{k:02x}": v for k, v in load.refused.items()},
            "publish_to_puback_ms": latency_summary(latencies),
            "sessions_lost": load.lost_sessions, "sessions_alive_at_end": alive,
            "generator_cpu_s": round((user1 - user0) + (sys1 - sys0), 1),
            "wall_s": round(time.perf_counter() - started, 1),
        }
        result["rpcs_answered_by_devices"] = sum(s.rpcs_answered for s in sessions)
    finally:
        for session in sessions:
            session.close()
        await asyncio.sleep(0.2)
    return result


def render(result: dict) -> str:
    def lat(summary: dict) -> str:
        return (f"p50 {fmt_ms(summary['p50'])}  p95 {fmt_ms(summary['p95'])}  p99 {fmt_ms(summary['p99'])}"
                f"  max {fmt_ms(summary['max'])} ms")

    load, connect = result["load"], result["connect"]
    devices = result["devices"]
    made = (f"{devices['from_tokens_file']} from --tokens-file" if "from_tokens_file" in devices else
            f"{devices['provisioned']} provisioned over MQTT in {devices['seconds']} s ({devices['per_s']}/s)")
    return "\n".join([
        f"MQTT device API benchmark: {result['target']} ({result['event_loop']}, {result['cpu_count']} cores shared"
        " with the whole stack)",
        f"  devices          {made}",
        f"  connected        {connect['connected']} sessions in {connect['seconds']} s ({connect['per_s']}/s),"
        f" CONNECT+SUBSCRIBE {lat(connect['connect_ms'])}" + (f"; failed {connect['failures']}"
                                                              if connect["failures"] else ""),
        f"  RPC, one by one  {result['rpc_serial']['calls']} calls: round trip"
        f" {lat(result['rpc_serial']['round_trip_ms'])}  (statuses {result['rpc_serial']['statuses']})",
        f"  RPC, idle        {result['rpc_idle']['calls']} calls, {result['rpc_concurrency']} at a time: round trip"
        f" {lat(result['rpc_idle']['round_trip_ms'])}  ({result['rpc_idle']['per_s']}/s;"
        f" statuses {result['rpc_idle']['statuses']})",
        f"  load             {load['messages_per_s']} messages/s for {load['seconds']} s"
        f" ({load['inflight']} in flight): telemetry"
        f" {load['telemetry_per_s']}/s + attributes {load['attributes_per_s']}/s (QoS 1, PUBACKed)",
        f"                   publish->PUBACK {lat(load['publish_to_puback_ms'])}; refused {load['refused'] or 'none'};"
        f" sessions lost {load['sessions_lost']}, alive at the end {load['sessions_alive_at_end']}",
        f"  RPC, under load  {result['rpc_under_load']['calls']} calls, {result['rpc_concurrency']} at a time:"
        f" round trip"
        f" {lat(result['rpc_under_load']['round_trip_ms'])}  ({result['rpc_under_load']['per_s']}/s;"
        f" statuses {result['rpc_under_load']['statuses']})",
        f"  generator CPU    {load['generator_cpu_s']} s during the load phase ({load['wall_s']} s)",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883, help="MQTT gateway plain port (default %(default)s)")
    p.add_argument("--admin-url", default="http://127.0.0.1:8081")
    p.add_argument("--admin-token", default=None, help="default: $ADMIN_API_TOKEN, else .local/stack.env")
    p.add_argument("--devices", type=int, default=10_000, help="connected devices (default %(default)s)")
    p.add_argument("--tokens-file", default=None, help="JSON lines of devices to reuse / to write")
    p.add_argument("--connect-parallel", type=int, default=256, help="sessions being opened at once")
    p.add_argument("--duration", type=float, default=30.0, help="measured load seconds (default %(default)s)")
    p.add_argument("--warmup", type=float, default=5.0, help="load seconds before measuring (default %(default)s)")
    p.add_argument("--attributes-every", type=int, default=5,
                   help="every n-th message of a device is client attributes, the others telemetry (0: none)")
    p.add_argument("--inflight", type=int, default=256,
                   help="messages in flight in the load phase, each from a random idle device (default %(default)s)")
    p.add_argument("--rpc", type=int, default=2000, help="RPC round trips per RPC phase (default %(default)s)")
    p.add_argument("--rpc-serial", type=int, default=300,
                   help="RPC round trips one at a time before the others: latency without queueing")
    p.add_argument("--rpc-concurrency", type=int, default=32)
    p.add_argument("--json", action="store_true", help="one JSON line on stdout (the summary goes to stderr)")
    p.add_argument("--no-uvloop", action="store_true")
    args = p.parse_args(argv)
    soft = raise_fd_limit()
    if soft != resource.RLIM_INFINITY and args.devices + FD_MARGIN > soft:
        print(f"error: {args.devices} devices need about {args.devices + FD_MARGIN} descriptors; the limit is {soft}",
              file=sys.stderr)
        return 2
    try:
        result = pick_runner(args.no_uvloop)(bench(args, secrets.token_hex(4)))
    except (SetupError, urllib.error.URLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    human = render(result)
    if args.json:
        print(human, file=sys.stderr)
        print(json.dumps(result, separators=(",", ":")))
    else:
        print(human)
    return 0


if __name__ == "__main__":
    sys.exit(main())
