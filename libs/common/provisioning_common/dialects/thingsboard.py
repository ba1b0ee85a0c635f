"""ThingsBoard's camelCase provisioning dialect (shared/spec/thingsboard-provisioning.md §1-§2)."""

from __future__ import annotations

from typing import Any

from ..models import (
    CredentialsType,
    Dialect,
    ProvisionRequest,
    ProvisionResult,
    ProvisionStatus,
    SuppliedCredentials,
    Transport,
)
from ._json import DialectError, dumps, get_bool, get_string

KEY_FIELD = "provisionDeviceKey"
#: Request fields by their ProvisionRequest / SuppliedCredentials name, for error messages (limits.py).
WIRE_NAMES = {
    "provision_key": "provisionDeviceKey", "provision_secret": "provisionDeviceSecret", "device_name": "deviceName",
    "token": "token", "client_id": "clientId", "username": "username", "password": "password",
    "certificate": "hash", "csr": "csr",
}

#: Every field of the request body this dialect reads; any other is the device's own (``ProvisionRequest.extra``).
FIELDS = frozenset({"provisionDeviceKey", "provisionDeviceSecret", "deviceName", "credentialsType", "token",
                    "clientId", "username", "password", "hash", "csr", "gateway"})


def parse(obj: dict[str, Any], *, transport: Transport, source_address: str = "") -> ProvisionRequest:
    """Build a request from a parsed JSON object; raises :class:`DialectError` like ThingsBoard's JsonConverter."""
    key = get_string(obj, "provisionDeviceKey", required=True)
    secret = get_string(obj, "provisionDeviceSecret", required=True)
    raw_type = get_string(obj, "credentialsType") if "credentialsType" in obj else CredentialsType.ACCESS_TOKEN.value
    try:
        credentials_type = CredentialsType(raw_type)
    except ValueError:
        raise DialectError(
            f"Unsupported credentialsType {raw_type[:40]!r}; expected one of "
            + ", ".join(t.value for t in CredentialsType)
        ) from None
    return ProvisionRequest(
        provision_key=key,
        provision_secret=secret,
        device_name=get_string(obj, "deviceName"),
        credentials_type=credentials_type,
        credentials=SuppliedCredentials(
            token=get_string(obj, "token"),
            client_id=get_string(obj, "clientId"),
            username=get_string(obj, "username"),
            password=get_string(obj, "password"),
            certificate=get_string(obj, "hash"),
            csr=get_string(obj, "csr"),
        ),
        gateway=get_bool(obj, "gateway"),
        dialect=Dialect.THINGSBOARD,
        transport=transport,
        source_address=source_address,
    )


def render(result: ProvisionResult) -> bytes:
    """Gson-compact body with ThingsBoard's key order (spec §2)."""
    if result.status is not ProvisionStatus.SUCCESS:
        return dumps({"errorMsg": result.error_message or "", "status": result.status.value})
    body: dict[str, Any] = {}
    if result.credentials_value is not None:
        body["credentialsValue"] = result.credentials_value
    body["credentialsType"] = (result.credentials_type or CredentialsType.ACCESS_TOKEN).value
    if result.ca_certificates is not None:
        # A certificate issued from a CSR (our extension): its hash and the issuing CA chain.
        body["credentialsId"] = result.credentials_id
        body["caCertificates"] = result.ca_certificates
    body["status"] = result.status.value
    return dumps(body)


def render_error(message: str) -> bytes:
    """A parse error or time-out in this dialect (our documented deviation: FAILURE with a reason)."""
    return dumps({"errorMsg": message, "status": ProvisionStatus.FAILURE.value})
