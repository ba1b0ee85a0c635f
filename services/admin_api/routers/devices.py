"""``/api/devices``: pre-provisioned devices (created with their credentials), look-ups and deletion.

Credentials are prepared (minted, hashed, checked) by the credentials service over the bus, within the
same limits as a device's own request; the device and its credentials are then written in one
statement, the value encrypted until the device collects it (CHECK_PRE_PROVISIONED_DEVICES).
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from fastapi import APIRouter, Query, Response
from provisioning_common.bus import Bus, RpcError
from provisioning_common.contract import PREPARE
from provisioning_common.db import repository
from provisioning_common.db.repository import DeviceRecord
from provisioning_common.dialects.limits import field_problem
from provisioning_common.models import (
    CredentialsType,
    PrepareCredentialsRequest,
    PreparedCredentials,
    SuppliedCredentials,
)

from ..dependencies import Box, BusDep, Pool, api_error
from ..schemas import MAX_PAGE, MAX_PAGE_SIZE, NO_CONTROLS, CredentialsIn, DeviceIn, Page

router = APIRouter(prefix="/devices")

_CONFLICTS = {
    "name": "Device with such name already exists!",
    "device_key": "Device with such deviceKey already exists in this profile!",
    "credentials": "Device credentials are already assigned to another device!",
}


def device_json(device: DeviceRecord) -> dict[str, Any]:
    """A device as the API shows it (its credentials' type, never their value)."""
    return {
        "id": str(device.id),
        "name": device.name,
        "label": device.label,
        "deviceProfileId": str(device.profile_id),
        "deviceKey": device.device_key,
        "gateway": device.gateway,
        "provisionState": device.provision_state,
        "credentialsType": device.credentials_type,
        "createdTime": int(device.created_at.timestamp() * 1000),
    }


def _checked(field: str, value: str, name: str) -> str:
    """``value`` if it is within the provisioning limit of ``field`` (dialects/limits.py), else HTTP 400."""
    problem = field_problem(field, value)
    if problem:
        raise api_error(400, f"{name} {problem}")
    return value


def supplied_credentials(creds: CredentialsIn | None) -> tuple[CredentialsType, SuppliedCredentials]:
    """Map the admin body's credentials to the fields a device would send (spec §1), within the same
    limits as a device's own request."""
    if creds is None or creds.credentials_value is None:
        return CredentialsType.ACCESS_TOKEN, SuppliedCredentials()
    value = creds.credentials_value
    ctype = creds.credentials_type
    if ctype is CredentialsType.MQTT_BASIC:
        if not isinstance(value, dict):
            raise api_error(400, "MQTT_BASIC credentialsValue must be an object {clientId, userName, password}")
        unknown = set(value) - {"clientId", "userName", "password"}
        if unknown:
            raise api_error(400, f"unknown MQTT_BASIC fields: {', '.join(sorted(unknown))}")
        return ctype, SuppliedCredentials(
            client_id=_checked("client_id", value.get("clientId", ""), "credentialsValue.clientId"),
            username=_checked("username", value.get("userName", ""), "credentialsValue.userName"),
            password=_checked("password", value.get("password", ""), "credentialsValue.password"),
        )
    if not isinstance(value, str) or not value:
        raise api_error(400, f"{ctype.value} credentialsValue must be a non-empty string")
    if ctype is CredentialsType.ACCESS_TOKEN:
        return ctype, SuppliedCredentials(token=_checked("token", value, "credentialsValue"))
    if ctype is CredentialsType.X509_CERTIFICATE:
        return ctype, SuppliedCredentials(certificate=_checked("certificate", value, "credentialsValue"))
    raise api_error(400, f"credentialsType {ctype.value} is not supported")


async def prepare(bus: Bus, ctype: CredentialsType, supplied: SuppliedCredentials) -> PreparedCredentials:
    """The credentials service prepares (mints, hashes, checks) what an operator gave, within the limits of a
    device's own request; HTTP 503 when it cannot be reached, 400 when it refuses them."""
    try:
        reply = await bus.call(PREPARE, PrepareCredentialsRequest(credentials_type=ctype, credentials=supplied))
    except RpcError:
        raise api_error(503, "credentials service unavailable") from None
    if not reply.ok or reply.prepared is None:
        raise api_error(400, reply.error_message or "invalid credentials")
    return reply.prepared


@router.post("", status_code=201)
async def create_device(body: DeviceIn, pool: Pool, bus: BusDep, box: Box) -> dict[str, Any]:
    if not await repository.profile_exists(pool, body.device_profile_id):
        raise api_error(400, f"deviceProfileId {body.device_profile_id} does not exist")
    prepared = await prepare(bus, *supplied_credentials(body.credentials))
    device_id = uuid.uuid4()
    try:
        device = await repository.create_device(
            pool, device_id=device_id, name=body.name, profile_id=body.device_profile_id,
            device_key=body.device_key or str(device_id), prepared=prepared,
            value_enc=box.encrypt_json(prepared.response_value),
        )
    except repository.DeviceConflict as exc:
        raise api_error(409, _CONFLICTS[exc.what]) from None
    shown = device_json(device)
    # Shown once, like a newly created device in ThingsBoard's UI.
    shown["credentials"] = {"credentialsType": prepared.credentials_type.value,
                            "credentialsValue": prepared.response_value}
    return shown


@router.get("/{device_id}")
async def get_device(device_id: uuid.UUID, pool: Pool) -> dict[str, Any]:
    device = await repository.device_record(pool, device_id)
    if device is None:
        raise api_error(404, f"Device {device_id} not found")
    return device_json(device)


@router.get("")
async def list_devices(
    pool: Pool,
    deviceProfileId: uuid.UUID | None = None,
    textSearch: str | None = Query(None, max_length=255, pattern=NO_CONTROLS),
    page: int = Query(0, ge=0, le=MAX_PAGE),
    pageSize: int = Query(100, ge=1, le=MAX_PAGE_SIZE),
    provisionState: Literal["provisioned", "pending"] | None = None,
    credentialsType: CredentialsType | None = None,
) -> Page:
    """``provisionState``: ``provisioned`` (the device has provisioned) or ``pending`` (created, not yet);
    ``credentialsType``: the type of the device's current credentials."""
    devices, total = await repository.list_devices(
        pool, profile_id=deviceProfileId, name_contains=textSearch, limit=pageSize, offset=page * pageSize,
        provisioned=None if provisionState is None else provisionState == "provisioned",
        credentials_type=credentialsType.value if credentialsType else None,
    )
    return Page(data=[device_json(d) for d in devices], totalElements=total, hasNext=(page + 1) * pageSize < total)


@router.delete("/{device_id}", status_code=204)
async def delete_device(device_id: uuid.UUID, pool: Pool) -> Response:
    if not await repository.delete_device(pool, device_id):
        raise api_error(404, f"Device {device_id} not found")
    return Response(status_code=204)
