"""The failed-secret limiter (spec "Our deviations": failed secrets are rate-limited per provision key and
per source address). Java's trim and names from certificate CNs are in test_names.py."""

from __future__ import annotations

from provisioning_core.rate_limit import FailureLimiter

# --- FailureLimiter -----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(limit: int = 3, start: float = 0.0) -> tuple[FailureLimiter, FakeClock]:
    clock = FakeClock(start)
    return FailureLimiter(limit, clock=clock), clock


def test_not_blocked_initially() -> None:
    limiter, _ = make()
    assert not limiter.blocked("key", "1.2.3.4")


def test_blocks_after_n_failures_same_key_and_source() -> None:
    limiter, _ = make(3)
    for _ in range(2):
        limiter.record_failure("key", "1.2.3.4")
        assert not limiter.blocked("key", "1.2.3.4")
    limiter.record_failure("key", "1.2.3.4")
    assert limiter.blocked("key", "1.2.3.4")


def test_limit_is_per_key_across_sources() -> None:
    limiter, _ = make(3)
    for source in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        limiter.record_failure("key", source)
    # The key is blocked even from a fresh source ...
    assert limiter.blocked("key", "10.0.0.99")
    assert limiter.blocked("key", "")
    # ... while other keys from fresh sources are not, and no single source reached the limit.
    assert not limiter.blocked("other-key", "10.0.0.99")
    assert not limiter.blocked("other-key", "10.0.0.1")


def test_limit_is_per_source_across_keys() -> None:
    limiter, _ = make(3)
    for key in ("k1", "k2", "k3"):
        limiter.record_failure(key, "203.0.113.5")
    assert limiter.blocked("k4", "203.0.113.5")
    assert not limiter.blocked("k4", "203.0.113.6")
    assert not limiter.blocked("k1", "203.0.113.6")


def test_empty_source_is_not_a_shared_bucket() -> None:
    limiter, _ = make(2)
    limiter.record_failure("k1", "")
    limiter.record_failure("k2", "")
    limiter.record_failure("k3", "")
    assert not limiter.blocked("k4", "")
    assert limiter.blocked("k1", "") is False


def test_key_and_source_namespaces_do_not_mix() -> None:
    limiter, _ = make(2)
    limiter.record_failure("same", "a")
    limiter.record_failure("same", "b")
    # The key "same" is blocked; a source literally named "same" is not.
    assert limiter.blocked("same", "c")
    assert not limiter.blocked("x", "same")


def test_window_rolls_after_sixty_seconds() -> None:
    limiter, clock = make(3, start=0.0)
    for _ in range(3):
        limiter.record_failure("key", "src")
    assert limiter.blocked("key", "src")
    clock.now = 59.9
    assert limiter.blocked("key", "src")
    clock.now = 60.0
    assert not limiter.blocked("key", "src")
    # Counting restarts from zero in the new window.
    limiter.record_failure("key", "src")
    limiter.record_failure("key", "src")
    assert not limiter.blocked("key", "src")
    limiter.record_failure("key", "src")
    assert limiter.blocked("key", "src")
    clock.now = 125.0
    assert not limiter.blocked("key", "src")


def test_window_with_large_clock_start() -> None:
    # The window is fixed: minute boundaries are multiples of 60 s of the clock (1_000_020 = 60 * 16667).
    limiter, clock = make(1, start=1_000_020.0)
    limiter.record_failure("key", "src")
    assert limiter.blocked("key", "src")
    clock.now += 30
    assert limiter.blocked("key", "src")
    clock.now += 60
    assert not limiter.blocked("key", "src")


def test_blocked_does_not_count_as_failure() -> None:
    limiter, _ = make(2)
    limiter.record_failure("key", "src")
    for _ in range(10):
        assert not limiter.blocked("key", "src")
    limiter.record_failure("key", "src")
    assert limiter.blocked("key", "src")
