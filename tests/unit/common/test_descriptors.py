"""File descriptors shared by every listener: raising RLIMIT_NOFILE, fitting a cap below it, running out.

How each transport uses them is tested with it: tests/unit/common/test_http_limits.py (uvicorn) and
tests/unit/mqtt_gateway/test_limits.py (the MQTT accept loop, on asyncio and uvloop).
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import subprocess
import sys
import textwrap

import pytest
from provisioning_common import descriptors
from provisioning_common.descriptors import (
    connection_cap,
    descriptor_shortage,
    fit_connection_cap,
    is_descriptor_shortage,
    raise_nofile_limit,
    soft_nofile_limit,
)

from .conftest import FakeRlimit

# --- raising the soft limit --------------------------------------------------------------------------


def test_soft_limit_is_raised_to_the_hard_one_for_real() -> None:
    """In a process of its own: the kernel, not a fake, takes the new limit."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import resource
        from provisioning_common.descriptors import raise_nofile_limit
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        before, after = raise_nofile_limit()
        print(before, after, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)
    """)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    before, after, now, hard = map(int, result.stdout.split())
    assert before <= 256 and after == now == hard


def test_soft_limit_is_raised_to_the_hard_one(fake_rlimit: FakeRlimit, caplog: pytest.LogCaptureFixture) -> None:
    calls = fake_rlimit(1024, 65536)
    with caplog.at_level(logging.WARNING):
        assert raise_nofile_limit() == (1024, 65536)
    assert calls == [(65536, 65536)]
    assert soft_nofile_limit() == 65536
    assert not caplog.records


def test_soft_limit_at_the_hard_one_is_left_alone(fake_rlimit: FakeRlimit) -> None:
    calls = fake_rlimit(4096, 4096)
    assert raise_nofile_limit() == (4096, 4096)
    assert calls == []


def test_unlimited_hard_limit_means_the_kernels_ceiling(fake_rlimit: FakeRlimit,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux refuses a soft limit above fs.nr_open even when the hard limit is "unlimited"."""
    calls = fake_rlimit(1024, resource.RLIM_INFINITY)
    monkeypatch.setattr(descriptors, "_nr_open", lambda fallback: 1_048_576)
    assert raise_nofile_limit() == (1024, 1_048_576)
    assert calls == [(1_048_576, resource.RLIM_INFINITY)]


def test_unlimited_soft_limit_is_left_alone(fake_rlimit: FakeRlimit) -> None:
    calls = fake_rlimit(resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    assert raise_nofile_limit() == (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    assert calls == []


def test_a_refused_raise_is_logged_and_the_limit_stays(fake_rlimit: FakeRlimit, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    fake_rlimit(1024, 65536)

    def refuse(which: int, limits: tuple[int, int]) -> None:
        raise ValueError("not allowed to raise the current limit")

    monkeypatch.setattr(resource, "setrlimit", refuse)
    with caplog.at_level(logging.WARNING, logger=descriptors.__name__):
        assert raise_nofile_limit() == (1024, 1024)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "from 1024 to 65536" in caplog.text and "not allowed" in caplog.text


# --- fitting a connection cap ------------------------------------------------------------------------


def test_cap_is_lowered_to_keep_the_reserve_free() -> None:
    assert connection_cap(10_000, 1024, reserve=128) == 1024 - 128
    assert connection_cap(50, 1024, reserve=128) == 50
    assert connection_cap(10_000, 10, reserve=128) == 1  # never 0: one connection is still served


def test_unknown_or_unlimited_descriptor_limit_keeps_the_cap() -> None:
    assert connection_cap(10_000, 0, reserve=128) == 10_000
    assert connection_cap(10_000, resource.RLIM_INFINITY, reserve=128) == 10_000


def test_lowered_cap_is_a_warning_naming_the_setting(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.descriptors")
    with caplog.at_level(logging.INFO, logger="test.descriptors"):
        assert fit_connection_cap(50, 1024, setting="X_MAX_CONNECTIONS", reserve=128, logger=logger) == 50
        assert not caplog.records
        assert fit_connection_cap(5000, 1024, setting="X_MAX_CONNECTIONS", reserve=128, logger=logger) == 896
    [record] = caplog.records
    assert record.levelname == "WARNING" and record.name == "test.descriptors"
    message = record.getMessage()
    assert "X_MAX_CONNECTIONS=5000" in message and "RLIMIT_NOFILE 1024" in message
    assert "128 are kept" in message and "capping connections at 896" in message


# --- running out -------------------------------------------------------------------------------------


def test_no_shortage_normally() -> None:
    assert descriptor_shortage() is None


def test_shortage_is_noticed_while_no_descriptor_is_free(out_of_descriptors: list[int]) -> None:
    assert descriptor_shortage() == "EMFILE"
    assert descriptor_shortage() == "EMFILE"  # checking costs no descriptor
    os.close(out_of_descriptors.pop())
    assert descriptor_shortage() is None


def test_which_errors_are_a_shortage() -> None:
    assert is_descriptor_shortage(OSError(errno.EMFILE, "Too many open files"))
    assert is_descriptor_shortage(OSError(errno.ENFILE, "Too many open files in system"))
    assert not is_descriptor_shortage(OSError(errno.ECONNABORTED, "Software caused connection abort"))
    assert not is_descriptor_shortage(None)
