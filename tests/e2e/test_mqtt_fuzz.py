"""Fuzzing MQTT provisioning against the real services (issue 10): tens of thousands of hostile inputs.

Three phases, all seeded (``FUZZ_SEED``, printed on failure) so that a failure can be replayed; their sizes
are ``FUZZ_MQTT_PAYLOADS`` / ``FUZZ_MQTT_RAW`` / ``FUZZ_MQTT_TELEMETRY`` (12,000 / 12,000 / 3,000):

* **payloads**: provision requests published to ``/provision/request`` on provisioning sessions (MQTT 3.1,
  3.1.1 and 5, QoS 0 and 1) - ThingsBoard and Innoway JSON with odd types, huge strings, NUL and control
  characters, lone surrogates, invalid UTF-8, deep nesting, byte-level mutations, and protobuf
  ``ProvisionDeviceRequestMsg`` built odd or mutated, or plain garbage. Half of them carry a real profile's
  key and secret, so that they get past the secret check into device creation.
* **raw packets**: valid packet sequences (built with the codec's client-side encoders) mutated, truncated,
  spliced or replaced by random bytes, sent to the listener on their own connection, then half-closed.
* **telemetry**: devices provisioned first publish odd JSON, deep nesting and all of the above to
  ``v1/devices/me/telemetry`` (this found a RecursionError traceback per deeply nested message).

Asserted: no answer is "Provisioning timed out" (what a 5xx is on MQTT here; on protobuf sessions, where a
time-out renders as a bare FAILURE, an answer that took PROVISION_TIMEOUT_S is one), no request is left
without an answer or a close, no "Traceback" in any service's output, no service died, and a normal
device provisions and connects afterwards. Each connection comes from its own 127.x.y.z address so that
the per-source failure limit does not turn the fuzz into a test of that limit alone.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import string
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from devstack import Stack
from mqtt_gateway import codec
from provisioning_common import mqtt_client_packets as client_codec
from provisioning_common.proto import transport_pb2 as pb

from . import mqtt_clients as mc
from .conftest import Admin, Env

SERVICES = ["credentials", "provisioning_core", "admin_api", "mqtt_gateway"]
SEED = int(os.environ.get("FUZZ_SEED", "20261130"))
PAYLOADS = int(os.environ.get("FUZZ_MQTT_PAYLOADS", "12000"))
RAW_INPUTS = int(os.environ.get("FUZZ_MQTT_RAW", "12000"))
TELEMETRY = int(os.environ.get("FUZZ_MQTT_TELEMETRY", "3000"))
CONCURRENCY = 48
PROVISION_TIMEOUT_S = 5.0  # conftest's PROVISION_TIMEOUT_S
#: An answer or a close must come within this (the time-out answer itself comes at PROVISION_TIMEOUT_S).
HANG_S = PROVISION_TIMEOUT_S + 10
TIMED_OUT = b"Provisioning timed out"
MAX_PACKET = 65536  # MQTT_MAX_PACKET_BYTES default


@pytest.fixture(scope="module")
def stack(env: Env) -> Iterator[Stack]:
    """The pipeline without the HTTP and CoAP gateways (not under test)."""
    running = Stack(env.variables(MQTT_PACKET_TIMEOUT_S="5", MQTT_IDLE_TIMEOUT_S="10"), SERVICES).start(timeout=60)
    try:
        yield running
    finally:
        running.stop()


# --- generators ---------------------------------------------------------------------------------------------

_CONTROL = "".join(map(chr, range(0x20))) + "\x7f\x85\u2028\u2029\ufeff\ufffe"
_UNICODE = "äöü߀你好👍🏽\u0301\u202e\U0010fffd"


@dataclass
class Profiles:
    """Real (key, secret) pairs the fuzz may use, so that inputs reach the core's deeper paths."""

    pairs: list[tuple[str, str]]


