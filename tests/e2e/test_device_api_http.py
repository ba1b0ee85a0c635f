"""ThingsBoard's HTTP device API end to end: ThingsBoard's own HTTP device SDK (``tb_device_http.TBHTTPDevice``
from tb-mqtt-client) as the device, the admin API as the operator, aio-pika as the backend team's consumer,
and raw HTTP for the edge cases, against the real services on RabbitMQ and Postgres.

Two HTTP gateway instances run: A (the stack's) and B (a second process on another port, with tight HTTP
limits - 1 s keep-alive, head and body deadlines - and a small rate limit), so that RPC answers are shown
to cross instances, messages waiting between two polls to be delivered once whichever instance the next
poll reaches, long polls to outlive the HTTP limits, and 429 to be what ThingsBoard answers. That a poll is
open (or no longer is) is read from RabbitMQ: the consumer count of the device's queue of that kind.
"""

from __future__ import annotations

import asyncio
import json
import queue
import random
import signal
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aio_pika
import httpx
import pytest
from devstack import ServiceProcess, Stack
from tb_device_http import TBHTTPDevice

from tests.ports import free_port

from .conftest import Admin, Env, tb_request

SERVICES = ["credentials", "provisioning_core", "admin_api", "http_gateway"]
#: DEVICE_CLIENT_RPC_TIMEOUT_S: how long a client-side RPC waits for the backend before 408.
CLIENT_RPC_TIMEOUT_S = 3
#: Gateway B's DEVICE_MESSAGES_RATE_LIMIT.
B_RATE = 20
#: Tokens used here: none may appear in any log.
TOKENS: list[str] = []


@pytest.fixture(scope="module")
def stack(env: Env) -> Iterator[Stack]:
    variables = env.variables(DEVICE_CLIENT_RPC_TIMEOUT_S=str(CLIENT_RPC_TIMEOUT_S))
    running = Stack(variables, SERVICES).start(timeout=60)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def gateway_b(stack: Stack) -> Iterator[tuple[ServiceProcess, str]]:
    """A second HTTP gateway instance: 1 s HTTP deadlines, B_RATE messages a minute per device."""
    port = free_port()
    process = ServiceProcess("http_gateway", {
        **stack.env, "HTTP_PORT": str(port), "DEVICE_MESSAGES_RATE_LIMIT": f"{B_RATE}:60",
        "HTTP_KEEP_ALIVE_TIMEOUT_S": "1", "HTTP_HEADER_TIMEOUT_S": "1", "HTTP_BODY_TIMEOUT_S": "1"})
    process.start()
    try:
        process.wait_ready(60)
        yield process, f"http://127.0.0.1:{port}"
    finally:
        process.stop()


@pytest.fixture
async def admin_async(env: Env, stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=env.admin_url, headers={"Authorization": f"Bearer {env.admin_token}"},
                                 timeout=20) as client:
        yield client


