"""Fuzzing the CoAP gateway against the real services: tens of thousands of datagrams, bounded.

Three kinds of input, from one seeded ``random.Random`` (``COAP_FUZZ_SEED`` overrides the seed; a failure
names it):

* random bytes (often with a version-1 first byte, to get past the first check);
* mutated CoAP requests: options (non-UTF-8 Uri-Path / Uri-Query / Proxy-Uri, arbitrary Block1/Block2/
  Size1, unknown critical options, repeated and long options), bytes (bit flips, truncation, reserved
  token lengths and nibbles, wrong version, a payload marker with no payload, type and code swapped);
* well-formed confirmable provisioning requests, both dialects, whose JSON is odd: wrong types, huge and
  incompressible strings, control characters and NUL, lone surrogates, truncation, deep nesting, half of
  them with the real provision key and secret (so they reach the core's writes); plus a few bodies far
  over one datagram (Block1), up to the size limit.

Asserted: not one 5.xx answer, every well-formed request answered 2.01 or 4.xx with the documented body,
no "Traceback" in any service's output, the gateway still answers, a normal provision works afterwards
(libcoap's coap-client when installed, else aiocoap), and the gateway's log has the malformed datagrams
as a summary, not one line each. Messages are encoded here, not by aiocoap, so that they can carry what
aiocoap's encoder refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiocoap
import pytest
from devstack import Stack

from .conftest import Admin, Env

SEED = int(os.environ.get("COAP_FUZZ_SEED", "20261130"))
N_RANDOM = 25_000
N_MUTATED = 35_000
N_JSON = 10_000
N_LARGE = 24  # bodies of 8-60 KB, block-wise (aiocoap's client)
#: Concurrent well-formed requests (one socket each), and how many datagrams go between two barriers.
WINDOW = 48
BATCH = 128

# --- encoding -----------------------------------------------------------------------------------------

CON, NON, ACK, RST = 0, 1, 2, 3
GET, POST, PUT, DELETE = 1, 2, 3, 4
#: String options (RFC 7252 §5.10): Uri-Host, Location-Path, Uri-Path, Uri-Query, Location-Query,
#: Proxy-Uri, Proxy-Scheme. A value that is not UTF-8 made aiocoap raise (and log a traceback) per datagram.
STRING_OPTIONS = (3, 8, 11, 15, 20, 35, 39)
URI_PATH, CONTENT_FORMAT, URI_QUERY, BLOCK2, BLOCK1, SIZE1 = 11, 12, 15, 23, 27, 60
NON_UTF8 = (b"\xff", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xf0\x28\x8c\x28", b"\xed\xa0\x80",
            b"\xc0\xaf", b"api\x80", b"\xfe\xff", b"provision\xe9")
#: ETag, If-None-Match, Observe, Uri-Port, OSCORE, Max-Age, Accept, Size2, Echo, No-Response, Request-Tag,
#: and unknown critical (odd) and elective (even) numbers.
OTHER_OPTIONS = (1, 4, 5, 6, 7, 9, 14, 17, 28, 252, 258, 292, 2049, 2050, 65000, 65001)
PATHS = (("api", "v1", "provision"), ("api", "provision"), ("api", "v1", "dev", "provision"),
         ("api", "v1", "some-token", "telemetry"), ("api", "v1"), (), ("", ""), (".well-known", "core"))
CONTROL = "".join(chr(c) for c in range(32)) + "\x7f\x85\u2028\u2029\ufeff"


def _extended(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes([value - 13])
    return 14, (value - 269).to_bytes(2, "big")


def encode(mtype: int, code: int, mid: int, token: bytes, options: list[tuple[int, bytes]],
           payload: bytes = b"") -> bytes:
    """RFC 7252 §3: header, token, options (deltas, extended fields), payload marker and payload."""
    out, last = bytearray([0x40 | mtype << 4 | len(token), code]) + mid.to_bytes(2, "big") + token, 0
    for number, value in sorted(options, key=lambda option: option[0]):
        delta_nibble, delta_ext = _extended(number - last)
        length_nibble, length_ext = _extended(len(value))
        out.append(delta_nibble << 4 | length_nibble)
        out += delta_ext + length_ext + value
        last = number
    return bytes(out) + (b"\xff" + payload if payload else b"")


def uint(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def path_options(path: tuple[str, ...]) -> list[tuple[int, bytes]]:
    return [(URI_PATH, segment.encode()) for segment in path]


def token_of(datagram: bytes) -> bytes:
    return datagram[4:4 + (datagram[0] & 0x0F)] if len(datagram) >= 4 else b""


def code_name(code: int) -> str:
    return f"{code >> 5}.{code & 0x1F:02d}"


# --- random and mutated datagrams ---------------------------------------------------------------------


def random_datagram(rng: random.Random) -> bytes:
    length = rng.choice((0, 1, 2, 3, 4, 5, 8, rng.randrange(4, 64), rng.randrange(64, 1400)))
    data = bytearray(rng.randbytes(length))
    if data and rng.random() < 0.6:
        data[0] = 0x40 | (data[0] & 0x3F)
    return bytes(data)


def _plausible_request(rng: random.Random) -> tuple[int, list[tuple[int, bytes]], bytes]:
    code = rng.choice((POST, POST, POST, GET, PUT, DELETE, rng.randrange(5, 32)))
    options = path_options(rng.choice(PATHS))
    if rng.random() < 0.3:
        options.append((CONTENT_FORMAT, uint(rng.choice((0, 42, 50, 60, 11050, 65535)))))
    if rng.random() < 0.2:
        options.append((URI_QUERY, rng.choice((b"a=1", b"", b"x" * 40))))
    payload = b""
    if rng.random() < 0.7:
        payload = rng.choice((b'{"provisionDeviceKey":"k","provisionDeviceSecret":"s"}', b"{}", b"x", b"\x00" * 8,
                              rng.randbytes(rng.randrange(1, 200))))
    return code, options, payload


def _mutate_options(rng: random.Random, options: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    options = list(options)
    choice = rng.randrange(8)
    if choice == 0:  # a string option that is not UTF-8
        options.append((rng.choice(STRING_OPTIONS), rng.choice(NON_UTF8)))
    elif choice == 1 and options:  # a path segment that is not UTF-8
        index = rng.randrange(len(options))
        options[index] = (options[index][0], rng.choice(NON_UTF8))
    elif choice == 2:  # Block1 / Block2 / Size1 with arbitrary values (szx 7 is reserved)
        options.append((rng.choice((BLOCK1, BLOCK2, SIZE1)), rng.randbytes(rng.randrange(0, 5))))
    elif choice == 3:  # other known and unknown options, critical or not
        for _ in range(rng.randrange(1, 4)):
            options.append((rng.choice(OTHER_OPTIONS), rng.randbytes(rng.randrange(0, 12))))
    elif choice == 4:  # one option many times
        number = rng.choice((URI_PATH, URI_QUERY, CONTENT_FORMAT, BLOCK1, 4))
        options += [(number, rng.randbytes(rng.randrange(0, 4)))] * rng.randrange(2, 60)
    elif choice == 5:  # a long option value
        options.append((rng.choice((URI_PATH, URI_QUERY, 35, 4, 2050)), rng.randbytes(rng.randrange(13, 1200))))
    elif choice == 6:  # Content-Format over its 2 bytes
        options.append((CONTENT_FORMAT, rng.randbytes(rng.randrange(3, 9))))
    else:  # control characters and URI delimiters in the path
        segment = "".join(rng.choice(CONTROL + "a/%?#") for _ in range(rng.randrange(0, 20)))
        options.append((URI_PATH, segment.encode()))
    return options


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    choice = rng.randrange(9)
    if choice == 0 and data:  # bit flips
        for _ in range(rng.randrange(1, 5)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif choice == 1 and data:  # bytes overwritten
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif choice == 2:  # truncated
        del data[rng.randrange(len(data) + 1):]
    elif choice == 3:  # garbage inserted
        position = rng.randrange(len(data) + 1)
        data[position:position] = rng.randbytes(rng.randrange(1, 16))
    elif choice == 4 and data:  # token length 9..15 (reserved)
        data[0] = (data[0] & 0xF0) | rng.randrange(9, 16)
    elif choice == 5 and data:  # version 0, 2 or 3
        data[0] = (data[0] & 0x3F) | rng.choice((0, 2, 3)) << 6
    elif choice == 6:  # a payload marker with nothing after it (a message format error)
        if 0xFF in data:
            del data[data.index(0xFF) + 1:]
        else:
            data.append(0xFF)
    elif choice == 7 and len(data) > 4:  # an option header with a reserved nibble, or cut extended fields
        position = rng.randrange(4, len(data))
        data[position:position] = bytes([rng.choice((0xF0, 0x0F, 0xD0, 0x0D, 0xE0, 0x0E, 0xDD, 0xEE))])
    elif len(data) > 1:  # type and code changed: requests as ACK/RST, responses and reserved codes as CON
        data[0] = (data[0] & 0xCF) | rng.randrange(4) << 4
        data[1] = rng.randrange(256)
    return bytes(data)


def mutated_datagram(rng: random.Random) -> bytes:
    code, options, payload = _plausible_request(rng)
    level = rng.randrange(3)
    if level in (0, 2):
        options = _mutate_options(rng, options)
    data = encode(rng.choice((CON, CON, NON)), code, rng.randrange(1 << 16), rng.randbytes(rng.randrange(9)),
                  options, payload)
    return _mutate_bytes(rng, data) if level in (1, 2) else data


# --- odd provisioning JSON ----------------------------------------------------------------------------

TB_FIELDS = ("deviceName", "provisionDeviceKey", "provisionDeviceSecret", "credentialsType", "token", "clientId",
             "username", "password", "hash")
INNOWAY_FIELDS = ("provision_key", "provision_secret", "device_name", "device_key")
CREDENTIALS_TYPES = ("ACCESS_TOKEN", "MQTT_BASIC", "X509_CERTIFICATE", "access_token", "", "LWM2M_CREDENTIALS")


def odd_string(rng: random.Random, longest: int = 2800) -> str:
    kind = rng.randrange(8)
    if kind == 0:
        return ""
    if kind == 1:  # control characters, NUL included
        return "".join(rng.choice(CONTROL + "ab") for _ in range(rng.randrange(1, 40)))
    if kind == 2:  # long and repetitive
        return rng.choice("aZ9-") * rng.randrange(256, longest)
    if kind == 3:  # long and incompressible
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(rng.randrange(256, longest)))
    if kind == 4:  # astral, combining, right-to-left override, private use
        return "".join(rng.choice("𝔘\U0001F600\u0301\u202e\ue000€ß中") for _ in range(rng.randrange(1, 60)))
    if kind == 5:
        return " " * rng.randrange(1, 10)
    if kind == 6:
        return rng.choice(("null", "true", "0", "-1", "1e999", "NaN", "{}", "[]", "'", '"', "\\", "%00", "${x}"))
    return "".join(rng.choice("abc") for _ in range(rng.randrange(1, 20)))


def odd_value(rng: random.Random) -> Any:
    return rng.choice((None, True, False, 0, -1, 1.5, 10**30, -(10**30), 1e308, [], {}, [1, "a"], {"a": 1},
                       [[[]]], odd_string(rng), odd_string(rng), odd_string(rng)))


def provision_json(rng: random.Random, key: str, secret: str) -> tuple[tuple[str, ...], bytes]:
    """(Uri-Path, payload): a provisioning request in either dialect with odd fields, as JSON text that is
    sometimes malformed itself. Half carry the real key and secret, so they reach the core's writes."""
    innoway = rng.random() < 0.25
    fields = INNOWAY_FIELDS if innoway else TB_FIELDS
    body: dict[str, Any] = ({"provision_key": key, "provision_secret": secret} if innoway
                            else {"provisionDeviceKey": key, "provisionDeviceSecret": secret})
    if rng.random() < 0.5:
        body = {name: odd_string(rng) for name in body}
    body["device_name" if innoway else "deviceName"] = f"fz-{rng.randrange(1 << 40):x}"
    if not innoway and rng.random() < 0.4:
        body["credentialsType"] = rng.choice(CREDENTIALS_TYPES)
    for _ in range(rng.randrange(1, 4)):  # odd values in any field, or fields that should not be there
        body[rng.choice(fields + ("extra", ""))] = odd_value(rng)
    if rng.random() < 0.1:
        del body[rng.choice(list(body))]
    text = json.dumps(body, ensure_ascii=rng.random() < 0.5)
    mutations: tuple[Callable[[str], str], ...] = (
        lambda t: t,
        lambda t: t,
        lambda t: t,
        lambda t: t[: rng.randrange(len(t) + 1)],  # truncated
        lambda t: t[:-1] + ', "deviceName": "dup"}',  # a duplicate key
        lambda t: "\ufeff" + t,  # byte order mark
        lambda t: t + rng.choice((" garbage", "\x00", "}", "\n")),
        lambda t: t.replace('"', "'", 1),
        lambda t: t[:-1] + ', "n": ' + rng.choice(("NaN", "Infinity", "1e999", "-0", "1" * 500)) + "}",
        lambda t: t[:-1] + ', "d": ' + "[" * 600 + "]" * 600 + "}",  # deep nesting
        lambda t: t.replace('"fz-', '"\\u0000fz-', 1),  # NUL as a JSON escape
        lambda t: t.replace('"fz-', '"\\ud800fz-', 1),  # a lone surrogate
    )
    payload = rng.choice(mutations)(text).encode("utf-8", "surrogatepass")
    if rng.random() < 0.05:  # bytes that are not UTF-8 inside a string
        payload = payload.replace(b"fz-", b"fz-\xff\xfe", 1)
    if innoway:
        path: tuple[str, ...] = ("api", "provision")
    else:
        path = rng.choice((("api", "v1", "provision"), ("api", "v1", "x", "provision")))
    return path, payload[:3800]  # one datagram, under aiocoap's 4 KB receive buffer


