"""The core's replay key (what makes a repeated request "the same request") and the undo of
answers that can no longer reach their caller."""

from __future__ import annotations

import time
from typing import Any

import pytest
from provisioning_common import bus
from provisioning_common.models import (
    CredentialsType,
    Dialect,
    ProvisionRequest,
    ProvisionResult,
    ProvisionStatus,
    SuppliedCredentials,
)
from provisioning_common.secretbox import SecretBox, generate_key
from provisioning_core.rate_limit import RateLimiter
from provisioning_core.service import ProvisioningCore

KEY = generate_key()


def core(window: float = 600.0, box_key: str = KEY) -> ProvisioningCore:
    return ProvisioningCore(None, None, SecretBox(box_key), RateLimiter.in_memory(),  # type: ignore[arg-type]
                            replay_window_s=window, reply_grace_s=2.0)


def request(**fields: Any) -> ProvisionRequest:
    return ProvisionRequest(**{"provision_key": "k", "provision_secret": "s3cret-value", "device_name": "dev-1",
                               **fields})


def test_the_same_content_is_the_same_request_whatever_its_message_id() -> None:
    c = core()
    assert c.replay_key(request()) == c.replay_key(request())  # two fresh request ids
    assert c.replay_key(request(device_name="  dev-1\t")) == c.replay_key(request())  # ThingsBoard trims names


@pytest.mark.parametrize(
    "change",
    [
        {"device_name": "dev-2"},
        {"provision_secret": "other-secret"},
        {"provision_key": "k2"},
        {"device_key": "imei-1"},
        {"dialect": Dialect.INNOWAY},
        {"gateway": True},
        {"credentials_type": CredentialsType.ACCESS_TOKEN, "credentials": SuppliedCredentials(token="abc")},
        {"credentials_type": CredentialsType.MQTT_BASIC,
         "credentials": SuppliedCredentials(client_id="c", username="u", password="p")},
    ],
)
def test_any_other_content_is_another_request(change: dict[str, Any]) -> None:
    c = core()
    assert c.replay_key(request(**change)) != c.replay_key(request())


def test_the_key_reveals_no_secret_and_depends_on_the_server_key() -> None:
    req = request(credentials_type=CredentialsType.ACCESS_TOKEN, credentials=SuppliedCredentials(token="tok-123"))
    key = core().replay_key(req)
    assert key.startswith("k:") and "s3cret" not in key and "tok-123" not in key
    assert core(box_key=generate_key()).replay_key(req) != key  # an HMAC, not a plain hash


def test_unnamed_requests_and_a_zero_window_fall_back_to_the_message_id() -> None:
    unnamed = request(device_name="")
    assert core().replay_key(unnamed) == unnamed.request_id
    named = request()
    assert core(window=0).replay_key(named) == named.request_id


SUCCESS = ProvisionResult(status=ProvisionStatus.SUCCESS, device_id="d", credentials_value="tok")


async def test_an_answer_ready_after_the_caller_gave_up_is_undone_and_reported_too_late() -> None:
    c = core()
    undone: list[str] = []

    async def undo(key: str) -> None:
        undone.append(key)

    c.undo = undo  # type: ignore[method-assign]
    token = bus._deadline.set(time.time() - 1.5)  # deadline 1.5 s ago: past deadline + grace/2
    try:
        with pytest.raises(bus.DeadlineExceeded):
            await c._deliverable("k:x", SUCCESS)
    finally:
        bus._deadline.reset(token)
    assert undone == ["k:x"]


async def test_an_answer_in_time_is_kept() -> None:
    c = core()
    token = bus._deadline.set(time.time() - 0.5)  # past the deadline but within the caller's grace
    try:
        assert await c._deliverable("k:x", SUCCESS) is SUCCESS
    finally:
        bus._deadline.reset(token)
