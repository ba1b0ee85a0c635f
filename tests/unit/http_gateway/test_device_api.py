"""The HTTP device API's routes with a stand-in for the bus: ThingsBoard's paths, parameters and codes,
long polls (answered, timed out, replaced, released on disconnect, ended on shutdown), RPC ids, rate limits."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from http_gateway.device_api import DeviceApi, RateLimits
from provisioning_common.bus import RpcError, RpcTimeout
from provisioning_common.contract import DOWNLINK_ATTRIBUTES, DOWNLINK_RPC
from provisioning_common.device_link import Downlink
from provisioning_common.settings import Settings

from .fakes import FakeApi, Incoming


def make(**overrides: Any) -> tuple[FastAPI, DeviceApi, FakeApi]:
    settings = Settings(bus_namespace="unit.", max_body_bytes=1024, **overrides)
    api = FakeApi()
    device_api = DeviceApi(settings, lambda: api)  # type: ignore[arg-type, return-value]
    app = FastAPI()
    app.include_router(device_api.router)
    return app, device_api, api


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[httpx.AsyncClient, DeviceApi, FakeApi]]:
    app, device_api, api = make()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        yield client, device_api, api


Gateway = tuple[httpx.AsyncClient, DeviceApi, FakeApi]


def rpc(two_way: bool = True, method: str = "setGpio") -> Downlink:
    if two_way:
        return Downlink(DOWNLINK_RPC, {"method": method, "params": {"pin": 1}}, "reply.q", "c1", time.time() + 30)
    return Downlink(DOWNLINK_RPC, {"method": method, "params": {"pin": 1}})


# --- attributes --------------------------------------------------------------------------------------


async def test_attribute_request_answers_both_scopes(gateway: Gateway) -> None:
    client, _, api = gateway
    response = await client.get("/api/v1/token-a/attributes", params={"clientKeys": "fw, hw", "sharedKeys": "interval"})
    assert response.status_code == 200 and response.json() == {"client": {"fw": "1.0"}, "shared": {"interval": 5}}
    [query] = api.queries
    assert (query.device_id, query.client_keys, query.shared_keys) == ("device-a", ["fw", "hw"], ["interval"])


async def test_repeated_key_parameters_are_joined_and_no_keys_asks_for_all(gateway: Gateway) -> None:
    client, _, api = gateway
    # What ThingsBoard's HTTP SDK sends for a list (firmware info): sharedKeys=a&sharedKeys=b.
    await client.get("/api/v1/token-a/attributes", params={"sharedKeys": ["fw_title", "fw_version"]})
    await client.get("/api/v1/token-a/attributes")
    assert [(q.client_keys, q.shared_keys) for q in api.queries] == [(None, ["fw_title", "fw_version"]), ([], [])]


async def test_attribute_request_refusals(gateway: Gateway) -> None:
    client, _, api = gateway
    assert (await client.get("/api/v1/unknown/attributes")).status_code == 401
    too_many = ",".join(f"k{i}" for i in range(1001))
    assert (await client.get("/api/v1/token-a/attributes", params={"clientKeys": too_many})).status_code == 400
    assert (await client.get("/api/v1/token-a/attributes", params={"clientKeys": "x" * 256})).status_code == 400
    api.bus.down = True
    response = await client.get("/api/v1/token-a/attributes")
    assert response.status_code == 503 and response.headers["retry-after"] == "1"


async def test_client_attributes_are_saved(gateway: Gateway) -> None:
    client, _, api = gateway
    response = await client.post("/api/v1/token-a/attributes", content=b'{"fw":"2.0","on":true}')
    assert response.status_code == 200 and response.content == b""
    assert api.saved == [("device-a", {"fw": "2.0", "on": True})]


@pytest.mark.parametrize("body", [b"not json", b"[1,2]", b"{}", b'"text"', b'{"":1}', b"", b"[" * 1000,
                                  b'{"a":NaN}', b'{"a":-Infinity}', b'{"a":1e400}'])
async def test_bad_client_attributes_are_400_and_nothing_saved(gateway: Gateway, body: bytes) -> None:
    client, _, api = gateway
    response = await client.post("/api/v1/token-a/attributes", content=body)
    assert response.status_code == 400 and response.json()["status"] == "FAILURE"
    assert api.saved == []


async def test_oversize_body_is_413_and_a_refusal_by_the_core_is_400(gateway: Gateway) -> None:
    client, _, api = gateway
    assert (await client.post("/api/v1/token-a/attributes", content=b'{"a":"' + b"x" * 2000 + b'"}')).status_code == 413
    assert (await client.post("/api/v1/token-a/rpc", content=b"x" * 2000)).status_code == 413
    assert (await client.post("/api/v1/token-a/rpc/5", content=b"x" * 2000)).status_code == 413
    api.save_error = RpcError("attributes not saved: a string contains \\u0000")
    assert (await client.post("/api/v1/token-a/attributes", content=b'{"a":1}')).status_code == 400
    api.save_error = RpcTimeout("no answer")
    assert (await client.post("/api/v1/token-a/attributes", content=b'{"a":1}')).status_code == 503


async def test_telemetry(gateway: Gateway) -> None:
    client, _, api = gateway
    assert (await client.post("/api/v1/token-a/telemetry", content=b'{"t":1}')).status_code == 200
    assert (await client.post("/api/v1/token-a/telemetry", content=b"t=1")).status_code == 400
    assert (await client.post("/api/v1/nobody/telemetry", content=b'{"t":1}')).status_code == 401
    assert api.telemetry == [("device-a", b'{"t":1}')]


# --- rate limits -------------------------------------------------------------------------------------


def test_rate_limits_are_per_device_and_bounded() -> None:
    limits = RateLimits("2:60", size=3)
    assert [limits.allow("a") for _ in range(3)] == [True, True, False]
    assert limits.allow("b")
    for key in ("c", "d", "e"):
        limits.allow(key)
    assert len(limits) == 3
    assert all(RateLimits("").allow("a") for _ in range(1000))


async def test_over_the_rate_limit_is_429_with_thingsboards_body() -> None:
    app, _, api = make(device_messages_rate_limit="3:60")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        codes = [(await client.post("/api/v1/token-a/telemetry", content=b'{"t":1}')).status_code for _ in range(4)]
        refused = await client.get("/api/v1/token-a/attributes")
        other = await client.post("/api/v1/token-b/telemetry", content=b'{"t":1}')
    assert codes == [200, 200, 200, 429]
    body = refused.json()
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert body["status"] == 429 and body["errorCode"] == 33
    assert body["message"] == "Too many requests for current device!"
    assert other.status_code == 200  # another device's budget is its own
    assert len(api.telemetry) == 4


# --- long polls --------------------------------------------------------------------------------------


def answered(api: FakeApi) -> list[tuple[str | None, dict[str, Any], bytes]]:
    return [(d.correlation_id, d.body, body) for d, body in api.links.answers]


async def test_attribute_update_poll_gets_the_update(gateway: Gateway) -> None:
    client, device_api, api = gateway
    poll = asyncio.create_task(client.get("/api/v1/token-a/attributes/updates", params={"timeout": 20000}))
    await api.bus.wait_polling(DOWNLINK_ATTRIBUTES, "device-a")
    assert api.bus.queue(DOWNLINK_ATTRIBUTES, "device-a").arguments == {
        "x-expires": 60_000, "x-message-ttl": 300_000, "x-max-length": 100}
    # Both kinds' queues exist from the first poll of either: an RPC waits in its own, the attribute poll
    # drops its copy.
    assert api.bus.publish("device-a", rpc()) == 2
    api.bus.publish("device-a", Downlink(DOWNLINK_ATTRIBUTES, {"interval": 10}))
    response = await asyncio.wait_for(poll, 5)
    assert response.status_code == 200 and response.json() == {"interval": 10}
    queue = api.bus.queue(DOWNLINK_ATTRIBUTES, "device-a")
    assert not queue.consumers and not queue.messages and len(device_api.polls) == 0
    assert [m.type for m in api.bus.queue(DOWNLINK_RPC, "device-a").messages] == [DOWNLINK_RPC, DOWNLINK_ATTRIBUTES]
    assert (await client.get("/api/v1/token-a/rpc")).json()["method"] == "setGpio"


async def test_what_arrives_between_two_polls_waits_for_the_next_one(gateway: Gateway) -> None:
    client, device_api, api = gateway
    assert (await client.get("/api/v1/token-a/rpc", params={"timeout": 1})).status_code == 408  # queue declared
    assert api.bus.publish("device-a", rpc(method="first")) == 2
    api.bus.publish("device-a", rpc(method="second"))
    for expected in ("first", "second"):
        response = await client.get("/api/v1/token-a/rpc", params={"timeout": 20000})
        assert response.json()["method"] == expected
    assert device_api.rpc_ids.pending == 2


async def test_a_message_reaching_a_poll_that_just_ended_is_requeued(gateway: Gateway) -> None:
    _, device_api, api = gateway
    poll = device_api.polls.open("device-a", DOWNLINK_RPC)
    ended = asyncio.Event()

    async def wait(future: asyncio.Future[Any]) -> None:
        poll.end()  # as at a timeout: then a message arrives before the consumer is cancelled
        api.bus.publish("device-a", rpc(method="late"))
        await asyncio.sleep(0)
        ended.set()

    assert await device_api.polls.run(poll, wait) is None
    queue = api.bus.queue(DOWNLINK_RPC, "device-a")
    assert [m.type for m in queue.messages] == [DOWNLINK_RPC] and not queue.consumers
    again = device_api.polls.open("device-a", DOWNLINK_RPC)
    got = await device_api.polls.run(again, lambda future: asyncio.wait_for(future, 5))
    assert got is not None and got.body["method"] == "late" and not queue.messages


async def test_a_message_in_flight_when_the_consumer_was_cancelled_is_requeued(gateway: Gateway) -> None:
    _, device_api, api = gateway
    poll = device_api.polls.open("device-a", DOWNLINK_RPC)
    assert await device_api.polls.run(poll, lambda future: asyncio.sleep(0)) is None
    assert poll.cancelled
    queue = api.bus.queue(DOWNLINK_RPC, "device-a")
    message = Incoming(b'{"method":"m"}', DOWNLINK_RPC, "device-a", queue=queue)
    await device_api.polls._deliver(poll, message)  # type: ignore[arg-type]
    assert message.settled == "nack" and [m.body for m in queue.messages] == [b'{"method":"m"}']


async def test_poll_timeout_is_408_and_timeout_must_be_a_number(gateway: Gateway) -> None:
    client, device_api, api = gateway
    response = await client.get("/api/v1/token-a/rpc", params={"timeout": 50})
    assert response.status_code == 408 and response.content == b""
    assert (await client.get("/api/v1/token-a/rpc", params={"timeout": "soon"})).status_code == 400
    assert (await client.get("/api/v1/token-a/rpc", params={"timeout": "-1"})).status_code == 408
    assert (await client.get("/api/v1/nobody/rpc", params={"timeout": 50})).status_code == 401
    assert not api.bus.queue(DOWNLINK_RPC, "device-a").consumers and len(device_api.polls) == 0


async def test_a_newer_poll_of_the_same_device_ends_the_older_with_408(gateway: Gateway) -> None:
    client, device_api, api = gateway
    first = asyncio.create_task(client.get("/api/v1/token-a/attributes/updates", params={"timeout": 20000}))
    await api.bus.wait_polling(DOWNLINK_ATTRIBUTES, "device-a")
    second = asyncio.create_task(client.get("/api/v1/token-a/attributes/updates", params={"timeout": 20000}))
    assert (await asyncio.wait_for(first, 5)).status_code == 408
    await api.bus.wait_polling(DOWNLINK_ATTRIBUTES, "device-a")
    other_kind = asyncio.create_task(client.get("/api/v1/token-a/rpc", params={"timeout": 20000}))
    await api.bus.wait_polling(DOWNLINK_RPC, "device-a")  # an RPC poll does not end an attributes poll
    api.bus.publish("device-a", Downlink(DOWNLINK_ATTRIBUTES, {"deleted": ["x"]}))
    assert (await asyncio.wait_for(second, 5)).json() == {"deleted": ["x"]}
    device_api.stop()
    assert (await asyncio.wait_for(other_kind, 5)).status_code == 408
    assert (await client.get("/api/v1/token-a/rpc", params={"timeout": 20000})).status_code == 408  # stopping


async def test_a_client_that_disconnects_mid_poll_ends_its_poll(gateway: Gateway) -> None:
    client, device_api, api = gateway
    app = client._transport.app  # type: ignore[attr-defined]
    gone = asyncio.Event()
    received = 0

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        if received == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": "/api/v1/token-a/attributes/updates", "raw_path": b"/api/v1/token-a/attributes/updates",
             "query_string": b"timeout=60000", "headers": [], "client": ("127.0.0.1", 5), "server": ("gw", 80)}
    task = asyncio.create_task(app(scope, receive, send))
    await api.bus.wait_polling(DOWNLINK_ATTRIBUTES, "device-a")
    gone.set()
    await asyncio.wait_for(task, 5)
    assert not api.bus.queue(DOWNLINK_ATTRIBUTES, "device-a").consumers and len(device_api.polls) == 0


async def test_poll_is_503_when_the_bus_is_down(gateway: Gateway) -> None:
    client, _, api = gateway
    api.bus.down = True
    assert (await client.get("/api/v1/token-a/attributes/updates", params={"timeout": 50})).status_code == 503


# --- server-side RPC ---------------------------------------------------------------------------------


async def test_server_rpc_poll_and_answer(gateway: Gateway) -> None:
    client, device_api, api = gateway
    poll = asyncio.create_task(client.get("/api/v1/token-a/rpc", params={"timeout": 20000}))
    await api.bus.wait_polling(DOWNLINK_RPC, "device-a")
    api.bus.publish("device-a", rpc())
    response = await asyncio.wait_for(poll, 5)
    body = response.json()
    assert response.status_code == 200 and list(body) == ["id", "method", "params"]
    assert body["method"] == "setGpio" and body["params"] == {"pin": 1}
    assert isinstance(body["id"], int) and 0 < body["id"] < 2**31

    # Someone else's id, an unknown one and a malformed one: ThingsBoard's answers, nothing passed on.
    assert (await client.post(f"/api/v1/token-b/rpc/{body['id']}", content=b'{"mine":false}')).status_code == 200
    assert (await client.post(f"/api/v1/token-a/rpc/{body['id'] + 1}", content=b"{}")).status_code == 200
    assert (await client.post("/api/v1/token-a/rpc/abc", content=b"{}")).status_code == 400
    assert (await client.post(f"/api/v1/token-a/rpc/{2**31}", content=b"{}")).status_code == 400
    assert (await client.post(f"/api/v1/token-a/rpc/{body['id']}", content=b"not json")).status_code == 400
    assert api.links.answers == []

    response = await client.post(f"/api/v1/token-a/rpc/{body['id']}", content=b'{"status":"ok"}')
    assert response.status_code == 200 and response.content == b""
    assert answered(api) == [("c1", {"method": "setGpio", "params": {"pin": 1}}, b'{"status":"ok"}')]
    assert device_api.rpc_ids.pending == 0


async def test_one_way_rpc_gets_an_id_and_its_answer_is_dropped(gateway: Gateway) -> None:
    client, device_api, api = gateway
    poll = asyncio.create_task(client.get("/api/v1/token-a/rpc"))
    await api.bus.wait_polling(DOWNLINK_RPC, "device-a")
    api.bus.publish("device-a", rpc(two_way=False))
    body = (await asyncio.wait_for(poll, 5)).json()
    assert body["id"] > 0 and device_api.rpc_ids.pending == 0
    assert (await client.post(f"/api/v1/token-a/rpc/{body['id']}", content=b"{}")).status_code == 200
    assert api.links.answers == []


async def test_rpc_poll_is_503_when_the_bus_is_down(gateway: Gateway) -> None:
    client, _, api = gateway
    api.bus.down = True
    assert (await client.get("/api/v1/token-a/rpc", params={"timeout": 50})).status_code == 503


# --- client-side RPC ---------------------------------------------------------------------------------


async def test_client_rpc_answer_and_no_answer(gateway: Gateway) -> None:
    client, _, api = gateway
    response = await client.post("/api/v1/token-a/rpc", content=b'{"method":"sum","params":{"a":2,"b":2}}')
    assert response.status_code == 200 and response.json() == {"result": 4}
    assert api.calls == [("device-a", {"method": "sum", "params": {"a": 2, "b": 2}})]
    api.rpc_answer = None
    assert (await client.post("/api/v1/token-a/rpc", content=b'{"method":"sum"}')).status_code == 408
    for bad in (b"{}", b'{"method":""}', b'{"method":1}', b"[]", b"nope"):
        response = await client.post("/api/v1/token-a/rpc", content=bad)
        assert response.status_code == 400, bad
        assert json.loads(response.content)["status"] == "FAILURE"
    assert len(api.calls) == 2
