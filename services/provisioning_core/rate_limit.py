"""Provisioning rate limits that protect without locking anyone else out (README "Rate limits").

* **Wrong secrets** (an unknown key, a wrong secret, a profile that does not take JSON requests) are
  limited per *(source, provision key)* (``PROVISION_FAILURES_PER_MINUTE``) and per *source*
  (``PROVISION_SOURCE_FAILURES_PER_MINUTE``). There is no per-key limit: the key ships in every device's
  firmware, and a per-key lockout let anyone holding it stop every device of the profile, while with
  ~103-bit secrets it protected nothing. A source over either limit is refused *before* its secret is
  looked at, whether right or wrong, so the refusal tells a guesser nothing.
* **Provisions** (requests with the right secret) are limited per profile
  (``PROVISION_RATE_LIMIT_PER_PROFILE``) and per source (``PROVISION_RATE_LIMIT_PER_SOURCE``), in
  ThingsBoard's ``capacity:seconds[,...]`` notation.

Every limit is a token bucket (GCRA: one timestamp per bucket) kept in Postgres
(``rate_limit_buckets``, migration 0007) and checked and taken in one transaction per batch of
concurrent requests (:class:`provisioning_common.rate_limit.PostgresStore`), so every core instance
shares one budget and there is no fixed-minute boundary at which the budget doubles. A bucket of
``capacity`` refills continuously over its period: at most ``capacity`` at once, ``capacity`` per
period in the long run.

A *source* is the client's address as the gateway saw it (through trusted proxies only, see
``FORWARDED_ALLOW_IPS`` and ``MQTT_PROXY_PROTOCOL``). IPv6 addresses count per /64 (one host's usual
allocation). CoAP sources are UDP and can be forged, so they are counted apart (``coap:<ip>``): forged
datagrams can only use up CoAP's own budget of that address, never lock it out of HTTP or MQTT.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from provisioning_common.device_api import parse_rate
from provisioning_common.models import ProvisionRequest, Transport
from provisioning_common.rate_limit import Bucket, MemoryStore, Store, address_key
from provisioning_common.settings import Settings

#: The period of the wrong-secret limits, whose settings count per minute.
FAILURE_PERIOD_S = 60.0


@dataclass(frozen=True)
class ProvisionLimits:
    """The limits' settings; windows are ``(capacity, seconds)`` pairs (none: unlimited)."""

    failures_per_source_key: int = 60
    failures_per_source: int = 300
    per_profile: tuple[tuple[int, int], ...] = ((6000, 60), (100_000, 3600))
    per_source: tuple[tuple[int, int], ...] = ((100, 60), (1000, 3600))

    @classmethod
    def from_settings(cls, settings: Settings) -> ProvisionLimits:
        return cls(
            failures_per_source_key=settings.provision_failures_per_minute,
            failures_per_source=settings.provision_source_failures_per_minute,
            per_profile=tuple(parse_rate(settings.provision_rate_limit_per_profile)),
            per_source=tuple(parse_rate(settings.provision_rate_limit_per_source)),
        )


class Refused(str, enum.Enum):
    #: The source used up its wrong-secret budget (per source, or for this key).
    FAILURES = "failures"
    #: The profile or the source used up its provisions budget.
    PROVISIONS = "provisions"


@dataclass(frozen=True)
class Verdict:
    refused: Refused | None = None
    #: Seconds until the refusing buckets have room again (rounded up by the gateways).
    retry_after_s: float = 0.0

    @property
    def admitted(self) -> bool:
        return self.refused is None


ADMITTED = Verdict()


def source_key(transport: Transport, address: str) -> str:
    """The bucket name of a client address: IPv6 per /64, CoAP's (forgeable UDP) apart; ``""`` when unknown.

    Anything that is not an IP address (the MQTT bridge's ``mqtt-client:<id>``) is kept as it is.
    """
    if not address:
        return ""
    key = address_key(address)
    return f"coap:{key}" if transport is Transport.COAP else key


class RateLimiter:
    """The core's limits on provision requests; one :meth:`wrong_secret` or :meth:`right_secret` call each."""

    def __init__(self, limits: ProvisionLimits, store: Store) -> None:
        self.limits = limits
        self._store = store

    @classmethod
    def in_memory(cls, limits: ProvisionLimits | None = None, *, clock: Callable[[], float] = time.monotonic
                  ) -> RateLimiter:
        return cls(limits or ProvisionLimits(), MemoryStore(clock))

    def _failure_buckets(self, req: ProvisionRequest) -> list[Bucket]:
        source = source_key(req.transport, req.source_address)
        if not source:
            return []
        return [
            Bucket(f"fs:{source}", self.limits.failures_per_source, FAILURE_PERIOD_S),
            Bucket(f"fk:{source}|{req.provision_key}", self.limits.failures_per_source_key, FAILURE_PERIOD_S),
        ]

    def _provision_buckets(self, req: ProvisionRequest, profile_id: object) -> list[Bucket]:
        buckets = [Bucket(f"pp:{profile_id}:{secs}", cap, secs) for cap, secs in self.limits.per_profile]
        source = source_key(req.transport, req.source_address)
        if source:
            buckets += [Bucket(f"ps:{source}:{secs}", cap, secs) for cap, secs in self.limits.per_source]
        return buckets

    async def _admit(self, check: list[Bucket], take: list[Bucket], *, taken_is: Refused) -> Verdict:
        if not check and not take:
            return ADMITTED
        refused, retry_after = await self._store.admit(check, take)
        if refused == 0:
            return ADMITTED
        return Verdict(Refused.FAILURES if refused == 1 else taken_is, max(retry_after, 0.0))

    def wrong_secret(self, req: ProvisionRequest) -> Awaitable[Verdict]:
        """A wrong key or secret: counted against the source, unless it is over its limit already (refused)."""
        return self._admit([], self._failure_buckets(req), taken_is=Refused.FAILURES)

    def right_secret(self, req: ProvisionRequest, profile_id: object) -> Awaitable[Verdict]:
        """The right secret: refused while its source is over a wrong-secret limit (which a guesser must not
        be able to tell from a wrong guess), else one provision taken from the profile's and the source's."""
        return self._admit(self._failure_buckets(req), self._provision_buckets(req, profile_id),
                           taken_is=Refused.PROVISIONS)

    def check_source(self, req: ProvisionRequest) -> Awaitable[Verdict]:
        """The right secret for a request refused anyway (a bad name): only whether its source is blocked."""
        return self._admit(self._failure_buckets(req), [], taken_is=Refused.FAILURES)
