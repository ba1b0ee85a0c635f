"""The device-authentication policy: who an MQTT client is, from what it presented at CONNECT.

Devices log in in two places: our MQTT gateway (CONNECT) and, in bridge mode, the operator's broker,
which asks ``broker_auth``. Both follow this one policy, ThingsBoard's ``MqttTransportHandler.processConnect``
(spec §3.2, §7, §9) plus Innoway's token-as-password:

1. Username **or** client id exactly ``provision``: a provisioning client. Nothing is checked (any
   password, any certificate); the caller holds it to the provisioning topics.
2. A TLS client certificate: the leaf alone decides (its ThingsBoard hash names X509_CERTIFICATE
   credentials, §7); user name and password are not looked at. An unknown leaf may still reach the CA
   of an X509_CERTIFICATE_CHAIN profile (§8): the caller's chain provisioning is asked last.
3. Otherwise, in this order, the first device found wins:
   a. MQTT_BASIC by client id / user name / password (§9), which the credentials service falls back
      from to the user name as a ThingsBoard access token (§9's fallback);
   b. the password as an Innoway access token (any user name).
   Only a client id or user name makes (a) worth asking, only a password (b): ThingsBoard's validator
   refuses MQTT_BASIC credentials with neither client id nor user name, so ``sha3("")`` names nothing.
4. Verdicts: a device id only from a result that is ``authenticated`` *and* names a device; a client
   that presented nothing but (at most) a client id that matched nothing is *anonymous* (EMQX lets its
   other authenticators decide); the credentials service not answering is *unavailable*, never a
   denial (ThingsBoard answers CONNACK "server unavailable", brokers get 503).

Pure except :func:`decide`, which runs a plan against the caller's transport (the credentials service
over the bus, and for the gateway the core's chain provisioning).
"""

from __future__ import annotations

import contextvars
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from .bus import RpcError
from .models import AuthenticateRequest, AuthenticateResult
from .rate_limit import WindowCounter

log = logging.getLogger(__name__)

__all__ = [
    "CLIENT_SOURCE",
    "AuthFailures",
    "TooManyFailures",
    "PROVISION",
    "Decision",
    "Kind",
    "Plan",
    "Presented",
    "Verdict",
    "accepts",
    "decide",
    "is_provisioning",
    "plan",
]

#: ThingsBoard's ``DataConstants.PROVISION``: the user name or client id of a provisioning client.
PROVISION = "provision"


@dataclass(frozen=True)
class Presented:
    """What a client presented: CONNECT's client id, user name and password, and its TLS chain.

    ``username``/``password`` are None when the CONNECT had none (an empty one counts as none);
    ``certificate_chain`` is base64 DER, leaf first (empty without TLS client authentication).
    """

    client_id: str = ""
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    certificate_chain: Sequence[str] = field(default=(), repr=False)

    @classmethod
    def from_connect(
        cls, client_id: str, username: str | None, password: bytes | None, certificate_chain: Sequence[str] = ()
    ) -> Presented:
        """From CONNECT's raw fields: the password is UTF-8 text (ThingsBoard's ``new String(bytes, UTF_8)``)."""
        return cls(client_id, username, password.decode("utf-8", "replace") if password else None,
                   tuple(certificate_chain))


class Kind(str, enum.Enum):
    """What a client is, before any lookup."""

    PROVISIONING = "provisioning"
    #: A TLS client certificate: only the certificate counts.
    CERTIFICATE = "certificate"
    #: A user name or a password to check.
    CREDENTIALS = "credentials"
    #: Neither: at most a client id (MQTT_BASIC credentials may consist of a client id alone).
    ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Plan:
    """The ordered questions for the credentials service (first device found wins), then, when no
    device was found, the chain to offer to X.509 chain provisioning (empty: none)."""

    kind: Kind
    attempts: tuple[AuthenticateRequest, ...] = ()
    provision_chain: tuple[str, ...] = field(default=(), repr=False)


def is_provisioning(client_id: str | None, username: str | None) -> bool:
    """ThingsBoard's test (exact, case-sensitive), made before any credential is looked at."""
    return username == PROVISION or client_id == PROVISION


def plan(presented: Presented) -> Plan:
    """Rules 1-3 of the module docstring."""
    if is_provisioning(presented.client_id, presented.username):
        return Plan(Kind.PROVISIONING)
    chain = tuple(presented.certificate_chain)
    if chain:
        return Plan(Kind.CERTIFICATE, (AuthenticateRequest(certificate=chain[0]),), chain)
    client_id, username, password = presented.client_id, presented.username or "", presented.password or ""
    attempts: list[AuthenticateRequest] = []
    if client_id or username:
        attempts.append(AuthenticateRequest(client_id=client_id, username=username, password=password))
    if password:
        attempts.append(AuthenticateRequest(token=password))
    return Plan(Kind.CREDENTIALS if username or password else Kind.ANONYMOUS, tuple(attempts))


class Verdict(str, enum.Enum):
    #: A provisioning client (rule 1).
    PROVISIONING = "provisioning"
    #: A device: :attr:`Decision.device_id` says which.
    AUTHENTICATED = "authenticated"
    #: Credentials were presented and name no device.
    DENIED = "denied"
    #: Nothing but (at most) a client id was presented, and it names no device.
    ANONYMOUS = "anonymous"
    #: The credentials service did not answer: retry later, not a denial.
    UNAVAILABLE = "unavailable"
    #: The client's address is over its wrong-credentials budget (:class:`AuthFailures`): refused unasked.
    LIMITED = "limited"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    device_id: str | None = None
    #: Why the verdict is UNAVAILABLE (the bus error's secret-free text), for the caller's log line.
    detail: str = ""


