"""ThingsBoard's protobuf provisioning payloads (spec §3.4), used by MQTT and CoAP when a payload is not JSON."""

from __future__ import annotations

from google.protobuf.message import DecodeError

from ..models import (
    CredentialsType,
    Dialect,
    ProvisionRequest,
    ProvisionResult,
    ProvisionStatus,
    SuppliedCredentials,
    Transport,
)
from ..proto import transport_pb2 as pb
from ._json import DialectError, dumps

_TYPES = {
    pb.ACCESS_TOKEN: CredentialsType.ACCESS_TOKEN,
    pb.X509_CERTIFICATE: CredentialsType.X509_CERTIFICATE,
    pb.MQTT_BASIC: CredentialsType.MQTT_BASIC,
    pb.LWM2M_CREDENTIALS: CredentialsType.LWM2M_CREDENTIALS,
}
_TYPE_NUMBERS = {v: k for k, v in _TYPES.items()}
#: Request fields by their ProvisionRequest / SuppliedCredentials name, for error messages (limits.py).
WIRE_NAMES = {
    "provision_key": "provisionDeviceKey", "provision_secret": "provisionDeviceSecret", "device_name": "deviceName",
    "token": "token", "client_id": "clientId", "username": "userName", "password": "password", "certificate": "hash",
}
_STATUS = {ProvisionStatus.SUCCESS: pb.SUCCESS, ProvisionStatus.NOT_FOUND: pb.NOT_FOUND,
           ProvisionStatus.FAILURE: pb.FAILURE}


def parse(payload: bytes, *, transport: Transport, source_address: str = "") -> ProvisionRequest:
    """Decode a ``ProvisionDeviceRequestMsg``; absent fields are "" (not validated, as in ThingsBoard)."""
    msg = pb.ProvisionDeviceRequestMsg()
    try:
        msg.ParseFromString(payload)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise DialectError(f"Payload is neither JSON nor a ProvisionDeviceRequestMsg: {type(exc).__name__}",
                           Dialect.PROTOBUF) from None
    creds = msg.credentialsDataProto
    try:
        credentials_type = _TYPES[msg.credentialsType]
    except KeyError:
        raise DialectError("Unknown credentialsType enum value", Dialect.PROTOBUF) from None
    return ProvisionRequest(
        provision_key=msg.provisionDeviceCredentialsMsg.provisionDeviceKey,
        provision_secret=msg.provisionDeviceCredentialsMsg.provisionDeviceSecret,
        device_name=msg.deviceName,
        credentials_type=credentials_type,
        credentials=SuppliedCredentials(
            token=creds.validateDeviceTokenRequestMsg.token,
            certificate=creds.validateDeviceX509CertRequestMsg.hash,
            client_id=creds.validateBasicMqttCredRequestMsg.clientId,
            username=creds.validateBasicMqttCredRequestMsg.userName,
            password=creds.validateBasicMqttCredRequestMsg.password,
        ),
        gateway=msg.gateway,
        dialect=Dialect.PROTOBUF,
        transport=transport,
        source_address=source_address,
    )


def render(result: ProvisionResult) -> bytes:
    """``ProvisionDeviceResponseMsg`` bytes; failures carry only the status (``08 02`` / ``08 03``)."""
    msg = pb.ProvisionDeviceResponseMsg(status=_STATUS[result.status])
    if result.status is ProvisionStatus.SUCCESS:
        if result.credentials_type in _TYPE_NUMBERS:
            msg.credentialsType = _TYPE_NUMBERS[result.credentials_type]
        value = result.credentials_value
        if isinstance(value, dict):
            msg.credentialsValue = dumps(value).decode("utf-8")
        elif value is not None:
            msg.credentialsValue = value
    return bytes(msg.SerializeToString())


def render_error(message: str) -> bytes:
    return bytes(pb.ProvisionDeviceResponseMsg(status=pb.FAILURE).SerializeToString())
