"""The normalized contract between gateways and services.

Gateways translate a wire dialect into :class:`ProvisionRequest` and render a
:class:`ProvisionResult` back; nothing here knows about HTTP, MQTT or CoAP.
"""

from __future__ import annotations

import enum
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class CredentialsType(str, enum.Enum):
    ACCESS_TOKEN = "ACCESS_TOKEN"
    MQTT_BASIC = "MQTT_BASIC"
    X509_CERTIFICATE = "X509_CERTIFICATE"
    LWM2M_CREDENTIALS = "LWM2M_CREDENTIALS"
    #: Ours, beyond ThingsBoard: the device sends a CSR and receives an X509_CERTIFICATE issued for it.
    X509_CSR = "X509_CSR"


class ProvisionStatus(str, enum.Enum):
    SUCCESS = "SUCCESS"
    NOT_FOUND = "NOT_FOUND"
    FAILURE = "FAILURE"


class ProvisionStrategy(str, enum.Enum):
    ALLOW_CREATE_NEW_DEVICES = "ALLOW_CREATE_NEW_DEVICES"
    CHECK_PRE_PROVISIONED_DEVICES = "CHECK_PRE_PROVISIONED_DEVICES"
    DISABLED = "DISABLED"
    #: ThingsBoard 3.5+: devices provision by connecting over MQTT TLS with a chain to the profile's CA.
    X509_CERTIFICATE_CHAIN = "X509_CERTIFICATE_CHAIN"


class Dialect(str, enum.Enum):
    """Which wire vocabulary a request came in; the answer is rendered in the same one."""

    THINGSBOARD = "thingsboard"
    INNOWAY = "innoway"
    #: ThingsBoard's protobuf messages (MQTT and CoAP only, when a payload is not JSON).
    PROTOBUF = "protobuf"


class Transport(str, enum.Enum):
    HTTP = "HTTP"
    MQTT = "MQTT"
    COAP = "COAP"
    ADMIN = "ADMIN"


# ThingsBoard's fixed messages (spec §2); Innoway reuses them (innoway spec).
MSG_NOT_FOUND = "Provision data was not found!"
MSG_FAILURE = "Failed to provision device!"
MSG_TIMEOUT = "Provisioning timed out"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SuppliedCredentials(_Frozen):
    """Credentials a device brings in its provision request (all optional, ThingsBoard's §1 fields)."""

    token: str = ""
    client_id: str = ""
    username: str = ""
    password: str = ""
    certificate: str = ""
    #: PEM certificate signing request (``X509_CSR``).
    csr: str = ""

    def any_given(self) -> bool:
        return bool(self.token or self.client_id or self.username or self.password or self.certificate or self.csr)


class ProvisionRequest(_Frozen):
    """A provision request as every transport hands it to provisioning-core."""

    request_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    provision_key: str
    provision_secret: str = Field(repr=False)
    device_name: str = ""
    #: Innoway's ``device_key``: the device's own unique key inside its profile.
    device_key: str = ""
    credentials_type: CredentialsType = CredentialsType.ACCESS_TOKEN
    credentials: SuppliedCredentials = Field(default_factory=SuppliedCredentials, repr=False)
    gateway: bool = False
    dialect: Dialect = Dialect.THINGSBOARD
    transport: Transport = Transport.HTTP
    source_address: str = ""
    #: The JSON fields the device sent beyond its dialect's own (ThingsBoard devices may send more), as sent:
    #: passed to the profile's pre-provisioning hook, stored nowhere. None: they were over
    #: ``dialects.EXTRA_MAX_BYTES`` and were dropped.
    extra: dict[str, Any] | None = Field(default_factory=dict, repr=False)


class AbandonResult(_Frozen):
    """Reply to ``provisioning_core.abandon`` (sent without a reply queue: nobody waits for it)."""

    undone: bool = False


class ProvisionResult(_Frozen):
    """Outcome of one provision request; credentials are set on SUCCESS only."""

    status: ProvisionStatus
    device_id: str | None = None
    device_name: str | None = None
    credentials_type: CredentialsType | None = None
    #: What the device receives: a token string, the certificate body, or the MQTT_BASIC object.
    credentials_value: str | dict[str, Any] | None = Field(default=None, repr=False)
    credentials_id: str | None = None
    #: PEM chain of the CA that issued ``credentials_value`` (certificates issued from a CSR).
    ca_certificates: list[str] | None = None
    error_message: str | None = None
    #: Set on a refusal by a rate limit: seconds until a retry may succeed (HTTP 429 + Retry-After, MQTT 5
    #: reason code 0x97, CoAP 4.29 + Max-Age). Not part of any dialect's body.
    retry_after_s: float | None = None

    @classmethod
    def not_found(cls) -> ProvisionResult:
        return cls(status=ProvisionStatus.NOT_FOUND, error_message=MSG_NOT_FOUND)

    @classmethod
    def failure(cls, message: str = MSG_FAILURE) -> ProvisionResult:
        return cls(status=ProvisionStatus.FAILURE, error_message=message)


# --- credentials service messages -------------------------------------------------------


class PrepareCredentialsRequest(_Frozen):
    """Ask the credentials service to mint or hash credentials before they are stored."""

    credentials_type: CredentialsType
    credentials: SuppliedCredentials = Field(default_factory=SuppliedCredentials, repr=False)
    #: Length of a generated token: 20 for ThingsBoard, 32 for Innoway.
    token_length: int = Field(default=20, ge=16, le=64)
    #: A device chose the token: hold it to the documented minimum (credentials.hashing.weak_token_problem)
    #: unless its profile allows weak tokens. False for tokens an operator sets through the admin API.
    enforce_token_minimum: bool = False


