"""The core's rate limits (provisioning_core.rate_limit) with the in-memory twin of the SQL store."""

from __future__ import annotations

from provisioning_common.models import Transport
from provisioning_core.rate_limit import Bucket, MemoryStore, ProvisionLimits, RateLimiter, Refused, source_key

from .factories import request


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_source_keys_put_coap_apart_and_ipv6_per_64() -> None:
    assert source_key(Transport.HTTP, "127.0.0.61") == "127.0.0.61"
    assert source_key(Transport.MQTT, "127.0.0.61") == "127.0.0.61"
    assert source_key(Transport.COAP, "127.0.0.61") == "coap:127.0.0.61"
    assert source_key(Transport.HTTP, "2001:db8:1:2:aaaa::1") == source_key(Transport.HTTP, "2001:db8:1:2::9")
    assert source_key(Transport.HTTP, "2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert source_key(Transport.HTTP, "::ffff:10.0.0.1") == "10.0.0.1"
    assert source_key(Transport.MQTT, "mqtt-client:abc") == "mqtt-client:abc"
    assert source_key(Transport.HTTP, "") == ""


async def test_a_bucket_allows_its_capacity_then_refills_continuously_without_a_boundary() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    bucket = [Bucket("b", 60, 60.0)]
    for _ in range(60):
        assert await store.admit([], bucket) == (0, 0.0)
    refused, retry = await store.admit([], bucket)
    assert refused == 2 and 0.99 < retry <= 1.0
    # A fixed window would allow 60 more at the next minute boundary; the bucket allows one a second.
    clock.now += 0.5
    assert (await store.admit([], bucket))[0] == 2
    clock.now += 0.5
    assert (await store.admit([], bucket))[0] == 0
    assert (await store.admit([], bucket))[0] == 2


async def test_all_or_nothing_across_buckets() -> None:
    store = MemoryStore(FakeClock())
    small, large = Bucket("small", 1, 60.0), Bucket("large", 10, 60.0)
    assert (await store.admit([], [small, large]))[0] == 0
    assert (await store.admit([], [small, large]))[0] == 2
    assert store.tat["large"] == 1000.0 + 6.0  # only the first call took from it


async def test_a_wrong_secret_flood_on_a_key_never_refuses_the_right_secret_from_another_source() -> None:
    limiter = RateLimiter.in_memory(ProvisionLimits(failures_per_source_key=3, failures_per_source=5),
                                    clock=FakeClock())
    for i in range(200):
        await limiter.wrong_secret(request(provision_secret="guess", source_address=f"10.1.{i // 250}.{i % 250}"))
    assert (await limiter.right_secret(request(source_address="10.9.9.9"), "profile")).admitted


async def test_a_source_is_limited_per_key_and_over_all_keys() -> None:
    limiter = RateLimiter.in_memory(ProvisionLimits(failures_per_source_key=3, failures_per_source=5),
                                    clock=FakeClock())
    verdicts = [await limiter.wrong_secret(request(provision_key="k1", source_address="10.0.0.1")) for _ in range(4)]
    assert [v.admitted for v in verdicts] == [True, True, True, False]
    assert verdicts[-1].refused is Refused.FAILURES
    # The same source's right secret for that key is refused too (a guesser learns nothing) ...
    assert (await limiter.right_secret(request(provision_key="k1", source_address="10.0.0.1"), "p")).refused is (
        Refused.FAILURES)
    # ... other keys still have room until the per-source budget (5) is used up.
    assert (await limiter.wrong_secret(request(provision_key="k2", source_address="10.0.0.1"))).admitted
    assert (await limiter.wrong_secret(request(provision_key="k3", source_address="10.0.0.1"))).admitted
    assert not (await limiter.wrong_secret(request(provision_key="k4", source_address="10.0.0.1"))).admitted
    assert not (await limiter.right_secret(request(provision_key="k4", source_address="10.0.0.1"), "p")).admitted


async def test_forged_coap_sources_do_not_touch_the_same_address_over_http_or_mqtt() -> None:
    limiter = RateLimiter.in_memory(ProvisionLimits(failures_per_source_key=2, failures_per_source=2),
                                    clock=FakeClock())
    for _ in range(5):
        await limiter.wrong_secret(request(source_address="127.0.0.61", transport=Transport.COAP))
    coap = request(source_address="127.0.0.61", transport=Transport.COAP)
    assert not (await limiter.right_secret(coap, "p")).admitted
    for transport in (Transport.HTTP, Transport.MQTT):
        assert (await limiter.right_secret(request(source_address="127.0.0.61", transport=transport), "p")).admitted


async def test_provisions_are_limited_per_profile_and_per_source_with_a_retry_time() -> None:
    clock = FakeClock()
    limiter = RateLimiter.in_memory(ProvisionLimits(per_profile=((3, 60),), per_source=((2, 60), (5, 3600))),
                                    clock=clock)
    assert (await limiter.right_secret(request(source_address="10.0.0.1"), "p1")).admitted
    assert (await limiter.right_secret(request(source_address="10.0.0.1"), "p1")).admitted
    by_source = await limiter.right_secret(request(source_address="10.0.0.1"), "p1")
    assert by_source.refused is Refused.PROVISIONS and 29 < by_source.retry_after_s <= 30
    assert (await limiter.right_secret(request(source_address="10.0.0.2"), "p1")).admitted
    by_profile = await limiter.right_secret(request(source_address="10.0.0.3"), "p1")
    assert by_profile.refused is Refused.PROVISIONS
    assert (await limiter.right_secret(request(source_address="10.0.0.3"), "p2")).admitted
    clock.now += 30
    assert (await limiter.right_secret(request(source_address="10.0.0.1"), "p2")).admitted


async def test_no_limits_configured_costs_nothing() -> None:
    limiter = RateLimiter.in_memory(ProvisionLimits(per_profile=(), per_source=()))
    assert (await limiter.right_secret(request(source_address=""), "p")).admitted
