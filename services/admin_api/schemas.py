"""The admin API's JSON bodies (camelCase on the wire, like ThingsBoard's REST API)."""

from __future__ import annotations

import enum
import uuid
from typing import Annotated, Any, Literal

from provisioning_common.device_api import MAX_METHOD
from provisioning_common.dialects.limits import FIELD_LIMITS
from provisioning_common.models import MAX_ATTRIBUTE_KEY, AttributeScope, CredentialsType, ProvisionStrategy
from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Text without C0 control characters or DEL: names, keys, secrets, ids, search strings. Postgres cannot
#: store NUL, and ThingsBoard refuses control characters in credentials (dialects/limits.py).
NO_CONTROLS = r"^[^\x00-\x1f\x7f]*$"
#: PEM text: the same, except that TAB, LF and CR are allowed.
PEM_TEXT = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"
#: What a pattern mismatch means, for the error message (pydantic would quote the pattern).
PATTERN_MESSAGES = {
    NO_CONTROLS: "must not contain control characters",
    PEM_TEXT: "must not contain control characters other than tab, CR and LF",
}
#: Largest page number of a list call: OFFSET page * pageSize stays a small bigint.
MAX_PAGE = 10_000_000
MAX_PAGE_SIZE = 1000


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _check_name(value: str) -> str:
    """Strip spaces as the core's Java ``trim()`` does (control characters are refused by the pattern),
    so that a pre-provisioned device's name is the very name its device will send."""
    value = value.strip(" ")
    if not value:
        raise ValueError("must not be blank")
    if "\x00" in value:
        raise ValueError("must not contain NUL")
    return value


class ProvisionHookIn(_Body):
    """A profile's pre-provisioning hook: where to ask, the HMAC secret, how long to wait, what no answer means."""

    url: str = Field(max_length=2048, pattern=r"^https?://[^\s\x00-\x1f\x7f]+$")
    #: Omitted on an update: the stored secret is kept. Never shown back.
    secret: str | None = Field(default=None, min_length=16, max_length=255, pattern=NO_CONTROLS)
    timeout_ms: int = Field(default=2000, ge=100, le=10_000, alias="timeoutMs")
    fail_open: bool = Field(default=False, alias="failOpen")


class DeviceProfileIn(_Body):
    name: str = Field(max_length=255, pattern=NO_CONTROLS)
    provision_strategy: ProvisionStrategy = Field(alias="provisionStrategy")
    provision_device_key: str | None = Field(
        default=None, alias="provisionDeviceKey", min_length=1, max_length=FIELD_LIMITS["provision_key"].max_chars,
        pattern=NO_CONTROLS,
    )
    provision_device_secret: str | None = Field(
        default=None, alias="provisionDeviceSecret", min_length=1,
        max_length=FIELD_LIMITS["provision_secret"].max_chars, pattern=NO_CONTROLS,
    )
    # X509_CERTIFICATE_CHAIN (ThingsBoard's field names).
    certificate_pem: str | None = Field(default=None, alias="certificatePem", max_length=65536, pattern=PEM_TEXT)
    certificate_regex: str = Field(default="(.*)", alias="certificateRegExPattern", min_length=1, max_length=1024,
                                   pattern=NO_CONTROLS)
    allow_create_by_x509: bool = Field(default=True, alias="allowCreateNewDevicesByX509Certificate")
    # Certificates issued from CSRs (ours): the signing CA and its key; the key is never returned.
    signing_certificate_pem: str | None = Field(default=None, alias="signingCertificatePem", max_length=65536,
                                                pattern=PEM_TEXT)
    signing_key_pem: str | None = Field(default=None, alias="signingKeyPem", max_length=65536, pattern=PEM_TEXT,
                                        repr=False)
    issued_validity_days: int = Field(default=365, alias="issuedCertificateValidityDays", ge=1, le=36500)
    #: Ours (issue 13): devices of this profile may choose access tokens below the minimum
    #: (credentials.hashing.MIN_DEVICE_TOKEN_LENGTH characters of [A-Za-z0-9._~-]). Off by default.
    allow_weak_tokens: bool = Field(default=False, alias="allowWeakTokens")
    #: The pre-provisioning hook (README "Pre-provisioning hook"); None: none.
    provision_hook: ProvisionHookIn | None = Field(default=None, alias="provisionHook")
    #: What a provision request for an existing, provisioned device of the profile does (README "Re-provisioning").
    reprovision_policy: Literal["NEVER", "ROTATE", "ROTATE_WITH_DEVICE_KEY"] = Field(
        default="NEVER", alias="reprovisionPolicy")

    _name = field_validator("name")(_check_name)