def accepts(result: AuthenticateResult) -> bool:
    """A lookup found a device: authenticated, and naming the device (a session needs its id)."""
    return result.authenticated and bool(result.device_id)


#: Asks the credentials service; raises :class:`~provisioning_common.bus.RpcError` when it does not answer.
Authenticate = Callable[[AuthenticateRequest], Awaitable[AuthenticateResult]]
#: X.509 chain provisioning (leaf first, base64 DER): the device id, or None when no profile takes the chain.
ProvisionChain = Callable[[list[str]], Awaitable[str | None]]


async def decide(
    presented: Presented,
    authenticate: Authenticate,
    provision_chain: ProvisionChain | None = None,
    *,
    failures: AuthFailures | None = None,
    source: str = "",
) -> Decision:
    """Run :func:`plan` for ``presented``: ask ``authenticate`` in order, then ``provision_chain`` (when
    given and a certificate found nothing), and apply the verdict rules (rule 4).

    With ``failures``, a login that ends DENIED or ANONYMOUS counts against ``source`` (the client's
    address), and a source over its budget is LIMITED before anything is asked (one login, one count:
    a device whose first attempt misses and second finds it is not counted)."""
    steps = plan(presented)
    if steps.kind is Kind.PROVISIONING:
        return Decision(Verdict.PROVISIONING)
    if failures is not None and failures.blocked(source):
        return Decision(Verdict.LIMITED)
    decision = await _decide(steps, authenticate, provision_chain)
    if failures is not None and decision.verdict in (Verdict.DENIED, Verdict.ANONYMOUS):
        failures.failed(source)
    return decision


async def _decide(steps: Plan, authenticate: Authenticate, provision_chain: ProvisionChain | None) -> Decision:
    for attempt in steps.attempts:
        try:
            result = await authenticate(attempt)
        except RpcError as exc:
            return Decision(Verdict.UNAVAILABLE, detail=str(exc))
        if accepts(result):
            return Decision(Verdict.AUTHENTICATED, result.device_id)
    if steps.provision_chain and provision_chain is not None:
        device_id = await provision_chain(list(steps.provision_chain))
        if device_id:
            return Decision(Verdict.AUTHENTICATED, device_id)
    return Decision(Verdict.ANONYMOUS if steps.kind is Kind.ANONYMOUS else Verdict.DENIED)


# --- wrong credentials per source (issue 13) -----------------------------------------------------------------

#: The address of the client being served, set where a gateway's request enters (HTTP: a dependency of the
#: device routes; CoAP: the device API's entry points); read by :meth:`TransportApi.authenticate_token`.
#: Empty: unknown, and then not limited.
CLIENT_SOURCE: contextvars.ContextVar[str] = contextvars.ContextVar("client_source", default="")


class TooManyFailures(Exception):
    """The client's address used up its wrong-credentials budget: refused without a look-up."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__("too many failed authentication attempts from this address")
        self.retry_after_s = retry_after_s


class AuthFailures:
    """Wrong credentials (unknown tokens, MQTT logins that name no device) counted per client address in
    one-minute windows, per gateway instance and so per transport: a source over ``per_minute`` is refused
    without asking the credentials service until its minute ends (HTTP 429 + Retry-After, CoAP 4.29 +
    Max-Age, MQTT CONNACK 0x9F / 3.1.1 "not authorized"). A forged UDP source can thus only hold back CoAP
    at that address, never HTTP or MQTT. Tokens are >= 96-bit random (or a profile's documented minimum),
    so the budget is not what keeps them secret: it keeps guessing floods off the bus and the database,
    and makes them visible - one WARNING per episode (never a token), with counts; ``per_minute`` 0: off.
    """

    def __init__(self, per_minute: int, transport: str, *, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = log) -> None:
        self._counter = WindowCounter(max(per_minute, 1), clock=clock)
        self._on = per_minute > 0
        self._per_minute = per_minute
        self._transport = transport
        self._clock = clock
        self._log = logger
        #: Every wrong attempt counted, and every attempt refused for being over the budget (since start).
        self.failures = 0
        self.refused = 0
        self._episode_refused = 0
        self._episode_until = -1.0

    def retry_after_s(self) -> float:
        return 60.0 - self._clock() % 60.0

    def blocked(self, source: str) -> bool:
        """Whether ``source`` is over its budget (counted as refused when it is)."""
        if not self._on or not source or not self._counter.exhausted(source):
            self._end_episode()
            return False
        self.refused += 1
        self._episode_refused += 1
        if self._episode_until < 0:
            self._log.warning(
                "%s: wrong credentials from %s reached %d a minute; that address is refused without a look-up"
                " until its minute ends (one warning per episode; %d wrong attempts counted since start)",
                self._transport, source, self._per_minute, self.failures,
            )
        self._episode_until = self._clock() + 120.0
        return True

    def check(self, source: str) -> None:
        """:meth:`blocked`, raising :class:`TooManyFailures`."""
        if self.blocked(source):
            raise TooManyFailures(self.retry_after_s())

    def failed(self, source: str) -> None:
        """Count one wrong attempt from ``source``."""
        if not self._on:
            return
        self.failures += 1
        self._counter.record(source)

    def _end_episode(self) -> None:
        if self._episode_until >= 0 and self._clock() > self._episode_until:
            self._log.info("%s: wrong-credentials episode over: %d attempts refused", self._transport,
                           self._episode_refused)
            self._episode_until, self._episode_refused = -1.0, 0