@pytest.fixture(scope="module")
async def backend(env: Env, stack: Stack) -> AsyncIterator[list[dict[str, Any]]]:
    """The operator's backend: answers client-side RPCs from ``device.rpc`` (method ``sum``; ``noAnswer`` is
    left unanswered). Yields the calls it received."""
    received: list[dict[str, Any]] = []
    connection = await aio_pika.connect(env.infra.rabbitmq_url)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(f"{env.namespace}device.rpc", aio_pika.ExchangeType.TOPIC, durable=True)
    rpc_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await rpc_queue.bind(exchange, routing_key="#")

    async def on_request(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with message.process():
            call = json.loads(message.body)
            received.append({"device": message.routing_key, **call})
            if call["method"] == "sum":
                answer = {"result": call["params"]["a"] + call["params"]["b"]}
                await channel.default_exchange.publish(
                    aio_pika.Message(json.dumps(answer).encode(), correlation_id=message.correlation_id),
                    routing_key=message.reply_to or "")

    await rpc_queue.consume(on_request)
    yield received
    await connection.close()


def provision(http: httpx.Client, profile: dict[str, Any], admin: Admin) -> tuple[str, str]:
    """A new device: (its token, its id)."""
    name = f"http-dev-{uuid.uuid4().hex[:10]}"
    body = http.post("/api/v1/provision", json=tb_request(profile, deviceName=name)).json()
    assert body["status"] == "SUCCESS", body
    TOKENS.append(body["credentialsValue"])
    return body["credentialsValue"], device_id(admin, name)


def device_id(admin: Admin, name: str) -> str:
    page = admin.http.get("/api/devices", params={"textSearch": name}).json()
    [device] = [d for d in page["data"] if d["name"] == name]
    return str(device["id"])


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 15.0) -> None:
    """Repeat ``check`` (about every 0.1 s) until it holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout:g} s: {what}")


async def pollers(env: Env, kind: str, device: str) -> int:
    """Open polls of ``kind`` for ``device``, on any instance: the consumers of its queue (0 when it has none)."""
    connection = await aio_pika.connect(env.infra.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(f"{env.namespace}http_gateway.{kind}.{device}", passive=True)
        except aio_pika.exceptions.ChannelClosed:  # NOT_FOUND
            return 0
        result = queue.declaration_result
        return int(result.consumer_count or 0)


def polling(env: Env, kind: str, device: str, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await pollers(env, kind, device) == count

    return check


async def admin_rpc(admin_async: httpx.AsyncClient, device: str, call: dict[str, Any]) -> httpx.Response:
    """A two-way RPC through the admin API, sent again while the device is offline (no poll open yet)."""
    deadline = time.monotonic() + 15
    while True:
        response = await admin_async.post(f"/api/devices/{device}/rpc", json=call)
        if response.status_code != 409 or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.1)


# --- ThingsBoard's HTTP SDK as the device -------------------------------------------------------------


async def test_thingsboard_http_sdk_device(env: Env, admin: Admin, profile: dict[str, Any],
                                           admin_async: httpx.AsyncClient, backend: list[dict[str, Any]]) -> None:
    name = f"sdk-{uuid.uuid4().hex[:10]}"
    device = await asyncio.to_thread(TBHTTPDevice.provision, env.http_url, name, profile["provisionDeviceKey"],
                                     profile["provisionDeviceSecret"])
    TOKENS.append(device.token)
    ident = device_id(admin, name)

    # Telemetry, as the SDK's README does it (connect, then queued telemetry).
    connection = await aio_pika.connect(env.infra.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(f"{env.namespace}device.telemetry", aio_pika.ExchangeType.TOPIC,
                                                  durable=True)
        tap = await channel.declare_queue(exclusive=True, auto_delete=True)
        await tap.bind(exchange, routing_key=ident)
        assert await asyncio.to_thread(device.connect)
        device.send_telemetry({"temperature": 21.5})
        async with tap.iterator(timeout=10) as messages:
            async for message in messages:
                sent = json.loads(message.body)
                if sent:  # connect() and the publish worker first post {} to test the connection
                    break
    assert sent["values"] == {"temperature": 21.5} and isinstance(sent["ts"], int)

    # Client attributes, then the attribute request (the SDK's client_keys/shared_keys parameters are not
    # ThingsBoard's names, so ThingsBoard - and we - answer with every client and shared attribute).
    assert admin.http.post(f"/api/devices/{ident}/attributes/shared", json={"interval": 5}).status_code == 200
    await asyncio.to_thread(device.send_attributes, {"firmwareVersion": "1.2.3", "model": "X1"})
    stored = admin.http.get(f"/api/devices/{ident}/attributes/client").json()
    assert {row["key"]: row["value"] for row in stored} == {"firmwareVersion": "1.2.3", "model": "X1"}
    answer = await asyncio.to_thread(device.request_attributes, ["firmwareVersion"], ["interval"])
    assert answer == {"client": {"firmwareVersion": "1.2.3", "model": "X1"}, "shared": {"interval": 5}}

    # A shared attribute set through the admin API reaches the SDK's long poll.
    # (Once the SDK's first poll is open: before the device ever polled, an update waits in Postgres only.)
    updates: queue.Queue[dict[str, Any]] = queue.Queue()
    device.subscribe("attributes", updates.put)
    await until(polling(env, "attributes", ident, 1), "the SDK polls attribute updates")
    assert (await admin_async.post(f"/api/devices/{ident}/attributes/shared", json={"interval": 10})).status_code == 200
    assert await asyncio.to_thread(updates.get, timeout=10) == {"interval": 10}

    # A server-side RPC through the admin API, answered by the SDK's callback (send_rpc with the request's id).
    def on_rpc(request: dict[str, Any]) -> None:
        device.send_rpc("reply", {"echo": request["params"], "method": request["method"]}, rpc_id=request["id"])

    device.subscribe("rpc", on_rpc)
    response = await admin_rpc(admin_async, ident, {"method": "setGpio", "params": {"pin": 23, "value": 1},
                                                    "timeout": 10000})
    assert response.status_code == 200, response.text
    assert response.json() == {"method": "reply", "params": {"echo": {"pin": 23, "value": 1}, "method": "setGpio"}}

    # Client-side RPC answered by the backend on RabbitMQ, and getSessionLimits answered by the gateway.
    assert await asyncio.to_thread(device.send_rpc, "sum", {"a": 2, "b": 3}) == {"result": 5}
    assert backend[-1] == {"device": ident, "method": "sum", "params": {"a": 2, "b": 3}}
    limits = await asyncio.to_thread(device.send_rpc, "getSessionLimits")
    assert limits == {"maxPayloadSize": 65536, "maxInflightMessages": 100,
                      "rateLimits": {"messages": "100:1,3000:60", "telemetryMessages": "", "telemetryDataPoints": ""}}
    assert all(call["method"] != "getSessionLimits" for call in backend)

    # Stop the SDK's poll threads: a newer poll of the same device ends theirs with 408, after which they
    # see their stop flag.
    device.unsubscribe("attributes")
    device.unsubscribe("rpc")
    device.stop_publish_worker()
    async with httpx.AsyncClient(base_url=env.http_url, timeout=10) as client:
        for path in ("attributes/updates", "rpc"):
            assert (await client.get(f"/api/v1/{device.token}/{path}", params={"timeout": 1})).status_code == 408


# --- raw HTTP: ThingsBoard's answers to everything else ---------------------------------------------------


def test_unknown_token_is_401_everywhere(http: httpx.Client) -> None:
    token = "no-such-token-" + uuid.uuid4().hex
    for method, path, body in [("GET", "attributes", None), ("POST", "attributes", b'{"a":1}'),
                               ("GET", "attributes/updates?timeout=1", None), ("GET", "rpc?timeout=1", None),
                               ("POST", "rpc", b'{"method":"m"}'), ("POST", "rpc/5", b"{}"),
                               ("POST", "telemetry", b'{"t":1}')]:
        response = http.request(method, f"/api/v1/{token}/{path}", content=body)
        assert response.status_code == 401 and response.content == b"", (method, path)


def test_long_polls_time_out_with_408(http: httpx.Client, admin: Admin, profile: dict[str, Any]) -> None:
    token, _ = provision(http, profile, admin)
    for path in ("attributes/updates", "rpc"):
        response = http.get(f"/api/v1/{token}/{path}", params={"timeout": 300})
        assert response.status_code == 408 and response.content == b""
    assert http.get(f"/api/v1/{token}/rpc", params={"timeout": "1s"}).status_code == 400


def test_bad_json_is_400_and_nothing_is_stored(http: httpx.Client, admin: Admin, profile: dict[str, Any]) -> None:
    token, ident = provision(http, profile, admin)
    for path, body in [("attributes", b'{"a":'), ("attributes", b"[1]"), ("attributes", b"{}"),
                       ("attributes", b'{"a":NaN}'), ("attributes", b'{"a":1e999}'),
                       ("rpc", b'{"method":"m","params":NaN}'),
                       ("rpc", b"nope"), ("rpc", b'{"params":1}'), ("rpc/1", b"not json"), ("telemetry", b"t=1")]:
        response = http.post(f"/api/v1/{token}/{path}", content=body)
        assert response.status_code == 400, (path, body, response.text)
        assert response.json()["status"] == "FAILURE"
    assert admin.http.get(f"/api/devices/{ident}/attributes/client").json() == []


def test_oversize_bodies_are_413(http: httpx.Client, admin: Admin, profile: dict[str, Any]) -> None:
    token, ident = provision(http, profile, admin)
    big = b'{"v":"' + b"a" * 70_000 + b'"}'
    for path in ("attributes", "rpc", "rpc/1", "telemetry"):
        assert http.post(f"/api/v1/{token}/{path}", content=big).status_code == 413, path
    assert admin.http.get(f"/api/devices/{ident}/attributes/client").json() == []


def test_attribute_request_with_thingsboards_parameters(http: httpx.Client, admin: Admin,
                                                        profile: dict[str, Any]) -> None:
    token, ident = provision(http, profile, admin)
    assert http.post(f"/api/v1/{token}/attributes", json={"fw": "1.0", "hw": "B", "on": True}).status_code == 200
    assert admin.http.post(f"/api/devices/{ident}/attributes/shared", json={"interval": 5, "mode": "eco"}
                           ).status_code == 200
    answer = http.get(f"/api/v1/{token}/attributes", params={"clientKeys": "fw,on", "sharedKeys": "mode"})
    assert answer.status_code == 200 and answer.json() == {"client": {"fw": "1.0", "on": True},
                                                           "shared": {"mode": "eco"}}
    only_shared = http.get(f"/api/v1/{token}/attributes", params={"sharedKeys": ["interval", "missing"]})
    assert only_shared.json() == {"shared": {"interval": 5}}
    assert http.get(f"/api/v1/{token}/attributes", params={"clientKeys": "nothing"}).json() == {}
    # provisionState is the server attribute ThingsBoard sets: never shown to the device.
    assert "provisionState" not in json.dumps(http.get(f"/api/v1/{token}/attributes").json())


async def test_rpc_answers_cross_instances_and_foreign_ids_are_dropped(
    env: Env, http: httpx.Client, admin: Admin, profile: dict[str, Any], admin_async: httpx.AsyncClient,
    gateway_b: tuple[ServiceProcess, str],
) -> None:
    """The RPC reaches device X's poll on instance A; device Y answering X's id (on A and on B) and an unknown
    id are answered 200 and dropped; X's own answer, sent to instance B, reaches the admin API's caller."""
    x_token, x_id = provision(http, profile, admin)
    y_token, _ = provision(http, profile, admin)
    _, b_url = gateway_b
    async with httpx.AsyncClient(base_url=env.http_url, timeout=30) as a, httpx.AsyncClient(base_url=b_url,
                                                                                             timeout=30) as b:
        poll = asyncio.create_task(a.get(f"/api/v1/{x_token}/rpc", params={"timeout": 20000}))
        asked = asyncio.create_task(admin_rpc(admin_async, x_id, {"method": "getState", "params": [1, 2],
                                                                  "timeout": 15000}))
        request = (await poll).json()
        assert request["method"] == "getState" and request["params"] == [1, 2]
        assert isinstance(request["id"], int) and 0 < request["id"] < 2**31
        for client in (a, b):
            foreign = await client.post(f"/api/v1/{y_token}/rpc/{request['id']}", json={"from": "y"})
            assert foreign.status_code == 200 and foreign.content == b""
        assert (await b.post(f"/api/v1/{x_token}/rpc/{request['id'] + 1}", json={"wrong": "id"})).status_code == 200
        assert (await b.post(f"/api/v1/{x_token}/rpc/not-a-number", json={})).status_code == 400
        assert not asked.done()
        assert (await b.post(f"/api/v1/{x_token}/rpc/{request['id']}", json={"state": "on"})).status_code == 200
        response = await asyncio.wait_for(asked, 15)
    assert response.status_code == 200 and response.json() == {"state": "on"}


async def test_what_arrives_between_polls_is_delivered_once_by_whichever_instance_polls_next(
    env: Env, http: httpx.Client, admin: Admin, profile: dict[str, Any], admin_async: httpx.AsyncClient,
    gateway_b: tuple[ServiceProcess, str],
) -> None:
    token, ident = provision(http, profile, admin)
    _, b_url = gateway_b
    offline = await admin_async.post(f"/api/devices/{ident}/rpc", json={"method": "early", "oneway": True})
    assert offline.status_code == 409  # never polled: offline
    async with httpx.AsyncClient(base_url=env.http_url, timeout=30) as a, httpx.AsyncClient(base_url=b_url,
                                                                                             timeout=30) as b:
        assert (await a.get(f"/api/v1/{token}/rpc", params={"timeout": 1})).status_code == 408
        for method in ("first", "second"):  # between two polls: they wait in the device's queue
            sent = await admin_async.post(f"/api/devices/{ident}/rpc", json={"method": method, "oneway": True})
            assert sent.status_code == 200, sent.text
        got = [(await client.get(f"/api/v1/{token}/rpc", params={"timeout": 5000})).json() for client in (b, a)]
        assert [request["method"] for request in got] == ["first", "second"]
        assert (await b.get(f"/api/v1/{token}/rpc", params={"timeout": 300})).status_code == 408  # no copy left
        assert (await a.get(f"/api/v1/{token}/rpc", params={"timeout": 300})).status_code == 408


async def test_a_client_that_leaves_mid_poll_releases_the_device(
    env: Env, http: httpx.Client, admin: Admin, profile: dict[str, Any], admin_async: httpx.AsyncClient,
) -> None:
    token, ident = provision(http, profile, admin)
    sock = socket.create_connection(("127.0.0.1", env.http_port))
    try:
        sock.sendall(f"GET /api/v1/{token}/attributes/updates?timeout=60000 HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
        await until(polling(env, "attributes", ident, 1), "the poll consumes the device's queue")
    finally:
        sock.close()
    await until(polling(env, "attributes", ident, 0), "the poll ended with its client")


async def test_client_rpc_without_backend_answer_is_408(env: Env, http: httpx.Client, admin: Admin,
                                                        profile: dict[str, Any], backend: list[dict[str, Any]]) -> None:
    token, ident = provision(http, profile, admin)
    async with httpx.AsyncClient(base_url=env.http_url, timeout=30) as client:
        response = await client.post(f"/api/v1/{token}/rpc", json={"method": "noAnswer", "params": {"x": 1}})
    assert response.status_code == 408 and response.content == b""
    assert {"device": ident, "method": "noAnswer", "params": {"x": 1}} in backend


async def test_long_poll_outlives_the_http_deadlines(http: httpx.Client, admin: Admin, profile: dict[str, Any],
                                                     gateway_b: tuple[ServiceProcess, str]) -> None:
    """On instance B the head, body and keep-alive deadlines are 1 s; a 2.5 s poll still gets its 408."""
    token, _ = provision(http, profile, admin)
    _, b_url = gateway_b
    async with httpx.AsyncClient(base_url=b_url, timeout=30) as client:
        started = time.monotonic()
        response = await client.get(f"/api/v1/{token}/attributes/updates", params={"timeout": 2500})
    assert response.status_code == 408 and time.monotonic() - started >= 2.4


def test_rate_limit_is_429_as_thingsboard(http: httpx.Client, admin: Admin, profile: dict[str, Any],
                                          gateway_b: tuple[ServiceProcess, str]) -> None:
    token, _ = provision(http, profile, admin)
    other, _ = provision(http, profile, admin)
    _, b_url = gateway_b
    with httpx.Client(base_url=b_url, timeout=10) as b:
        codes = [b.post(f"/api/v1/{token}/telemetry", json={"n": n}).status_code for n in range(B_RATE + 3)]
        refused = b.get(f"/api/v1/{token}/attributes")
        assert b.post(f"/api/v1/{other}/telemetry", json={"n": 0}).status_code == 200  # per device
    assert codes == [200] * B_RATE + [429] * 3
    body = refused.json()
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert body["status"] == 429 and body["errorCode"] == 33 and "Too many requests" in body["message"]


FUZZ_REQUESTS = 1000
FUZZ_CONNECTIONS = 16


def fuzz_body(rng: random.Random) -> bytes:
    """Random bytes, odd JSON, oversize keys and key counts, NUL, NaN, deep nesting, and RPC-shaped objects."""
    text = lambda: rng.choice(["", "a", "\x00", "é" * 3, "k" * rng.choice([255, 256, 3000]), "😀", "a\u0000b"])  # noqa: E731
    value = lambda: rng.choice([None, True, 1, -1, 2**70, 1.5, text(), [1, 2], {"n": {"m": [None]}}])  # noqa: E731
    kind = rng.randrange(10)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 200))
    if kind == 1:
        return rng.choice([b"", b"null", b"[]", b"{}", b'"s"', b"1", b"NaN", b'{"a":NaN}', b'{"a":1e999}',
                           b"[" * 3000, b'{"a":' * 600, b'{"a":1', b"\xff\xfe"])
    if kind == 2:
        return json.dumps({f"k{i}": i for i in range(rng.choice([999, 1000, 1001, 1500]))}).encode()
    if kind < 6:
        return json.dumps({text(): value() for _ in range(rng.randrange(4))}).encode()
    # RPC-shaped; a client-side call only ever to getSessionLimits (any other method waits for the backend)
    method = rng.choice(["getSessionLimits", "", 5, None, "m" * 256, ["x"]])
    call: dict[str, Any] = {"method": method, "params": value()}
    if rng.random() < 0.3:
        del call["method"]
    return json.dumps(call).encode()


async def test_device_api_fuzz_finds_no_5xx(env: Env, http: httpx.Client, admin: Admin,
                                            profile: dict[str, Any]) -> None:
    """Random methods, paths, tokens, query strings and bodies: every answer is < 500 (the zz test then finds no
    traceback in any log). Polls get only timeouts that end at once (negative, tiny or not a number)."""
    rng = random.Random(20260712)
    tokens = [provision(http, profile, admin)[0] for _ in range(8)]
    paths = ["attributes"] * 3 + ["attributes/updates", "rpc", "rpc/{id}", "rpc/{id}", "telemetry",
                                  rng.choice(["", "attributes/x", "rpc/1/2", "claim"])]
    ids = ["1", "0", "-1", "2147483647", "2147483648", "abc", "%00", "1.5", str(3 << 21), "9" * 30]
    statuses: Counter[int] = Counter()

    def request() -> tuple[str, str, dict[str, str], bytes]:
        token = rng.choice(tokens) if rng.random() < 0.8 else rng.choice(["bad", "%00", "a" * 300, "..", " "])
        path = rng.choice(paths).replace("{id}", rng.choice(ids))
        method = rng.choice(["GET", "POST"]) if rng.random() < 0.9 else rng.choice(["PUT", "DELETE", "HEAD", "PATCH"])
        params: dict[str, str] = {}
        if path in ("attributes/updates", "rpc") or rng.random() < 0.3:
            params["timeout"] = rng.choice(["-1", "1", "20", "x", "", " ", "1e3", "-99999999999999999999"])
        for name in ("clientKeys", "sharedKeys"):
            if rng.random() < 0.3:
                params[name] = rng.choice(["", ",", "a,b", "k" * 256, ",".join(str(i) for i in range(1001)), "\x00"])
        return method, f"/api/v1/{token}/{path}", params, fuzz_body(rng) if method != "GET" else b""

    async def worker(client: httpx.AsyncClient, count: int) -> None:
        for _ in range(count):
            method, url, params, body = request()
            response = await client.request(method, url, params=params, content=body)
            statuses[response.status_code] += 1

    async with httpx.AsyncClient(base_url=env.http_url, timeout=30) as client:
        await asyncio.wait_for(asyncio.gather(*(worker(client, FUZZ_REQUESTS // FUZZ_CONNECTIONS)
                                                for _ in range(FUZZ_CONNECTIONS))), 120)
    print(f"\ndevice API fuzz: statuses {dict(sorted(statuses.items()))}")
    assert not any(code >= 500 for code in statuses), statuses
    assert statuses[200] and statuses[400] and statuses[401] and statuses[408]


async def test_zz_sigterm_answers_open_polls_and_the_gateway_exits_at_once(
    env: Env, http: httpx.Client, admin: Admin, profile: dict[str, Any], admin_async: httpx.AsyncClient,
    gateway_b: tuple[ServiceProcess, str],
) -> None:
    process, b_url = gateway_b
    token, ident = provision(http, profile, admin)
    async with httpx.AsyncClient(base_url=b_url, timeout=30) as client:
        poll = asyncio.create_task(client.get(f"/api/v1/{token}/rpc", params={"timeout": 60000}))
        await until(polling(env, "rpc", ident, 1), "the poll consumes the device's queue")
        started = time.monotonic()
        process.signal(signal.SIGTERM)
        response = await asyncio.wait_for(poll, 10)
    assert response.status_code == 408
    assert process.proc is not None
    assert await asyncio.to_thread(process.proc.wait, 10) == 0
    assert time.monotonic() - started < 5
    assert "graceful shutdown exceeded" not in process.output and "Traceback" not in process.output


def test_zz_no_traceback_and_no_token_in_any_log(stack: Stack, gateway_b: tuple[ServiceProcess, str]) -> None:
    logs = stack.output() + "\n" + gateway_b[0].output
    assert "Traceback" not in logs, logs[-4000:]
    assert TOKENS and not any(token in logs for token in TOKENS)
