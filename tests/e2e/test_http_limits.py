"""Slow, idle and hostile HTTP clients against the real services (provisioning_common.http_limits).

The deadlines are set to 2 s here so the tests are quick; each "closed by the deadline" assertion
allows the deadline plus a generous SLACK (two shared cores), and no less than 90 % of the deadline,
so a connection closed for another reason (a refusal, a crash) cannot pass for one closed on time.
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from devstack import Stack

from tests.ports import free_port

from .conftest import Admin, Env, tb_request

HEADER_S = 2.0
BODY_S = 2.0
KEEP_ALIVE_S = 2.0
#: Beyond a deadline, how long a close may still take on a busy machine.
SLACK = 8.0
LIMITS = {
    "HTTP_HEADER_TIMEOUT_S": str(HEADER_S),
    "HTTP_BODY_TIMEOUT_S": str(BODY_S),
    "HTTP_KEEP_ALIVE_TIMEOUT_S": str(KEEP_ALIVE_S),
}
MAX_HEADER_BYTES = 8192  # the default, deliberately not overridden
SERVICES = ("credentials", "provisioning_core", "admin_api", "http_gateway", "broker_auth")
CAP_WARNING = "HTTP connection cap reached"
#: Every provision secret the tests used, checked against the services' logs at the end.
SECRETS: set[str] = set()


@pytest.fixture(scope="module")
def bridge_auth_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def stack(env: Env, bridge_auth_port: int) -> Iterator[Stack]:
    """The services with an HTTP listener (and what provisioning needs), with short deadlines."""
    env.extra.update(LIMITS, BRIDGE_AUTH_PORT=str(bridge_auth_port))
    running = Stack(env.variables(), SERVICES).start(timeout=60)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def ports(env: Env, bridge_auth_port: int) -> dict[str, int]:
    return {"http_gateway": env.http_port, "admin_api": env.admin_port, "broker_auth": bridge_auth_port}


# --- raw-socket helpers --------------------------------------------------------------------------


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


def now() -> float:
    return asyncio.get_running_loop().time()


async def until_closed(reader: asyncio.StreamReader, limit: float,
                       since: float | None = None) -> tuple[float, bytes]:
    """Read until the server closes (EOF or reset): (seconds since ``since``, default now; bytes received).

    ``since`` is taken before what starts the server's deadline (the connect, the write), so the
    seconds are never less than the deadline, however late this task runs.
    """
    loop = asyncio.get_running_loop()
    start, received = (loop.time() if since is None else since), b""

    async def drain() -> None:
        nonlocal received
        while True:
            try:
                data = await reader.read(65536)
            except (ConnectionResetError, BrokenPipeError):  # closed by the server, as an EOF is
                return
            if not data:
                return
            received += data

    try:
        await asyncio.wait_for(drain(), limit)
    except TimeoutError:
        raise AssertionError(f"still open after {limit:g} s (received {received[:80]!r})") from None
    return loop.time() - start, received


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length (all our services send one)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 15)
    return status, headers, body


def provision_body(profile: dict[str, Any], **fields: Any) -> bytes:
    SECRETS.add(profile["provisionDeviceSecret"])
    return json.dumps(tb_request(profile, deviceName=f"lim-{uuid.uuid4().hex[:10]}", **fields)).encode()


async def provision(client: httpx.AsyncClient, profile: dict[str, Any]) -> None:
    response = await client.post("/api/v1/provision", content=provision_body(profile))
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "SUCCESS", response.text


# --- slowloris ------------------------------------------------------------------------------------


async def test_slowloris_is_closed_at_the_header_deadline_while_devices_provision(
    env: Env, stack: Stack, profile: dict[str, Any]
) -> None:
    n = 200
    loop = asyncio.get_running_loop()
    connected = 0
    all_connected = asyncio.Event()
    closed = 0
    all_closed = asyncio.Event()

    async def slowloris() -> tuple[float, bytes]:
        nonlocal connected, closed
        start = loop.time()
        reader, writer = await connect(env.http_port)
        connected += 1
        if connected == n:
            all_connected.set()

        async def trickle() -> None:
            # A head that never ends, a byte every 0.2 s: it would take minutes.
            for byte in b"POST /api/v1/provision HTTP/1.1\r\nHost: devices\r\nX-Pad: " + b"a" * 1000:
                if writer.is_closing() or reader.at_eof():
                    return
                writer.write(bytes([byte]))
                await asyncio.sleep(0.2)

        sender = asyncio.create_task(trickle())
        try:
            return await until_closed(reader, HEADER_S + SLACK, since=start)
        finally:
            sender.cancel()
            writer.close()
            closed += 1
            if closed == n:
                all_closed.set()

    async def devices() -> int:
        """Provision one device after another from the moment every slowloris holds its connection."""
        await all_connected.wait()
        done = 0
        async with httpx.AsyncClient(base_url=env.http_url, timeout=15) as client:
            while not all_closed.is_set():
                await provision(client, profile)
                done += 1
            await provision(client, profile)  # and after them
        return done + 1

    provisioned = asyncio.create_task(devices())
    loris = await asyncio.gather(*(slowloris() for _ in range(n)))
    done = await provisioned
    lifetimes = [seconds for seconds, _ in loris]
    assert all(received == b"" for _, received in loris)  # closed, not answered
    assert min(lifetimes) >= 0.9 * HEADER_S, min(lifetimes)
    assert max(lifetimes) <= HEADER_S + SLACK, max(lifetimes)
    assert done >= 2  # devices provisioned while the slowloris connections were open, and after
    print(f"{n} slowloris closed after {min(lifetimes):.2f}-{max(lifetimes):.2f} s; {done} devices provisioned")


@pytest.mark.parametrize("service", ["http_gateway", "admin_api", "broker_auth"])
async def test_connection_that_never_sends_is_closed_at_the_header_deadline(
    ports: dict[str, int], service: str
) -> None:
    start = now()
    reader, writer = await connect(ports[service])
    try:
        seconds, received = await until_closed(reader, HEADER_S + SLACK, since=start)
    finally:
        writer.close()
    assert received == b""
    assert seconds >= 0.9 * HEADER_S


async def test_body_that_stalls_is_closed_at_the_body_deadline(env: Env, stack: Stack,
                                                               profile: dict[str, Any]) -> None:
    body = provision_body(profile)
    reader, writer = await connect(env.http_port)
    start = now()
    writer.write(b"POST /api/v1/provision HTTP/1.1\r\nHost: devices\r\nContent-Length: %d\r\n\r\n" % len(body))
    writer.write(body[: len(body) // 2])  # and then nothing
    await writer.drain()
    try:
        seconds, received = await until_closed(reader, BODY_S + SLACK, since=start)
    finally:
        writer.close()
    assert received == b""
    assert seconds >= 0.9 * BODY_S


async def test_admin_api_body_that_stalls_is_closed_without_a_traceback(env: Env, stack: Stack, admin: Admin) -> None:
    body = json.dumps({"name": f"profile-{uuid.uuid4().hex[:10]}", "provisionStrategy": "ALLOW_CREATE_NEW_DEVICES"})
    reader, writer = await connect(env.admin_port)
    start = now()
    writer.write(f"POST /api/device-profiles HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {env.admin_token}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body[:10]}".encode())
    await writer.drain()
    try:
        seconds, received = await until_closed(reader, BODY_S + SLACK, since=start)
    finally:
        writer.close()
    assert received == b"" and seconds >= 0.9 * BODY_S
    # The admin API still answers, and answered nothing about the cut request in its log.
    admin.create_profile()
    assert "Traceback" not in stack["admin_api"].output


async def test_idle_keep_alive_connection_is_closed(env: Env, stack: Stack) -> None:
    reader, writer = await connect(env.http_port)
    try:
        writer.write(b"GET /live HTTP/1.1\r\nHost: devices\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers.get("connection") != "close"  # kept alive
        start = now()
        writer.write(b"GET /live HTTP/1.1\r\nHost: devices\r\n\r\n")  # a second request on it works
        assert (await read_response(reader))[0] == 200
        seconds, received = await until_closed(reader, KEEP_ALIVE_S + SLACK, since=start)
    finally:
        writer.close()
    assert received == b""
    assert seconds >= 0.9 * KEEP_ALIVE_S


async def test_connection_answered_before_its_body_ended_is_closed_when_idle(env: Env, stack: Stack) -> None:
    """413 goes out on the head alone; once the body has arrived the connection is idle like any other."""
    reader, writer = await connect(env.http_port)
    try:
        writer.write(b"POST /api/v1/provision HTTP/1.1\r\nHost: devices\r\nContent-Length: 70000\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert status == 413 and headers.get("connection") != "close"
        start = now()
        writer.write(b"x" * 70000)
        await writer.drain()
        seconds, received = await until_closed(reader, KEEP_ALIVE_S + SLACK, since=start)
    finally:
        writer.close()
    assert received == b"" and seconds >= 0.9 * KEEP_ALIVE_S


async def test_slow_head_on_a_kept_alive_connection_is_closed(env: Env, stack: Stack) -> None:
    """The second request's head has HTTP_HEADER_TIMEOUT_S from its first byte, like the first's."""
    reader, writer = await connect(env.http_port)
    try:
        writer.write(b"GET /live HTTP/1.1\r\nHost: devices\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        start = now()
        writer.write(b"GET /live HTTP/1.1\r\n")  # and nothing more
        seconds, received = await until_closed(reader, HEADER_S + SLACK, since=start)
    finally:
        writer.close()
    assert received == b"" and seconds >= 0.9 * HEADER_S


# --- header size ---------------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["http_gateway", "admin_api", "broker_auth"])
async def test_oversized_header_gets_431_and_the_connection_is_closed(
    ports: dict[str, int], service: str
) -> None:
    reader, writer = await connect(ports[service])
    try:
        writer.write(b"GET /live HTTP/1.1\r\nHost: devices\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        status, headers, _ = await read_response(reader)
        _, rest = await until_closed(reader, SLACK)
    finally:
        writer.close()
    assert status == 431 and headers["connection"] == "close"
    assert rest == b""
    # The listener goes on: a head just under the limit is answered.
    reader, writer = await connect(ports[service])
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: devices\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES - 200)
                     + b"\r\nConnection: close\r\n\r\n")
        status, _, _ = await read_response(reader)
    finally:
        writer.close()
    assert status == 200


async def test_head_sent_in_pieces_is_refused_once_over_the_limit(env: Env, stack: Stack) -> None:
    """The head is counted as it arrives: it is refused at the limit, not buffered until it ends."""
    reader, writer = await connect(env.http_port)
    try:
        head = b"GET /live HTTP/1.1\r\nHost: devices\r\nX-Big: "
        writer.write(head)
        sent = len(head)
        while sent <= MAX_HEADER_BYTES:  # one byte over the limit, in pieces, and the head never ends
            await asyncio.sleep(0.01)
            writer.write(b"a" * 512)
            sent += 512
        # A server that waited for the end of the head would answer nothing and close at the deadline.
        status, headers, _ = await read_response(reader)
    finally:
        writer.close()
    assert status == 431 and headers["connection"] == "close"


async def test_body_in_the_same_packet_as_the_head_is_not_counted_as_head(
    env: Env, stack: Stack, profile: dict[str, Any]
) -> None:
    body = provision_body(profile, pad="p" * 50_000)  # one write: head and a 50 KB body
    reader, writer = await connect(env.http_port)
    try:
        writer.write(b"POST /api/v1/provision HTTP/1.1\r\nHost: devices\r\nContent-Length: %d\r\n\r\n" % len(body)
                     + body)
        status, _, answer = await read_response(reader)
    finally:
        writer.close()
    assert status == 200 and json.loads(answer)["status"] == "SUCCESS", answer


async def test_oversized_head_pipelined_behind_a_request_gets_431_after_its_answer(env: Env, stack: Stack) -> None:
    reader, writer = await connect(env.http_port)
    try:
        writer.write(b"GET /live HTTP/1.1\r\nHost: devices\r\n\r\n"
                     b"GET /live HTTP/1.1\r\nHost: devices\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
        first = await read_response(reader)
        second = await read_response(reader)
        await until_closed(reader, SLACK)
    finally:
        writer.close()
    assert first[0] == 200 and second[0] == 431


# --- connection cap ------------------------------------------------------------------------------


async def test_connection_cap_refuses_cleanly_and_warns_once(env: Env, stack: Stack, profile: dict[str, Any]) -> None:
    cap, excess = 20, 10
    port = free_port()
    gateway = Stack(env.variables(HTTP_PORT=str(port), HTTP_MAX_CONNECTIONS=str(cap), HTTP_HEADER_TIMEOUT_S="60",
                                  HTTP_KEEP_ALIVE_TIMEOUT_S="60"), ["http_gateway"]).start(timeout=30)
    held: list[asyncio.StreamWriter] = []
    try:
        # cap connections, each with one answered request: the gateway has accepted and counts them.
        for _ in range(cap):
            reader, writer = await connect(port)
            held.append(writer)
            writer.write(b"GET /live HTTP/1.1\r\nHost: devices\r\n\r\n")
            assert (await read_response(reader))[0] == 200

        refusals = []
        for _ in range(excess):  # what a device sends: a whole request at once
            reader, writer = await connect(port)
            try:
                writer.write(b"POST /api/v1/provision HTTP/1.1\r\nHost: devices\r\nContent-Length: 2\r\n\r\n{}")
                status, headers, text = await read_response(reader)
                await until_closed(reader, SLACK)  # and closed
            finally:
                writer.close()
            refusals.append((status, headers, text))
        assert all(status == 503 for status, _, _ in refusals), refusals
        assert all(h.get("retry-after") == "1" and h.get("connection") == "close" for _, h, _ in refusals)

        for writer in held:
            writer.close()
        held.clear()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=15) as client:
            # The gateway sees the closes a moment later; until then 503 is the documented answer.
            for _ in range(100):
                if (await client.get("/live")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            await provision(client, profile)
    finally:
        for writer in held:
            writer.close()
        gateway.stop()
    # Everything the gateway logged has been read once its last line is in.
    for _ in range(100):
        if "Finished server process" in gateway["http_gateway"].output:
            break
        await asyncio.sleep(0.1)
    output = gateway["http_gateway"].output
    assert "Finished server process" in output
    warnings = [line for line in output.splitlines() if CAP_WARNING in line]
    assert len(warnings) == 1, warnings
    assert " WARNING " in warnings[0] and f"HTTP_MAX_CONNECTIONS={cap}" in warnings[0]
    assert "Traceback" not in output
    assert not any(secret in output for secret in SECRETS)


# --- pipelining and clients that do not read --------------------------------------------------


async def test_flood_of_pipelined_requests_is_closed(env: Env, stack: Stack) -> None:
    """uvicorn alone queues every pipelined request it parses: one client could grow it by gigabytes."""
    reader, writer = await connect(env.http_port)
    try:
        writer.write(b"GET /live HTTP/1.1\r\nHost: devices\r\n\r\n" * 5000)
        _, received = await until_closed(reader, SLACK)
    finally:
        writer.close()
    answers = received.count(b"HTTP/1.1 200")
    assert answers < 1000, answers
    # A few requests ahead of their answers are fine.
    reader, writer = await connect(env.http_port)
    try:
        writer.write(b"GET /live HTTP/1.1\r\nHost: devices\r\n\r\n" * 8)
        assert [(await read_response(reader))[0] for _ in range(8)] == [200] * 8
    finally:
        writer.close()


async def test_client_that_does_not_read_its_answers_is_closed(env: Env, stack: Stack) -> None:
    """Unread answers fill the buffers; uvicorn alone would then wait for that client without end."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", env.admin_port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        # ~10 KB answers: 2,000 of them are more than the kernel buffers hold.
        for _ in range(2000):
            writer.write(b"GET /openapi.json HTTP/1.1\r\nHost: admin\r\n\r\n")
            try:
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(0.002)
        await until_closed(reader, BODY_S + SLACK)  # by the write deadline or the pipelining bound
    finally:
        writer.close()


def test_no_traceback_and_no_secret_in_any_service_log(stack: Stack) -> None:
    output = stack.output()
    assert "Traceback" not in output
    assert SECRETS and not any(secret in output for secret in SECRETS)