# --- the client side ----------------------------------------------------------------------------------


@dataclass
class Findings:
    """Every answer seen, by code; the inputs behind 5.xx answers and bad bodies."""

    codes: Counter[str] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    bad_answers: list[str] = field(default_factory=list)
    unanswered: list[bytes] = field(default_factory=list)
    sent: int = 0
    inputs: dict[bytes, bytes] = field(default_factory=dict)  # token -> last datagram sent with it

    def answer(self, datagram: bytes) -> None:
        code = datagram[1]
        self.codes[code_name(code)] += 1
        if code >> 5 == 5:
            cause = self.inputs.get(token_of(datagram), b"?")
            self.server_errors.append(f"{code_name(code)} {datagram[:120]!r} <- {cause[:300]!r}")


class Endpoint(asyncio.DatagramProtocol):
    """One client socket: records every datagram, ACKs separate (CON) responses, resolves waiters by token."""

    def __init__(self, findings: Findings) -> None:
        self.findings = findings
        self.transport: asyncio.DatagramTransport | None = None
        self.waiters: dict[bytes, asyncio.Future[bytes]] = {}
        self.acked: set[bytes] = set()  # mids of our CONs the server ACKed empty (answer comes separately)
        self.pings: dict[bytes, asyncio.Future[None]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) < 4:
            return
        mtype, code, mid = (data[0] >> 4) & 3, data[1], data[2:4]
        if code == 0:
            if mtype == RST and mid in self.pings:
                self.pings.pop(mid).set_result(None)
            elif mtype == ACK:
                self.acked.add(mid)
            return
        if mtype == CON:
            assert self.transport is not None
            self.transport.sendto(bytes([0x60, 0]) + mid)  # empty ACK of a separate response
        self.findings.answer(data)
        waiter = self.waiters.pop(token_of(data), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(data)

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP refused: the gateway is gone
        self.findings.bad_answers.append(f"socket error {exc!r}")


async def open_endpoint(findings: Findings, port: int) -> tuple[asyncio.DatagramTransport, Endpoint]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(lambda: Endpoint(findings),
                                                              remote_addr=("127.0.0.1", port))
    return transport, protocol


async def ping(transport: asyncio.DatagramTransport, endpoint: Endpoint, mid: int, timeout: float = 10.0) -> None:
    """A CoAP ping; its RST means the gateway has read every datagram sent to it before this one."""
    key = mid.to_bytes(2, "big")
    endpoint.pings[key] = asyncio.get_running_loop().create_future()
    transport.sendto(b"\x40\x00" + key)
    await asyncio.wait_for(endpoint.pings[key], timeout)


async def blast(port: int, findings: Findings, make: Callable[[], bytes], count: int, sockets: int = 8) -> None:
    """Send ``count`` datagrams from ``sockets`` sockets, a ping barrier every :data:`BATCH` so that the
    gateway's receive buffer never overflows (what it drops it never sees, and would not be fuzzed)."""
    endpoints = [await open_endpoint(findings, port) for _ in range(sockets)]
    barrier_transport, barrier = await open_endpoint(findings, port)
    try:
        for i in range(count):
            datagram = make()
            findings.inputs[token_of(datagram)] = datagram
            endpoints[i % sockets][0].sendto(datagram)
            findings.sent += 1
            if i % BATCH == BATCH - 1:
                await ping(barrier_transport, barrier, i // BATCH)
        await ping(barrier_transport, barrier, 0xFFFF)
    finally:
        # Closed at the end of the module only: answers that come late must not bounce (ICMP errors
        # are tests/e2e/test_coap_network.py's subject, not this one's).
        PARKED.extend(transport for transport, _ in endpoints)
        PARKED.append(barrier_transport)


#: Client sockets of the module, closed when it ends.
PARKED: list[asyncio.DatagramTransport] = []


def contract_breach(code: int, content_format: int | None, payload: bytes) -> str | None:
    """Why a well-formed provisioning request's answer breaks the contract (None when it keeps it):
    2.01, 4.00 or 4.13, with a JSON body in the ThingsBoard or Innoway shape (or protobuf, format 42)."""
    if code not in (0x41, 0x80, 0x8D):  # 2.01, 4.00, 4.13
        return f"code {code_name(code)}"
    if content_format == 42:
        return None
    try:
        body = json.loads(payload)
    except ValueError:
        return "body is not JSON"
    if not isinstance(body, dict) or body.get("status") not in ("SUCCESS", "FAILURE", "NOT_FOUND"):
        return "no status"
    if body["status"] != "SUCCESS" and not isinstance(body.get("errorMsg", body.get("error_msg")), str):
        return "no errorMsg / error_msg"
    if (body["status"] == "SUCCESS") != (code == 0x41):
        return "status and code disagree"
    return None


async def well_formed_requests(port: int, findings: Findings, requests: list[tuple[tuple[str, ...], bytes]]) -> None:
    """Each as a CON from one of :data:`WINDOW` sockets, retransmitted like a CoAP client (2 s, 4 times)
    until answered; the answer must keep the contract (:func:`contract_breach`)."""
    queue: asyncio.Queue[tuple[tuple[str, ...], bytes]] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    rng = random.Random(SEED + 1)

    async def worker() -> None:
        transport, endpoint = await open_endpoint(findings, port)
        PARKED.append(transport)
        mid = 0
        while not queue.empty():
            path, payload = queue.get_nowait()
            mid += 1
            token = rng.randbytes(8)
            datagram = encode(CON, POST, mid, token, path_options(path), payload)
            findings.inputs[token] = datagram
            waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            endpoint.waiters[token] = waiter
            answer = None
            for _ in range(5):  # the first send and 4 retransmissions (RFC 7252's MAX_RETRANSMIT)
                transport.sendto(datagram)
                findings.sent += 1
                try:
                    answer = await asyncio.wait_for(asyncio.shield(waiter), 2.0)
                    break
                except TimeoutError:
                    if mid.to_bytes(2, "big") in endpoint.acked:
                        # ACKed empty: the separate answer comes within PROVISION_TIMEOUT_S (5 s here).
                        with contextlib.suppress(TimeoutError):
                            answer = await asyncio.wait_for(asyncio.shield(waiter), 15.0)
                        break
            endpoint.waiters.pop(token, None)
            if answer is None:
                findings.unanswered.append(datagram)
                continue
            message = aiocoap.Message.decode(answer)
            problem = contract_breach(int(message.code), message.opt.content_format, message.payload)
            if problem:
                findings.bad_answers.append(f"{problem}: {answer[:200]!r} <- {payload[:200]!r}")

    await asyncio.gather(*(worker() for _ in range(WINDOW)))


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(env: Env) -> Iterator[Stack]:
    """The module's services, with the wrong-secret limit out of the way: the fuzz sends thousands of wrong
    secrets from 127.0.0.1, and the normal provision at the end comes from there too."""
    running = Stack(env.variables(PROVISION_FAILURES_PER_MINUTE="100000000",
                                    PROVISION_SOURCE_FAILURES_PER_MINUTE="100000000")).start(timeout=60)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module", autouse=True)
async def close_client_sockets() -> AsyncIterator[None]:
    yield
    for transport in PARKED:
        transport.close()
    PARKED.clear()


@pytest.fixture(scope="module")
def fuzz_profile(admin: Admin) -> dict[str, Any]:
    return admin.create_profile()


@pytest.fixture(scope="module")
def findings() -> Findings:
    return Findings()


# --- the tests ----------------------------------------------------------------------------------------


async def test_random_and_mutated_datagrams(env: Env, stack: Stack, findings: Findings) -> None:
    rng = random.Random(SEED)
    started = time.monotonic()
    await blast(env.coap_port, findings, lambda: random_datagram(rng), N_RANDOM)
    await blast(env.coap_port, findings, lambda: mutated_datagram(rng), N_MUTATED)
    print(f"{N_RANDOM} random + {N_MUTATED} mutated datagrams in {time.monotonic() - started:.1f} s; "
          f"answers {dict(findings.codes)}")
    assert not findings.server_errors, f"seed {SEED}: {len(findings.server_errors)} x 5.xx, e.g. " \
                                       f"{findings.server_errors[:5]}"


async def test_well_formed_requests_with_odd_provisioning_json(
    env: Env, stack: Stack, findings: Findings, fuzz_profile: dict[str, Any]
) -> None:
    rng = random.Random(SEED + 2)
    key, secret = fuzz_profile["provisionDeviceKey"], fuzz_profile["provisionDeviceSecret"]
    before = Counter(findings.codes)
    started = time.monotonic()
    await well_formed_requests(env.coap_port, findings, [provision_json(rng, key, secret) for _ in range(N_JSON)])
    answered = sum((findings.codes - before).values())
    print(f"{N_JSON} odd provisioning requests in {time.monotonic() - started:.1f} s; "
          f"answers {dict(findings.codes - before)}")
    assert not findings.unanswered, f"seed {SEED}: {len(findings.unanswered)} unanswered, e.g. " \
                                    f"{findings.unanswered[:3]}"
    assert not findings.server_errors, f"seed {SEED}: {len(findings.server_errors)} x 5.xx " \
                                       f"({answered} answers), e.g. {findings.server_errors[:5]}"
    assert not findings.bad_answers, f"seed {SEED}: {len(findings.bad_answers)}, e.g. {findings.bad_answers[:5]}"
    assert (findings.codes - before)["2.01"] > 0  # the real key and secret did provision devices


async def test_bodies_far_over_one_datagram(env: Env, stack: Stack, fuzz_profile: dict[str, Any]) -> None:
    """Block1 transfers (aiocoap's client) of huge and incompressible strings in every field."""
    rng = random.Random(SEED + 3)
    context = await aiocoap.Context.create_client_context(transports=["udp6"], loggername="coap-fuzz-client")
    problems: list[str] = []
    try:
        for _ in range(N_LARGE):
            body: dict[str, Any] = {"provisionDeviceKey": fuzz_profile["provisionDeviceKey"],
                                    "provisionDeviceSecret": fuzz_profile["provisionDeviceSecret"]}
            size = rng.choice((8_000, 20_000, 60_000))
            field_name = rng.choice(("deviceName", "token", "username", "password", "clientId", "hash"))
            body[field_name] = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(size))
            if field_name in ("username", "password", "clientId"):
                body["credentialsType"] = "MQTT_BASIC"
            elif field_name in ("token", "hash"):
                body["credentialsType"] = "ACCESS_TOKEN" if field_name == "token" else "X509_CERTIFICATE"
            payload = json.dumps(body).encode()
            request = aiocoap.Message(code=aiocoap.POST, uri=f"coap://127.0.0.1:{env.coap_port}/api/v1/provision",
                                      payload=payload)
            async with asyncio.timeout(30):
                response = await context.request(request).response
            problem = contract_breach(int(response.code), response.opt.content_format, response.payload)
            if problem:
                problems.append(f"{field_name} of {size}: {problem}: {response.payload[:200]!r}")
    finally:
        await context.shutdown()
    assert not problems, f"seed {SEED}: {problems}"


async def test_gateway_still_answers_and_a_normal_provision_works(
    env: Env, stack: Stack, findings: Findings, admin: Admin
) -> None:
    transport, endpoint = await open_endpoint(findings, env.coap_port)
    PARKED.append(transport)
    await ping(transport, endpoint, 4242)
    profile = admin.create_profile()
    name = f"after-fuzz-{SEED}"
    body = json.dumps({"deviceName": name, "provisionDeviceKey": profile["provisionDeviceKey"],
                       "provisionDeviceSecret": profile["provisionDeviceSecret"]})
    client = next((shutil.which(c) for c in ("coap-client", "coap-client-notls", "coap-client-openssl",
                                             "coap-client-gnutls") if shutil.which(c)), None)
    if client is not None:  # libcoap: another CoAP implementation than the one the gateway is built on
        result = await asyncio.to_thread(
            subprocess.run, [client, "-m", "post", "-t", "50", "-B", "20", "-e", body,
                             f"coap://127.0.0.1:{env.coap_port}/api/v1/provision"],
            capture_output=True, text=True, timeout=30)
        answer = json.loads(result.stdout.strip().splitlines()[-1])
    else:
        context = await aiocoap.Context.create_client_context(transports=["udp6"], loggername="coap-fuzz-client")
        try:
            request = aiocoap.Message(code=aiocoap.POST, uri=f"coap://127.0.0.1:{env.coap_port}/api/v1/provision",
                                      payload=body.encode())
            async with asyncio.timeout(30):
                response = await context.request(request).response
            assert response.code == aiocoap.CREATED
            answer = json.loads(response.payload)
        finally:
            await context.shutdown()
    assert answer["status"] == "SUCCESS" and answer["credentialsType"] == "ACCESS_TOKEN"
    assert admin.http.get("/api/devices", params={"deviceProfileId": profile["id"]}).json()["data"][0]["name"] == name


def test_zz_no_traceback_and_malformed_datagrams_summarized(stack: Stack, findings: Findings) -> None:
    gateway = stack["coap_gateway"]
    gateway.signal(signal.SIGTERM)  # its last summary is logged on the way out
    assert gateway.proc is not None and gateway.proc.wait(30) == 0
    logs = stack.output()
    traceback_services = [p.name for p in stack.processes.values() if "Traceback" in p.output]
    assert not traceback_services, f"seed {SEED}: Traceback in {traceback_services}: " + "\n".join(
        stack[name].output[-3000:] for name in traceback_services)
    summaries = [line for line in gateway.lines if "malformed CoAP datagrams dropped in the last" in line]
    assert summaries and all(" WARNING coap_gateway.malformed: " in line for line in summaries), summaries
    dropped = sum(int(line.split(" WARNING coap_gateway.malformed: ")[1].split()[0]) for line in summaries)
    assert dropped > 1000, summaries  # the random and mutated datagrams were dropped, and counted
    per_datagram = [line for line in gateway.lines if "Ignoring unparsable message" in line
                    or "Exception in callback" in line or "those don't fit" in line or "Message ID set" in line]
    assert not per_datagram, per_datagram[:5]
    errors = [line for line in gateway.lines if " ERROR " in line]
    assert not errors, errors[:5]
    print("\n".join(summaries))
    assert findings.sent >= N_RANDOM + N_MUTATED + N_JSON and "Traceback" not in logs
    # Answers that came late (separate ones, up to PROVISION_TIMEOUT_S) were recorded meanwhile too.
    assert not findings.server_errors, f"seed {SEED}: {len(findings.server_errors)} x 5.xx, e.g. " \
                                       f"{findings.server_errors[:5]}"
