"""A bounded fuzz of the HTTP provisioning endpoints against the real services: tens of thousands of
random and mutated requests, 0 answers >= 500, 0 tracebacks in any service's output, and a device
provisions normally afterwards.

A seeded generator of our own (Hypothesis would spend most of the budget on shrinking machinery) over
raw keep-alive HTTP/1.1 connections (httpx costs more CPU per request than the gateway does). The
per-source limit of malformed requests is raised for this module: from one address it would answer
"Too many failed provisioning attempts" after 60 requests and the parsers would hardly be exercised.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from devstack import Stack

from .conftest import Admin, Env

#: Total requests and parallel keep-alive connections; about 20-40 s on two busy cores.
REQUESTS = int(os.environ.get("HTTP_FUZZ_REQUESTS", "30000"))
CONNECTIONS = 16
SEED = int(os.environ.get("HTTP_FUZZ_SEED", "20260710"))
TIME_LIMIT_S = 120
MAX_BODY = 64 * 1024

TB_FIELDS = ["provisionDeviceKey", "provisionDeviceSecret", "deviceName", "credentialsType", "token", "clientId",
             "username", "password", "hash", "csr", "gateway"]
INNO_FIELDS = ["provision_key", "provision_secret", "device_name", "device_key"]
CTYPES = ["ACCESS_TOKEN", "MQTT_BASIC", "X509_CERTIFICATE", "LWM2M_CREDENTIALS", "X509_CSR", "access_token", ""]
CONTENT_TYPES = [None, "application/json", "application/json; charset=utf-8", "text/plain", "application/x-protobuf",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=xyz", "application/octet-stream",
                 "*/*", "application/json; charset=latin-1", "\x01garbage"]
PATHS = ["/api/v1/provision", "/api/provision"]


@pytest.fixture(scope="module")
def stack(env: Env) -> Iterator[Stack]:
    """The HTTP provisioning pipeline only (no MQTT/CoAP gateways), with the malformed-request limit raised."""
    variables = env.variables(PROVISION_FAILURES_PER_MINUTE="1000000000",
                              PROVISION_SOURCE_FAILURES_PER_MINUTE="1000000000", LOG_LEVEL="WARNING")
    running = Stack(variables, ["credentials", "provisioning_core", "admin_api", "http_gateway"]).start(timeout=60)
    try:
        yield running
    finally:
        running.stop()


class Generator:
    """Request bodies: random bytes, odd JSON types, huge and control-laden strings, invalid UTF-8,
    deep nesting, and byte-level mutations of valid requests (some with the real key and secret)."""

    def __init__(self, rng: random.Random, profile: dict[str, Any]) -> None:
        self.rng = rng
        self.key = profile["provisionDeviceKey"]
        self.secret = profile["provisionDeviceSecret"]
        # Incompressible text (no run Postgres could compress into an index row), sliced at random offsets:
        # drawing each character anew would make the generator slower than the gateway.
        self.pool = "".join(chr(rng.randrange(0x21, 0x2FFF)) for _ in range(60_000))
        self.controls = "".join(chr(rng.randrange(0x20)) for _ in range(1000))
        self.ascii = "".join(chr(rng.randrange(0x20, 0x7F)) for _ in range(1000))
        self.unicode = "".join(chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0xA0, 0xD800),
                                               rng.randrange(0xE000, 0x110000)])) for _ in range(1000))

    def slice(self, length: int, pool: str | None = None) -> str:
        pool = self.pool if pool is None else pool
        start = self.rng.randrange(len(pool) - length)
        return pool[start:start + length]

    def text(self) -> str:
        r = self.rng
        kind = r.randrange(10)
        if kind == 0:
            return self.slice(r.randrange(1, 8), self.controls)
        if kind == 1:
            return "a" * r.choice([254, 255, 256, 1000, 3000, 9000, 20000])
        if kind == 2:  # incompressible, over the btree limit
            return self.slice(r.choice([255, 256, 2000, 9000]))
        if kind == 3:
            return r.choice(["\x00", "a\x00b", "\x00" * 300, " \t\n", "\u2028\u2029", "😀" * 64, "\ufeff", "\x7f"])
        if kind == 4:
            return self.slice(r.randrange(0, 40), self.unicode)
        return self.slice(r.randrange(0, 30), self.ascii)

    def value(self, depth: int = 0) -> Any:
        r = self.rng
        kind = r.randrange(12 if depth < 3 else 8)
        if kind < 4:
            return self.text()
        if kind == 4:
            return r.choice([None, True, False])
        if kind == 5:
            return r.choice([0, -1, 2**63, -(2**64), 10**400, 1.5, -0.0, 1e308])
        if kind == 6:
            return r.choice(CTYPES)
        if kind == 7:
            return r.choice([self.key, self.secret])
        if kind < 10:
            return [self.value(depth + 1) for _ in range(r.randrange(4))]
        return {self.text()[:10]: self.value(depth + 1) for _ in range(r.randrange(4))}

    def object(self) -> dict[str, Any]:
        r = self.rng
        fields = TB_FIELDS if r.random() < 0.6 else INNO_FIELDS + r.sample(TB_FIELDS, r.randrange(2))
        obj: dict[str, Any] = {}
        for name in r.sample(fields, r.randrange(len(fields) + 1)):
            obj[name] = self.value()
        if r.random() < 0.5:  # mostly with a key and secret, often the real ones, so the core sees them
            real = r.random() < 0.5
            if fields is TB_FIELDS:
                obj.update(provisionDeviceKey=self.key if real else self.text(),
                           provisionDeviceSecret=self.secret if real else self.text())
            else:
                obj.update(provision_key=self.key if real else self.text(),
                           provision_secret=self.secret if real else self.text())
        return obj

    def valid(self) -> bytes:
        name = f"fz-{uuid.UUID(int=self.rng.getrandbits(128)).hex[:16]}"
        if self.rng.random() < 0.5:
            return json.dumps({"provisionDeviceKey": self.key, "provisionDeviceSecret": self.secret,
                               "deviceName": name}).encode()
        return json.dumps({"provision_key": self.key, "provision_secret": self.secret, "device_name": name,
                           "device_key": name}).encode()

    def mutate(self, data: bytes) -> bytes:
        r = self.rng
        buf = bytearray(data)
        for _ in range(r.randrange(1, 6)):
            op = r.randrange(4)
            pos = r.randrange(len(buf) + 1)
            if op == 0 and buf:
                buf[min(pos, len(buf) - 1)] = r.randrange(256)
            elif op == 1:
                buf[pos:pos] = r.randbytes(r.randrange(1, 4))
            elif op == 2 and buf:
                del buf[pos:pos + r.randrange(1, 4)]
            else:
                buf[pos:pos] = r.choice([b"\\u0000", b"\\ud800", b"\xc0\x80", b"\xed\xa0\x80", b"\xff", b'"', b"{",
                                         b"]", b"\\", b"\x00"])
        return bytes(buf)

    def body(self) -> tuple[str, bytes]:
        """(category, body)."""
        r = self.rng
        kind = r.randrange(100)
        if kind < 8:
            return "bytes", r.randbytes(r.randrange(0, 200))
        if kind < 12:
            depth = r.choice([10, 100, 1000, 5000, 30000, 40000])
            opener, closer = r.choice([(b"[", b"]"), (b'{"a":', b"}")])
            return "nesting", opener * depth + b"1" + closer * depth
        if kind < 16:
            return "oversize", b'{"deviceName":"' + b"x" * (MAX_BODY + r.randrange(1, 5000)) + b'"}'
        if kind < 22:
            return "valid", self.valid()
        if kind < 45:
            return "mutated", self.mutate(self.valid() if r.random() < 0.5 else json.dumps(self.object()).encode())
        if kind < 50:
            return "top-level", json.dumps(self.value()).encode()
        data = json.dumps(self.object(), ensure_ascii=r.random() < 0.5).encode("utf-8", "surrogatepass")
        if len(data) > MAX_BODY:
            return "oversize", data
        return "object", data


def http_request(rng: random.Random, port: int, body: bytes) -> bytes:
    method = "POST" if rng.random() < 0.97 else rng.choice(["GET", "PUT", "DELETE", "PATCH"])
    path = rng.choice(PATHS) + ("?x=%00" if rng.random() < 0.05 else "")
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    content_type = rng.choice(CONTENT_TYPES)
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    head = "\r\n".join(lines).encode("latin-1")
    if rng.random() < 0.1:  # chunked, in a few chunks
        chunks, pos = [], 0
        while pos < len(body):
            size = rng.randrange(1, 4096)
            chunks.append(f"{size if pos + size <= len(body) else len(body) - pos:x}".encode() + b"\r\n"
                          + body[pos:pos + size] + b"\r\n")
            pos += size
        return head + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(chunks) + b"0\r\n\r\n"
    return head + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers = {}
    for line in header_lines:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            body += (await reader.readexactly(size + 2))[:-2] if size else b""
            if not size:
                await reader.readuntil(b"\r\n")
                return status, headers, body
    return status, headers, await reader.readexactly(int(headers.get("content-length", "0")))


def json_shape(body: bytes) -> str:
    """Which answer shape a provisioning response has (anything else is a finding)."""
    try:
        obj = json.loads(body)
    except ValueError:
        return "not-json"
    if not isinstance(obj, dict) or obj.get("status") not in ("SUCCESS", "NOT_FOUND", "FAILURE"):
        return "odd-json"
    return "innoway" if "error_msg" in obj or "device_id" in obj else "thingsboard"


async def fuzz(port: int, make: Callable[[], tuple[str, bytes, bytes]], total: int) -> dict[str, Counter[Any]]:
    results: dict[str, Counter[Any]] = {"status": Counter(), "category": Counter(), "shape": Counter(),
                                        "by_category": Counter(), "resets": Counter(), "non_json": Counter()}
    remaining = [total]
    findings: list[str] = []

    async def worker() -> None:
        reader = writer = None
        while remaining[0] > 0:
            remaining[0] -= 1
            category, body, request = make()
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(request)
                await writer.drain()
                status, headers, answer = await asyncio.wait_for(read_response(reader), 20)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                # A connection may be closed after an oversized body (the rest is never read).
                results["resets"][category] += 1
                if category != "oversize":
                    findings.append(f"{category}: {type(exc).__name__} for {body[:80]!r}")
                writer.close()
                reader = writer = None
                continue
            results["status"][status] += 1
            results["category"][category] += 1
            results["by_category"][(category, status)] += 1
            if status >= 500:
                findings.append(f"{category}: {status} {answer[:200]!r} for {body[:200]!r}")
            if headers.get("content-type", "").startswith("application/json"):
                results["shape"][json_shape(answer)] += 1
            else:  # the HTTP parser's own refusal (e.g. a control character in a header value)
                results["non_json"][status] += 1
            if headers.get("connection", "").lower() == "close":
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
    results["findings"] = Counter(findings)
    return results


async def test_http_fuzz_finds_no_5xx_and_no_traceback(env: Env, stack: Stack, admin: Admin) -> None:
    profile = admin.create_profile()
    rng = random.Random(SEED)
    generator = Generator(rng, profile)

    def make() -> tuple[str, bytes, bytes]:
        category, body = generator.body()
        return category, body, http_request(rng, env.http_port, body)

    started = time.monotonic()
    results = await asyncio.wait_for(fuzz(env.http_port, make, REQUESTS), TIME_LIMIT_S)
    elapsed = time.monotonic() - started
    answered = sum(results["status"].values())
    print(f"\nHTTP fuzz: {answered} answers to {REQUESTS} requests in {elapsed:.1f}s "
          f"({answered / elapsed:.0f}/s), statuses {dict(sorted(results['status'].items()))}, "
          f"categories {dict(results['category'])}, shapes {dict(results['shape'])}, "
          f"non-JSON answers {dict(results['non_json'])}, resets {dict(results['resets'])}")
    assert not results["findings"], list(results["findings"].items())[:20]
    assert not any(code >= 500 for code in results["status"])
    assert answered >= REQUESTS * 0.95
    # Every answer of the gateway is a JSON object in one of the two dialects; only the HTTP parser's
    # refusals of invalid requests (4xx) are not.
    assert set(results["shape"]) <= {"thingsboard", "innoway"}, dict(results["shape"])
    assert all(400 <= code < 500 for code in results["non_json"]), dict(results["non_json"])
    assert results["by_category"][("valid", 200)] > 0 and results["status"][400] > REQUESTS // 4

    # And a device provisions normally afterwards.
    async with httpx.AsyncClient(base_url=env.http_url, timeout=15) as client:
        response = await client.post("/api/v1/provision", json={
            "provisionDeviceKey": profile["provisionDeviceKey"],
            "provisionDeviceSecret": profile["provisionDeviceSecret"],
            "deviceName": f"after-fuzz-{uuid.uuid4().hex[:8]}"})
    assert response.status_code == 200 and response.json()["status"] == "SUCCESS", response.text
    assert list(response.json()) == ["credentialsValue", "credentialsType", "status"]


def test_zz_no_traceback_in_any_service_output(stack: Stack) -> None:
    logs = stack.output()
    assert "Traceback" not in logs, logs[-4000:]