class Generator:
    """Seeded random inputs; ``describe`` keeps what each input was, for failure messages."""

    def __init__(self, seed: int, profiles: Profiles) -> None:
        self.r = random.Random(seed)
        self.profiles = profiles

    # strings and values

    def text(self) -> str:
        r = self.r
        kind = r.randrange(12)
        if kind == 0:
            return ""
        if kind == 1:
            return "".join(r.choice(_CONTROL) for _ in range(r.randrange(1, 8)))
        if kind == 2:
            base = self.short()
            i = r.randrange(len(base) + 1)
            return base[:i] + "\x00" + base[i:]
        if kind == 3:  # long, incompressible (what breaks a btree index row)
            size = r.choice((256, 2000, 3000, 9000, 20000, 40000))
            return base64.b64encode(r.randbytes(size)).decode()[:size]
        if kind == 4:
            return r.choice(" \t\n\r") * r.randrange(1, 300)
        if kind == 5:
            return "".join(r.choice(_UNICODE) for _ in range(r.randrange(1, 40)))
        if kind == 6:
            return "\ud800" + self.short()  # a lone surrogate (json.dumps escapes it as \ud800)
        if kind == 7:
            return "%00%s'\"\\;--<script>${jndi:ldap://x}" + self.short()
        if kind == 8:
            return "provision"
        return self.short()

    def short(self) -> str:
        alphabet = string.ascii_letters + string.digits + "-_."
        return "".join(self.r.choice(alphabet) for _ in range(self.r.randrange(1, 20)))

    def value(self, depth: int = 0) -> Any:
        r = self.r
        kind = r.randrange(14)
        if kind < 6:
            return self.text()
        if kind == 6:
            return r.choice([0, -1, 1, 2**31, 2**63, 10**40, -(10**40)])
        if kind == 7:
            return r.choice([0.0, -0.0, 1.5, 1e308, 5e-324, 3.14])
        if kind == 8:
            return r.choice([True, False])
        if kind == 9:
            return None
        if kind == 10 and depth < 3:
            return [self.value(depth + 1) for _ in range(r.randrange(4))]
        if kind == 11 and depth < 3:
            return {self.text()[:40]: self.value(depth + 1) for _ in range(r.randrange(4))}
        return self.short()

    # JSON requests

    def key_and_secret(self) -> tuple[Any, Any]:
        r = self.r
        roll = r.random()
        if roll < 0.5:
            return r.choice(self.profiles.pairs)  # real: the request reaches device creation
        if roll < 0.7:
            return self.short(), self.short()
        return self.value(), self.value()

    def json_request(self) -> dict[str, Any]:
        r = self.r
        key, secret = self.key_and_secret()
        if r.random() < 0.75:
            obj: dict[str, Any] = {"provisionDeviceKey": key, "provisionDeviceSecret": secret}
            optional = ["deviceName", "credentialsType", "token", "clientId", "username", "password", "hash", "csr",
                        "gateway"]
            types = ["ACCESS_TOKEN", "MQTT_BASIC", "X509_CERTIFICATE", "X509_CERTIFICATE_CHAIN", "LWM2M_CREDENTIALS",
                     "access_token", ""]
        else:
            obj = {"provision_key": key, "provision_secret": secret}
            optional = ["device_name", "device_key"]
            types = []
        # Mostly sane requests with one odd field reach the core; wild ones test the edge's checks.
        wild = r.random() < 0.5
        chosen = r.sample(optional, r.randrange(len(optional) + 1))
        odd = set(chosen) if wild else {r.choice(chosen)} if chosen and r.random() < 0.7 else set()
        for name in chosen:
            if name == "credentialsType" and (name not in odd or r.random() < 0.5):
                obj[name] = r.choice(types)
            elif name == "gateway" and name not in odd:
                obj[name] = r.choice([True, False])
            elif name not in odd:
                obj[name] = r.choice([self.short(), f"fuzz-{uuid.UUID(int=r.getrandbits(128)).hex[:12]}",
                                      "".join(r.choice(_UNICODE) for _ in range(5))])
            else:
                obj[name] = self.value()
        if r.random() < 0.1:
            for _ in range(r.randrange(1, 5)):  # unknown fields
                obj[self.text()[:30]] = self.value()
        if r.random() < 0.05:
            obj.pop(r.choice(list(obj)))  # a required field missing
        return obj

    def json_payload(self) -> tuple[str, bytes]:
        r = self.r
        obj = self.json_request()
        raw = json.dumps(obj, ensure_ascii=r.random() < 0.5).encode("utf-8", "surrogatepass")
        kind = r.randrange(12)
        if kind < 7:
            return "json", raw
        if kind == 7:
            return "json+mutated", self.mutate(raw)
        if kind == 8:  # invalid UTF-8 inside a string
            bad = r.choice([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xe2\x82"])
            i = raw.find(b'": "') + 4 if b'": "' in raw else 1
            return "json+invalid-utf8", raw[:i] + bad + raw[i:]
        if kind == 9:
            return "json+wrapped", r.choice([
                b"\xef\xbb\xbf" + raw, raw + b"garbage", b"[" + raw + b"]", raw.replace(b":", b":NaN,", 1),
                b'{"provisionDeviceKey": Infinity}', raw + raw, b" \n\t" + raw + b"\n"])
        if kind == 10:
            depth = r.choice([100, 1000, 5000, 30000])
            return "json+deep", b'{"provisionDeviceKey": ' + b"[" * depth + b"]" * depth + b"}"
        return "json+duplicate-keys", raw[:-1] + b', "provisionDeviceKey": ' + json.dumps(self.value()).encode(
            "utf-8", "surrogatepass") + b"}"

    # protobuf requests

    def protobuf_payload(self) -> tuple[str, bytes]:
        r = self.r
        kind = r.randrange(6)
        if kind == 0:
            return "random-bytes", r.randbytes(r.choice([1, 2, 5, 40, 300, 5000]))
        key, secret = r.choice(self.profiles.pairs) if r.random() < 0.5 else (self.short(), self.short())

        def s() -> str:
            return self.text().encode("utf-8", "replace").decode("utf-8")  # protobuf strings must be valid UTF-8

        msg = pb.ProvisionDeviceRequestMsg(
            deviceName=s() if r.random() < 0.7 else f"pb-{r.getrandbits(48):x}",
            credentialsType=r.choice([0, 1, 2, 3]),
            provisionDeviceCredentialsMsg=pb.ProvisionDeviceCredentialsMsg(
                provisionDeviceKey=key if r.random() < 0.8 else s(), provisionDeviceSecret=secret),
            gateway=r.random() < 0.1,
        )
        which = r.randrange(4)
        if which == 1:
            msg.credentialsDataProto.validateDeviceTokenRequestMsg.token = s()
        elif which == 2:
            msg.credentialsDataProto.validateBasicMqttCredRequestMsg.clientId = s()
            msg.credentialsDataProto.validateBasicMqttCredRequestMsg.userName = s()
            msg.credentialsDataProto.validateBasicMqttCredRequestMsg.password = s()
        elif which == 3:
            msg.credentialsDataProto.validateDeviceX509CertRequestMsg.hash = s()
        raw = msg.SerializeToString()
        if kind == 1:
            return "protobuf+mutated", self.mutate(raw)
        if kind == 2:
            # Unknown enum value / invalid UTF-8 in a string / field of the wrong wire type.
            return "protobuf+wire", r.choice([
                b"\x10\x7f" + raw, raw + b"\x0a\x03\xff\xfe\xfd", b"\x0a\x02\xc0\x80" + raw, raw + b"\x1d\x00\x00",
                b"\x28" + b"\xff" * 10 + b"\x01" + raw, raw[: r.randrange(len(raw) + 1)]])
        return "protobuf", raw

    def payload(self) -> tuple[str, bytes]:
        return self.json_payload() if self.r.random() < 0.7 else self.protobuf_payload()

    def telemetry_payload(self) -> tuple[str, bytes]:
        """What a provisioned device might publish to ``v1/devices/me/telemetry``: JSON objects and arrays
        of odd values, deep nesting, and everything a provision request may be."""
        r = self.r
        kind = r.randrange(5)
        if kind == 0:
            obj = {self.text()[:50]: self.value() for _ in range(r.randrange(1, 6))}
            return "telemetry-json", json.dumps(obj, ensure_ascii=r.random() < 0.5).encode("utf-8", "surrogatepass")
        if kind == 1:
            items = [{"ts": self.value(), "values": {self.short(): self.value()}} for _ in range(r.randrange(4))]
            return "telemetry-array", json.dumps(items).encode("utf-8", "surrogatepass")
        if kind == 2:
            depth = r.choice([10, 1000, 5000, 30000])
            opener, closer = r.choice([(b"[", b"]"), (b'{"a":', b"}")])
            return "telemetry-deep", opener * depth + b"1" + closer * depth
        return self.payload()

    # bytes

    def mutate(self, data: bytes) -> bytes:
        r = self.r
        buf = bytearray(data)
        for _ in range(r.randrange(1, 6)):
            op = r.randrange(7)
            if not buf:
                buf += r.randbytes(r.randrange(1, 10))
                continue
            i = r.randrange(len(buf))
            if op == 0:
                buf[i] ^= 1 << r.randrange(8)
            elif op == 1:
                buf[i] = r.choice([0x00, 0xFF, 0x7F, 0x80, 0x22, 0x5C, 0x7B, 0x7D])
            elif op == 2:
                buf[i:i] = r.randbytes(r.randrange(1, 16))
            elif op == 3:
                del buf[i:i + r.randrange(1, 16)]
            elif op == 4:
                del buf[i:]
            elif op == 5:
                j = r.randrange(len(buf))
                buf[i:i] = buf[j:j + r.randrange(1, 32)]
            else:
                buf[i] = r.randrange(256)
        return bytes(buf)

    # raw packet sequences

    def packets(self, profile_request: bytes) -> tuple[str, bytes]:
        r = self.r
        level = r.choice([3, 4, 5])
        props = {0x11: r.randrange(1 << 32), 0x21: r.randrange(1, 65535)} if level == 5 and r.random() < 0.3 else None
        username = r.choice(["provision", "provision", None, self.short(), "x" * r.choice([1, 300, 65535])])
        try:
            connect = client_codec.encode_connect(
                r.choice(["", "provision", self.short()]), username=username,
                password=r.choice([None, b"", r.randbytes(r.randrange(1, 50))]),
                keep_alive=r.choice([0, 1, 60, 65535]), clean_session=r.random() < 0.9, protocol_level=level,
                will_topic=r.choice([None, None, "will/t", "/provision/request", "#"]), will_payload=r.randbytes(5),
                will_qos=r.choice([0, 1, 2, 3]), properties=props)
        except ValueError:
            connect = client_codec.encode_connect("c", username="provision", protocol_level=level)
        seq = [connect]
        for _ in range(r.randrange(5)):
            kind = r.randrange(8)
            if kind == 0:
                seq.append(client_codec.encode_subscribe(r.randrange(1, 65535), [(r.choice(
                    ["/provision/response", "#", "+/x", "", "/provision/response\x00"]), r.randrange(4))],
                    protocol_level=level))
            elif kind in (1, 2, 3):
                payload = profile_request if r.random() < 0.5 else self.payload()[1]
                qos = r.choice([0, 1, 1, 2])
                seq.append(codec.encode_publish(
                    r.choice(["/provision/request", "/provision/request", "v1/devices/me/telemetry", "a/+/b", ""]),
                    payload, qos=qos, packet_id=r.randrange(1, 65535) if qos else None, protocol_level=level))
            elif kind == 4:
                seq.append(client_codec.encode_pingreq())
            elif kind == 5:
                seq.append(client_codec.encode_unsubscribe(r.randrange(1, 65535), ["/provision/response"], level))
            elif kind == 6:
                seq.append(codec.encode_puback(r.randrange(1, 65535), protocol_level=level))
            else:
                seq.append(client_codec.encode_disconnect_client())
        data = b"".join(seq)
        how = r.randrange(8)
        if how == 0:
            return "valid", data
        if how in (1, 2, 3):
            return "mutated", self.mutate(data)
        if how == 4:
            return "truncated", data[: r.randrange(len(data))]
        if how == 5:
            return "random", r.randbytes(r.choice([1, 2, 3, 10, 100, 2000]))
        if how == 6:  # a header claiming far more than is sent, or a huge/invalid remaining length
            return "length", bytes([r.choice([0x10, 0x30, 0x32, 0x82, 0xC0])]) + r.choice(
                [b"\xff\xff\xff\x7f", b"\xff\xff\xff\xff\x01", b"\x80\x80\x80\x00", b"\x7f"]) + r.randbytes(20)
        return "spliced", connect + self.mutate(data[len(connect):])


# --- clients --------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    timed_out: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _source(r: random.Random) -> str:
    return f"127.{r.randrange(256)}.{r.randrange(256)}.{r.randrange(1, 255)}"


async def _provision_once(port: int, payload: bytes, *, level: int, qos: int, source: str) -> tuple[str, bytes, float]:
    """One provisioning session: (outcome, answer, seconds). Outcomes: "answer", "closed" (refused: a
    PUBACK error or a close, as ThingsBoard does), "hang" (neither within HANG_S)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(client_codec.encode_connect(f"fz-{uuid.uuid4().hex[:8]}", username="provision", keep_alive=0,
                                          protocol_level=level)
                     + client_codec.encode_subscribe(1, [("/provision/response", 1)], protocol_level=level)
                     + codec.encode_publish("/provision/request", payload, qos=qos, packet_id=2 if qos else None,
                                            protocol_level=level))
        try:
            async with asyncio.timeout(HANG_S):
                while True:
                    packet = await codec.read_packet(reader, max_packet_size=1 << 20, protocol_level=level)
                    if isinstance(packet, codec.Publish):
                        return "answer", packet.payload, time.monotonic() - started
        except (asyncio.IncompleteReadError, ConnectionError):
            return "closed", b"", time.monotonic() - started
        except TimeoutError:
            return "hang", b"", time.monotonic() - started
    finally:
        writer.close()


async def _telemetry_once(port: int, token: str, payload: bytes, *, level: int, qos: int,
                          source: str) -> str:
    """A provisioned device publishes telemetry: "accepted" (PUBACK / PINGRESP after it), "closed", "hang"."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(client_codec.encode_connect(f"dev-{uuid.uuid4().hex[:8]}", username=token, keep_alive=0,
                                          protocol_level=level)
                     + codec.encode_publish("v1/devices/me/telemetry", payload, qos=qos,
                                            packet_id=3 if qos else None, protocol_level=level)
                     + client_codec.encode_pingreq())
        try:
            async with asyncio.timeout(HANG_S):
                while True:
                    packet = await codec.read_packet(reader, max_packet_size=1 << 20, protocol_level=level)
                    if isinstance(packet, codec.PubAck):
                        return "refused" if packet.reason_code else "accepted"
                    if isinstance(packet, codec.OtherPacket) and packet.packet_type == codec.PacketType.PINGRESP:
                        return "accepted"
        except (asyncio.IncompleteReadError, ConnectionError):
            return "closed"
        except TimeoutError:
            return "hang"
    finally:
        writer.close()


