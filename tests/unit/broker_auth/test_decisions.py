"""Who the broker may admit and which topics it may let them use (EMQX and RabbitMQ shapes)."""

from __future__ import annotations

import pytest
from broker_auth import decisions
from broker_auth.decisions import Verdict
from provisioning_common import device_auth


@pytest.mark.parametrize("client_id", ["dev-1", "a.b", "DEVICE_42", "é"])
def test_provisioning_client_ids_that_can_name_a_response_topic(client_id: str) -> None:
    assert decisions.provisioning_client_ok(client_id)


@pytest.mark.parametrize("client_id", [None, "", "a/b", "+", "a#", "dev*", "x" * 257, "nul\x00"])
def test_provisioning_client_ids_that_would_widen_a_topic_are_refused(client_id: str | None) -> None:
    assert not decisions.provisioning_client_ok(client_id)


@pytest.mark.parametrize(("username", "client_id", "expected"), [
    ("provision", "dev-1", True), ("tok", "provision", True), ("tok", "dev-1", False), ("", None, False),
])
def test_provisioning_clients_by_username_or_client_id_as_thingsboard(
    username: str, client_id: str | None, expected: bool
) -> None:
    assert decisions.is_provisioning(username, client_id) is expected


@pytest.mark.parametrize(("verdict", "emqx", "rabbitmq"), [
    (device_auth.Verdict.AUTHENTICATED, Verdict.ALLOW, Verdict.ALLOW),
    (device_auth.Verdict.DENIED, Verdict.DENY, Verdict.DENY),
    # Nothing to check: EMQX asks its next authenticator; RabbitMQ has no such answer.
    (device_auth.Verdict.ANONYMOUS, Verdict.IGNORE, Verdict.DENY),
])
def test_login_verdicts_per_broker(verdict: device_auth.Verdict, emqx: Verdict, rabbitmq: Verdict) -> None:
    decision = device_auth.Decision(verdict, "d" if verdict is device_auth.Verdict.AUTHENTICATED else None)
    assert decisions.emqx_login(decision) is emqx
    assert decisions.rabbitmq_login(decision) is rabbitmq


def test_emqx_acl_for_a_provisioning_client_is_its_own_topics_then_nothing() -> None:
    acl = decisions.provisioning_acl("dev-1")
    assert acl[:2] == [
        {"permission": "allow", "action": "publish", "topic": "eq provision/request/dev-1"},
        {"permission": "allow", "action": "subscribe", "topic": "eq provision/response/dev-1"},
    ]
    assert acl[-1] == {"permission": "deny", "action": "all", "topic": "#"}


def test_amqp_key_is_rabbitmqs_translation() -> None:
    assert decisions.amqp_key("provision/response/+") == "provision.response.*"
    assert decisions.amqp_key("a/#") == "a.#"


@pytest.mark.parametrize(("permission", "key", "verdict"), [
    ("write", "provision.request", Verdict.DENY),  # the bare topic vouches for no client id (issue 14)
    ("write", "provision.request.dev-1", Verdict.ALLOW),
    ("write", "provision.request.dev-2", Verdict.DENY),
    ("write", "provision.response.dev-1", Verdict.DENY),
    ("read", "provision.response.dev-1", Verdict.ALLOW),
    ("read", "provision.response.*", Verdict.DENY),
    ("read", "provision.response.#", Verdict.DENY),
    ("read", "provision.response.dev-2", Verdict.DENY),
    ("read", "provision.request.dev-1", Verdict.DENY),
    ("write", "v1.devices.me.telemetry", Verdict.DENY),
    ("configure", "provision.request", Verdict.DENY),
])
def test_rabbitmq_topics_of_a_provisioning_client(permission: str, key: str, verdict: Verdict) -> None:
    assert decisions.rabbitmq_topic("provision", permission, key, "dev-1") is verdict


def test_rabbitmq_topics_of_a_client_id_provision_are_a_provisioning_clients() -> None:
    """Admitted as provisioning by its client id (any username): never a device's topics."""
    assert decisions.rabbitmq_topic("tok", "write", "v1.devices.me.telemetry", "provision") is Verdict.DENY
    assert decisions.rabbitmq_topic("tok", "write", "provision.request.provision", "provision") is Verdict.ALLOW
    assert decisions.rabbitmq_topic("tok", "read", "provision.response.provision", "provision") is Verdict.ALLOW


@pytest.mark.parametrize("client_id", [None, "dev*", "a/b"])
def test_rabbitmq_provisioning_client_without_a_usable_client_id_gets_nothing(client_id: str | None) -> None:
    assert decisions.rabbitmq_topic("provision", "write", "provision.request", client_id) is Verdict.DENY


@pytest.mark.parametrize(("key", "verdict"), [
    ("#", Verdict.DENY), ("*.response.dev-1", Verdict.DENY), ("*", Verdict.DENY), ("provision", Verdict.DENY),
    ("provision.response.dev-1", Verdict.DENY), ("provision.#", Verdict.DENY), ("provision.request", Verdict.DENY),
    ("v1.devices.me.telemetry", Verdict.ALLOW), ("sensors.*.temp", Verdict.ALLOW), ("sensors.#", Verdict.ALLOW),
    ("provisioning.x", Verdict.ALLOW),
])
@pytest.mark.parametrize("permission", ["read", "write"])
def test_rabbitmq_devices_never_touch_the_provisioning_topics(key: str, verdict: Verdict, permission: str) -> None:
    assert decisions.rabbitmq_topic("A1b2C3d4E5f6G7h8I9j0", permission, key, "c1") is verdict


@pytest.mark.parametrize(("resource", "name", "permission", "client_id", "verdict"), [
    ("queue", "mqtt-subscription-dev-1qos1", "configure", "dev-1", Verdict.ALLOW),
    ("queue", "mqtt-subscription-dev-1qos0", "read", "dev-1", Verdict.ALLOW),
    ("queue", "mqtt-will-dev-1", "write", "dev-1", Verdict.ALLOW),
    ("queue", "mqtt-subscription-dev-10qos1", "read", "dev-1", Verdict.DENY),
    ("queue", "mqtt-subscription-provisioning-bridge-hostqos1", "read", "dev-1", Verdict.DENY),
    ("queue", "mqtt-subscription-dev-1qos1", "read", None, Verdict.DENY),  # e.g. the same login over AMQP
    ("exchange", "amq.topic", "write", "dev-1", Verdict.ALLOW),
    ("exchange", "amq.topic", "read", None, Verdict.ALLOW),
    ("exchange", "amq.topic", "configure", "dev-1", Verdict.DENY),
    ("topic", "amq.topic", "read", "dev-1", Verdict.DENY),
])
def test_rabbitmq_resources(resource: str, name: str, permission: str, client_id: str | None, verdict: Verdict) -> None:
    assert decisions.rabbitmq_resource(resource, name, permission, client_id) is verdict


@pytest.mark.parametrize(("username", "client_id", "verdict"), [
    ("provisioning-bridge", "provisioning-bridge-host", Verdict.IGNORE),  # its own store decides (EMQX: next)
    ("provisioning-bridge", "anything", Verdict.IGNORE),
    ("provision", "provisioning-bridge-host", Verdict.DENY),  # would take over the bridge's session
    ("token", "provisioning-bridge", Verdict.DENY),
    ("provision", "provisioning-bridge2", None),
    ("provision", "dev-1", None),
    ("", "", None),
])
def test_the_bridges_identity_is_never_admitted_here(username: str, client_id: str, verdict: Verdict | None) -> None:
    assert decisions.bridge_identity(username, client_id, "provisioning-bridge") is verdict
