"""``/api/devices/{id}/credentials/revoke`` and ``.../rotate``: take a device's credentials away, or replace them.

An operator who suspects a token, password or key leaked revokes it (the device can no longer log in) or
rotates it (new credentials, shown once). Either way the old credentials are dead everywhere at once:

- their lookup key goes to ``revoked_credentials`` (migration 0012), so no device can be given them again,
  and every log-in path asks the database (the credentials service keeps no cache), so our gateways and
  ``broker_auth`` refuse them from the next CONNECT or request on;
- the device's live sessions on our gateways end: a ``revoked`` message on ``device.downlink`` (contract
  ``DOWNLINK_REVOKED``) closes its MQTT connections (MQTT 5: DISCONNECT 0x87), ends its CoAP observations
  (4.01) and its HTTP long polls opened before the revocation (401). Sessions a device holds on an
  operator's own broker (bridge mode) are that broker's to close.

Rotation without a body keeps the credentials type: a new server-generated token (ACCESS_TOKEN), or a new
password under the same client id and user name (MQTT_BASIC); an X.509 certificate is replaced only with
the new certificate given in the body. A device that has not provisioned itself yet collects the new
credentials at its claim (CHECK_PRE_PROVISIONED_DEVICES), as it would have the old ones.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body
from provisioning_common.db import repository
from provisioning_common.device_link import end_sessions
from provisioning_common.models import CredentialsType, SuppliedCredentials

from ..dependencies import Box, BusDep, Pool, api_error
from ..schemas import CredentialsIn
from .devices import _CONFLICTS, device_json, prepare, supplied_credentials

log = logging.getLogger(__name__)

router = APIRouter(prefix="/devices/{device_id}/credentials")

@router.post("/revoke")
async def revoke(device_id: uuid.UUID, pool: Pool, bus: BusDep) -> dict[str, Any]:
    """The device keeps its name, attributes and history but has no credentials until the next rotation."""
    try:
        device = await repository.revoke_credentials(pool, device_id)
    except repository.UnknownDevice:
        raise api_error(404, f"Device {device_id} not found") from None
    log.info("credentials of device %s revoked", device_id)
    return {**device_json(device), "sessionsEnded": await end_sessions(bus, device_id)}


async def _rotation_request(
    pool: Pool, device_id: uuid.UUID, body: CredentialsIn | None
) -> tuple[CredentialsType, SuppliedCredentials]:
    """What to ask the credentials service for: the body's credentials, else new ones of the current type."""
    if body is not None and body.credentials_value is not None:
        return supplied_credentials(body)
    try:
        current = await repository.current_credentials(pool, device_id)
    except repository.UnknownDevice:
        raise api_error(404, f"Device {device_id} not found") from None
    ctype = body.credentials_type if body is not None else (
        CredentialsType(current[0]) if current else CredentialsType.ACCESS_TOKEN)
    if ctype is CredentialsType.ACCESS_TOKEN:
        return ctype, SuppliedCredentials()  # a new server-generated token
    if ctype is CredentialsType.MQTT_BASIC:
        kept = current[1] if current and current[0] == CredentialsType.MQTT_BASIC.value else {}
        if not kept.get("clientId") and not kept.get("userName"):
            raise api_error(400, "MQTT_BASIC rotation needs credentialsValue {clientId, userName, password}: "
                                 "the device has no MQTT_BASIC client id or user name to keep")
        return ctype, SuppliedCredentials(client_id=kept.get("clientId", ""), username=kept.get("userName", ""),
                                          password=secrets.token_urlsafe(24))
    raise api_error(400, f"{ctype.value} rotation needs the new certificate as credentialsValue (PEM)")


@router.post("/rotate")
async def rotate(
    device_id: uuid.UUID, pool: Pool, bus: BusDep, box: Box, body: Annotated[CredentialsIn | None, Body()] = None
) -> dict[str, Any]:
    """New credentials for the device (shown once, in ``credentials``); the old ones are revoked."""
    prepared = await prepare(bus, *await _rotation_request(pool, device_id, body))
    try:
        device = await repository.rotate_credentials(pool, device_id, prepared,
                                                     box.encrypt_json(prepared.response_value))
    except repository.UnknownDevice:
        raise api_error(404, f"Device {device_id} not found") from None
    except repository.DeviceConflict:
        raise api_error(409, _CONFLICTS["credentials"]) from None
    log.info("credentials of device %s rotated (%s)", device_id, prepared.credentials_type.value)
    return {
        **device_json(device),
        # Shown once, like a newly created device's.
        "credentials": {"credentialsType": prepared.credentials_type.value,
                        "credentialsValue": prepared.response_value},
        "sessionsEnded": await end_sessions(bus, device_id),
    }
