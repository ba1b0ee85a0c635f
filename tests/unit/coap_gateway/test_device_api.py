"""The CoAP device API (coap_gateway.device_api) against a stub TransportApi: each path's codes and
bodies, the RPC ledger, the limits, and observations over a real UDP listener (registration, notifications,
replacement, deregistration, RST, the gateway stopping), with a stub in place of the bus."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.constants import TransportTuning
from aiocoap.optiontypes import BlockOption
from coap_gateway import device_api as device_api_module
from coap_gateway.device_api import Feature, RpcLedger, _Observation, query_value
from coap_gateway.server import CoapGateway
from provisioning_common.bus import RpcError
from provisioning_common.contract import DOWNLINK_ATTRIBUTES, DOWNLINK_RPC
from provisioning_common.device_api import SessionLimitsInfo
from provisioning_common.device_link import Attachment, Downlink, Sink
from provisioning_common.models import (
    AttributesQuery,
    AttributesSnapshot,
    AuthenticateRequest,
    AuthenticateResult,
    ClientAttributesUpdate,
)
from provisioning_common.settings import Settings

from tests.ports import free_udp_port

TOKENS = {"tok-a": "dev-a", "tok-b": "dev-b"}


class StubLinks:
    """DeviceLinks stand-in: remembers the sinks; the test delivers downlink messages itself."""

    def __init__(self) -> None:
        self.sinks: dict[str, Attachment] = {}
        self.detached: list[Attachment] = []
        self.answers: list[tuple[Downlink, bytes]] = []
        self.changed = asyncio.Event()
        self.fail_attach = False

    async def attach(self, device_id: str, sink: Sink) -> Attachment:
        if self.fail_attach:
            raise RpcError("bus unavailable")
        attachment = Attachment(device_id, sink)
        self.sinks[attachment.id] = attachment
        self.changed.set()
        return attachment

    async def detach(self, attachment: Attachment) -> None:
        self.sinks.pop(attachment.id, None)
        self.detached.append(attachment)
        self.changed.set()

    async def answer(self, downlink: Downlink, body: bytes) -> bool:
        self.answers.append((downlink, body))
        return True

    def deliver(self, device_id: str, downlink: Downlink) -> int:
        sinks = [a.sink for a in self.sinks.values() if a.device_id == device_id]
        for sink in sinks:
            sink(downlink)
        return len(sinks)

    async def wait(self, condition: Any, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


class StubApi:
    def __init__(self, shared: dict[str, Any] | None = None, client: dict[str, Any] | None = None) -> None:
        self.links = StubLinks()
        self.shared = shared or {}
        self.client = client or {}
        self.saved: list[tuple[str, dict[str, Any]]] = []
        self.queries: list[AttributesQuery] = []
        self.rpc_calls: list[tuple[str, dict[str, Any], int]] = []
        self.rpc_answer: bytes | None = b'{"time":42}'
        self.telemetry: list[tuple[str, bytes]] = []
        self.auth_calls = 0
        self.down = False

    async def authenticate(self, request: AuthenticateRequest) -> AuthenticateResult:
        self.auth_calls += 1
        if self.down:
            raise RpcError("down")
        device = TOKENS.get(request.token)
        return AuthenticateResult(authenticated=device is not None, device_id=device)

    async def authenticate_token(self, token: str) -> AuthenticateResult:
        return await self.authenticate(AuthenticateRequest(token=token))

    async def get_attributes(self, query: AttributesQuery) -> AttributesSnapshot:
        self.queries.append(query)
        if self.down:
            raise RpcError("down")

        def pick(values: dict[str, Any], keys: list[str] | None) -> dict[str, Any]:
            if keys is None:
                return {}
            return {k: v for k, v in values.items() if not keys or k in keys}

        return AttributesSnapshot(client=pick(self.client, query.client_keys),
                                  shared=pick(self.shared, query.shared_keys))

    async def save_client_attributes(self, device_id: str, values: dict[str, Any]) -> None:
        ClientAttributesUpdate(device_id=device_id, values=values)  # as TransportApi does (it validates)
        if self.down:
            raise RpcError("down")
        self.saved.append((device_id, values))

    async def client_rpc(self, device_id: str, call: dict[str, Any], *, max_payload_size: int) -> bytes | None:
        self.rpc_calls.append((device_id, call, max_payload_size))
        if call["method"] == "getSessionLimits":
            return SessionLimitsInfo(max_payload_size, 7, {"messages": "100:1"}).render()
        return self.rpc_answer

    async def publish_telemetry(self, device_id: str, payload: bytes) -> None:
        self.telemetry.append((device_id, payload))


def _settings(**overrides: Any) -> Settings:
    return Settings(**{"coap_port": 0, "bind_host": "127.0.0.1", "max_body_bytes": 4096, **overrides})


def _request(path: str, payload: bytes = b"", code: Code = Code.POST, **options: Any) -> aiocoap.Message:
    return aiocoap.Message(code=code, uri_path=tuple(path.strip("/").split("/")), payload=payload, **options)


def rpc_downlink(method: str = "setGpio", params: Any = None, *, two_way: bool = True,
                 timeout: float = 30.0) -> Downlink:
    return Downlink(DOWNLINK_RPC, {"method": method, "params": params}, "reply-q" if two_way else None,
                    uuid.uuid4().hex if two_way else None, time.time() + timeout)


# --- one-shot requests ---------------------------------------------------------------------------------


async def _answer(api: StubApi, path: str, payload: bytes = b"", code: Code = Code.POST,
                  settings: Settings | None = None, **options: Any) -> aiocoap.Message:
    gateway = CoapGateway(api, settings or _settings())  # type: ignore[arg-type]
    return await gateway.handle(_request(path, payload, code, **options))


def _error_message(answer: aiocoap.Message) -> str:
    body = json.loads(answer.payload)
    assert body["status"] == "FAILURE" and answer.opt.content_format == 50
    return str(body["errorMsg"])


async def test_post_attributes_is_stored_and_answered_2_01() -> None:
    api = StubApi()
    answer = await _answer(api, "/api/v1/tok-a/attributes", b'{"fw":"1.2","on":true}')
    assert answer.code is Code.CREATED and api.saved == [("dev-a", {"fw": "1.2", "on": True})]


@pytest.mark.parametrize("payload", [b"", b"fw=1", b"[1,2]", b"{}", b'"x"', b'{"":1}', b"\xff\xfe"])
async def test_bad_attributes_are_4_00_and_nothing_is_stored(payload: bytes) -> None:
    api = StubApi()
    answer = await _answer(api, "/api/v1/tok-a/attributes", payload)
    assert answer.code is Code.BAD_REQUEST and _error_message(answer)
    assert api.saved == [] and api.auth_calls == 0  # refused before the bus


async def test_too_many_attributes_in_one_message_is_4_00() -> None:
    api = StubApi()
    payload = json.dumps({f"k{i}": i for i in range(1001)}).encode()
    answer = await _answer(api, "/api/v1/tok-a/attributes", payload, settings=_settings(max_body_bytes=65536))
    assert answer.code is Code.BAD_REQUEST and "too many" in _error_message(answer)


async def test_unknown_token_is_4_01_and_bus_down_is_5_03() -> None:
    api = StubApi()
    for path, payload in (("/api/v1/nope/attributes", b'{"a":1}'), ("/api/v1/nope/rpc", b'{"method":"m"}'),
                          ("/api/v1/nope/rpc/1", b"{}"), ("/api/v1/nope/telemetry", b'{"t":1}')):
        answer = await _answer(api, path, payload)
        assert answer.code is Code.UNAUTHORIZED and answer.payload == b"", path
    answer = await _answer(api, "/api/v1/nope/attributes", code=Code.GET)
    assert answer.code is Code.UNAUTHORIZED
    api.down = True
    answer = await _answer(api, "/api/v1/tok-a/attributes", b'{"a":1}')
    assert answer.code is Code.SERVICE_UNAVAILABLE and answer.opt.max_age == 1


@pytest.mark.parametrize(
    ("query", "client_keys", "shared_keys", "expected"),
    [
        ((), [], [], {"client": {"fw": "1"}, "shared": {"mode": "eco", "level": 3}}),
        (("clientKeys=fw", "sharedKeys=level"), ["fw"], ["level"], {"client": {"fw": "1"}, "shared": {"level": 3}}),
        (("sharedKeys=mode,nope",), None, ["mode", "nope"], {"shared": {"mode": "eco"}}),
        (("clientKeys=fw",), ["fw"], None, {"client": {"fw": "1"}}),
        (("sharedKeys=a", "sharedKeys=mode"), None, ["mode"], {"shared": {"mode": "eco"}}),  # the last one wins
    ],
)
async def test_get_attributes(query: tuple[str, ...], client_keys: Any, shared_keys: Any, expected: Any) -> None:
    api = StubApi(shared={"mode": "eco", "level": 3}, client={"fw": "1"})
    answer = await _answer(api, "/api/v1/tok-a/attributes", code=Code.GET, uri_query=query)
    assert answer.code is Code.CONTENT and answer.opt.content_format == 50
    assert json.loads(answer.payload) == expected
    assert api.queries == [AttributesQuery(device_id="dev-a", client_keys=client_keys, shared_keys=shared_keys)]


async def test_get_attributes_with_nothing_found_is_4_04_as_thingsboard() -> None:
    answer = await _answer(StubApi(), "/api/v1/tok-a/attributes", code=Code.GET, uri_query=("sharedKeys=x",))
    assert answer.code is Code.NOT_FOUND and answer.payload == b""


async def test_get_rpc_without_observe_is_4_00() -> None:
    answer = await _answer(StubApi(), "/api/v1/tok-a/rpc", code=Code.GET)
    assert answer.code is Code.BAD_REQUEST and "Observe" in _error_message(answer)


async def test_client_side_rpc() -> None:
    api = StubApi()
    answer = await _answer(api, "/api/v1/tok-a/rpc", b'{"method":"getTime","params":{}}')
    assert (answer.code, answer.payload, answer.opt.content_format) == (Code.CONTENT, b'{"time":42}', 50)
    limits = await _answer(api, "/api/v1/tok-a/rpc", b'{"method":"getSessionLimits"}')
    assert limits.code is Code.CONTENT and json.loads(limits.payload)["maxPayloadSize"] == 4096
    assert [call[2] for call in api.rpc_calls] == [4096, 4096]  # the body limit this gateway enforces
    api.rpc_answer = None
    timed_out = await _answer(api, "/api/v1/tok-a/rpc", b'{"method":"getTime"}')
    assert timed_out.code is Code.GATEWAY_TIMEOUT and _error_message(timed_out)
    for bad in (b"{", b"[]", b'{"params":1}', b'{"method":""}', b'{"method":3}'):
        answer = await _answer(api, "/api/v1/tok-a/rpc", bad)
        assert answer.code is Code.BAD_REQUEST, bad
    assert len(api.rpc_calls) == 3


async def test_rpc_reply_goes_to_the_asker_once_and_only_from_its_device() -> None:
    api = StubApi()
    gateway = CoapGateway(api, _settings())  # type: ignore[arg-type]
    downlink = rpc_downlink()
    request_id = gateway.device_api.ledger.add("dev-a", downlink)
    assert request_id is not None
    path = f"/api/v1/tok-a/rpc/{request_id}"
    # Another device answering that id: accepted as ThingsBoard does (2.01) and dropped.
    other = await gateway.handle(_request(f"/api/v1/tok-b/rpc/{request_id}", b'{"forged":true}'))
    assert other.code is Code.CREATED and api.links.answers == []
    not_json = await gateway.handle(_request(path, b"ok"))
    assert not_json.code is Code.BAD_REQUEST and api.links.answers == []
    answer = await gateway.handle(_request(path, b'{"result":"ok"}'))
    assert answer.code is Code.CREATED and api.links.answers == [(downlink, b'{"result":"ok"}')]
    again = await gateway.handle(_request(path, b'{"result":"again"}'))  # answered already: dropped
    assert again.code is Code.CREATED and len(api.links.answers) == 1
    unknown = await gateway.handle(_request("/api/v1/tok-a/rpc/999999", b"{}"))
    assert unknown.code is Code.CREATED and len(api.links.answers) == 1
    for bad in ("abc", "-1", "1.5", "٣", "12345678901"):
        refused = await gateway.handle(_request(f"/api/v1/tok-a/rpc/{bad}", b"{}"))
        assert refused.code is Code.BAD_REQUEST, bad


async def test_rate_limit_is_4_29_per_token() -> None:
    api = StubApi()
    gateway = CoapGateway(api, _settings(device_messages_rate_limit="3:60"))  # type: ignore[arg-type]
    codes = [(await gateway.handle(_request("/api/v1/tok-a/telemetry", b'{"t":1}'))).code for _ in range(4)]
    assert codes == [Code.CREATED] * 3 + [Code.TOO_MANY_REQUESTS]
    limited = await gateway.handle(_request("/api/v1/tok-a/attributes", b'{"a":1}'))
    assert limited.code is Code.TOO_MANY_REQUESTS and limited.opt.max_age == 1 and _error_message(limited)
    other = await gateway.handle(_request("/api/v1/tok-b/telemetry", b'{"t":1}'))
    assert other.code is Code.CREATED  # another token has its own budget
    assert api.saved == [] and len(api.telemetry) == 4


def test_rate_limit_state_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_api_module, "MAX_RATE_LIMITED_TOKENS", 3)
    gateway = CoapGateway(StubApi(), _settings(device_messages_rate_limit="1:60"))  # type: ignore[arg-type]
    assert gateway.device_api.allow("t0") and not gateway.device_api.allow("t0")
    for n in range(1, 4):
        assert gateway.device_api.allow(f"t{n}")
    assert gateway.device_api.allow("t0")  # forgotten (least recently used), so it starts afresh
    assert len(gateway.device_api._rates) == 3


def test_query_value() -> None:
    assert query_value(("clientKeys=a,b", "x=1"), "clientKeys") == "a,b"
    assert query_value(("clientKeys=",), "clientKeys") == ""
    assert query_value(("clientKeysX=1",), "clientKeys") is None


# --- the RPC ledger --------------------------------------------------------------------------------------


async def test_ledger_ids_bounds_and_deadlines() -> None:
    ledger = RpcLedger(max_per_device=2, default_timeout_s=10, max_timeout_s=300)
    first, second = rpc_downlink(), rpc_downlink()
    one, two = ledger.add("d", first), ledger.add("d", second)
    assert one is not None and two is not None and one != two
    assert ledger.add("d", rpc_downlink()) is None  # DEVICE_MAX_INFLIGHT unanswered
    assert ledger.add("d", rpc_downlink(two_way=False)) is not None  # one-way: nothing to wait for
    assert ledger.add("e", rpc_downlink()) is not None  # per device
    assert ledger.take("e", one) is None  # not the id of that device
    assert ledger.take("d", one) is first and ledger.take("d", one) is None
    assert ledger.unanswered("d") == 1
    # Forgotten at the caller's deadline.
    soon = rpc_downlink(timeout=0.05)
    three = ledger.add("f", soon)
    assert three is not None and ledger.unanswered("f") == 1
    await asyncio.sleep(0.2)
    assert ledger.take("f", three) is None and ledger.unanswered("f") == 0
    ledger.clear()
    assert ledger.unanswered("d") == 0


def test_attribute_updates_are_merged_in_order() -> None:
    observation = _Observation(Feature.ATTRIBUTES, "d", "ip", None)
    observation.merge({"a": 1, "b": 2})
    observation.merge({"deleted": ["a", "c"]})
    observation.merge({"c": 3})
    assert [json.loads(p) for p in observation.take_notifications()] == [{"b": 2, "c": 3, "deleted": ["a"]}]
    assert observation.take_notifications() == []


# --- observations over a real listener ------------------------------------------------------------------


class Observer:
    """A CoAP client on a plain UDP socket: sends exactly the requests a test needs and ACKs what is CON."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(("127.0.0.1", port))
        self.mid = 100

    async def send(self, path: str, *, code: Code = Code.GET, token: bytes = b"tk", non: bool = True,
                   payload: bytes = b"", **options: Any) -> None:
        message = aiocoap.Message(code=code, uri_path=tuple(path.strip("/").split("/")), payload=payload, **options)
        message.mtype = aiocoap.NON if non else aiocoap.CON
        self.mid += 1
        message.mid, message.token = self.mid, token
        await asyncio.get_running_loop().sock_sendall(self.sock, message.encode())

    async def recv(self, timeout: float = 5.0, *, ack: bool = True) -> aiocoap.Message:
        """The next message that is not an empty ACK; a CON is acknowledged unless ``ack`` is False."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                message = aiocoap.Message.decode(await loop.sock_recv(self.sock, 65536))
                if message.code is Code.EMPTY:
                    continue
                if message.mtype is aiocoap.CON and ack:
                    await self._empty(aiocoap.ACK, message.mid)
                return message

    async def reset(self, mid: int) -> None:
        await self._empty(aiocoap.RST, mid)

    async def _empty(self, mtype: Any, mid: int) -> None:
        empty = aiocoap.Message(code=Code.EMPTY)
        empty.mtype, empty.mid = mtype, mid
        await asyncio.get_running_loop().sock_sendall(self.sock, empty.encode())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
async def served() -> AsyncIterator[tuple[CoapGateway, StubApi]]:
    api = StubApi(shared={"mode": "eco"})
    gateway = CoapGateway(api, _settings(coap_port=free_udp_port()))  # type: ignore[arg-type]
    await gateway.start()
    try:
        yield gateway, api
    finally:
        await gateway.stop(drain_timeout=1)


@pytest.fixture
async def observer(served: tuple[CoapGateway, StubApi]) -> AsyncIterator[Observer]:
    client = Observer(served[0]._settings.coap_port)
    yield client
    client.close()


def _attrs(api: StubApi, device: str = "dev-a") -> int:
    return sum(1 for a in api.links.sinks.values() if a.device_id == device)


async def test_attribute_observation_notifies_updates_and_ends_on_deregistration(
    served: tuple[CoapGateway, StubApi], observer: Observer
) -> None:
    gateway, api = served
    await observer.send("/api/v1/tok-a/attributes", observe=0)
    first = await observer.recv()
    # ThingsBoard's first answer: the shared attributes, flat.
    assert (first.code, first.opt.observe, json.loads(first.payload)) == (Code.CONTENT, 0, {"mode": "eco"})
    assert api.queries[-1] == AttributesQuery(device_id="dev-a", client_keys=None, shared_keys=[])
    assert _attrs(api) == 1 and gateway.device_api.observations == 1
    api.links.deliver("dev-a", Downlink(DOWNLINK_ATTRIBUTES, {"mode": "boost"}))
    api.links.deliver("dev-a", rpc_downlink())  # not for this observation
    update = await observer.recv()
    assert (update.code, update.opt.observe, json.loads(update.payload)) == (Code.CONTENT, 1, {"mode": "boost"})
    api.links.deliver("dev-a", Downlink(DOWNLINK_ATTRIBUTES, {"deleted": ["mode"]}))
    deleted = await observer.recv()
    assert (deleted.opt.observe, json.loads(deleted.payload)) == (2, {"deleted": ["mode"]})
    assert gateway.device_api.ledger.unanswered("dev-a") == 0  # the RPC went nowhere
    # Observe = 1 with the same token: the observation ends (2.02, ThingsBoard) and the device is detached.
    await observer.send("/api/v1/tok-a/attributes", observe=1)
    ended = await observer.recv()
    assert ended.code is Code.DELETED and ended.opt.observe is None
    await api.links.wait(lambda: _attrs(api) == 0)
    assert gateway.device_api.observations == 0


async def test_rpc_observation_sends_ids_and_the_answer_reaches_the_asker(
    served: tuple[CoapGateway, StubApi], observer: Observer
) -> None:
    gateway, api = served
    await observer.send("/api/v1/tok-a/rpc", observe=0, non=False)
    first = await observer.recv()
    assert (first.code, first.opt.observe, first.payload) == (Code.VALID, 0, b"")  # ThingsBoard: 2.03
    call = rpc_downlink("setGpio", {"pin": 23, "value": 1})
    api.links.deliver("dev-a", call)
    notification = await observer.recv()
    assert notification.mtype is aiocoap.CON  # as the observing request went
    body = json.loads(notification.payload)
    assert body == {"id": body["id"], "method": "setGpio", "params": {"pin": 23, "value": 1}}
    await observer.send(f"/api/v1/tok-a/rpc/{body['id']}", code=Code.POST, payload=b'{"ok":1}', token=b"r1")
    assert (await observer.recv()).code is Code.CREATED
    assert api.links.answers == [(call, b'{"ok":1}')]
    # One-way RPCs get an id too; an answer to them goes nowhere.
    api.links.deliver("dev-a", rpc_downlink("blink", two_way=False))
    one_way = json.loads((await observer.recv()).payload)
    assert one_way["method"] == "blink" and one_way["id"] > body["id"]


async def test_unanswered_rpcs_are_bounded_per_device() -> None:
    api = StubApi()
    gateway = CoapGateway(api, _settings(coap_port=free_udp_port(), device_max_inflight=2))  # type: ignore[arg-type]
    await gateway.start()
    client = Observer(gateway._settings.coap_port)
    try:
        await client.send("/api/v1/tok-a/rpc", observe=0)
        await client.recv()
        for n in range(3):
            api.links.deliver("dev-a", rpc_downlink(f"m{n}"))
        got = [json.loads((await client.recv()).payload)["method"] for _ in range(2)]
        assert got == ["m0", "m1"] and gateway.device_api.ledger.unanswered("dev-a") == 2
        api.links.deliver("dev-a", rpc_downlink("blink", two_way=False))  # the one after m2 arrives: m2 never did
        assert json.loads((await client.recv()).payload)["method"] == "blink"
    finally:
        client.close()
        await gateway.stop(drain_timeout=1)


async def test_a_new_observation_of_the_device_replaces_the_old(
    served: tuple[CoapGateway, StubApi], observer: Observer
) -> None:
    gateway, api = served
    await observer.send("/api/v1/tok-a/attributes", observe=0, token=b"t1")
    assert (await observer.recv()).token == b"t1"
    second = Observer(gateway._settings.coap_port)
    try:
        await second.send("/api/v1/tok-a/attributes", observe=0, token=b"t2")
        assert (await second.recv()).code is Code.CONTENT
        replaced = await observer.recv()
        assert (replaced.token, replaced.code, replaced.opt.observe) == (b"t1", Code.DELETED, None)
        await api.links.wait(lambda: len(api.links.detached) == 1)
        assert _attrs(api) == 1 and gateway.device_api.observations == 1
        api.links.deliver("dev-a", Downlink(DOWNLINK_ATTRIBUTES, {"x": 1}))
        assert json.loads((await second.recv()).payload) == {"x": 1}
    finally:
        second.close()


async def test_an_rst_to_a_notification_ends_the_observation(
    served: tuple[CoapGateway, StubApi], observer: Observer
) -> None:
    gateway, api = served
    await observer.send("/api/v1/tok-a/attributes", observe=0, non=False)
    await observer.recv()
    api.links.deliver("dev-a", Downlink(DOWNLINK_ATTRIBUTES, {"x": 1}))
    notification = await observer.recv(ack=False)
    await observer.reset(notification.mid)
    await api.links.wait(lambda: _attrs(api) == 0)
    assert gateway.device_api.observations == 0


async def test_observation_refusals(served: tuple[CoapGateway, StubApi], observer: Observer,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    gateway, api = served
    await observer.send("/api/v1/nope/rpc", observe=0)
    refused = await observer.recv()
    assert refused.code is Code.UNAUTHORIZED and refused.opt.observe is None
    api.links.fail_attach = True
    await observer.send("/api/v1/tok-a/rpc", observe=0, token=b"t2")
    refused = await observer.recv()
    assert refused.code is Code.SERVICE_UNAVAILABLE and refused.opt.max_age == 1
    api.links.fail_attach = False
    monkeypatch.setattr(device_api_module, "MAX_OBSERVATIONS_PER_SOURCE", 1)
    await observer.send("/api/v1/tok-a/rpc", observe=0, token=b"t3")
    assert (await observer.recv()).code is Code.VALID
    await observer.send("/api/v1/tok-b/rpc", observe=0, token=b"t4")
    refused = await observer.recv()
    assert refused.code is Code.TOO_MANY_REQUESTS and refused.token == b"t4"
    # Replacing its own observation of the same device is not one more.
    await observer.send("/api/v1/tok-a/rpc", observe=0, token=b"t5")
    assert {(await observer.recv()).code for _ in range(2)} == {Code.VALID, Code.DELETED}
    monkeypatch.setattr(device_api_module, "MAX_OBSERVATIONS", 1)
    monkeypatch.setattr(device_api_module, "MAX_OBSERVATIONS_PER_SOURCE", 10)
    await observer.send("/api/v1/tok-b/attributes", observe=0, token=b"t6")
    full = await observer.recv()
    assert full.code is Code.SERVICE_UNAVAILABLE and full.opt.max_age == device_api_module.FULL_RETRY_S
    assert gateway.device_api.observations == 1


async def test_a_large_notification_goes_out_block_wise(
    served: tuple[CoapGateway, StubApi], observer: Observer
) -> None:
    _, api = served
    await observer.send("/api/v1/tok-a/attributes", observe=0)
    await observer.recv()
    api.links.deliver("dev-a", Downlink(DOWNLINK_ATTRIBUTES, {"blob": "x" * 3000}))
    first = await observer.recv()
    assert first.opt.observe == 1 and first.opt.block2 is not None and first.opt.block2.more
    payload, number = first.payload, 1
    while True:
        await observer.send("/api/v1/tok-a/attributes", token=b"b%d" % number,
                            block2=BlockOption.BlockwiseTuple(number, False, 6))
        block = await observer.recv()
        payload += block.payload
        if not block.opt.block2.more:
            break
        number += 1
    assert json.loads(payload) == {"blob": "x" * 3000}


async def test_stopping_ends_observations_with_5_03() -> None:
    api = StubApi()
    gateway = CoapGateway(api, _settings(coap_port=free_udp_port()))  # type: ignore[arg-type]
    await gateway.start()
    client = Observer(gateway._settings.coap_port)
    try:
        await client.send("/api/v1/tok-a/rpc", observe=0)
        await client.recv()
        await gateway.stop(drain_timeout=1)
        ended = await client.recv()
        assert ended.code is Code.SERVICE_UNAVAILABLE and ended.opt.max_age == 1 and ended.opt.observe is None
        assert api.links.sinks == {} and gateway.device_api.observations == 0
    finally:
        client.close()


async def test_a_vanished_client_ends_its_observation(served: tuple[CoapGateway, StubApi]) -> None:
    """Its socket is closed: the next notification draws an ICMP port unreachable, which aiocoap reports
    as an error for that address, and the observation ends (detached)."""
    gateway, api = served
    client = Observer(gateway._settings.coap_port)
    await client.send("/api/v1/tok-a/attributes", observe=0, non=False)
    await client.recv()
    client.close()
    api.links.deliver("dev-a", Downlink(DOWNLINK_ATTRIBUTES, {"x": 1}))
    await api.links.wait(lambda: _attrs(api) == 0)
    assert gateway.device_api.observations == 0


async def test_unacknowledged_notifications_end_the_observation(
    served: tuple[CoapGateway, StubApi], observer: Observer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that stops acknowledging (gone without an ICMP error): aiocoap retransmits the confirmable
    notification MAX_RETRANSMIT times, then gives up on that address and the observation ends."""
    monkeypatch.setattr(TransportTuning, "ACK_TIMEOUT", 0.05)
    monkeypatch.setattr(TransportTuning, "MAX_RETRANSMIT", 1)
    gateway, api = served
    await observer.send("/api/v1/tok-a/rpc", observe=0, non=False)
    await observer.recv()
    api.links.deliver("dev-a", rpc_downlink(two_way=False))
    sent = await observer.recv(ack=False)
    again = await observer.recv(ack=False)
    assert again.mid == sent.mid  # the retransmission
    await api.links.wait(lambda: _attrs(api) == 0)
    assert gateway.device_api.observations == 0


