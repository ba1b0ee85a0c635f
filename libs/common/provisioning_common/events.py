"""Provisioning events (README "Provisioning events"): one record per provisioning decision.

Every decision - a JSON request answered by provisioning-core, an X.509 chain accepted, rotated or
refused, a request the gateway answered "timed out" - becomes one :class:`ProvisionEvent`: when, the
:class:`Outcome`, a :class:`Reason` code (finer than what the device is told: an unknown key and a wrong
secret are both NOT_FOUND to the device, never to the operator), where it came from, which profile and
device, the request id and the latency. An event never holds a secret: no provision key or secret, no
credentials, nothing but the fields below.

provisioning-core emits them through an :class:`EventWriter`: :meth:`EventWriter.emit` only appends to a
bounded in-process queue (never blocks, never fails a provision; when full the event is dropped and
counted), and a background task writes each batch with one ``COPY`` into ``provision_events``
(migration 0010) and publishes each event to the ``provisioning.events`` topic exchange (routing key
``<outcome>.<transport>``), where the admin API's live stream and the operator's systems read them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import enum
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from .models import Dialect, Transport
from .outage import OutageLog

log = logging.getLogger(__name__)


class Outcome(str, enum.Enum):
    """What was decided (the first part of the exchange's routing key)."""

    #: A device was given credentials (created, claimed, or the first answer replayed).
    SUCCESS = "SUCCESS"
    #: Answered NOT_FOUND: no usable profile for that key and secret (reason: which check failed).
    NOT_FOUND = "NOT_FOUND"
    #: Answered FAILURE (reason: why).
    FAILURE = "FAILURE"
    #: Refused by a rate limit (answered FAILURE with Retry-After / 429 / 0x97 / 4.29).
    RATE_LIMITED = "RATE_LIMITED"
    #: The gateway answered "timed out" / 503: the core did not answer in time, or could not.
    TIMED_OUT = "TIMED_OUT"
    #: A TLS client's certificate chain created its device (X509_CERTIFICATE_CHAIN strategy).
    X509_ACCEPTED = "X509_ACCEPTED"
    #: A new leaf of a known device replaced its certificate.
    X509_ROTATED = "X509_ROTATED"
    #: A chain was refused (CONNACK "not authorized").
    X509_REFUSED = "X509_REFUSED"


class Reason(str, enum.Enum):
    """Why; kept apart in the event even where the device hears one answer for several (NOT_FOUND)."""

    # SUCCESS / X509_ACCEPTED / X509_ROTATED
    CREATED = "created"
    CLAIMED = "claimed"
    REPLAYED = "replayed"
    ROTATED = "rotated"
    #: A device that provisioned before asked again and its profile's reprovisionPolicy gave it new credentials.
    REPROVISIONED = "reprovisioned"
    # NOT_FOUND
    MISSING_KEY_OR_SECRET = "missing_key_or_secret"
    UNKNOWN_KEY = "unknown_key"
    WRONG_SECRET = "wrong_secret"
    PROFILE_DISABLED = "profile_disabled"
    X509_CHAIN_ONLY = "x509_chain_only"
    # FAILURE
    BLANK_NAME = "blank_name"
    INVALID_NAME = "invalid_name"
    NAME_REQUIRED = "name_required"
    NAME_TAKEN = "name_taken"
    DEVICE_KEY_TAKEN = "device_key_taken"
    CREDENTIALS_IN_USE = "credentials_in_use"
    NOT_PRE_PROVISIONED = "not_pre_provisioned"
    ALREADY_PROVISIONED = "already_provisioned"
    INVALID_CERTIFICATE = "invalid_certificate"
    TOO_WEAK_TOKEN = "too_weak_token"
    INVALID_CREDENTIALS = "invalid_credentials"
    NO_SIGNING_CA = "no_signing_ca"
    CSR_REQUIRED = "csr_required"
    CSR_REFUSED = "csr_refused"
    INTERNAL_ERROR = "internal_error"
    #: The profile's pre-provisioning hook said no, or could not decide and the profile fails closed.
    HOOK_DENIED = "hook_denied"
    HOOK_UNAVAILABLE = "hook_unavailable"
    # RATE_LIMITED
    TOO_MANY_FAILURES = "too_many_failures"
    TOO_MANY_PROVISIONS = "too_many_provisions"
    # TIMED_OUT
    NO_ANSWER = "no_answer"
    UNAVAILABLE = "unavailable"
    # X509_REFUSED (and NAME_TAKEN, CREDENTIALS_IN_USE, UNAVAILABLE above)
    CHAIN_INVALID = "chain_invalid"
    CN_MISMATCH = "cn_mismatch"
    NOT_CHAIN_PROFILE = "not_chain_profile"
    CREATION_NOT_ALLOWED = "creation_not_allowed"
    #: A refusal whose reason was not named (should not happen; kept so an event is never lost).
    UNSPECIFIED = "unspecified"


#: Longest text kept in an event's client-chosen fields (device names are at most 255 characters).
MAX_TEXT = 255


def _storable(value: str | None) -> str | None:
    """Client-chosen text as Postgres can store it: no NUL (one NUL would fail a whole batch), bounded."""
    if value is None:
        return None
    return value.replace("\x00", "\ufffd")[:MAX_TEXT]


class ProvisionEvent(BaseModel):
    """One provisioning decision; ``model_dump(by_alias=True)`` is the admin API's and the exchange's JSON."""

    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True)

    time: datetime.datetime = Field(default_factory=lambda: datetime.datetime.now(datetime.UTC))
    outcome: Outcome
    reason: Reason
    transport: Transport
    #: The request's dialect; None for an X.509 chain (no request body).
    dialect: Dialect | None = None
    source_address: str = ""
    device_profile_id: uuid.UUID | None = None
    device_id: uuid.UUID | None = None
    #: The device's name when known: the created or claimed one, else the name the request asked for.
    device_name: str | None = None
    request_id: str = ""
    #: How long the decision took: in the core from receiving the request to its answer; for TIMED_OUT,
    #: how long the gateway waited.
    latency_ms: float = Field(default=0.0, ge=0)

    @field_validator("source_address", "request_id", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return _storable(value) if isinstance(value, str) else value

    @field_validator("device_name", mode="before")
    @classmethod
    def _name(cls, value: Any) -> Any:
        return (_storable(value) or None) if isinstance(value, str) else value

    @property
    def routing_key(self) -> str:
        """``<outcome>.<transport>`` on the ``provisioning.events`` exchange, e.g. ``NOT_FOUND.HTTP``."""
        return f"{self.outcome.value}.{self.transport.value}"

    @classmethod
    def trusted(
        cls, *, outcome: Outcome, reason: Reason, transport: Transport, dialect: Dialect | None, source_address: str,
        device_profile_id: uuid.UUID | None, device_id: uuid.UUID | None, device_name: str | None, request_id: str,
        latency_ms: float,
    ) -> ProvisionEvent:
        """The event ``ProvisionEvent(...)`` makes of these, now, without pydantic's validation: provisioning-core's
        hot path (one per provision), where every value is already of its field's type. The validators' work
        (client text made storable, a blank name None, no negative latency) is done here, in about half the time
        validating takes. ``test_a_trusted_event_is_the_validated_one`` keeps the two the same."""
        if latency_ms < 0:
            raise ValueError("latency_ms < 0")
        event = cls.__new__(cls)
        _set(event, "__dict__", {
            "time": datetime.datetime.now(datetime.UTC), "outcome": outcome, "reason": reason, "transport": transport,
            "dialect": dialect, "source_address": _storable(source_address), "device_profile_id": device_profile_id,
            "device_id": device_id, "device_name": _storable(device_name) or None, "request_id": _storable(request_id),
            "latency_ms": latency_ms,
        })
        # What validation records (model_fields_set): every field but the defaulted time.
        _set(event, "__pydantic_fields_set__", set(_TRUSTED_FIELDS_SET))
        _set(event, "__pydantic_extra__", None)
        _set(event, "__pydantic_private__", None)
        return event

    def wire(self) -> dict[str, Any]:
        """The documented JSON: camelCase, ``time`` in milliseconds since the epoch (like ``createdTime``).

        Written out rather than ``model_dump(mode="json", by_alias=True)`` (what it equals, key order included:
        ``test_the_wire_form_is_the_model_dump``), which took about twice as long, once per event on the core."""
        profile_id, device_id, dialect = self.device_profile_id, self.device_id, self.dialect
        return {
            "time": int(self.time.timestamp() * 1000),
            "outcome": self.outcome.value,
            "reason": self.reason.value,
            "transport": self.transport.value,
            "dialect": None if dialect is None else dialect.value,
            "sourceAddress": self.source_address,
            "deviceProfileId": None if profile_id is None else str(profile_id),
            "deviceId": None if device_id is None else str(device_id),
            "deviceName": self.device_name,
            "requestId": self.request_id,
            "latencyMs": self.latency_ms,
        }

    def wire_json(self) -> bytes:
        return json.dumps(self.wire(), separators=(",", ":")).encode()


def wire_json_array(events: Iterable[ProvisionEvent]) -> bytes:
    """A JSON array of the events' :meth:`~ProvisionEvent.wire` forms (one message on the exchange), rendered
    in one ``json.dumps``: the same bytes as ``b"[" + b",".join(e.wire_json() for e in events) + b"]"``."""
    return json.dumps([event.wire() for event in events], separators=(",", ":")).encode()


_set = object.__setattr__  # what pydantic's model_construct sets an instance's state with
_TRUSTED_FIELDS_SET = frozenset(ProvisionEvent.model_fields) - {"time"}


class EventSink:
    """Where provisioning code hands its events; this one drops them (PROVISION_EVENTS_ENABLED=false)."""

    enabled = False

    def emit(self, event: ProvisionEvent) -> None:
        """Record ``event``; never blocks and never raises."""


#: Defaults of :class:`EventWriter`: a batch is written at least every FLUSH_INTERVAL_S, or as soon as
#: BATCH_SIZE events wait; at most QUEUE_MAX wait (beyond: dropped and counted, provisioning goes on).
FLUSH_INTERVAL_S = 0.15
BATCH_SIZE = 500
QUEUE_MAX = 20_000


class EventWriter(EventSink):
    """Batches events off the hot path: ``emit`` appends to a bounded queue; :meth:`run` (a background task)
    hands each batch to ``store`` (one multi-row write) and then to ``publish`` (the batch's messages).

    A batch ``store`` fails for (database down) is dropped and counted - events are a record, never a reason
    to slow or fail provisioning - with one WARNING per outage; the same for ``publish``.
    """

    enabled = True

    def __init__(
        self,
        store: Callable[[Sequence[ProvisionEvent]], Awaitable[None]],
        publish: Callable[[Sequence[ProvisionEvent]], Awaitable[None]] | None = None,
        *,
        flush_interval_s: float = FLUSH_INTERVAL_S,
        batch_size: int = BATCH_SIZE,
        queue_max: int = QUEUE_MAX,
    ) -> None:
        self._store = store
        self._publish = publish
        self._flush_interval_s = flush_interval_s
        self._batch_size = batch_size
        self._queue_max = queue_max
        self._queue: collections.deque[ProvisionEvent] = collections.deque()
        self._wakeup = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._overflow = OutageLog(log, "provision events queue")
        self._store_outage = OutageLog(log, "provision events store")
        self._publish_outage = OutageLog(log, "provision events exchange")
        #: Events dropped because the queue was full, or their batch could not be stored.
        self.dropped_full = 0
        self.dropped_unstored = 0
        self.unpublished = 0
        self.stored = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    def emit(self, event: ProvisionEvent) -> None:
        if len(self._queue) >= self._queue_max:
            self.dropped_full += 1
            self._overflow.failed(f"more than {self._queue_max} events waiting; dropping new ones")
            return
        self._queue.append(event)
        if len(self._queue) >= self._batch_size:
            self._wakeup.set()

    async def run(self) -> None:
        """Flush forever: every ``flush_interval_s``, or at once when a batch is full (the background task)."""
        while True:
            if len(self._queue) < self._batch_size:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self._flush_interval_s)
            self._wakeup.clear()
            # Shielded: a service stopping cancels this task, never a batch half written (close() then waits
            # for it, through the flush lock, and writes the rest).
            await asyncio.shield(self.flush())

    async def flush(self) -> int:
        """Write and publish what waits now, batch by batch; returns how many events were taken."""
        taken = 0
        async with self._flushing:
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(self._batch_size, len(self._queue)))]
                taken += len(batch)
                await self._write(batch)
        if not self._queue and self._overflow.down:
            self._overflow.recovered()
        return taken

    async def _write(self, batch: list[ProvisionEvent]) -> None:
        try:
            await self._store(batch)
        except Exception as exc:  # noqa: BLE001 - any failure: count, one WARNING per outage, go on
            self.dropped_unstored += len(batch)
            self._store_outage.failed(type(exc).__name__)
        else:
            self.stored += len(batch)
            if self._store_outage.down:
                self._store_outage.recovered()
        if self._publish is None:
            return
        try:
            await self._publish(batch)
        except Exception as exc:  # noqa: BLE001 - the bus away: count, one WARNING per outage, go on
            self.unpublished += len(batch)
            self._publish_outage.failed(type(exc).__name__)
        else:
            if self._publish_outage.down:
                self._publish_outage.recovered()

    async def close(self, timeout: float = 5.0) -> None:
        """Write what is still queued (bounded by ``timeout``), e.g. when the service stops."""
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except TimeoutError:
            log.warning("%d provision events not written before stopping", len(self._queue))


def elapsed_ms(started: float) -> float:
    """Milliseconds since ``started`` (a ``time.perf_counter()`` value)."""
    return round((time.perf_counter() - started) * 1000, 3)
