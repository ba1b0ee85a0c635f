"""Downlink.revokes: which sessions a ``revoked`` message ends (device_link.end_sessions sends it)."""

from __future__ import annotations

from provisioning_common.contract import DOWNLINK_ATTRIBUTES, DOWNLINK_REVOKED
from provisioning_common.device_link import Downlink


def test_a_revocation_ends_the_sessions_opened_before_it_only() -> None:
    revoked = Downlink(DOWNLINK_REVOKED, {"revokedAt": 1000.5})
    assert revoked.revokes(since=999.0)
    assert revoked.revokes(since=1000.5)
    assert not revoked.revokes(since=1000.6)  # logged in after it, with what is valid now


def test_a_revocation_that_does_not_say_when_ends_every_session() -> None:
    for body in ({}, {"revokedAt": "yesterday"}, {"revokedAt": True}, {"revokedAt": None}):
        assert Downlink(DOWNLINK_REVOKED, body).revokes(since=1e12), body


def test_other_messages_revoke_nothing() -> None:
    assert not Downlink(DOWNLINK_ATTRIBUTES, {"revokedAt": 2e12}).revokes(since=0.0)
