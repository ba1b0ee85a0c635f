"""What every transport gateway does, independent of its wire protocol.

Like ThingsBoard's ``TransportService``: a gateway hands raw payloads here and maps the
:class:`ProvisionOutcome` kind to its protocol's status codes. No provisioning rule lives here.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from . import metrics
from .bus import OUTBOX_MAX, Bus, NoRoute, RpcError, RpcTimeout, outcome_unknown
from .context import current_request_id, request_scope
from .contract import (
    ABANDON,
    AUTHENTICATE,
    GET_ATTRIBUTES,
    PROVISION,
    PROVISION_X509_CHAIN,
    REPORT_TIMEOUT,
    RPC_REQUEST_EXCHANGE,
    SAVE_CLIENT_ATTRIBUTES,
    TELEMETRY_EXCHANGE,
)
from .device_api import SESSION_LIMITS_METHOD, DeviceApiError, SessionLimitsInfo, load_json
from .device_auth import CLIENT_SOURCE, AuthFailures
from .device_link import DeviceLinks
from .dialects import DialectError, parse_provision_request, render_error, render_result
from .dialects.limits import MalformedRequestLimiter
from .events import Outcome, ProvisionEvent, Reason, elapsed_ms
from .models import (
    MSG_TIMEOUT,
    AttributesQuery,
    AttributesSnapshot,
    AuthenticateRequest,
    AuthenticateResult,
    ClientAttributesUpdate,
    Dialect,
    ProvisionResult,
    Transport,
    X509ChainProvisionRequest,
)
from .outage import OutageLog
from .settings import Settings

log = logging.getLogger(__name__)


class OutcomeKind(str, enum.Enum):
    #: The core answered (SUCCESS, NOT_FOUND or FAILURE): HTTP 200.
    ANSWERED = "answered"
    #: The request could not be parsed: HTTP 400.
    BAD_REQUEST = "bad_request"
    #: The core did not answer in time or the bus is down: HTTP 503.
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class ProvisionOutcome:
    kind: OutcomeKind
    dialect: Dialect
    #: The response body, already rendered in the caller's dialect.
    body: bytes
    result: ProvisionResult | None = None


class TransportApi:
    def __init__(self, bus: Bus, settings: Settings, service: str = "gateway") -> None:
        self._bus = bus
        self._settings = settings
        #: This process's downlink queue: sessions attach here to receive RPCs and attribute updates.
        self.links = DeviceLinks(bus, service)
        self._core_outage = OutageLog(log, "provisioning")
        # Malformed requests never reach the core's wrong-secret limiter: count them here, per source.
        self._malformed = MalformedRequestLimiter(settings.provision_failures_per_minute)
        #: Wrong device credentials per source address (AUTH_FAILURES_PER_MINUTE), for this process's transport.
        self.auth_failures = AuthFailures(settings.auth_failures_per_minute, service)

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def timeout(self) -> float:
        """How long a provision request may take before the caller gets a time-out answer."""
        return self._settings.provision_timeout_s

    async def provision(
        self,
        payload: bytes,
        *,
        transport: Transport,
        source_address: str = "",
        protobuf_fallback: bool = False,
        request_id: str | None = None,
    ) -> ProvisionOutcome:
        """Parse a provision payload, ask the core, and render the answer in the caller's dialect.

        ``protobuf_fallback``: a payload that is not a JSON object is ThingsBoard's protobuf (MQTT, CoAP).
        ``request_id``: the caller's own id for this request, when a redelivery of the same request can
        reach us again (the MQTT bridge); the core then replays the first answer. Default: a fresh one.

        Runs as one request (:func:`~provisioning_common.context.request_scope`: the request id in force,
        e.g. an HTTP client's ``X-Request-Id``, else a fresh one, which the bus carries to the core), and
        is counted and timed by outcome, transport and dialect (``provisioning_provisions_total``,
        ``provisioning_provision_duration_seconds``).
        """
        received = time.perf_counter()
        with request_scope():
            outcome = await self._provision(payload, transport=transport, source_address=source_address,
                                            protobuf_fallback=protobuf_fallback, request_id=request_id)
        if outcome.kind is OutcomeKind.ANSWERED and outcome.result is not None:
            label = metrics.provision_outcome(outcome.result)
        else:
            label = "bad_request" if outcome.kind is OutcomeKind.BAD_REQUEST else "timeout"
        elapsed = time.perf_counter() - received
        metrics.series(metrics.PROVISIONS, label, transport.value, outcome.dialect.value).inc()
        metrics.series(metrics.PROVISION_SECONDS, transport.value, label).observe(elapsed)
        # One line per answer, with the request id (the core's lines of the same request carry it too); the
        # refusals a flood produces (rate-limited, unparsable) only at DEBUG. Never the secret or credentials.
        level = logging.DEBUG if label in ("rate_limited", "bad_request") else logging.INFO
        if log.isEnabledFor(level):
            device = outcome.result.device_name if outcome.result is not None else None
            log.log(level, "provision over %s (%s) from %s: %s%s in %.1f ms", transport.value, outcome.dialect.value,
                    source_address or "-", label, f", device {device}" if device else "", elapsed * 1000)
        return outcome

    async def _provision(
        self, payload: bytes, *, transport: Transport, source_address: str, protobuf_fallback: bool,
        request_id: str | None,
    ) -> ProvisionOutcome:
        try:
            request = parse_provision_request(
                payload, transport=transport, source_address=source_address, protobuf_fallback=protobuf_fallback
            )
        except DialectError as exc:
            dialect = exc.dialect or Dialect.THINGSBOARD
            if self._malformed.blocked(source_address):
                refused = MalformedRequestLimiter.too_many()
                return ProvisionOutcome(OutcomeKind.ANSWERED, dialect, render_result(dialect, refused), refused)
            self._malformed.record(source_address)
            return ProvisionOutcome(OutcomeKind.BAD_REQUEST, dialect, render_error(dialect, exc.message))
        if request_id:
            request = request.model_copy(update={"request_id": request_id})
        started = time.perf_counter()
        try:
            # The core must commit by now + PROVISION_TIMEOUT_S; we wait BUS_REPLY_GRACE_S longer for
            # its answer, so "timed out" is only ever said when nothing was (or will be) written.
            result = await self._bus.call(PROVISION, request, message_id=request.request_id)
        except RpcError as exc:
            self._report_timeout(exc, started, transport, request.dialect, source_address,
                                 request_id=request.request_id, device_name=request.device_name)
            # Timed out, a dependency down, or the bus gone: one WARNING per outage, "retry later" to each.
            self._core_outage.failed(type(exc).__name__ if isinstance(exc, RpcTimeout) else str(exc))
            if outcome_unknown(exc):
                # The core may have written the device and its answer never reached us (the broker
                # died with it, or it came too late): the device is about to hear "timed out", so
                # ask the core to undo that work - now, or once the broker is back.
                self._bus.send_reliably(ABANDON, request)
            unavailable = render_error(request.dialect, MSG_TIMEOUT)
            return ProvisionOutcome(OutcomeKind.UNAVAILABLE, request.dialect, unavailable)
        if self._core_outage.down:
            self._core_outage.recovered()
        return ProvisionOutcome(OutcomeKind.ANSWERED, request.dialect, render_result(request.dialect, result), result)

    def _report_timeout(self, exc: RpcError, started: float, transport: Transport, dialect: Dialect | None,
                        source_address: str, *, request_id: str, device_name: str = "") -> None:
        """The device is about to hear "timed out": the TIMED_OUT provisioning event (README "Provisioning
        events"), sent to the core like ``abandon`` (reliably, one-way), which stores and publishes it."""
        # Reports never take more than half of the bus's outbox (a broker outage): ``abandon`` messages, which
        # undo what nobody was told, keep the other half; a report over it is dropped (the metrics count it).
        if not self._settings.provision_events_enabled or self._bus.one_way_backlog >= OUTBOX_MAX // 2:
            return
        self._bus.send_reliably(REPORT_TIMEOUT, ProvisionEvent(
            outcome=Outcome.TIMED_OUT, reason=Reason.NO_ANSWER if outcome_unknown(exc) else Reason.UNAVAILABLE,
            transport=transport, dialect=dialect, source_address=source_address,
            request_id=current_request_id() or request_id, device_name=device_name.strip() or None,
            latency_ms=elapsed_ms(started),
        ))

    async def authenticate(self, request: AuthenticateRequest) -> AuthenticateResult:
        """Ask the credentials service who owns these credentials. Raises RpcError when unreachable."""
        return await self._bus.call(AUTHENTICATE, request)

    async def authenticate_token(self, token: str) -> AuthenticateResult:
        """A device API token (HTTP/CoAP path), limited per source (``device_auth.CLIENT_SOURCE``): raises
        :class:`~provisioning_common.device_auth.TooManyFailures` when the source is over its budget, and
        RpcError when the credentials service is unreachable; a token naming no device counts against it."""
        source = CLIENT_SOURCE.get()
        self.auth_failures.check(source)
        result = await self.authenticate(AuthenticateRequest(token=token))
        if not (result.authenticated and result.device_id):
            self.auth_failures.failed(source)
        return result

    async def provision_x509_chain(
        self, chain: list[str], *, transport: Transport, source_address: str = ""
    ) -> ProvisionResult:
        """A TLS client presented a chain (base64 DER, leaf first) whose leaf is unknown: let the core
        apply the X509_CERTIFICATE_CHAIN strategy. Bus failures become FAILURE."""
        with request_scope():
            result = await self._provision_x509_chain(chain, transport=transport, source_address=source_address)
        label = "timeout" if result.error_message == MSG_TIMEOUT else metrics.provision_outcome(result)
        metrics.X509_CHAIN_PROVISIONS.labels(label, transport.value).inc()
        return result

    async def _provision_x509_chain(self, chain: list[str], *, transport: Transport, source_address: str
                                    ) -> ProvisionResult:
        request = X509ChainProvisionRequest(chain=chain[:10], transport=transport, source_address=source_address)
        started = time.perf_counter()
        try:
            return await self._bus.call(PROVISION_X509_CHAIN, request)
        except RpcError as exc:
            self._report_timeout(exc, started, transport, None, source_address, request_id=request.request_id)
            log.warning("x509 chain provisioning unavailable: %s", exc)
            return ProvisionResult.failure(MSG_TIMEOUT)

    async def publish_telemetry(self, device_id: str, payload: bytes) -> None:
        """Forward a device's telemetry to the ``device.telemetry`` topic exchange, keyed by device id."""
        await self._bus.publish_event(TELEMETRY_EXCHANGE, device_id, payload)

    # --- the device API after provisioning (provisioning_common.device_api has the payload rules) ---

    async def get_attributes(self, query: AttributesQuery) -> AttributesSnapshot:
        """A device's client/shared attributes from Postgres (device_api). Raises RpcError when unreachable."""
        return await self._bus.call(GET_ATTRIBUTES, query, timeout=self._settings.provision_timeout_s)

    async def save_client_attributes(self, device_id: str, values: dict[str, Any]) -> None:
        """Store client attributes a device published; device_api then announces them on ``device.attributes``.
        Raises RpcError when unreachable (the device is told, nothing half-stored: one statement)."""
        await self._bus.call(SAVE_CLIENT_ATTRIBUTES, ClientAttributesUpdate(device_id=device_id, values=values))

    def session_limits(self, *, max_payload_size: int) -> SessionLimitsInfo:
        """What ``getSessionLimits`` answers: the per-session limits every gateway enforces."""
        return SessionLimitsInfo(
            max_payload_size=max_payload_size,
            max_inflight_messages=self._settings.device_max_inflight,
            rate_limits={"messages": self._settings.device_messages_rate_limit,
                         "telemetryMessages": "", "telemetryDataPoints": ""},
        )

    async def client_rpc(self, device_id: str, call: dict[str, Any], *, max_payload_size: int) -> bytes | None:
        """A device's client-side RPC (``{"method", "params"}``): the backend's answer body, or None when no
        backend listens on ``device.rpc`` or it did not answer within DEVICE_CLIENT_RPC_TIMEOUT_S (the
        device then gets no answer, as from ThingsBoard when no rule chain answers).
        ``getSessionLimits`` is answered here, never sent to the backend."""
        if call.get("method") == SESSION_LIMITS_METHOD:
            return self.session_limits(max_payload_size=max_payload_size).render()
        body = json.dumps(call, separators=(",", ":")).encode()
        try:
            return await self._bus.ask(RPC_REQUEST_EXCHANGE, device_id, body,
                                       timeout=self._settings.device_client_rpc_timeout_s, type="rpc")
        except NoRoute:
            log.debug("client-side RPC %r of %s: no backend bound to %s", call.get("method"), device_id,
                      RPC_REQUEST_EXCHANGE)
            return None
        except RpcError as exc:
            log.debug("client-side RPC %r of %s: %s", call.get("method"), device_id, type(exc).__name__)
            return None


def is_json_document(payload: bytes) -> bool:
    """Telemetry must be a JSON object or array (ThingsBoard rejects anything else).

    Nesting deep enough to exhaust the parser's recursion (about 1,000 levels) is refused too, and so
    are NaN, Infinity and unpaired surrogates (``device_api.load_json``: the same JSON everywhere)."""
    try:
        return isinstance(load_json(payload), (dict, list))
    except DeviceApiError:
        return False


class BusSession:
    """The one Bus and TransportApi of an HTTP service, opened and closed by its ASGI lifespan.

    ``bus`` may be given already connected (then it is not closed here).
    """

    def __init__(self, settings: Settings, bus: Bus | None = None) -> None:
        self._settings = settings
        self._given = bus
        self.bus: Bus | None = bus
        self._api: TransportApi | None = TransportApi(bus, settings) if bus is not None else None

    @property
    def api(self) -> TransportApi:
        assert self._api is not None, "used before the application started"
        return self._api

    @property
    def is_connected(self) -> bool:
        """Readiness (``health.bus_check``): connected once the application started, and while the bus is."""
        return self.bus is not None and self.bus.is_connected

    def lifespan(self, service: str, detail: str = "") -> Callable[[Any], AbstractAsyncContextManager[None]]:
        """A FastAPI ``lifespan`` that connects as ``service``, announces it ready, and closes on shutdown."""
        from .runtime import announce_ready

        @contextlib.asynccontextmanager
        async def lifespan(_: Any) -> AsyncIterator[None]:
            if self.bus is None:
                self.bus = await Bus.connect(self._settings, service)
                self._api = TransportApi(self.bus, self._settings)
            announce_ready(service, detail)
            yield
            if self._given is None and self.bus is not None:
                await self.bus.close()

        return lifespan