class PreparedCredentials(_Frozen):
    """Everything needed to store credentials and to answer the device, produced by credentials."""

    credentials_type: CredentialsType
    #: Unique lookup key stored in ``device_credentials.credentials_id`` (a hash for tokens and certificates).
    credentials_id: str
    #: Password hash for MQTT_BASIC, else None.
    secret_hash: str | None = Field(default=None, repr=False)
    #: The value the device is told (token, certificate body or MQTT_BASIC object).
    response_value: str | dict[str, Any] = Field(repr=False)


class MintTokensRequest(_Frozen):
    """Ask for a batch of fresh access tokens, so that provisioning a device needs no round trip."""

    count: int = Field(ge=1, le=1024)
    token_length: int = Field(default=20, ge=16, le=64)


class MintTokensResult(_Frozen):
    tokens: list[PreparedCredentials]


class PrepareCredentialsResult(_Frozen):
    ok: bool
    prepared: PreparedCredentials | None = None
    error_message: str | None = None


class PrepareManyRequest(_Frozen):
    """Several credentials prepared in one call (the admin API's bulk import: one round trip per batch)."""

    items: list[PrepareCredentialsRequest] = Field(min_length=1, max_length=1024)


class PrepareManyResult(_Frozen):
    #: One result per item, in order.
    results: list[PrepareCredentialsResult]


class AuthenticateRequest(_Frozen):
    """Find the device owning the given credentials (token, MQTT_BASIC parts, or certificate)."""

    token: str = Field(default="", repr=False)
    client_id: str = ""
    username: str = ""
    password: str = Field(default="", repr=False)
    certificate: str = Field(default="", repr=False)


class AuthenticateResult(_Frozen):
    authenticated: bool
    device_id: str | None = None
    device_name: str | None = None
    credentials_type: CredentialsType | None = None


class VerifyChainRequest(_Frozen):
    """Find the X509_CERTIFICATE_CHAIN profile whose CA a presented chain (base64 DER, leaf first) reaches."""

    chain: list[str] = Field(min_length=1, max_length=10, repr=False)


class VerifyChainResult(_Frozen):
    ok: bool
    profile_id: str | None = None
    #: The leaf's first CN (RFC 4514 escaped), and its base64 body (what credentials store).
    leaf_common_name: str | None = None
    leaf_body: str | None = Field(default=None, repr=False)
    #: The leaf's ThingsBoard hash: its X509_CERTIFICATE credentials id.
    leaf_credentials_id: str | None = None
    error_message: str | None = None


class IssueCertificateRequest(_Frozen):
    """Issue a device certificate for a CSR with a profile's signing CA (its key arrives encrypted)."""

    csr: str = Field(repr=False)
    device_name: str
    signing_certificate: str
    signing_key_enc: str = Field(repr=False)
    validity_days: int = Field(ge=1, le=36500)


class IssueCertificateResult(_Frozen):
    ok: bool
    prepared: PreparedCredentials | None = None
    ca_certificates: list[str] | None = None
    error_message: str | None = None


class X509ChainProvisionRequest(_Frozen):
    """A device connected over MQTT TLS with this chain (base64 DER, leaf first) and no known leaf."""

    request_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    chain: list[str] = Field(min_length=1, max_length=10)
    transport: Transport = Transport.MQTT
    source_address: str = ""


class RpcFailure(_Frozen):
    """Body of a reply when the remote handler raised: the caller turns it into its own error."""

    error: str
    #: Machine-readable reason the caller acts on (``deadline_exceeded``, ``unavailable``); None otherwise.
    code: str | None = None


# --- the device API after provisioning (attributes; RPC bodies travel as JSON, see contract) --------------


class AttributeScope(str, enum.Enum):
    """ThingsBoard's three attribute scopes: the device writes ``client``, operators ``shared`` (which
    devices read and are notified of) and ``server`` (which devices never see, e.g. ``provisionState``)."""

    CLIENT = "client"
    SHARED = "shared"
    SERVER = "server"


#: Longest attribute key (ThingsBoard's key_dictionary column is varchar(255)).
MAX_ATTRIBUTE_KEY = 255


class AttributesQuery(_Frozen):
    """A device asks for its client and/or shared attributes (ThingsBoard's attribute request).

    ``None``: that scope was not asked for (nothing of it returned); ``[]``: every key of that scope.
    A request naming neither scope is, as in ThingsBoard, both with every key (the gateway decides).
    """

    device_id: str
    client_keys: list[str] | None = Field(default=None, max_length=1000)
    shared_keys: list[str] | None = Field(default=None, max_length=1000)


class AttributesSnapshot(_Frozen):
    """The attributes found, by key; a scope with nothing found is empty (and left out on the wire)."""

    client: dict[str, Any] = Field(default_factory=dict)
    shared: dict[str, Any] = Field(default_factory=dict)


class ClientAttributesUpdate(_Frozen):
    """A device publishes client attributes: a JSON object, stored key by key (and announced on the bus)."""

    device_id: str
    values: dict[str, Any] = Field(max_length=1000)


class AttributesSaved(_Frozen):
    saved: int
