"""device_api: a provisioned device's attributes in Postgres, for the gateways (contract.DEVICE_API).

Served by the provisioning-core process on its own queue (``device_api``), with its own consumer
channel and prefetch window, and at most half of the Postgres pool: device traffic never queues
provisioning requests, at the broker or at the pool.

- GET_ATTRIBUTES: the client and/or shared attributes a device asks for (ThingsBoard's attribute
  request; server attributes are never shown to a device).
- SAVE_CLIENT_ATTRIBUTES: store the client attributes a device published (one statement), then announce
  them on ``device.attributes`` (routing key = device id, body = the device's JSON object).

An unknown device id (deleted while its session lived, or not an id at all) is an :class:`RpcError`
saying so; a database outage is :class:`Unavailable` ("retry later") through :class:`DatabaseGuard`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import asyncpg
from provisioning_common.bus import Bus, RpcError
from provisioning_common.contract import ATTRIBUTES_EXCHANGE, GET_ATTRIBUTES, SAVE_CLIENT_ATTRIBUTES, Handler
from provisioning_common.db import repository
from provisioning_common.db.guard import DatabaseGuard
from provisioning_common.models import (
    AttributeScope,
    AttributesQuery,
    AttributesSaved,
    AttributesSnapshot,
    ClientAttributesUpdate,
)

log = logging.getLogger(__name__)


class DeviceApi:
    def __init__(self, pool: asyncpg.Pool, bus: Bus, *, max_connections: int = 8) -> None:
        self._pool = pool
        self._bus = bus
        #: Connections device traffic may hold at once; the rest of the pool stays for provisioning.
        self._connections = asyncio.Semaphore(max(1, max_connections))
        self._db = DatabaseGuard(log).run

    def handlers(self) -> list[Handler]:
        """The entry points, one per method of :data:`contract.DEVICE_API`."""
        return [
            GET_ATTRIBUTES.handler(self.get_attributes),
            SAVE_CLIENT_ATTRIBUTES.handler(self.save_client_attributes),
        ]

    async def get_attributes(self, query: AttributesQuery) -> AttributesSnapshot:
        device_id = _device_uuid(query.device_id)
        if query.client_keys is None and query.shared_keys is None:
            return AttributesSnapshot()
        try:
            async with self._connections:
                rows = await self._db(repository.get_attributes(
                    self._pool, device_id, client=query.client_keys, shared=query.shared_keys
                ))
        except repository.UnknownDevice:
            raise _unknown(query.device_id) from None
        found: dict[str, dict[str, Any]] = {AttributeScope.CLIENT.value: {}, AttributeScope.SHARED.value: {}}
        for row in rows:
            found[row.scope][row.key] = row.value
        return AttributesSnapshot(client=found[AttributeScope.CLIENT.value], shared=found[AttributeScope.SHARED.value])

    async def save_client_attributes(self, update: ClientAttributesUpdate) -> AttributesSaved:
        device_id = _device_uuid(update.device_id)
        if not update.values:
            return AttributesSaved(saved=0)
        try:
            async with self._connections:
                saved = await self._db(repository.save_attributes(
                    self._pool, device_id, AttributeScope.CLIENT.value, update.values
                ))
        except repository.UnknownDevice:
            raise _unknown(update.device_id) from None
        except (repository.InvalidAttributes, ValueError) as exc:
            raise RpcError(f"attributes not saved: {exc}") from None
        body = json.dumps(update.values, separators=(",", ":"), allow_nan=False).encode()
        await self._bus.publish_event(ATTRIBUTES_EXCHANGE, str(device_id), body)
        return AttributesSaved(saved=saved)


def _device_uuid(device_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(device_id)
    except ValueError:
        raise _unknown(device_id) from None


def _unknown(device_id: str) -> RpcError:
    return RpcError(f"unknown device {device_id[:64]!r}")