async def _raw_once(port: int, data: bytes, *, source: str) -> tuple[str, bytes]:
    """Send ``data``, half-close, read until the server closes: ("closed" | "hang", what it sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    received = b""
    try:
        writer.write(data)
        try:
            await writer.drain()
            writer.write_eof()
        except (ConnectionError, OSError):
            pass  # the server already closed on an early error: fine
        try:
            async with asyncio.timeout(HANG_S):
                while chunk := await reader.read(65536):
                    received += chunk
        except ConnectionError:
            pass
        except TimeoutError:
            return "hang", received
        return "closed", received
    finally:
        writer.close()


async def _run_bounded(count: int, one: Callable[[int], Any]) -> None:
    limit = asyncio.Semaphore(CONCURRENCY)

    async def guarded(i: int) -> None:
        async with limit:
            await one(i)

    # Created in waves so that tens of thousands of pending coroutines never sit in memory at once.
    for start in range(0, count, 2000):
        await asyncio.gather(*(guarded(i) for i in range(start, min(count, start + 2000))))


def _timed_out_answer(answer: bytes, seconds: float) -> bool:
    # JSON sessions name it; a protobuf session's time-out is a bare FAILURE (08 03), seen by its delay.
    return TIMED_OUT in answer or seconds >= PROVISION_TIMEOUT_S


# --- the test ---------------------------------------------------------------------------------------------------


async def test_fuzz_mqtt_provisioning(env: Env, stack: Stack, admin: Admin) -> None:
    created = [admin.create_profile() for _ in range(3)]
    created.append(admin.create_profile("CHECK_PRE_PROVISIONED_DEVICES"))
    profiles = Profiles([(p["provisionDeviceKey"], p["provisionDeviceSecret"]) for p in created])
    gen = Generator(SEED, profiles)
    sources = random.Random(SEED + 1)
    valid_request = json.dumps({"provisionDeviceKey": profiles.pairs[0][0],
                                "provisionDeviceSecret": profiles.pairs[0][1]}).encode()
    payloads = [gen.payload() for _ in range(PAYLOADS)]
    raw_inputs = [gen.packets(valid_request) for _ in range(RAW_INPUTS)]
    sessions = [(gen.r.choice([3, 4, 5]), gen.r.choice([0, 1, 1])) for _ in range(PAYLOADS)]
    addresses = [_source(sources) for _ in range(PAYLOADS + RAW_INPUTS)]
    port = env.mqtt_port
    tally = Tally()

    async def one_payload(i: int) -> None:
        kind, payload = payloads[i]
        level, qos = sessions[i]
        where = f"payload #{i} ({kind}, MQTT level {level}, QoS {qos}, {len(payload)} bytes: {payload[:80]!r})"
        try:
            outcome, answer, seconds = await _provision_once(port, payload, level=level, qos=qos,
                                                             source=addresses[i])
        except OSError as exc:
            tally.errors.append(f"{where}: {exc!r}")
            return
        tally.outcomes[f"payload {outcome}"] += 1
        if outcome == "hang":
            tally.hangs.append(where)
        elif outcome == "answer":
            tally.outcomes[_answer_kind(answer)] += 1
            if _timed_out_answer(answer, seconds):
                tally.timed_out.append(f"{where} -> {answer[:100]!r} after {seconds:.1f} s")

    async def one_raw(i: int) -> None:
        kind, data = raw_inputs[i]
        where = f"raw #{i} ({kind}, {len(data)} bytes: {data[:60]!r})"
        try:
            outcome, received = await _raw_once(port, data, source=addresses[PAYLOADS + i])
        except OSError as exc:
            tally.errors.append(f"{where}: {exc!r}")
            return
        tally.outcomes[f"raw {outcome}"] += 1
        if outcome == "hang":
            tally.hangs.append(where)
        if TIMED_OUT in received:
            tally.timed_out.append(f"{where} -> {received[:200]!r}")

    # Devices provisioned before the fuzz publish fuzzed telemetry: the authenticated side of a session.
    tokens = []
    for _ in range(4):
        answer = json.loads(await mc.raw_provision(port, valid_request))
        assert answer["status"] == "SUCCESS", answer
        tokens.append(answer["credentialsValue"])
    telemetry = [gen.telemetry_payload() for _ in range(TELEMETRY)]
    telemetry_sessions = [(gen.r.choice(tokens), gen.r.choice([3, 4, 5]), gen.r.choice([0, 1]))
                          for _ in range(TELEMETRY)]
    addresses += [_source(sources) for _ in range(TELEMETRY)]

    async def one_telemetry(i: int) -> None:
        kind, payload = telemetry[i]
        token, level, qos = telemetry_sessions[i]
        where = f"telemetry #{i} ({kind}, MQTT level {level}, QoS {qos}, {len(payload)} bytes: {payload[:60]!r})"
        try:
            outcome = await _telemetry_once(port, token, payload, level=level, qos=qos,
                                            source=addresses[PAYLOADS + RAW_INPUTS + i])
        except OSError as exc:
            tally.errors.append(f"{where}: {exc!r}")
            return
        tally.outcomes[f"telemetry {outcome}"] += 1
        if outcome == "hang":
            tally.hangs.append(where)

    phases = {}
    for name, count, one in (("payloads", PAYLOADS, one_payload), ("raw inputs", RAW_INPUTS, one_raw),
                             ("telemetry messages", TELEMETRY, one_telemetry)):
        phase_started = time.monotonic()
        await _run_bounded(count, one)
        phases[name] = (count, time.monotonic() - phase_started)
    summary = (f"seed {SEED}: " + ", ".join(f"{n} {name} in {s:.1f} s" for name, (n, s) in phases.items())
               + f"; {dict(tally.outcomes)}")
    print(summary)

    output = stack.output()
    tracebacks = output.count("Traceback")
    noisy = Counter(f"{name} {level}" for name, process in stack.processes.items() for line in process.lines
                    for level in ("WARNING", "ERROR", "CRITICAL") if f" {level} " in line)
    print(f"log lines by level: {dict(noisy)}")
    dead = [name for name, process in stack.processes.items()
            if process.proc is None or process.proc.poll() is not None]
    assert not dead, f"{dead} died; {summary}"
    assert not tally.errors, f"{len(tally.errors)} client errors, e.g. {tally.errors[:5]}; {summary}"
    assert not tally.hangs, f"{len(tally.hangs)} inputs neither answered nor closed, e.g. {tally.hangs[:5]}; {summary}"
    assert not tally.timed_out, (f"{len(tally.timed_out)} 'Provisioning timed out' answers, e.g. "
                                 f"{tally.timed_out[:8]}; {summary}")
    assert tracebacks == 0, f"{tracebacks} tracebacks, first:\n{_first_traceback(output)}\n{summary}"

    # A normal device, with ThingsBoard's example client, after all that.
    key, secret = profiles.pairs[1]
    answer = await asyncio.to_thread(mc.provision_json, port, {
        "deviceName": f"after-fuzz-{uuid.uuid4().hex[:6]}", "provisionDeviceKey": key, "provisionDeviceSecret": secret})
    assert answer["status"] == "SUCCESS", answer
    device = await asyncio.to_thread(mc.connect, port, username=answer["credentialsValue"])
    try:
        assert mc.accepted(device)
    finally:
        device.stop()


def _answer_kind(answer: bytes) -> str:
    try:
        body = json.loads(answer)
        if not isinstance(body, dict):
            return "answer other JSON"
        reason = body.get("errorMsg") or body.get("error_msg") or ""
        return f"answer {body.get('status')}" + (f" ({reason[:40]})" if reason else "")
    except ValueError:
        try:
            return f"answer protobuf {pb.ResponseStatus.Name(pb.ProvisionDeviceResponseMsg.FromString(answer).status)}"
        except Exception:
            return "answer other"


def _first_traceback(output: str) -> str:
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if "Traceback" in line:
            return "\n".join(lines[max(0, i - 2):i + 40])
    return ""
