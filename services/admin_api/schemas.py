"""The admin API's JSON bodies (camelCase on the wire, like ThingsBoard's REST API)."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from provisioning_common.models import CredentialsType, ProvisionStrategy


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _check_name(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be blank")
    if "\x00" in value:
        raise ValueError("must not contain NUL")
    return value


class DeviceProfileIn(_Body):
    name: str = Field(max_length=255)
    provision_strategy: ProvisionStrategy = Field(alias="provisionStrategy")
    provision_device_key: str | None = Field(default=None, alias="provisionDeviceKey", min_length=1, max_length=255)
    provision_device_secret: str | None = Field(
        default=None, alias="provisionDeviceSecret", min_length=1, max_length=255
    )
    # X509_CERTIFICATE_CHAIN (ThingsBoard's field names).
    certificate_pem: str | None = Field(default=None, alias="certificatePem", max_length=65536)
    certificate_regex: str = Field(default="(.*)", alias="certificateRegExPattern", min_length=1, max_length=1024)
    allow_create_by_x509: bool = Field(default=True, alias="allowCreateNewDevicesByX509Certificate")
    # Certificates issued from CSRs (ours): the signing CA and its key; the key is never returned.
    signing_certificate_pem: str | None = Field(default=None, alias="signingCertificatePem", max_length=65536)
    signing_key_pem: str | None = Field(default=None, alias="signingKeyPem", max_length=65536, repr=False)
    issued_validity_days: int = Field(default=365, alias="issuedCertificateValidityDays", ge=1, le=36500)

    _name = field_validator("name")(_check_name)


class CredentialsIn(_Body):
    credentials_type: CredentialsType = Field(alias="credentialsType")
    #: Token string, certificate PEM, or ``{"clientId", "userName", "password"}``; omitted = generate a token.
    credentials_value: str | dict[str, str] | None = Field(default=None, alias="credentialsValue")


class DeviceIn(_Body):
    name: str = Field(max_length=255)
    device_profile_id: uuid.UUID = Field(alias="deviceProfileId")
    device_key: str | None = Field(default=None, alias="deviceKey", min_length=1, max_length=255)
    credentials: CredentialsIn | None = None

    _name = field_validator("name")(_check_name)


class Page(BaseModel):
    data: list[dict[str, Any]]
    totalElements: int
    hasNext: bool
