"""``python -m provisioning_core``: serve provision requests, and the device_api (attributes), until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aio_pika
from aio_pika.abc import AbstractExchange
from provisioning_common import metrics, runtime
from provisioning_common.bus import Bus
from provisioning_common.contract import CORE, DEVICE_API, EVENTS_EXCHANGE
from provisioning_common.db import repository
from provisioning_common.events import EventSink, EventWriter, ProvisionEvent, wire_json_array
from provisioning_common.rate_limit import PostgresStore
from provisioning_common.secretbox import SecretBox

from .device_api import DeviceApi
from .hook import ProvisionHooks
from .rate_limit import ProvisionLimits, RateLimiter
from .service import ProvisioningCore

#: Replayable answers are kept well past any redelivery (requests expire after PROVISION_TIMEOUT_S).
ANSWER_RETENTION_S = 3600.0


async def start(context: runtime.Context) -> runtime.Running:
    settings = context.settings
    if settings.data_encryption_key is None:
        raise SystemExit("DATA_ENCRYPTION_KEY is required (a Fernet key shared with admin-api)")
    box = SecretBox(settings.data_encryption_key.get_secret_value())
    # Provision secrets stored in clear before migration 0008 are encrypted now (the admin API does it too).
    await repository.seal_profile_secrets(await context.pool(), box.encrypt_json)
    limits_store = PostgresStore(await context.pool())
    publisher = EventPublisher(await context.bus())
    events = event_writer(await context.pool(), publisher) if settings.provision_events_enabled else EventSink()
    core = ProvisioningCore(await context.pool(), await context.bus(),
                            box,
                            RateLimiter(ProvisionLimits.from_settings(settings), limits_store),
                            profile_ttl_s=settings.profile_cache_ttl_s,
                            replay_window_s=settings.provision_replay_window_s,
                            reply_grace_s=settings.bus_reply_grace_s,
                            events=events,
                            write_batch_max=settings.provision_write_batch_max,
                            hooks=(hooks := ProvisionHooks(await context.pool(), box,
                                                           max_concurrency=settings.provision_hook_max_concurrency)))
    # Device traffic (attributes) on its own queue and channel, with at most half of the pool, so
    # that it never queues provisioning.
    device_api = DeviceApi(await context.pool(), await context.bus(), max_connections=settings.db_pool_max // 2)
    background = [purge_forever(core, limits_store, await context.pool(), settings.provision_events_retention_days,
                                settings.provision_events_purge_interval_s)]
    stop: list[Callable[[], Awaitable[None]]] = [hooks.close]
    if isinstance(events, EventWriter):
        background.append(events.run())
        stop.append(events.close)  # after the requests in flight finished: their events are written too
    return runtime.Running(serve=CORE, handlers=metrics.count_decisions(core.handlers()),
                           on_undelivered=core.on_undelivered,
                           also_serve=[(DEVICE_API, device_api.handlers())],
                           background=background, stop=stop)


def event_writer(pool: Any, publisher: EventPublisher) -> EventWriter:
    """Provisioning events stored in batches (one COPY) and then published to ``provisioning.events``."""

    async def store(batch: Sequence[ProvisionEvent]) -> None:
        await repository.insert_provision_events(pool, batch)

    return EventWriter(store, publisher.publish)


class EventPublisher:
    """Publishes each batch of events to ``provisioning.events`` as one message per routing key (a JSON array of
    the events with that ``<outcome>.<transport>``), on a channel of its own without publisher confirms.

    One message per event cost the core more per provision (an AMQP publish is ~0.1-0.2 ms of Python) than the
    rest of the event together, and measurably lowered provisions/s; per routing key, a busy core publishes
    a handful of messages per flush whatever its rate, and an idle one a one-element array. Events are a record,
    not a transaction: a message lost with the connection is still in Postgres."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._exchange: AbstractExchange | None = None

    async def publish(self, batch: Sequence[ProvisionEvent]) -> None:
        if self._exchange is None:
            await self._bus.exchange(EVENTS_EXCHANGE)  # looked up, or declared on a development broker
            channel = await self._bus.open_channel()
            self._exchange = await channel.get_exchange(self._bus.settings.queue(EVENTS_EXCHANGE), ensure=False)
        by_key: dict[str, list[ProvisionEvent]] = {}
        for event in batch:
            by_key.setdefault(event.routing_key, []).append(event)
        for routing_key, events in by_key.items():
            message = aio_pika.Message(wire_json_array(events), content_type="application/json",
                                       delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            # Not mandatory: events nobody bound a queue for are dropped by the broker, not returned to us.
            await self._exchange.publish(message, routing_key=routing_key, mandatory=False)


async def purge_forever(
    core: ProvisioningCore, limits_store: PostgresStore, pool: Any, events_retention_days: float, interval_s: float
) -> None:
    """Forget what expired, every ``interval_s`` (PROVISION_EVENTS_PURGE_INTERVAL_S): replayable answers, full
    rate-limit buckets, and provisioning events older than PROVISION_EVENTS_RETENTION_DAYS."""
    while True:
        with contextlib.suppress(Exception):
            await core.purge_answers(ANSWER_RETENTION_S)
        with contextlib.suppress(Exception):
            await limits_store.purge()  # full buckets are the same as none
        with contextlib.suppress(Exception):
            await repository.purge_provision_events(pool, events_retention_days)
        await asyncio.sleep(interval_s)


if __name__ == "__main__":
    runtime.run_service(CORE.name, start)
