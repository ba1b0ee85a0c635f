"""A gateway's "timed out" answer is reported to the core as the TIMED_OUT provisioning event (TransportApi), next
to ``abandon``, without the secret, and never crowding ``abandon`` out of the bus's outbox."""

from __future__ import annotations

import json
from typing import Any

from provisioning_common.bus import OUTBOX_MAX, ConnectionLost, RpcError, Unavailable
from provisioning_common.contract import ABANDON, REPORT_TIMEOUT
from provisioning_common.events import Outcome, ProvisionEvent, Reason
from provisioning_common.models import Dialect, Transport
from provisioning_common.settings import Settings
from provisioning_common.transport_api import OutcomeKind, TransportApi

SECRET = "s3cret-never-in-an-event"
BODY = json.dumps({"deviceName": " dev-1 ", "provisionDeviceKey": "key", "provisionDeviceSecret": SECRET}).encode()


class Bus:
    """The part of the Bus that TransportApi.provision uses: ``call`` fails with ``error``."""

    def __init__(self, error: RpcError, backlog: int = 0) -> None:
        self.error = error
        self.sent: list[tuple[Any, Any]] = []
        self.one_way_backlog = backlog

    async def call(self, *_: Any, **__: Any) -> Any:
        raise self.error

    def send_reliably(self, message: Any, payload: Any) -> None:
        self.sent.append((message, payload))


def api(bus: Bus, **settings: Any) -> TransportApi:
    return TransportApi(bus, Settings(**settings))  # type: ignore[arg-type]


async def test_a_time_out_is_reported_with_abandon() -> None:
    bus = Bus(ConnectionLost("gone"))
    outcome = await api(bus).provision(BODY, transport=Transport.COAP, source_address="10.0.0.5")
    assert outcome.kind is OutcomeKind.UNAVAILABLE
    assert [m for m, _ in bus.sent] == [REPORT_TIMEOUT, ABANDON]
    event = bus.sent[0][1]
    assert isinstance(event, ProvisionEvent)
    assert (event.outcome, event.reason, event.transport, event.dialect) == (
        Outcome.TIMED_OUT, Reason.NO_ANSWER, Transport.COAP, Dialect.THINGSBOARD)
    assert event.source_address == "10.0.0.5" and event.device_name == "dev-1" and event.request_id
    assert SECRET not in event.model_dump_json()


async def test_a_core_that_answered_unavailable_is_reported_without_abandon() -> None:
    bus = Bus(Unavailable("database unavailable"))
    await api(bus).provision(BODY, transport=Transport.HTTP)
    assert [(m, p.reason) for m, p in bus.sent] == [(REPORT_TIMEOUT, Reason.UNAVAILABLE)]


async def test_no_report_when_events_are_off_or_the_outbox_is_half_full() -> None:
    off = Bus(ConnectionLost("gone"))
    await api(off, provision_events_enabled=False).provision(BODY, transport=Transport.HTTP)
    crowded = Bus(ConnectionLost("gone"), backlog=OUTBOX_MAX // 2)
    await api(crowded).provision(BODY, transport=Transport.HTTP)
    # abandon is still sent in both cases: it undoes what nobody was told.
    assert [m for m, _ in off.sent] == [ABANDON] and [m for m, _ in crowded.sent] == [ABANDON]
