"""``/api/devices/{id}/attributes/{scope}``: a device's attributes as an operator reads and writes them.

``scope`` is ``client``, ``shared`` or ``server`` (or ThingsBoard's ``CLIENT_SCOPE``, ``SHARED_SCOPE``,
``SERVER_SCOPE``). Operators write shared and server attributes; client attributes are the device's own
(read and delete only). A change to shared attributes is published to the device's session(s) on
``device.downlink`` (type ``attributes``) once committed: ``{"key": value, ...}`` for values set,
``{"deleted": ["key", ...]}`` for keys deleted. A device without a session gets nothing pushed; it reads
the stored values on its next attribute request. The statements are in ``provisioning_common.db.repository``.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query
from provisioning_common.bus import Bus, RpcError
from provisioning_common.contract import DOWNLINK_ATTRIBUTES, DOWNLINK_EXCHANGE
from provisioning_common.db import repository
from provisioning_common.models import MAX_ATTRIBUTE_KEY, AttributeScope

from ..dependencies import BusDep, Pool, api_error
from ..schemas import KEYS_QUERY_MAX, MAX_ATTRIBUTES_PER_CALL, NO_CONTROLS, AttributeKey, ScopeIn

log = logging.getLogger(__name__)

router = APIRouter(prefix="/devices")

KeysQuery = Annotated[
    str | None,
    Query(max_length=KEYS_QUERY_MAX, pattern=NO_CONTROLS, description="comma-separated attribute keys"),
]


def parse_keys(raw: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (blank entries dropped); 400 when a key is too long or too many."""
    keys = [key.strip() for key in (raw or "").split(",")]
    keys = list(dict.fromkeys(key for key in keys if key))
    if len(keys) > MAX_ATTRIBUTES_PER_CALL:
        raise api_error(400, f"keys: at most {MAX_ATTRIBUTES_PER_CALL} keys")
    if any(len(key) > MAX_ATTRIBUTE_KEY for key in keys):
        raise api_error(400, f"keys: each key must be at most {MAX_ATTRIBUTE_KEY} characters")
    return keys


def _not_found(device_id: uuid.UUID) -> Exception:
    return api_error(404, f"Device {device_id} not found")


async def _notify(bus: Bus, device_id: uuid.UUID, body: dict[str, Any]) -> None:
    """Push a shared-attribute change to the device's sessions; a device offline gets it on its next request."""
    try:
        await bus.publish(DOWNLINK_EXCHANGE, str(device_id), json.dumps(body, separators=(",", ":")).encode(),
                          type=DOWNLINK_ATTRIBUTES)
    except RpcError as exc:  # stored all the same: the device reads it on its next attribute request
        log.warning("shared attributes of %s saved but not pushed to its session: %s", device_id, exc)


@router.get("/{device_id}/attributes/{scope}")
async def get_attributes(
    device_id: uuid.UUID, scope: ScopeIn, pool: Pool, keys: KeysQuery = None
) -> list[dict[str, Any]]:
    """The device's attributes of ``scope`` (those named in ``keys``, or all), by key:
    ``[{"key", "value", "lastUpdateTs"}]`` as ThingsBoard's REST API answers."""
    try:
        rows = await repository.get_attributes(pool, device_id, **{scope.scope.value: parse_keys(keys)})
    except repository.UnknownDevice:
        raise _not_found(device_id) from None
    return [{"key": row.key, "value": row.value, "lastUpdateTs": row.last_update_ts} for row in rows]


@router.post("/{device_id}/attributes/{scope}")
async def save_attributes(
    device_id: uuid.UUID,
    scope: ScopeIn,
    values: Annotated[dict[AttributeKey, Any], Body(max_length=MAX_ATTRIBUTES_PER_CALL)],
    pool: Pool,
    bus: BusDep,
) -> dict[str, int]:
    """Set shared or server attributes (a JSON object, any JSON values); shared ones are pushed to the device."""
    target = scope.scope
    if target is AttributeScope.CLIENT:
        raise api_error(400, "client attributes are written by the device; set shared or server attributes")
    if not values:
        raise api_error(400, "No attributes data found in request body!")
    try:
        saved = await repository.save_attributes(pool, device_id, target.value, values)
    except repository.UnknownDevice:
        raise _not_found(device_id) from None
    except repository.InvalidAttributes as exc:
        raise api_error(400, str(exc)) from None
    except ValueError:
        raise api_error(400, "attribute values must be JSON (no NaN or Infinity)") from None
    if target is AttributeScope.SHARED:
        await _notify(bus, device_id, values)
    return {"saved": saved}


@router.delete("/{device_id}/attributes/{scope}")
async def delete_attributes(
    device_id: uuid.UUID, scope: ScopeIn, pool: Pool, bus: BusDep, keys: KeysQuery = None
) -> dict[str, int]:
    """Delete the attributes named in ``keys`` (required); deleted shared keys are announced to the device."""
    names = parse_keys(keys)
    if not names:
        raise api_error(400, "keys: name at least one attribute key to delete")
    try:
        deleted = await repository.delete_attributes(pool, device_id, scope.scope.value, names)
    except repository.UnknownDevice:
        raise _not_found(device_id) from None
    if deleted and scope.scope is AttributeScope.SHARED:
        await _notify(bus, device_id, {"deleted": deleted})
    return {"deleted": len(deleted)}
