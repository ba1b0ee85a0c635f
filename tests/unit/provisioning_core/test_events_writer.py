"""The provisioning events' batching writer (provisioning_common.events.EventWriter) and the event's wire form."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest
from provisioning_common.events import EventWriter, Outcome, ProvisionEvent, Reason, wire_json_array
from provisioning_common.models import Dialect, Transport


def event(n: int = 0, **fields: object) -> ProvisionEvent:
    values: dict[str, object] = {"outcome": Outcome.SUCCESS, "reason": Reason.CREATED, "transport": Transport.HTTP,
                                 "device_name": f"dev-{n}", "request_id": f"r{n}", **fields}
    return ProvisionEvent.model_validate(values)


class Store:
    """Records each batch it is handed; fails while ``failing`` is set."""

    def __init__(self) -> None:
        self.batches: list[list[ProvisionEvent]] = []
        self.failing = False
        self.stored = asyncio.Event()

    async def __call__(self, batch: Sequence[ProvisionEvent]) -> None:
        if self.failing:
            raise OSError("database down")
        self.batches.append(list(batch))
        self.stored.set()


@contextlib.asynccontextmanager
async def running(writer: EventWriter) -> AsyncIterator[None]:
    task = asyncio.create_task(writer.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_emit_only_queues_and_the_background_task_writes_one_batch_in_order() -> None:
    store, published = Store(), list[ProvisionEvent]()

    async def publish(batch: Sequence[ProvisionEvent]) -> None:
        published.extend(batch)

    writer = EventWriter(store, publish, flush_interval_s=0.05)
    for n in range(5):
        writer.emit(event(n))
    assert store.batches == [] and writer.queued == 5  # nothing written on the caller's path
    async with running(writer):
        await asyncio.wait_for(store.stored.wait(), 2)
    assert [[e.device_name for e in batch] for batch in store.batches] == [[f"dev-{n}" for n in range(5)]]
    assert [e.device_name for e in published] == [f"dev-{n}" for n in range(5)]
    assert writer.stored == 5 and writer.queued == 0


async def test_a_full_batch_is_written_at_once_without_waiting_for_the_interval() -> None:
    store = Store()
    writer = EventWriter(store, flush_interval_s=60, batch_size=10)
    async with running(writer):
        for n in range(9):
            writer.emit(event(n))
        await asyncio.sleep(0.1)
        assert store.batches == []  # under a batch: waits for the interval (60 s)
        writer.emit(event(9))
        await asyncio.wait_for(store.stored.wait(), 2)
        assert [len(b) for b in store.batches] == [10]
        writer.emit(event(10))
    await writer.close()  # what is left is written when the service stops
    assert [len(b) for b in store.batches] == [10, 1]


async def test_stopping_in_the_middle_of_a_batch_loses_nothing() -> None:
    """The service cancels the background task first, then calls close(): the batch being written finishes."""
    release, batches = asyncio.Event(), []

    async def slow_store(batch: Sequence[ProvisionEvent]) -> None:
        await release.wait()
        batches.append([e.device_name for e in batch])

    writer = EventWriter(slow_store, flush_interval_s=0.01, batch_size=2)
    task = asyncio.create_task(writer.run())
    writer.emit(event(0))
    writer.emit(event(1))
    await asyncio.sleep(0.05)  # the first batch is being written
    writer.emit(event(2))
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    release.set()
    await writer.close()
    assert batches == [["dev-0", "dev-1"], ["dev-2"]]


async def test_a_full_queue_drops_new_events_and_counts_them_never_blocking(caplog: pytest.LogCaptureFixture) -> None:
    store = Store()
    writer = EventWriter(store, queue_max=3)
    with caplog.at_level(logging.WARNING):
        for n in range(10):
            writer.emit(event(n))
    assert writer.queued == 3 and writer.dropped_full == 7
    assert len([r for r in caplog.records if "queue" in r.getMessage()]) == 1  # one WARNING, not one per event
    await writer.flush()
    assert [e.device_name for e in store.batches[0]] == ["dev-0", "dev-1", "dev-2"]


async def test_a_batch_the_store_refuses_is_dropped_and_counted_then_writing_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = Store()
    store.failing = True
    writer = EventWriter(store)
    with caplog.at_level(logging.WARNING):
        for n in range(3):
            writer.emit(event(n))
        await writer.flush()
        writer.emit(event(3))
        await writer.flush()
    assert writer.dropped_unstored == 4 and store.batches == []
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
    store.failing = False
    writer.emit(event(4))
    await writer.flush()
    assert [[e.device_name for e in b] for b in store.batches] == [["dev-4"]] and writer.stored == 1
    assert any("available again" in r.getMessage() for r in caplog.records)


async def test_publish_failures_are_counted_and_do_not_undo_the_store() -> None:
    store = Store()

    async def publish(batch: Sequence[ProvisionEvent]) -> None:
        raise RuntimeError("bus down")

    writer = EventWriter(store, publish)
    for n in range(3):
        writer.emit(event(n))
    await writer.flush()
    assert writer.stored == 3 and writer.unpublished == 3


def test_the_wire_form_is_the_documented_json() -> None:
    profile_id, device_id = uuid.uuid4(), uuid.uuid4()
    moment = datetime.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=datetime.UTC)
    e = ProvisionEvent(time=moment, outcome=Outcome.NOT_FOUND, reason=Reason.WRONG_SECRET, transport=Transport.COAP,
                       dialect=Dialect.INNOWAY, source_address="10.0.0.1", device_profile_id=profile_id,
                       device_id=device_id, device_name="d", request_id="rid", latency_ms=1.5)
    assert e.routing_key == "NOT_FOUND.COAP"
    assert e.wire() == {"time": 1767323045678, "outcome": "NOT_FOUND", "reason": "wrong_secret", "transport": "COAP",
                        "dialect": "innoway", "sourceAddress": "10.0.0.1", "deviceProfileId": str(profile_id),
                        "deviceId": str(device_id), "deviceName": "d", "requestId": "rid", "latencyMs": 1.5}
    assert json.loads(e.wire_json()) == e.wire()


def test_client_text_is_storable() -> None:
    """A NUL (which Postgres refuses, failing the whole batch) is replaced; long text is cut; blank is no name."""
    e = event(device_name="a\x00b" + "x" * 300, source_address="s\x00")
    assert e.device_name is not None and "\x00" not in e.device_name and len(e.device_name) == 255
    assert e.source_address == "s\ufffd"
    assert event(device_name="").device_name is None


TRUSTED_CASES: list[dict[str, object]] = [
    {"outcome": Outcome.SUCCESS, "reason": Reason.CREATED, "transport": Transport.HTTP, "dialect": Dialect.THINGSBOARD,
     "source_address": "10.0.0.1", "device_profile_id": uuid.uuid4(), "device_id": uuid.uuid4(),
     "device_name": "dev", "request_id": "rid", "latency_ms": 1.25},
    {"outcome": Outcome.X509_REFUSED, "reason": Reason.CN_MISMATCH, "transport": Transport.MQTT, "dialect": None,
     "source_address": "s\x00" + "x" * 300, "device_profile_id": None, "device_id": None,
     "device_name": "a\x00b" + "y" * 300, "request_id": "r\x00" * 200, "latency_ms": 0.0},
    {"outcome": Outcome.NOT_FOUND, "reason": Reason.UNKNOWN_KEY, "transport": Transport.COAP,
     "dialect": Dialect.INNOWAY, "source_address": "", "device_profile_id": None, "device_id": None,
     "device_name": "", "request_id": "", "latency_ms": 12.0},
]


@pytest.mark.parametrize("fields", TRUSTED_CASES)
def test_a_trusted_event_is_the_validated_one(fields: dict[str, object]) -> None:
    """The core's unvalidated constructor (its hot path) makes the event validation would."""
    trusted = ProvisionEvent.trusted(**fields)  # type: ignore[arg-type]
    validated = ProvisionEvent.model_validate({**fields, "time": trusted.time})
    assert trusted == validated and trusted.model_dump() == validated.model_dump()
    assert trusted.model_fields_set == validated.model_fields_set - {"time"}
    assert list(trusted.__dict__) == list(ProvisionEvent.model_fields)
    assert trusted.time.tzinfo is datetime.UTC and abs(trusted.time - datetime.datetime.now(datetime.UTC)).seconds < 5
    assert trusted.wire_json() == validated.wire_json()
    with pytest.raises(ValueError):
        ProvisionEvent.trusted(**{**fields, "latency_ms": -1.0})  # type: ignore[arg-type]


@pytest.mark.parametrize("fields", TRUSTED_CASES)
def test_the_wire_form_is_the_model_dump(fields: dict[str, object]) -> None:
    """wire() is written out for speed; it stays model_dump's JSON (keys in the same order), time in ms."""
    e = ProvisionEvent.model_validate(fields)
    dumped = e.model_dump(mode="json", by_alias=True)
    dumped["time"] = int(e.time.timestamp() * 1000)
    assert e.wire() == dumped and list(e.wire()) == list(dumped)
    assert e.wire_json() == json.dumps(dumped, separators=(",", ":")).encode()


def test_a_batch_renders_as_the_array_of_its_events() -> None:
    events = [ProvisionEvent.model_validate(f) for f in TRUSTED_CASES]
    assert wire_json_array(events) == b"[" + b",".join(e.wire_json() for e in events) + b"]"
    assert json.loads(wire_json_array(events)) == [e.wire() for e in events]
    assert wire_json_array([]) == b"[]"
