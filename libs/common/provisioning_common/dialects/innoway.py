"""Innoway's snake_case provisioning dialect (shared/spec/innoway-provisioning.md)."""

from __future__ import annotations

from typing import Any

from ..models import CredentialsType, Dialect, ProvisionRequest, ProvisionResult, ProvisionStatus, Transport
from ._json import dumps, get_string

KEY_FIELD = "provision_key"
#: Request fields by their ProvisionRequest name, for error messages (limits.py).
WIRE_NAMES = {
    "provision_key": "provision_key", "provision_secret": "provision_secret", "device_name": "device_name",
    "device_key": "device_key",
}
#: Innoway hands out 32-character tokens.
TOKEN_LENGTH = 32

#: Every field of the request body this dialect reads; any other is the device's own (``ProvisionRequest.extra``).
FIELDS = frozenset({"provision_key", "provision_secret", "device_name", "device_key"})


def parse(obj: dict[str, Any], *, transport: Transport, source_address: str = "") -> ProvisionRequest:
    return ProvisionRequest(
        provision_key=get_string(obj, "provision_key", required=True),
        provision_secret=get_string(obj, "provision_secret", required=True),
        device_name=get_string(obj, "device_name"),
        device_key=get_string(obj, "device_key"),
        credentials_type=CredentialsType.ACCESS_TOKEN,
        dialect=Dialect.INNOWAY,
        transport=transport,
        source_address=source_address,
    )


def render(result: ProvisionResult) -> bytes:
    if result.status is not ProvisionStatus.SUCCESS:
        return dumps({"status": result.status.value, "error_msg": result.error_message or ""})
    return dumps({"device_id": result.device_id, "status": result.status.value, "token": result.credentials_value})


def render_error(message: str) -> bytes:
    return dumps({"status": ProvisionStatus.FAILURE.value, "error_msg": message})
