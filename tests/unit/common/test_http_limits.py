"""The per-process side of the HTTP limits: fitting the cap to the descriptor limit, log lines once per episode.

Raising RLIMIT_NOFILE, fitting a cap and noticing exhaustion themselves are tested in test_descriptors.py.

What connections see (431, 503, deadlines) is tested against the real services in
tests/e2e/test_http_limits.py.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import pytest
from provisioning_common import http_limits
from provisioning_common.http_limits import ConnectionGuard, HttpLimits, fit_descriptor_limit
from provisioning_common.settings import Settings

from .conftest import FakeRlimit

LIMITS = HttpLimits.from_settings(Settings())


def test_defaults_are_what_devices_need() -> None:
    assert HttpLimits(max_header_bytes=8192, header_timeout_s=10.0, body_timeout_s=10.0,
                                keep_alive_timeout_s=15.0, max_connections=4096) == LIMITS


def test_soft_descriptor_limit_is_raised_and_a_cap_that_fits_stays(fake_rlimit: FakeRlimit,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    calls = fake_rlimit(1024, 65536)
    with caplog.at_level(logging.WARNING):
        assert fit_descriptor_limit(LIMITS) == LIMITS
    assert calls == [(65536, 65536)]
    assert not caplog.records


def test_cap_that_does_not_fit_is_lowered_with_a_warning(fake_rlimit: FakeRlimit,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    fake_rlimit(1024, 2048)
    with caplog.at_level(logging.WARNING):
        fitted = fit_descriptor_limit(LIMITS)
    assert fitted == replace(LIMITS, max_connections=2048 - http_limits.RESERVED_DESCRIPTORS)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "HTTP_MAX_CONNECTIONS=4096" in caplog.text and "1920" in caplog.text


def test_a_small_descriptor_limit_keeps_at_most_a_quarter_for_other_uses(fake_rlimit: FakeRlimit) -> None:
    fake_rlimit(256, 256)
    assert fit_descriptor_limit(LIMITS).max_connections == 192


def test_cap_warning_once_per_episode_and_at_most_once_a_minute(monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    monkeypatch.setattr(http_limits.time, "monotonic", lambda: now[0])
    guard = ConnectionGuard(LIMITS)
    with caplog.at_level(logging.WARNING, logger=http_limits.__name__):
        for _ in range(50):
            guard.refused(4096)
        guard.admitted()
        now[0] += 10
        guard.refused(4096)  # a new episode, but within the minute
        assert len(caplog.records) == 1
        guard.admitted()
        now[0] += http_limits.LOG_INTERVAL_S
        guard.refused(4096)
    assert len(caplog.records) == 2
    assert all("HTTP_MAX_CONNECTIONS=4096" in r.getMessage() for r in caplog.records)
    assert guard.counts["refused"] == 52


def test_summary_sums_up_and_resets(caplog: pytest.LogCaptureFixture) -> None:
    guard = ConnectionGuard(LIMITS)
    with caplog.at_level(logging.INFO, logger=http_limits.__name__):
        guard.log_summary()  # nothing happened: nothing logged
        guard.counts.update(header=5000, oversized=3)
        guard.log_summary()
        guard.log_summary()
    assert len(caplog.records) == 1
    assert "5000 connections closed at the header deadline" in caplog.text and "3 heads over" in caplog.text


def test_running_out_of_descriptors_is_logged_once_per_episode(out_of_descriptors: list[int],
                                                               caplog: pytest.LogCaptureFixture) -> None:
    guard = ConnectionGuard(LIMITS)
    with caplog.at_level(logging.WARNING, logger=http_limits.__name__):
        for _ in range(5):
            guard.check_descriptors(open_connections=7)
        assert len(caplog.records) == 1
        assert "EMFILE" in caplog.text and "7 HTTP connections open" in caplog.text
        os.close(out_of_descriptors.pop())
        guard.check_descriptors(open_connections=6)
        guard.check_descriptors(open_connections=6)
    assert len(caplog.records) == 2
    assert "available again" in caplog.records[1].getMessage()
