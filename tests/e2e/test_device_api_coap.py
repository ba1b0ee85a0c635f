"""ThingsBoard's CoAP device API after provisioning, end to end, with clients we did not write: libcoap's
``coap-client`` (the client ThingsBoard's CoAP documentation uses) and aiocoap's client for the observe
flows whose codes and cancellation a test must see. The operator's side is the admin API (shared attributes,
server-side RPC) and a backend consumer on RabbitMQ (aio-pika) answering client-side RPCs.

Flows: provision over CoAP, telemetry and client attributes, attribute requests, observing shared-attribute
updates set through the admin API, answering a server-side RPC sent through the admin API (observe
``/rpc``, ``POST /rpc/{id}``), client-side RPC answered by the backend, ``getSessionLimits``, a second
gateway instance (the RPC reaches the device through the instance that holds its observation; its own rate
limit → 4.29), and bad input (not JSON, oversize, unknown id, another device's id, bad token) leaving every
other device untouched.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aio_pika
import aiocoap
import httpx
import pytest
from aiocoap.numbers.codes import Code
from devstack import Stack

from tests.ports import free_udp_port

from .conftest import Admin, Env, tb_request
from .test_http_provisioning import TelemetryListener, device_by_name

SERVICES = ["credentials", "provisioning_core", "admin_api", "coap_gateway"]
COAP_CLIENT = shutil.which("coap-client-notls") or shutil.which("coap-client")
JSON_CF = 50
#: Tokens handed out in this module, checked against the services' logs at the end.
TOKENS: set[str] = set()


@pytest.fixture(scope="module")
def stack(env: Env) -> Iterator[Stack]:
    """What a CoAP device needs: credentials, the core (provisioning and device_api), the admin API, the
    CoAP gateway."""
    assert COAP_CLIENT, "libcoap's coap-client is needed (Debian: libcoap3-bin, which .ci/run installs)"
    running = Stack(env.variables(), SERVICES).start(timeout=60)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
async def coap(stack: Stack) -> AsyncIterator[aiocoap.Context]:
    context = await aiocoap.Context.create_client_context(transports=["udp6"], loggername="coap-device-api-test")
    try:
        yield context
    finally:
        await context.shutdown()


@pytest.fixture(scope="module")
async def admin_async(env: Env, stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """The admin API for calls that wait for the device (two-way RPC) while the test plays the device."""
    async with httpx.AsyncClient(base_url=env.admin_url, headers={"Authorization": f"Bearer {env.admin_token}"},
                                 timeout=60) as client:
        yield client


class Backend:
    """The operator's backend on RabbitMQ, as the README's example consumer: takes client-side RPCs from
    ``device.rpc`` and answers each on its ``reply_to`` with its ``correlation_id``."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def __aenter__(self) -> Backend:
        self.conn = await aio_pika.connect(self.env.infra.rabbitmq_url)
        channel = await self.conn.channel()
        exchange = await channel.declare_exchange(f"{self.env.namespace}device.rpc", aio_pika.ExchangeType.TOPIC,
                                                  durable=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key="#")  # every device

        async def on_request(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                call = json.loads(message.body)
                self.calls.append((message.routing_key or "", call))
                answer = {"answer": call["method"], "echo": call["params"]}
                await channel.default_exchange.publish(
                    aio_pika.Message(json.dumps(answer).encode(), correlation_id=message.correlation_id),
                    routing_key=message.reply_to or "")

        await queue.consume(on_request)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()


@pytest.fixture(scope="module")
async def backend(env: Env, stack: Stack) -> AsyncIterator[Backend]:
    async with Backend(env) as running:
        yield running


# --- clients -----------------------------------------------------------------------------------------------


async def coap_client(env: Env, path: str, *args: str, port: int | None = None,
                      timeout: float = 30) -> tuple[str, str]:
    """One libcoap ``coap-client`` run: (what it printed: the payload, what it said on stderr: e.g. ``4.00 Bad
    Request`` for an error answer)."""
    assert COAP_CLIENT
    proc = await asyncio.create_subprocess_exec(
        COAP_CLIENT, "-B", str(int(timeout)), *args, f"coap://127.0.0.1:{port or env.coap_port}{path}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout + 5)
    return out.decode(), err.decode()


async def coap_post(env: Env, path: str, body: dict[str, Any] | str, **kwargs: Any) -> tuple[str, str]:
    text = body if isinstance(body, str) else json.dumps(body)
    return await coap_client(env, path, "-m", "post", "-t", "50", "-e", text, **kwargs)


class CoapObserver:
    """``coap-client -s <seconds> -w``: observes a resource and prints each notification's payload on a line."""

    def __init__(self, env: Env, path: str, seconds: int) -> None:
        self.env, self.path, self.seconds = env, path, seconds

    async def __aenter__(self) -> CoapObserver:
        assert COAP_CLIENT
        self.proc = await asyncio.create_subprocess_exec(
            COAP_CLIENT, "-m", "get", "-s", str(self.seconds), "-B", str(self.seconds), "-w",
            f"coap://127.0.0.1:{self.env.coap_port}{self.path}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        return self

    async def payload(self, timeout: float = 15) -> str:
        """The next non-empty payload (the RPC resource's first answer, 2.03, has none)."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.proc.stdout.readline()).decode()
                assert line, f"coap-client ended: {(await self.proc.stderr.read()).decode()}"  # type: ignore[union-attr]
                if line.strip():
                    return line.strip()

    async def finished(self) -> int:
        """Wait for coap-client to end its observation itself (after ``-s``: a GET with Observe = 1)."""
        return await asyncio.wait_for(self.proc.wait(), self.seconds + 15)

    async def __aexit__(self, *exc: object) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            await self.proc.wait()


async def coap_request(coap: aiocoap.Context, env: Env, path: str, payload: bytes | dict[str, Any] = b"", *,
                       code: Code = Code.POST, port: int | None = None, **options: Any) -> aiocoap.Message:
    if isinstance(payload, dict):
        payload = json.dumps(payload).encode()
    message = aiocoap.Message(code=code, uri=f"coap://127.0.0.1:{port or env.coap_port}{path}", payload=payload,
                              **options)
    async with asyncio.timeout(30):
        return await coap.request(message).response


async def provision(env: Env, admin: Admin, profile: dict[str, Any]) -> tuple[str, str]:
    """A device provisions itself over CoAP with coap-client; returns (token, device id)."""
    name = f"coap-dev-{uuid.uuid4().hex[:8]}"
    out, err = await coap_post(env, "/api/v1/provision", tb_request(profile, deviceName=name))
    answer = json.loads(out)
    assert answer["status"] == "SUCCESS" and answer["credentialsType"] == "ACCESS_TOKEN", (out, err)
    TOKENS.add(answer["credentialsValue"])
    return answer["credentialsValue"], str(device_by_name(admin, name)["id"])


async def wait_online(admin_async: httpx.AsyncClient, device_id: str) -> None:
    """Until the admin API finds a session for the device: a one-way RPC is taken (200) instead of 409."""
    async with asyncio.timeout(15):
        while True:
            response = await admin_async.post(f"/api/devices/{device_id}/rpc",
                                              json={"method": "ping", "params": {}, "oneway": True})
            if response.status_code == 200:
                return
            assert response.status_code == 409, response.text
            await asyncio.sleep(0.1)


async def wait_offline(admin_async: httpx.AsyncClient, device_id: str) -> None:
    """Until the admin API finds no session for the device any more (its RPCs get 409)."""
    async with asyncio.timeout(15):
        while True:
            response = await admin_async.post(f"/api/devices/{device_id}/rpc",
                                              json={"method": "ping", "params": {}, "oneway": True})
            if response.status_code == 409:
                return
            assert response.status_code == 200, response.text
            await asyncio.sleep(0.1)


def client_attributes(admin: Admin, device_id: str) -> dict[str, Any]:
    response = admin.http.get(f"/api/devices/{device_id}/attributes/client")
    assert response.status_code == 200, response.text
    return {item["key"]: item["value"] for item in response.json()}


# --- ThingsBoard's documented flows, with coap-client -------------------------------------------------------


async def test_thingsboard_coap_flows_with_coap_client(
    env: Env, admin: Admin, admin_async: httpx.AsyncClient, backend: Backend
) -> None:
    profile = admin.create_profile()
    token, device_id = await provision(env, admin, profile)
    base = f"/api/v1/{token}"

    async with TelemetryListener(env, device_id) as telemetry:
        out, err = await coap_post(env, f"{base}/telemetry", {"temperature": 21.5})
        assert (out, err) == ("", "")  # 2.01, nothing to print
        assert json.loads(await telemetry.get()) == {"temperature": 21.5}

    out, err = await coap_post(env, f"{base}/attributes", {"attribute1": "value1", "attribute2": True, "n": 42.0})
    assert (out, err) == ("", "")
    assert client_attributes(admin, device_id) == {"attribute1": "value1", "attribute2": True, "n": 42.0}

    saved = admin.http.post(f"/api/devices/{device_id}/attributes/SHARED_SCOPE", json={"shared1": "s", "level": 3})
    assert saved.status_code == 200, saved.text
    out, err = await coap_client(env, f"{base}/attributes?clientKeys=attribute1,attribute2&sharedKeys=shared1,x")
    assert json.loads(out) == {"client": {"attribute1": "value1", "attribute2": True}, "shared": {"shared1": "s"}}
    out, _ = await coap_client(env, f"{base}/attributes")  # neither named: every client and shared attribute
    assert json.loads(out) == {"client": {"attribute1": "value1", "attribute2": True, "n": 42.0},
                               "shared": {"shared1": "s", "level": 3}}
    _, err = await coap_client(env, f"{base}/attributes?sharedKeys=nothing")
    assert err.startswith("4.04"), err  # ThingsBoard: nothing found

    # Client-side RPC, answered by the backend consumer on RabbitMQ.
    out, err = await coap_post(env, f"{base}/rpc", {"method": "getCurrentTime", "params": {"tz": "UTC"}})
    assert json.loads(out) == {"answer": "getCurrentTime", "echo": {"tz": "UTC"}}, err
    assert (device_id, {"method": "getCurrentTime", "params": {"tz": "UTC"}}) in backend.calls
    # getSessionLimits: answered by the gateway itself, with what it enforces.
    out, _ = await coap_post(env, f"{base}/rpc", {"method": "getSessionLimits", "params": {}})
    assert json.loads(out) == {"maxPayloadSize": 65536, "maxInflightMessages": 100,
                               "rateLimits": {"messages": "100:1,3000:60", "telemetryMessages": "",
                                              "telemetryDataPoints": ""}}
    assert all(call[1]["method"] != "getSessionLimits" for call in backend.calls)

    # Server-side RPC: observe /rpc (ThingsBoard's coap-client -s example), answer on /rpc/{id}.
    async with CoapObserver(env, f"{base}/rpc", seconds=30) as observer:
        await wait_online(admin_async, device_id)
        assert json.loads(await observer.payload())["method"] == "ping"  # the probe, one-way
        asked = asyncio.create_task(admin_async.post(
            f"/api/devices/{device_id}/rpc", json={"method": "setGpio", "params": {"pin": 23, "value": 1}}))
        while True:
            request = json.loads(await observer.payload())
            if request["method"] != "ping":  # wait_online may have sent more than one probe
                break
        assert request == {"id": request["id"], "method": "setGpio", "params": {"pin": 23, "value": 1}}
        out, err = await coap_post(env, f"{base}/rpc/{request['id']}", {"result": "ok"})
        assert (out, err) == ("", "")
        answer = await asyncio.wait_for(asked, 30)
        assert (answer.status_code, answer.json()) == (200, {"result": "ok"})

        # ThingsBoard's own two-way path works the same.
        asked = asyncio.create_task(admin_async.post(f"/api/rpc/twoway/{device_id}",
                                                     json={"method": "getValue", "params": None}))
        request = json.loads(await observer.payload())
        assert (request["method"], request["params"]) == ("getValue", None)
        await coap_post(env, f"{base}/rpc/{request['id']}", "17")
        assert (await asyncio.wait_for(asked, 30)).json() == 17


async def test_observation_ended_by_coap_client_detaches_the_device(
    env: Env, admin: Admin, admin_async: httpx.AsyncClient
) -> None:
    """coap-client ends its observation after ``-s`` seconds (Observe = 1): the device is offline again."""
    token, device_id = await provision(env, admin, admin.create_profile())
    async with CoapObserver(env, f"/api/v1/{token}/rpc", seconds=2) as observer:
        await wait_online(admin_async, device_id)
        assert await observer.finished() == 0
    await wait_offline(admin_async, device_id)
    offline = await admin_async.post(f"/api/devices/{device_id}/rpc", json={"method": "m", "params": {}})
    assert offline.status_code == 409


# --- observe with aiocoap: codes, notifications, cancellation ------------------------------------------------


async def test_observe_shared_attribute_updates_set_through_the_admin_api(
    env: Env, admin: Admin, admin_async: httpx.AsyncClient, coap: aiocoap.Context
) -> None:
    token, device_id = await provision(env, admin, admin.create_profile())
    admin.http.post(f"/api/devices/{device_id}/attributes/shared", json={"mode": "eco"})
    request = aiocoap.Message(code=Code.GET, uri=f"coap://127.0.0.1:{env.coap_port}/api/v1/{token}/attributes",
                              observe=0)
    observed = coap.request(request)
    first = await asyncio.wait_for(observed.response, 15)
    # ThingsBoard's first answer to the observation: every shared attribute.
    assert (first.code, first.opt.observe, json.loads(first.payload)) == (Code.CONTENT, 0, {"mode": "eco"})
    notifications = observed.observation.__aiter__()

    saved = await admin_async.post(f"/api/devices/{device_id}/attributes/shared", json={"mode": "boost", "fan": 2})
    assert saved.status_code == 200, saved.text
    update = await asyncio.wait_for(notifications.__anext__(), 15)
    assert (update.code, update.opt.content_format, json.loads(update.payload)) == (
        Code.CONTENT, JSON_CF, {"mode": "boost", "fan": 2})
    deleted = await admin_async.delete(f"/api/devices/{device_id}/attributes/shared", params={"keys": "fan"})
    assert deleted.status_code == 200, deleted.text
    assert json.loads((await asyncio.wait_for(notifications.__anext__(), 15)).payload) == {"deleted": ["fan"]}
    # Client attributes and server attributes are not shared-attribute updates.
    await coap_request(coap, env, f"/api/v1/{token}/attributes", {"fw": "1.0"})
    admin.http.post(f"/api/devices/{device_id}/attributes/server", json={"secret": 1})
    admin.http.post(f"/api/devices/{device_id}/attributes/shared", json={"mode": "night"})
    assert json.loads((await asyncio.wait_for(notifications.__anext__(), 15)).payload) == {"mode": "night"}

    # The client cancels. aiocoap (0.4.17) takes the next notification still and answers the one after it
    # with RST, which ends the observation: the device is detached.
    observed.observation.cancel()
    for mode in ("off", "standby"):
        admin.http.post(f"/api/devices/{device_id}/attributes/shared", json={"mode": mode})
    await wait_offline(admin_async, device_id)
    # Later updates wait in Postgres for the device's next request.
    admin.http.post(f"/api/devices/{device_id}/attributes/shared", json={"mode": "away"})
    answer = await coap_request(coap, env, f"/api/v1/{token}/attributes?sharedKeys=mode", code=Code.GET)
    assert json.loads(answer.payload) == {"shared": {"mode": "away"}}


async def test_observe_codes_and_a_replaced_observation(
    env: Env, admin: Admin, admin_async: httpx.AsyncClient, coap: aiocoap.Context
) -> None:
    token, device_id = await provision(env, admin, admin.create_profile())
    uri = f"coap://127.0.0.1:{env.coap_port}/api/v1/{token}/rpc"
    first = coap.request(aiocoap.Message(code=Code.GET, uri=uri, observe=0))
    answer = await asyncio.wait_for(first.response, 15)
    assert (answer.code, answer.opt.observe, answer.payload) == (Code.VALID, 0, b"")  # ThingsBoard: 2.03
    first_notifications = first.observation.__aiter__()
    # Waiting for the first observation's end before it can come: aiocoap's iterator is a lossy queue of
    # one, and the terminal 2.02 is followed at once by the end of the observation, which overwrites it
    # when nobody awaits it yet (the gateway ends the old observation before it answers the new one).
    ending = asyncio.create_task(first_notifications.__anext__())
    await asyncio.sleep(0)  # the task now awaits the iterator's pending notification
    # A second observation of the same device replaces the first (ThingsBoard): the first ends.
    second = coap.request(aiocoap.Message(code=Code.GET, uri=uri, observe=0))
    assert (await asyncio.wait_for(second.response, 15)).code is Code.VALID
    ended = await asyncio.wait_for(ending, 15)
    assert (ended.code, ended.opt.observe) == (Code.DELETED, None)  # ThingsBoard: the old one gets 2.02
    with pytest.raises(StopAsyncIteration):
        await first_notifications.__anext__()
    asked = asyncio.create_task(admin_async.post(f"/api/devices/{device_id}/rpc",
                                                 json={"method": "reboot", "params": {"delay": 1}}))
    notification = await asyncio.wait_for(second.observation.__aiter__().__anext__(), 15)
    call = json.loads(notification.payload)
    assert (call["method"], call["params"]) == ("reboot", {"delay": 1})
    reply = await coap_request(coap, env, f"/api/v1/{token}/rpc/{call['id']}", {"rebooting": True})
    assert reply.code is Code.CREATED
    assert (await asyncio.wait_for(asked, 30)).json() == {"rebooting": True}
    second.observation.cancel()
    # GET /rpc without Observe, and telemetry cannot be observed (ThingsBoard: 4.00 / not a GET resource).
    assert (await coap_request(coap, env, f"/api/v1/{token}/rpc", code=Code.GET)).code is Code.BAD_REQUEST
    no_token = await coap_request(coap, env, "/api/v1/no-such-token/rpc", code=Code.GET, observe=0)
    assert no_token.code is Code.UNAUTHORIZED and no_token.opt.observe is None


# --- bad input ------------------------------------------------------------------------------------------------


async def test_bad_input_is_refused_and_other_devices_are_untouched(
    env: Env, admin: Admin, admin_async: httpx.AsyncClient, coap: aiocoap.Context, backend: Backend
) -> None:
    profile = admin.create_profile()
    token_a, device_a = await provision(env, admin, profile)
    token_b, device_b = await provision(env, admin, profile)
    observed = coap.request(aiocoap.Message(code=Code.GET, observe=0,
                                            uri=f"coap://127.0.0.1:{env.coap_port}/api/v1/{token_a}/rpc"))
    await asyncio.wait_for(observed.response, 15)
    notifications = observed.observation.__aiter__()
    asked = asyncio.create_task(admin_async.post(f"/api/devices/{device_a}/rpc",
                                                 json={"method": "read", "params": {"n": 1}, "timeout": 30000}))
    call = json.loads((await asyncio.wait_for(notifications.__anext__(), 15)).payload)
    a_id = call["id"]

    b = f"/api/v1/{token_b}"
    cases: list[tuple[str, bytes, Code]] = [
        (f"{b}/attributes", b"not json", Code.BAD_REQUEST),
        (f"{b}/attributes", b"[1,2]", Code.BAD_REQUEST),
        (f"{b}/attributes", b"{}", Code.BAD_REQUEST),
        (f"{b}/attributes", json.dumps({"big": "x" * 70_000}).encode(), Code.REQUEST_ENTITY_TOO_LARGE),
        (f"{b}/telemetry", b"temperature=25", Code.BAD_REQUEST),
        (f"{b}/rpc", b'{"params":{}}', Code.BAD_REQUEST),  # client-side RPC without a method
        (f"{b}/rpc", b"not json", Code.BAD_REQUEST),
        (f"{b}/rpc/{a_id}", b"not json", Code.BAD_REQUEST),
        (f"{b}/rpc/abc", b"{}", Code.BAD_REQUEST),
        (f"{b}/rpc/{a_id}", b'{"forged":true}', Code.CREATED),  # another device's id: accepted, dropped
        (f"{b}/rpc/{a_id + 100_000}", b'{"unknown":true}', Code.CREATED),  # unknown id: accepted, dropped
        ("/api/v1/not-a-token/attributes", b'{"a":1}', Code.UNAUTHORIZED),
        ("/api/v1/not-a-token/rpc", b'{"method":"m"}', Code.UNAUTHORIZED),
        (f"/api/v1/not-a-token/rpc/{a_id}", b'{"forged":true}', Code.UNAUTHORIZED),
    ]
    for path, payload, code in cases:
        answer = await coap_request(coap, env, path, payload)
        assert answer.code is code, (path, payload[:40], answer)
        if code not in (Code.CREATED, Code.UNAUTHORIZED):
            assert json.loads(answer.payload)["status"] == "FAILURE"
    # Nothing was stored for B, nothing reached the backend from it, and A's caller still waits ...
    assert client_attributes(admin, device_b) == {}
    assert all(device != device_b for device, _ in backend.calls)
    assert not asked.done()
    # ... for A's own answer, which it gets.
    reply = await coap_request(coap, env, f"/api/v1/{token_a}/rpc/{a_id}", {"value": 7})
    assert reply.code is Code.CREATED
    answer = await asyncio.wait_for(asked, 30)
    assert (answer.status_code, answer.json()) == (200, {"value": 7})
    # A's observation lives on; B still works normally.
    asked = asyncio.create_task(admin_async.post(f"/api/devices/{device_a}/rpc",
                                                 json={"method": "again", "params": None, "oneway": True}))
    assert json.loads((await asyncio.wait_for(notifications.__anext__(), 15)).payload)["method"] == "again"
    assert (await asked).status_code == 200
    assert (await coap_request(coap, env, f"{b}/attributes", {"ok": 1})).code is Code.CREATED
    assert client_attributes(admin, device_b) == {"ok": 1}
    observed.observation.cancel()


# --- a second gateway instance --------------------------------------------------------------------------------


async def test_rpc_reaches_the_instance_holding_the_observation_and_its_rate_limit(
    env: Env, admin: Admin, admin_async: httpx.AsyncClient, coap: aiocoap.Context
) -> None:
    """Another CoAP gateway process on the same bus, with its own rate limit (5 messages a minute)."""
    port = free_udp_port()
    second = await asyncio.to_thread(
        Stack(env.variables(COAP_PORT=str(port), DEVICE_MESSAGES_RATE_LIMIT="5:60"), ["coap_gateway"]).start)
    try:
        token, device_id = await provision(env, admin, admin.create_profile())
        observed = coap.request(aiocoap.Message(code=Code.GET, observe=0,
                                                uri=f"coap://127.0.0.1:{port}/api/v1/{token}/rpc"))  # message 1
        await asyncio.wait_for(observed.response, 15)
        asked = asyncio.create_task(admin_async.post(f"/api/devices/{device_id}/rpc",
                                                     json={"method": "where", "params": {}}))
        call = json.loads((await asyncio.wait_for(observed.observation.__aiter__().__anext__(), 15)).payload)
        # The answer goes to the instance that sent the RPC (a UDP load balancer keeps client-IP affinity).
        reply = await coap_request(coap, env, f"/api/v1/{token}/rpc/{call['id']}", {"here": 2}, port=port)  # 2
        assert reply.code is Code.CREATED
        assert (await asyncio.wait_for(asked, 30)).json() == {"here": 2}
        observed.observation.cancel()

        limits = await coap_request(coap, env, f"/api/v1/{token}/rpc", {"method": "getSessionLimits"}, port=port)
        assert json.loads(limits.payload)["rateLimits"]["messages"] == "5:60"  # message 3
        codes = [(await coap_request(coap, env, f"/api/v1/{token}/telemetry", {"t": n}, port=port)).code
                 for n in range(3)]
        assert codes == [Code.CREATED, Code.CREATED, Code.TOO_MANY_REQUESTS]
        limited = await coap_request(coap, env, f"/api/v1/{token}/attributes", {"a": 1}, port=port)
        assert limited.code is Code.TOO_MANY_REQUESTS and limited.opt.max_age == 1
        assert client_attributes(admin, device_id) == {}
        # The first instance has its own budget.
        assert (await coap_request(coap, env, f"/api/v1/{token}/telemetry", {"t": 9})).code is Code.CREATED
    finally:
        await asyncio.to_thread(second.stop)
    assert "Traceback" not in second.output()


def test_zz_no_traceback_and_no_token_in_the_logs(stack: Stack) -> None:
    logs = stack.output()
    assert "Traceback" not in logs
    errors = [line for line in stack["coap_gateway"].lines if " ERROR " in line or " WARNING " in line]
    assert not errors, errors[:5]
    assert TOKENS and not [token for token in TOKENS if token in logs]
