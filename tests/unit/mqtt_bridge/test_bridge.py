"""The bridge's delivery rules with a fake paho client and a fake TransportApi: answer, then acknowledge,
on the connection the request came on; coalesce a redelivery; acknowledge what cannot be answered."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import pytest
from mqtt_bridge import topics
from mqtt_bridge.bridge import MqttBridge, _Delivery, parse_broker_url
from provisioning_common.models import Dialect
from provisioning_common.settings import Settings
from provisioning_common.transport_api import OutcomeKind, ProvisionOutcome

ANSWER = b'{"credentialsValue":"t","credentialsType":"ACCESS_TOKEN","status":"SUCCESS"}'


@dataclass
class _Info:
    mid: int


@dataclass
class FakeClient:
    published: list[tuple[str, bytes, Any]] = field(default_factory=list)
    acked: list[int] = field(default_factory=list)
    next_mid: int = 100

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool, properties: Any) -> _Info:
        self.next_mid += 1
        self.published.append((topic, payload, properties))
        return _Info(self.next_mid)

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append(mid)


class FakeApi:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.release = asyncio.Event()
        self.release.set()

    async def provision(self, payload: bytes, **kwargs: Any) -> ProvisionOutcome:
        self.calls.append(kwargs)
        await self.release.wait()
        return ProvisionOutcome(OutcomeKind.ANSWERED, Dialect.THINGSBOARD, ANSWER)


async def _bridge() -> tuple[MqttBridge, FakeClient, FakeApi]:
    api = FakeApi()
    bridge = MqttBridge(api, Settings(provision_timeout_s=2), parse_broker_url("mqtt://h"))  # type: ignore[arg-type]
    client = FakeClient()
    bridge._client = client  # type: ignore[assignment]
    bridge._loop = asyncio.get_running_loop()
    bridge._epoch, bridge._connected = 1, True
    return bridge, client, api


def _delivery(mid: int = 7, topic: str = "provision/request/dev-1", epoch: int = 1, correlation: bytes | None = b"c",
              response_topic: str | None = "provision/response/dev-1") -> _Delivery:
    return _Delivery(mid, 1, topic, b'{"provisionDeviceKey":"k","provisionDeviceSecret":"s"}', response_topic,
                     correlation, epoch)


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_answer_is_published_then_the_request_acknowledged_after_the_brokers_puback() -> None:
    bridge, client, api = await _bridge()
    bridge._dispatch(_delivery())
    await _settle()
    [(topic, payload, props)] = client.published
    assert (topic, payload) == ("provision/response/dev-1", ANSWER)
    assert props.CorrelationData == b"c" and props.ContentType == "application/json"
    assert client.acked == []  # not before the broker has the answer
    bridge._answer_acknowledged(client.next_mid, True)
    await _settle()
    assert client.acked == [7]
    [call] = api.calls
    assert call["request_id"] == topics.request_id("provision/request/dev-1", _delivery().payload,
                                                   topics.Route("provision/response/dev-1", b"c", "dev-1"))
    assert call["source_address"] == "mqtt-client:dev-1" and call["protobuf_fallback"] is True


async def test_no_acknowledgement_on_a_later_connection() -> None:
    bridge, client, _api = await _bridge()
    bridge._dispatch(_delivery())
    await _settle()
    bridge._epoch = 2  # paho reconnected: packet id 7 now means nothing (or someone else's message)
    bridge._answer_acknowledged(client.next_mid, True)
    await _settle()
    assert client.acked == []


async def test_a_redelivery_during_the_first_attempt_is_answered_once_and_both_acknowledged() -> None:
    bridge, client, api = await _bridge()
    api.release.clear()
    bridge._dispatch(_delivery(mid=7, epoch=1))
    await _settle()
    bridge._epoch = 2
    bridge._dispatch(_delivery(mid=3, epoch=2))  # same message, delivered again after a reconnect
    await _settle()
    api.release.set()
    await _settle()
    bridge._answer_acknowledged(client.next_mid, True)
    await _settle()
    assert len(api.calls) == 1 and len(client.published) == 1
    assert client.acked == [3]  # the first delivery's connection is gone; the second one's ack counts
    assert bridge.counters["duplicates"] == 1


async def test_unroutable_messages_are_acknowledged_and_counted_without_provisioning() -> None:
    bridge, client, api = await _bridge()
    bridge._dispatch(_delivery(mid=1, topic="provision/request", response_topic=None))
    bridge._dispatch(_delivery(mid=2, response_topic="provision/response/victim"))
    bridge._dispatch(_delivery(mid=3, topic="provision/request/a/b"))
    await _settle()
    assert api.calls == [] and client.published == [] and sorted(client.acked) == [1, 2, 3]
    assert bridge.counters == {"ignored_no_client_id": 1, "refused_foreign_response_topic": 1, "ignored_topic": 1}


async def test_a_foreign_response_topic_is_logged_without_the_payload(caplog: pytest.LogCaptureFixture) -> None:
    bridge, _client, api = await _bridge()
    with caplog.at_level(logging.INFO):
        bridge._dispatch(_delivery(response_topic="provision/response/victim"))
        await _settle()
    [record] = [r for r in caplog.records if "not its own" in r.getMessage()]
    assert record.levelname == "WARNING" and "provision/response/victim" in record.getMessage()
    assert "provisionDeviceSecret" not in caplog.text and api.calls == []


async def test_mqtt311_bridge_publishes_answers_without_properties() -> None:
    api = FakeApi()
    bridge = MqttBridge(api, Settings(provision_timeout_s=2, mqtt_bridge_protocol="3.1.1"),  # type: ignore[arg-type]
                        parse_broker_url("mqtt://h"))
    client = FakeClient()
    bridge._client = client  # type: ignore[assignment]
    bridge._loop = asyncio.get_running_loop()
    bridge._epoch, bridge._connected = 1, True
    bridge._dispatch(_delivery(correlation=None, response_topic=None))
    await _settle()
    [(topic, payload, props)] = client.published
    assert (topic, payload, props) == ("provision/response/dev-1", ANSWER, None)
    assert api.calls[0]["source_address"] == "mqtt-client:dev-1"


async def test_a_retained_request_is_never_answered() -> None:
    bridge, client, api = await _bridge()
    delivery = _delivery()
    delivery.retained = True
    bridge._dispatch(delivery)
    await _settle()
    assert api.calls == [] and client.acked == [7] and bridge.counters == {"ignored_retained": 1}


async def test_an_answer_the_broker_refuses_still_acknowledges_the_request() -> None:
    bridge, client, _api = await _bridge()
    bridge._dispatch(_delivery())
    await _settle()
    bridge._answer_acknowledged(client.next_mid, False)  # e.g. the broker's ACL says no
    await _settle()
    assert client.acked == [7] and bridge.counters["answers_refused"] == 1


async def test_no_puback_for_the_answer_leaves_the_request_to_the_broker() -> None:
    bridge, client, _api = await _bridge()
    bridge._settings = Settings(provision_timeout_s=0.05)
    bridge._dispatch(_delivery())
    await asyncio.sleep(0.2)
    assert client.published and client.acked == []


async def test_stopping_takes_no_new_request() -> None:
    bridge, client, api = await _bridge()
    bridge._stopping = True
    bridge._dispatch(_delivery())
    await _settle()
    assert api.calls == [] and client.acked == []