async def test_an_rpc_waits_for_the_rpc_observation_and_is_sent_once(
    served: tuple[CoapGateway, StubApi], observer: Observer
) -> None:
    """A device observing only its attributes gets an RPC: held (ThingsBoard's device actor keeps it for the
    device's RPC subscription) and sent once the device observes /rpc; with both observations attached,
    an RPC reaches both sinks and is sent once."""
    gateway, api = served
    await observer.send("/api/v1/tok-a/attributes", observe=0, token=b"at")
    await observer.recv()
    early = rpc_downlink("early")
    assert api.links.deliver("dev-a", early) == 1
    assert gateway.device_api.ledger.unanswered("dev-a") == 0
    await observer.send("/api/v1/tok-a/rpc", observe=0, token=b"rp")
    first = await observer.recv()
    assert (first.token, first.code) == (b"rp", Code.VALID)
    held = await observer.recv()
    assert held.token == b"rp" and json.loads(held.payload)["method"] == "early"
    assert api.links.deliver("dev-a", rpc_downlink("both")) == 2
    api.links.deliver("dev-a", Downlink(DOWNLINK_ATTRIBUTES, {"after": True}))
    # Sent before the update: were the RPC sent twice, the two next messages would both be on /rpc.
    got = {m.token: json.loads(m.payload) for m in [await observer.recv() for _ in range(2)]}
    assert got[b"at"] == {"after": True} and got[b"rp"]["method"] == "both"
    assert gateway.device_api.ledger.unanswered("dev-a") == 2
