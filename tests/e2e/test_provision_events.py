"""Provisioning events (README "Provisioning events"): one event per decision, over HTTP, MQTT and CoAP, stored
(admin API), published on ``provisioning.events`` and streamed live; never a secret; old ones purged."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiocoap
import asyncpg
import httpx
import pytest
from aiocoap.numbers.codes import Code
from devstack import Stack

from tests.conftest import Infra
from tests.pki import Issued, issue, write_client_files

from . import mqtt_clients as mc
from .conftest import Admin, Env, _create_database, _drop_database

#: Every secret this module used (provision secrets, credentials handed out): no event may contain one.
SECRETS: set[str] = set()
TRANSPORTS = ("HTTP", "MQTT", "COAP")


@pytest.fixture(scope="module")
def env(infra: Infra, tls_files: tuple[Path, Path, Path]) -> Iterator[Env]:
    """One provision per profile and hour (so a profile's second provision is RATE_LIMITED), purges every second."""
    environment = Env(infra)
    environment.extra.update(
        MQTT_TLS_CERT_FILE=str(tls_files[0]), MQTT_TLS_KEY_FILE=str(tls_files[1]),
        PROVISION_RATE_LIMIT_PER_PROFILE="1:3600", PROVISION_EVENTS_PURGE_INTERVAL_S="1",
    )
    environment.ca_file = tls_files[2]
    _create_database(environment)
    try:
        yield environment
    finally:
        _drop_database(environment)
        asyncio.run(_delete_exchange(environment))


async def _delete_exchange(env: Env) -> None:
    connection = await aio_pika.connect(env.infra.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        with contextlib.suppress(Exception):
            await channel.exchange_delete(f"{env.namespace}provisioning.events")


class ExchangeTap:
    """A consumer of the ``provisioning.events`` exchange (bound with ``#``), as an operator's system would be."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.messages: list[tuple[str, bytes]] = []
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        connection = await aio_pika.connect(self.env.infra.rabbitmq_url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(f"{self.env.namespace}provisioning.events",
                                                      aio_pika.ExchangeType.TOPIC, durable=True)
            queue = await channel.declare_queue(exclusive=True)
            await queue.bind(exchange, routing_key="#")

            async def received(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                self.messages.append((message.routing_key or "", message.body))

            await queue.consume(received, no_ack=True)
            self._ready.set()
            await self._stop.wait()

    def start(self) -> ExchangeTap:
        self._thread.start()
        assert self._ready.wait(15), "could not bind to provisioning.events"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """Every event received, with its message's routing key (a message is a JSON array of events)."""
        found: list[tuple[str, dict[str, Any]]] = []
        for key, body in list(self.messages):
            events = json.loads(body)
            assert isinstance(events, list) and events, body
            assert all(f"{e['outcome']}.{e['transport']}" == key for e in events), (key, events)
            found.extend((key, event) for event in events)
        return found

    def named(self, name: str) -> list[tuple[str, dict[str, Any]]]:
        return [(key, event) for key, event in self.events() if event.get("deviceName") == name]


@pytest.fixture(scope="module")
def tap(env: Env, stack: Stack) -> Iterator[ExchangeTap]:
    running = ExchangeTap(env).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def pki() -> dict[str, Issued]:
    root = issue(f"Events Fleet CA {uuid.uuid4().hex[:6]}", ca=True, days=3650)
    return {"root": root, "intermediate": issue("Events Fleet Intermediate", root, ca=True, days=3650)}


def events_named(admin: Admin, name: str) -> list[dict[str, Any]]:
    response = admin.http.get("/api/provision-events", params={"deviceName": name})
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


def wait_for(check: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def _remember(body: dict[str, Any], answer: dict[str, Any] | None = None) -> None:
    for key in ("provisionDeviceSecret", "provision_secret", "token", "password"):
        if body.get(key):
            SECRETS.add(str(body[key]))
    value = (answer or {}).get("credentialsValue")
    if isinstance(value, str):
        SECRETS.add(value)


async def send(env: Env, transport: str, body: dict[str, Any]) -> dict[str, Any]:
    """A ThingsBoard provision request over ``transport``; its JSON answer."""
    if transport == "HTTP":
        async with httpx.AsyncClient(timeout=20) as client:
            response = await client.post(f"{env.http_url}/api/v1/provision", json=body)
            answer: dict[str, Any] = response.json()
    elif transport == "MQTT":
        answer = await asyncio.to_thread(mc.provision_json, env.mqtt_port, body, timeout=20)
    else:
        context = await aiocoap.Context.create_client_context(transports=["udp6"], loggername="events-coap")
        try:
            request = aiocoap.Message(code=Code.POST, uri=f"coap://127.0.0.1:{env.coap_port}/api/v1/provision",
                                      payload=json.dumps(body).encode())
            async with asyncio.timeout(30):
                response_coap = await context.request(request).response
            answer = json.loads(response_coap.payload) if response_coap.payload else {}
        finally:
            await context.shutdown()
    _remember(body, answer)
    return answer


@dataclass
class Case:
    transport: str
    name: str
    outcome: str
    reason: str
    profile_id: str | None = None
    dialect: str = "thingsboard"


def _request(profile: dict[str, Any], name: str, **fields: Any) -> dict[str, Any]:
    SECRETS.add(profile["provisionDeviceSecret"])
    return {"provisionDeviceKey": profile["provisionDeviceKey"],
            "provisionDeviceSecret": profile["provisionDeviceSecret"], "deviceName": name, **fields}


async def _cases(env: Env, admin: Admin, transport: str) -> list[Case]:
    """Send one request of each outcome (and the three NOT_FOUND reasons) over ``transport``."""
    tag = f"ev-{transport.lower()}-{uuid.uuid4().hex[:6]}"
    cases: list[Case] = []

    async def case(name: str, body: dict[str, Any], outcome: str, reason: str, profile_id: str | None) -> None:
        await send(env, transport, body)
        cases.append(Case(transport, name, outcome, reason, profile_id))

    created = admin.create_profile()
    await case(f"{tag}-ok", _request(created, f"{tag}-ok"), "SUCCESS", "created", created["id"])
    # The profile's one provision of the hour is used: the next is refused by the rate limit.
    await case(f"{tag}-limited", _request(created, f"{tag}-limited"), "RATE_LIMITED", "too_many_provisions",
               created["id"])
    unknown = {"provisionDeviceKey": f"nokey-{uuid.uuid4().hex[:8]}", "provisionDeviceSecret": "unknown-secret-x1",
               "deviceName": f"{tag}-unknown"}
    SECRETS.add("unknown-secret-x1")
    await case(f"{tag}-unknown", unknown, "NOT_FOUND", "unknown_key", None)
    wrong = _request(created, f"{tag}-wrong", provisionDeviceSecret=f"wrong-{uuid.uuid4().hex[:10]}")
    await case(f"{tag}-wrong", wrong, "NOT_FOUND", "wrong_secret", created["id"])
    disabled = admin.create_profile("DISABLED", provisionDeviceKey=f"k-{uuid.uuid4().hex[:8]}",
                                    provisionDeviceSecret=f"s-{uuid.uuid4().hex[:12]}")
    await case(f"{tag}-disabled", _request(disabled, f"{tag}-disabled"), "NOT_FOUND", "profile_disabled",
               disabled["id"])
    taken = admin.create_profile()
    admin.create_device(taken["id"], f"{tag}-taken")
    await case(f"{tag}-taken", _request(taken, f"{tag}-taken"), "FAILURE", "name_taken", taken["id"])
    pre = admin.create_profile("CHECK_PRE_PROVISIONED_DEVICES")
    await case(f"{tag}-absent", _request(pre, f"{tag}-absent"), "FAILURE", "not_pre_provisioned", pre["id"])
    innoway = {"provision_key": created["provisionDeviceKey"], "provision_secret": f"bad-{uuid.uuid4().hex[:10]}",
               "device_name": f"{tag}-innoway"}
    await send(env, transport, innoway)
    cases.append(Case(transport, f"{tag}-innoway", "NOT_FOUND", "wrong_secret", created["id"], "innoway"))
    if transport == "HTTP":
        weak = admin.create_profile()
        await case(f"{tag}-weak", _request(weak, f"{tag}-weak", credentialsType="ACCESS_TOKEN", token="abc12"),
                   "FAILURE", "too_weak_token", weak["id"])
    return cases


def _check_one_event(admin: Admin, tap: ExchangeTap, case: Case) -> dict[str, Any]:
    stored = events_named(admin, case.name)
    assert len(stored) == 1, (case, stored)
    event = stored[0]
    assert (event["outcome"], event["reason"], event["transport"]) == (case.outcome, case.reason, case.transport), case
    assert event["deviceProfileId"] == case.profile_id
    assert event["dialect"] == case.dialect and event["sourceAddress"] == "127.0.0.1"
    assert event["requestId"] and event["latencyMs"] >= 0 and isinstance(event["time"], int)
    assert (event["deviceId"] is not None) == (case.outcome == "SUCCESS")
    published = tap.named(case.name)
    assert published == [(f"{case.outcome}.{case.transport}", event)], (case, published)
    return event


async def _sentinel(env: Env, admin: Admin, tap: ExchangeTap) -> None:
    """A last request whose event, once stored and published, says every earlier one was (one writer, in order)."""
    name = f"sentinel-{uuid.uuid4().hex[:8]}"
    await send(env, "HTTP", {"provisionDeviceKey": "sentinel", "provisionDeviceSecret": "sentinel-s",
                             "deviceName": name})
    assert await asyncio.to_thread(wait_for, lambda: events_named(admin, name) and tap.named(name))


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_each_outcome_gives_exactly_one_event_stored_and_published(
    env: Env, admin: Admin, tap: ExchangeTap, transport: str
) -> None:
    cases = await _cases(env, admin, transport)
    await _sentinel(env, admin, tap)
    for case in cases:
        _check_one_event(admin, tap, case)
    # The API's filters select them.
    ok = next(c for c in cases if c.outcome == "SUCCESS")
    page = admin.http.get("/api/provision-events", params={"outcome": "SUCCESS", "transport": transport,
                                                           "deviceProfileId": ok.profile_id}).json()
    assert [e["deviceName"] for e in page["data"]] == [ok.name] and page["totalElements"] == 1
    wrong = admin.http.get("/api/provision-events", params={"reason": "wrong_secret", "transport": transport}).json()
    assert any(e["deviceName"].endswith("-wrong") for e in wrong["data"])
    assert all(e["reason"] == "wrong_secret" for e in wrong["data"])


async def test_gateway_time_outs_are_timed_out_events(
    env: Env, stack: Stack, admin: Admin, tap: ExchangeTap
) -> None:
    """The core does not answer (stopped): each gateway answers "timed out" and reports it; one event each."""
    profiles = {t: admin.create_profile() for t in TRANSPORTS}
    names = {t: f"ev-timeout-{t.lower()}-{uuid.uuid4().hex[:6]}" for t in TRANSPORTS}
    core = stack["provisioning_core"]
    core.signal(signal.SIGSTOP)
    try:
        answers = await asyncio.gather(*(send(env, t, _request(profiles[t], names[t])) for t in TRANSPORTS))
    finally:
        core.signal(signal.SIGCONT)
    assert all(a.get("errorMsg") == "Provisioning timed out" for a in answers), answers
    await _sentinel(env, admin, tap)
    for transport, name in names.items():
        event = await asyncio.to_thread(wait_for, lambda n=name: events_named(admin, n))
        assert len(event) == 1 and event[0]["outcome"] == "TIMED_OUT" and event[0]["transport"] == transport, event
        assert event[0]["reason"] == "no_answer" and event[0]["latencyMs"] >= 4000
        assert tap.named(name) == [(f"TIMED_OUT.{transport}", event[0])]


def _tls(env: Env, tmp_path: Path, leaf: Issued, *chain: Issued) -> mc.TlsOptions:
    cert_file, key_file = write_client_files(tmp_path, leaf, *chain)
    return mc.TlsOptions(str(env.ca_file), cert_file, key_file)


def _connect(env: Env, tls: mc.TlsOptions) -> bool:
    client = mc.connect(env.mqtts_port, tls=tls)
    try:
        return mc.accepted(client)
    finally:
        client.stop()


async def test_x509_chain_accepted_rotated_refused(
    env: Env, admin: Admin, tap: ExchangeTap, pki: dict[str, Issued], tmp_path: Path
) -> None:
    root, intermediate = pki["root"], pki["intermediate"]
    profile = admin.create_profile("X509_CERTIFICATE_CHAIN", certificatePem=root.pem,
                                   certificateRegExPattern=r"^(sensor-[0-9a-f]+)\.fleet$",
                                   allowCreateNewDevicesByX509Certificate=True)
    name = f"sensor-{uuid.uuid4().hex[:8]}"
    first = issue(f"{name}.fleet", intermediate)
    assert await asyncio.to_thread(_connect, env, _tls(env, tmp_path, first, intermediate))
    second = issue(f"{name}.fleet", intermediate)
    assert await asyncio.to_thread(_connect, env, _tls(env, tmp_path, second, intermediate))
    mismatch = issue(f"{name}.elsewhere", intermediate)
    assert not await asyncio.to_thread(_connect, env, _tls(env, tmp_path, mismatch, intermediate))
    await _sentinel(env, admin, tap)
    stored = events_named(admin, name)
    assert [(e["outcome"], e["reason"]) for e in stored] == [("X509_ROTATED", "rotated"), ("X509_ACCEPTED", "created")]
    assert all(e["transport"] == "MQTT" and e["deviceProfileId"] == profile["id"] and e["deviceId"] for e in stored)
    assert {k for k, _ in tap.named(name)} == {"X509_ACCEPTED.MQTT", "X509_ROTATED.MQTT"}
    refused = admin.http.get("/api/provision-events", params={"outcome": "X509_REFUSED",
                                                              "deviceProfileId": profile["id"]}).json()["data"]
    assert [(e["reason"], e["deviceName"], e["dialect"]) for e in refused] == [("cn_mismatch", None, None)]


async def test_live_stream_delivers_events(env: Env, admin: Admin) -> None:
    profile = admin.create_profile()
    name = f"ev-stream-{uuid.uuid4().hex[:8]}"
    lines: list[str] = []
    subscribed, got = threading.Event(), threading.Event()

    def listen() -> None:
        headers = {"Authorization": f"Bearer {env.admin_token}"}
        params = {"outcome": "SUCCESS", "transport": "HTTP"}
        with httpx.stream("GET", f"{env.admin_url}/api/provision-events/stream", headers=headers, params=params,
                          timeout=httpx.Timeout(20, read=30)) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                lines.append(line)
                if line.startswith("retry:"):
                    subscribed.set()
                if line.startswith("data:") and name in line:
                    got.set()
                    return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert await asyncio.to_thread(subscribed.wait, 15), lines
    await send(env, "MQTT", _request(admin.create_profile(), f"{name}-other"))  # another transport: filtered out
    await send(env, "HTTP", _request(profile, name))
    assert await asyncio.to_thread(got.wait, 15), lines
    events = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    assert [(e["deviceName"], e["outcome"], e["transport"]) for e in events] == [(name, "SUCCESS", "HTTP")]
    assert events[0] == events_named(admin, name)[0]
    listener.join(5)


def test_the_request_id_is_the_one_of_the_logs(env: Env, admin: Admin) -> None:
    """An HTTP client's X-Request-Id is the event's requestId (the id the services' log lines carry)."""
    name, request_id = f"ev-rid-{uuid.uuid4().hex[:6]}", f"rid-{uuid.uuid4().hex}"
    body = _request(admin.create_profile(), name)
    response = httpx.post(f"{env.http_url}/api/v1/provision", json=body, headers={"X-Request-Id": request_id})
    _remember(body, response.json())
    event = wait_for(lambda: events_named(admin, name))
    assert [e["requestId"] for e in event] == [request_id]


def test_bad_filters_are_400(admin: Admin) -> None:
    for params in ({"outcome": "MAYBE"}, {"reason": "why"}, {"pageSize": "0"}, {"since": "yesterday"},
                   {"deviceProfileId": "x"}):
        response = admin.http.get("/api/provision-events", params=params)
        assert response.status_code == 400 and response.json()["status"] == 400, (params, response.text)
    assert httpx.get(f"{admin.env.admin_url}/api/provision-events").status_code == 401


async def test_retention_purge_deletes_old_events(env: Env, admin: Admin, stack: Stack) -> None:
    conn = await asyncpg.connect(env.database_url)
    try:
        old, recent = f"ev-old-{uuid.uuid4().hex[:6]}", f"ev-recent-{uuid.uuid4().hex[:6]}"
        now = datetime.datetime.now(datetime.UTC)
        for name, age_days in ((old, 31), (recent, 29)):
            status = await conn.execute(
                "INSERT INTO provision_events (time, outcome, reason, transport, device_name, request_id, latency_ms)"
                " VALUES ($1, 'SUCCESS', 'created', 'HTTP', $2, 'r', 1)", now - datetime.timedelta(days=age_days), name)
            assert status == "INSERT 0 1"  # written (the purge, every second here, may take the old one at once)
        assert await asyncio.to_thread(wait_for, lambda: not events_named(admin, old), 15)
        assert len(events_named(admin, recent)) == 1
    finally:
        await conn.close()


def test_zz_no_event_or_log_line_contains_a_secret(admin: Admin, tap: ExchangeTap, stack: Stack) -> None:
    stored: list[str] = []
    page = 0
    while True:
        body = admin.http.get("/api/provision-events", params={"page": page, "pageSize": 1000}).json()
        stored.extend(json.dumps(e) for e in body["data"])
        if not body["hasNext"]:
            break
        page += 1
    published = [raw.decode() for _, raw in tap.messages]
    assert len(stored) >= 30 and len(tap.events()) >= 30
    secrets = {s for s in SECRETS if len(s) >= 5}
    assert len(secrets) >= 10
    leaked = sorted(s for s in secrets if any(s in text for text in stored + published))
    assert not leaked, leaked
    logs = stack.output()
    assert "provisioned device" in logs
    assert not sorted(s for s in secrets if s in logs)