class CredentialsIn(_Body):
    credentials_type: CredentialsType = Field(alias="credentialsType")
    #: Token string, certificate PEM, or ``{"clientId", "userName", "password"}``; omitted = generate a token.
    #: Each part is checked against the provisioning limits (dialects/limits.py) by the route.
    credentials_value: (
        Annotated[str, Field(max_length=FIELD_LIMITS["certificate"].max_chars, pattern=PEM_TEXT)]
        | Annotated[
            dict[Annotated[str, Field(max_length=16)],
                 Annotated[str, Field(max_length=FIELD_LIMITS["password"].max_chars, pattern=NO_CONTROLS)]],
            Field(max_length=3),
        ]
        | None
    ) = Field(default=None, alias="credentialsValue")


class DeviceIn(_Body):
    name: str = Field(max_length=FIELD_LIMITS["device_name"].max_chars, pattern=NO_CONTROLS)
    device_profile_id: uuid.UUID = Field(alias="deviceProfileId")
    device_key: str | None = Field(default=None, alias="deviceKey", min_length=1,
                                   max_length=FIELD_LIMITS["device_key"].max_chars, pattern=NO_CONTROLS)
    credentials: CredentialsIn | None = None

    _name = field_validator("name")(_check_name)


class Page(BaseModel):
    data: list[dict[str, Any]]
    totalElements: int
    hasNext: bool


# --- device attributes and server-side RPC (routers.attributes, routers.rpc) --------------------------------

#: Most keys one call sets, reads or deletes (a device's own update is held to the same number).
MAX_ATTRIBUTES_PER_CALL = 1000
#: An attribute key: 1 to 255 characters (ThingsBoard's key dictionary column), no control characters.
AttributeKey = Annotated[str, Field(min_length=1, max_length=MAX_ATTRIBUTE_KEY, pattern=NO_CONTROLS)]
#: ``?keys=a,b``: comma-separated keys, each within the key limit (checked by the route).
KEYS_QUERY_MAX = MAX_ATTRIBUTES_PER_CALL * (MAX_ATTRIBUTE_KEY + 1)


class ScopeIn(str, enum.Enum):
    """The scope in an attribute path: ours (``client``, ``shared``, ``server``) or ThingsBoard's names."""

    CLIENT = "client"
    SHARED = "shared"
    SERVER = "server"
    CLIENT_SCOPE = "CLIENT_SCOPE"
    SHARED_SCOPE = "SHARED_SCOPE"
    SERVER_SCOPE = "SERVER_SCOPE"

    @property
    def scope(self) -> AttributeScope:
        return AttributeScope(self.value.removesuffix("_SCOPE").lower())


class RpcIn(BaseModel):
    """A server-side RPC (ThingsBoard's ``/api/rpc/{oneway|twoway}/{deviceId}`` body). ThingsBoard's other
    fields (``persistent``, ``retries``, ``expirationTime``, ``additionalInfo``) are accepted and ignored:
    an RPC reaches a device that has a session now, or is refused."""

    model_config = ConfigDict(extra="ignore")

    method: str = Field(min_length=1, max_length=MAX_METHOD, pattern=NO_CONTROLS)
    params: Any = None
    #: How long the device has to answer, in milliseconds (ThingsBoard's unit); capped by DEVICE_RPC_MAX_TIMEOUT_S.
    timeout: int | None = Field(default=None, ge=1, le=3_600_000)
    oneway: bool = Field(default=False, strict=True)
