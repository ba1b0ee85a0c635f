"""Wrong device credentials per source address (issue 13): device_auth.AuthFailures and decide()'s use of it."""

from __future__ import annotations

import logging

import pytest
from provisioning_common import device_auth
from provisioning_common.device_auth import AuthFailures, Presented, TooManyFailures, Verdict
from provisioning_common.models import AuthenticateRequest, AuthenticateResult

SECRET_TOKEN = "never-in-a-log-line-0123456789"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_source_over_its_budget_is_refused_until_its_minute_ends(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    failures = AuthFailures(3, "http_gateway", clock=clock)
    for _ in range(3):
        assert not failures.blocked("10.0.0.1")
        failures.failed("10.0.0.1")
    with caplog.at_level(logging.INFO):
        for _ in range(5):
            with pytest.raises(TooManyFailures) as refused:
                failures.check("10.0.0.1")
        assert not failures.blocked("10.0.0.2")  # another address is untouched
        assert not failures.blocked("")  # an unknown address is never limited
    assert 0 < refused.value.retry_after_s <= 60
    assert (failures.failures, failures.refused) == (3, 5)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "10.0.0.1" in warnings[0].getMessage()  # one per episode
    clock.now += 60
    assert not failures.blocked("10.0.0.1")  # a new minute
    clock.now += 200
    with caplog.at_level(logging.INFO):
        failures.blocked("10.0.0.1")
    assert "episode over: 5 attempts refused" in caplog.text


def test_zero_turns_it_off() -> None:
    failures = AuthFailures(0, "coap_gateway")
    for _ in range(100):
        failures.failed("10.0.0.1")
    assert not failures.blocked("10.0.0.1") and failures.failures == 0


async def test_decide_counts_one_failure_per_denied_login_and_limits_before_asking(
    caplog: pytest.LogCaptureFixture,
) -> None:
    asked: list[AuthenticateRequest] = []

    async def authenticate(request: AuthenticateRequest) -> AuthenticateResult:
        asked.append(request)
        return AuthenticateResult(authenticated=request.token == "good-token")

    failures = AuthFailures(2, "mqtt_gateway")
    wrong = Presented("client", "user", SECRET_TOKEN)  # two questions (MQTT_BASIC, then token): one login
    with caplog.at_level(logging.DEBUG):
        for _ in range(2):
            decision = await device_auth.decide(wrong, authenticate, failures=failures, source="10.0.0.9")
            assert decision.verdict is Verdict.DENIED
        assert failures.failures == 2 and len(asked) == 4
        limited = await device_auth.decide(wrong, authenticate, failures=failures, source="10.0.0.9")
        assert limited.verdict is Verdict.LIMITED and len(asked) == 4  # refused without a look-up
        provisioning = await device_auth.decide(Presented("provision", "provision"), authenticate,
                                                failures=failures, source="10.0.0.9")
        assert provisioning.verdict is Verdict.PROVISIONING
    assert SECRET_TOKEN not in caplog.text


async def test_decide_does_not_count_a_login_found_on_its_second_question() -> None:
    async def authenticate(request: AuthenticateRequest) -> AuthenticateResult:
        found = request.token == "innoway-token"
        return AuthenticateResult(authenticated=found, device_id="d" if found else None)

    failures = AuthFailures(1, "mqtt_gateway")
    for _ in range(3):  # MQTT_BASIC misses, the password as a token finds it
        decision = await device_auth.decide(Presented("c", "any", "innoway-token"), authenticate,
                                            failures=failures, source="10.0.0.9")
        assert decision.verdict is Verdict.AUTHENTICATED
    assert failures.failures == 0
