"""Bridge-mode topic schemes, request-id derivation, rate-limit keys and the broker URL."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mqtt_bridge import topics
from mqtt_bridge.bridge import parse_broker_url
from mqtt_bridge.topics import Ignored, Route

PAYLOAD = b'{"provisionDeviceKey":"k","provisionDeviceSecret":"s"}'


# --- routing ------------------------------------------------------------------------------------


def test_mqtt5_request_goes_to_its_own_response_topic_with_its_correlation_data() -> None:
    assert topics.route("provision/request/dev-1", "provision/response/dev-1", b"\x01") == Route(
        "provision/response/dev-1", b"\x01", "dev-1")


@pytest.mark.parametrize("response_topic", [None, ""])
def test_mqtt311_request_goes_to_the_client_ids_response_topic(response_topic: str | None) -> None:
    assert topics.route("provision/request/dev-1", response_topic, None) == Route(
        "provision/response/dev-1", None, "dev-1")


@pytest.mark.parametrize("response_topic", [
    "provision/response/someone-else", "devices/dev-1/inbox", "provision/response/", "provision/response/dev-1/x",
    "provision/response/+", "provision/response/#", "provision/responses/dev-1", "/provision/response/dev-1",
    "provision/response/dev-10",
])
def test_a_response_topic_that_is_not_the_askers_own_is_refused(response_topic: str) -> None:
    # Issue 14: only the request topic's client id is vouched for by the broker's ACL (write provision/request/%c).
    assert topics.route("provision/request/dev-1", response_topic, b"c") is Ignored.FOREIGN_RESPONSE_TOPIC


@pytest.mark.parametrize("response_topic", [None, "", "provision/response/dev-1"])
def test_the_bare_request_topic_names_no_client_and_is_ignored(response_topic: str | None) -> None:
    assert topics.route("provision/request", response_topic, None) is Ignored.NO_CLIENT_ID


@pytest.mark.parametrize("topic", [
    "provision/request/", "provision/request/a/b", "provision/requests", "provision/request/a/", "other/topic",
    "/provision/request", "provision/request/+",
])
def test_other_topics_are_ignored(topic: str) -> None:
    assert topics.route(topic, "provision/response/x", None) is Ignored.TOPIC


def test_subscription_is_shared_unless_the_group_is_empty() -> None:
    assert topics.subscription("provisioning") == "$share/provisioning/provision/request/#"
    assert topics.subscription("") == "provision/request/#"


# --- request ids --------------------------------------------------------------------------------


def _id(topic: str = "provision/request/dev-1", payload: bytes = PAYLOAD, response: str = "provision/response/dev-1",
        correlation: bytes | None = None) -> str:
    return topics.request_id(topic, payload, Route(response, correlation, response.rsplit("/", 1)[-1]))


def test_request_id_is_the_same_for_every_delivery_of_a_message() -> None:
    assert _id() == _id() == _id(payload=bytes(PAYLOAD))
    assert _id().startswith("mqtt-bridge:") and len(_id()) <= 128


def test_request_id_changes_with_client_payload_correlation_and_scheme() -> None:
    ids = {
        _id(),
        _id(topic="provision/request/dev-2", response="provision/response/dev-2"),
        _id(payload=PAYLOAD + b" "),
        _id(correlation=b"1"),
        _id(correlation=b"2"),
        _id(topic="provision/request/dev-1x", correlation=b"1"),
    }
    assert len(ids) == 6


def test_absent_and_empty_correlation_data_are_not_confused_with_moving_bytes_between_fields() -> None:
    # Length-prefixed fields: bytes cannot slide from the correlation data into the payload.
    assert _id(correlation=b"ab", payload=b"c") != _id(correlation=b"a", payload=b"bc")


@given(st.binary(max_size=64), st.binary(max_size=64), st.binary(max_size=64), st.binary(max_size=64))
def test_distinct_correlation_and_payload_pairs_get_distinct_ids(c1: bytes, p1: bytes, c2: bytes, p2: bytes) -> None:
    if (c1, p1) != (c2, p2):
        assert _id(correlation=c1, payload=p1) != _id(correlation=c2, payload=p2)


def test_rate_limit_key_is_the_client_id_namespaced_away_from_addresses() -> None:
    assert topics.rate_limit_key(Route("provision/response/dev-1", None, "dev-1")) == "mqtt-client:dev-1"


# --- broker URL ----------------------------------------------------------------------------------


def test_broker_url_parts_and_defaults() -> None:
    plain = parse_broker_url("mqtt://bridge:p%40ss%3Aword@broker.example:1884")
    assert (plain.host, plain.port, plain.tls, plain.username, plain.password) == (
        "broker.example", 1884, False, "bridge", "p@ss:word")
    tls = parse_broker_url("mqtts://broker.example")
    assert (tls.port, tls.tls, tls.username, tls.password) == (8883, True, None, None)
    assert parse_broker_url("mqtt://h").port == 1883


def test_broker_url_repr_hides_the_password() -> None:
    address = parse_broker_url("mqtt://bridge:secret-pw@h:1883")
    assert "secret-pw" not in repr(address) and "secret-pw" not in f"{address!r}"


@pytest.mark.parametrize("url", ["http://h:1883", "mqtt://", "tcp://h", "h:1883"])
def test_broker_url_must_be_mqtt_or_mqtts(url: str) -> None:
    with pytest.raises(ValueError):
        parse_broker_url(url)
