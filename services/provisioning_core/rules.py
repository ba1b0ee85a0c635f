"""ThingsBoard's provisioning rules (``DeviceProvisionServiceImpl``) as pure functions.

Each function takes what the service has read (the request, the device profile, the device already
stored under the requested name, the credentials service's answer) and returns a decision: a
:class:`Refusal` (which status, which message) or what to do next. Nothing here reads the database,
the bus or the clock; :mod:`provisioning_core.service` fetches, calls and writes around them.

Spec: ``shared/spec/thingsboard-provisioning.md`` §2 (statuses and messages), §4 (validation order and
strategies), §5 (creation, names, credentials), §6 (pre-provisioned claim), §8 (X.509 chain), and its
"Our deviations"; ``shared/spec/innoway-provisioning.md`` (token length, same statuses).

The order of a JSON request's checks (§4, first hit wins)::

    check_request    blank name -> FAILURE; empty key or secret -> NOT_FOUND
    decide_strategy  no profile / no secret / DISABLED / X509 chain profile / wrong secret -> NOT_FOUND
                     (then the rate limits, provisioning_core.rate_limit: a source over its wrong-secret
                     limit -> too_many, whatever the secret; a profile or source over its provisions -> too_many)
                     ALLOW_CREATE_NEW_DEVICES -> CreateDevice (the name, or a generated one)
                     CHECK_PRE_PROVISIONED_DEVICES -> ClaimDevice (no name -> FAILURE)
    decide_claim     no such device / another profile / already claimed -> FAILURE
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import re
import secrets
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from provisioning_common.db.repository import NamedDevice, ProfileRow
from provisioning_common.dialects import innoway
from provisioning_common.dialects.limits import MSG_TOO_MANY_FAILURES, field_problem
from provisioning_common.events import Reason
from provisioning_common.models import (
    MSG_FAILURE,
    MSG_NOT_FOUND,
    CredentialsType,
    Dialect,
    PreparedCredentials,
    ProvisionRequest,
    ProvisionResult,
    ProvisionStatus,
    ProvisionStrategy,
    VerifyChainResult,
)

#: ``provisionState`` once a device provisioned itself (spec §5, §6).
PROVISIONED = "provisioned"
# Ours: a key or source over its wrong-secret limit is answered MSG_TOO_MANY_FAILURES (dialects.limits,
# whose malformed-request limiter in the gateways answers in the same words).
#: Ours: the profile or the source address used up its provisions (PROVISION_RATE_LIMIT_PER_*).
MSG_TOO_MANY_PROVISIONS = "Too many provisioning requests; retry later"
#: Ours: an X.509 chain whose leaf CN does not give a device name through the profile's pattern.
MSG_CN_MISMATCH = "Certificate CN does not match the device profile's pattern"
#: Ours (X509_CSR): the profile has no signing CA, or the request carries no CSR.
MSG_NO_SIGNING_CA = "This device profile does not issue certificates"
MSG_CSR_REQUIRED = "X509_CSR requires a csr (PEM)"

#: Generated device names and ThingsBoard tokens: 20 characters of [A-Za-z0-9] (spec §5, §10).
GENERATED_NAME_LENGTH = 20
NAME_ALPHABET = string.ascii_letters + string.digits
THINGSBOARD_TOKEN_LENGTH = 20

_JAVA_TRIM = "".join(chr(c) for c in range(0x21))


# --- decisions -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """Answer ``status`` with ``message`` and write nothing.

    ``failed_attempt``: the request guessed a wrong provision key or secret, which counts against the
    per-key and per-source limiter (ours, spec "Our deviations"). ``reason``: the provisioning event's
    reason code (README "Provisioning events"), never told to the device, so not part of the answer's
    equality either: each decision below names its own, in this module only.
    """

    status: ProvisionStatus
    message: str
    failed_attempt: bool = False
    reason: Reason = field(default=Reason.UNSPECIFIED, compare=False)

    def result(self) -> ProvisionResult:
        return ProvisionResult(status=self.status, error_message=self.message)


def not_found(reason: Reason = Reason.UNSPECIFIED, *, failed_attempt: bool = False) -> Refusal:
    """NOT_FOUND, ``"Provision data was not found!"`` (spec §2), whatever the ``reason``."""
    return Refusal(ProvisionStatus.NOT_FOUND, MSG_NOT_FOUND, failed_attempt, reason)


def failure(message: str = MSG_FAILURE, *, reason: Reason = Reason.UNSPECIFIED) -> Refusal:
    """FAILURE, ``"Failed to provision device!"`` unless one of our documented reasons (spec §2, deviations)."""
    return Refusal(ProvisionStatus.FAILURE, message, reason=reason)


@dataclass(frozen=True)
class Proceed:
    """The request passed the checks that need no profile; ``name`` is trimmed, ``""`` when none was sent."""

    name: str


@dataclass(frozen=True)
class CreateDevice:
    """ALLOW_CREATE_NEW_DEVICES: create a device called ``name`` (``generated`` when the server chose it)."""

    name: str
    generated: bool = False


@dataclass(frozen=True)
class ClaimDevice:
    """CHECK_PRE_PROVISIONED_DEVICES: hand out the stored credentials of the device called ``name``."""

    name: str


# --- names (spec §4.1, §5, §8) -----------------------------------------------------------------------


def java_trim(value: str) -> str:
    """Java's ``String.trim()``: strips characters <= U+0020 at both ends (spec §4.1)."""
    return value.strip(_JAVA_TRIM)


def generated_name() -> str:
    """A name for a device whose request named none: ``randomAlphanumeric(20)`` (spec §5)."""
    return "".join(secrets.choice(NAME_ALPHABET) for _ in range(GENERATED_NAME_LENGTH))


def normalise_name(raw: str) -> str | Refusal:
    """The request's device name as ThingsBoard uses it: trimmed when given; blank after trim -> FAILURE."""
    if not raw:
        return ""
    name = java_trim(raw)
    return name if name else failure(reason=Reason.BLANK_NAME)


def valid_device_name(name: str) -> bool:
    """A device may be stored under ``name``: at most 255 characters, no NUL (spec §5 ``DeviceDataValidator``)."""
    return bool(name) and field_problem("device_name", name) is None


def name_from_common_name(pattern: str, common_name: str | None) -> str | None:
    """ThingsBoard: ``Pattern.compile(regex).matcher(CN).find()`` then ``group(1)`` (spec §8.4).

    The name is trimmed and must be a valid device name; otherwise None (FAILURE).
    """
    if common_name is None:
        return None
    try:
        match = re.search(pattern, common_name)
        name = match.group(1) if match else None
    except (re.error, IndexError):
        return None
    name = java_trim(name) if name else None
    return name if name and valid_device_name(name) else None


# --- a JSON request (spec §4, §5, §6) ----------------------------------------------------------------


def check_request(req: ProvisionRequest) -> Refusal | Proceed:
    """The checks before the profile is read, in ThingsBoard's order (spec §4.1-4.2).

    A blank name beats a wrong key; an empty key or secret is NOT_FOUND without counting as a guess.
    """
    name = normalise_name(req.device_name)
    if isinstance(name, Refusal):
        return name
    if not req.provision_key or not req.provision_secret:
        return not_found(Reason.MISSING_KEY_OR_SECRET)
    return Proceed(name)


#: The event reason of each uniqueness rule a write can break (repository.DeviceConflict.what).
_CONFLICT_REASONS = {"name": Reason.NAME_TAKEN, "device_key": Reason.DEVICE_KEY_TAKEN,
                     "credentials": Reason.CREDENTIALS_IN_USE}


def conflict(what: str) -> Refusal:
    """A write refused by a uniqueness rule (``what``: name, device_key, credentials): ThingsBoard's FAILURE."""
    return failure(reason=_CONFLICT_REASONS.get(what, Reason.UNSPECIFIED))


def too_many_reason(*, failures: bool) -> Reason:
    """The RATE_LIMITED event's reason: the wrong-secret limit, or the provisions limit."""
    return Reason.TOO_MANY_FAILURES if failures else Reason.TOO_MANY_PROVISIONS


def too_many(*, failures: bool, retry_after_s: float) -> ProvisionResult:
    """A rate limit's refusal (ours): FAILURE with the reason, and when to retry (not in the body)."""
    message = MSG_TOO_MANY_FAILURES if failures else MSG_TOO_MANY_PROVISIONS
    return ProvisionResult(status=ProvisionStatus.FAILURE, error_message=message, retry_after_s=retry_after_s)


def secret_matches(profile: ProfileRow, secret: str) -> bool:
    """``String.equals`` on the secret (spec §4.5), compared in constant time."""
    return profile.provision_secret is not None and hmac.compare_digest(
        profile.provision_secret.encode(), secret.encode()
    )


def decide_strategy(
    req: ProvisionRequest, profile: ProfileRow | None, name: str, *, new_name: Callable[[], str] = generated_name
) -> Refusal | CreateDevice | ClaimDevice:
    """The profile's strategy applied to a request that passed :func:`check_request` (spec §4.3-4.5).

    ``profile`` is the one whose provision key the request carries (None when there is none); ``name``
    is :attr:`Proceed.name`. Every NOT_FOUND here counts as a failed attempt (a wrong key or secret).
    DISABLED, an unknown strategy and, ours, an X509_CERTIFICATE_CHAIN profile are NOT_FOUND
    (ThingsBoard: no answer at all for the latter).
    """
    if profile is None:
        return not_found(Reason.UNKNOWN_KEY, failed_attempt=True)
    try:
        strategy = ProvisionStrategy(profile.provision_strategy)
    except ValueError:
        return not_found(Reason.PROFILE_DISABLED, failed_attempt=True)
    if strategy is ProvisionStrategy.X509_CERTIFICATE_CHAIN:
        return not_found(Reason.X509_CHAIN_ONLY, failed_attempt=True)
    json_strategies = (ProvisionStrategy.ALLOW_CREATE_NEW_DEVICES, ProvisionStrategy.CHECK_PRE_PROVISIONED_DEVICES)
    if strategy not in json_strategies or profile.provision_secret is None:
        return not_found(Reason.PROFILE_DISABLED, failed_attempt=True)
    if not secret_matches(profile, req.provision_secret):
        return not_found(Reason.WRONG_SECRET, failed_attempt=True)
    if strategy is ProvisionStrategy.ALLOW_CREATE_NEW_DEVICES:
        if not name:
            return CreateDevice(new_name(), generated=True)
        return CreateDevice(name) if valid_device_name(name) else failure(reason=Reason.INVALID_NAME)
    if not name:
        return failure(reason=Reason.NAME_REQUIRED)  # no device has an empty name
    return ClaimDevice(name)


@dataclass(frozen=True)
class ClaimPreProvisioned:
    """Hand out ``device``'s stored (encrypted) credentials and mark it provisioned."""

    device: NamedDevice
    value_enc: bytes


def decide_claim(profile: ProfileRow, device: NamedDevice | None) -> Refusal | ClaimPreProvisioned:
    """A pre-provisioned device's claim (spec §6), given the device stored under the requested name.

    Absent, in another profile, or with any ``provisionState`` (claimed before) -> FAILURE. Ours: the
    credentials are kept (encrypted) only until handed out, so a device without them -> FAILURE too.
    """
    if device is None or device.profile_id != profile.id:
        return failure(reason=Reason.NOT_PRE_PROVISIONED)
    if device.provision_state is not None:
        return failure(reason=Reason.ALREADY_PROVISIONED)
    if device.value_enc is None:
        return failure(reason=Reason.INTERNAL_ERROR)
    return ClaimPreProvisioned(device, device.value_enc)


# --- credentials (spec §5, deviations) -------------------------------------------------------------


class CredentialsSource(enum.Enum):
    """Where a new device's credentials come from."""

    #: No credential field in the request: a random token (spec §5), from the core's minted pool.
    GENERATED_TOKEN = "generated_token"
    #: Credential fields given: the credentials service validates and hashes them (spec §5).
    SUPPLIED = "supplied"
    #: Ours (X509_CSR): the credentials service issues a certificate for the CSR with the profile's CA.
    ISSUED_FROM_CSR = "issued_from_csr"


def credentials_source(req: ProvisionRequest) -> CredentialsSource:
    if req.credentials_type is CredentialsType.X509_CSR:
        return CredentialsSource.ISSUED_FROM_CSR
    if not req.credentials.any_given():
        return CredentialsSource.GENERATED_TOKEN
    return CredentialsSource.SUPPLIED


def token_length(dialect: Dialect) -> int:
    """Generated tokens: 20 characters for ThingsBoard (spec §5), 32 for Innoway (innoway spec)."""
    return innoway.TOKEN_LENGTH if dialect is Dialect.INNOWAY else THINGSBOARD_TOKEN_LENGTH


def prepare_failure(credentials_error: str | None) -> Refusal:
    """The credentials service refused supplied credentials: ThingsBoard's generic FAILURE (spec §5),
    except a certificate that does not parse and a device-chosen token under the minimum (issue 13), whose
    reasons are told (our documented deviations)."""
    if credentials_error and "X.509" in credentials_error:
        return failure(credentials_error, reason=Reason.INVALID_CERTIFICATE)
    if credentials_error and credentials_error.startswith("Access token is too weak"):
        return failure(credentials_error, reason=Reason.TOO_WEAK_TOKEN)
    return failure(reason=Reason.INVALID_CREDENTIALS)


#: Ours: the profile's pre-provisioning hook refused the request, or could not decide (fail-closed).
MSG_HOOK_REFUSED = "Provisioning refused by the device profile's hook"


def hook_refusal(reason: str | None) -> Refusal:
    """FAILURE for a request the profile's hook refused (its reason goes to the event, never to the device)."""
    return failure(MSG_HOOK_REFUSED,
                   reason=Reason.HOOK_UNAVAILABLE if reason == "hook_unavailable" else Reason.HOOK_DENIED)


#: Profile reprovisionPolicy values (migration 0015, README "Re-provisioning after a factory reset").
REPROVISION_NEVER = "NEVER"
REPROVISION_ROTATE = "ROTATE"
REPROVISION_WITH_DEVICE_KEY = "ROTATE_WITH_DEVICE_KEY"


def reprovision_refusal(req: ProvisionRequest, profile: ProfileRow) -> Refusal | None:
    """Why a request for a taken name is refused before looking at the device: the profile never re-provisions,
    or asks for the device's own key and the request carries none (ThingsBoard's answer either way)."""
    if profile.reprovision_policy == REPROVISION_ROTATE:
        return None
    if profile.reprovision_policy == REPROVISION_WITH_DEVICE_KEY and req.device_key:
        return None
    return conflict("name")


def reprovision_proof(req: ProvisionRequest, profile: ProfileRow) -> str | None:
    """The device key a re-provisioning must match, or None when the profile asks for none."""
    return req.device_key if profile.reprovision_policy == REPROVISION_WITH_DEVICE_KEY else None


def issue_refusal(req: ProvisionRequest, profile: ProfileRow) -> Refusal | None:
    """Why an X509_CSR request cannot be issued a certificate before asking for one, or None."""
    if not profile.signing_certificate_pem or not profile.signing_key_enc:
        return failure(MSG_NO_SIGNING_CA, reason=Reason.NO_SIGNING_CA)
    if not req.credentials.csr:
        return failure(MSG_CSR_REQUIRED, reason=Reason.CSR_REQUIRED)
    return None


def issue_failure(credentials_error: str | None) -> Refusal:
    """The credentials service refused to issue a certificate for the CSR: its reason is told."""
    return failure(credentials_error or MSG_FAILURE, reason=Reason.CSR_REFUSED)


def created_result(
    device_id: uuid.UUID, name: str, prepared: PreparedCredentials, ca_certificates: list[str] | None = None
) -> ProvisionResult:
    """SUCCESS for a created device: the credentials it was given (spec §2, §5)."""
    return ProvisionResult(
        status=ProvisionStatus.SUCCESS,
        device_id=str(device_id),
        device_name=name,
        credentials_type=prepared.credentials_type,
        credentials_value=prepared.response_value,
        credentials_id=prepared.credentials_id,
        ca_certificates=ca_certificates,
    )


def claimed_result(
    device: NamedDevice, name: str, credentials_value: str | dict[str, Any] | None
) -> ProvisionResult:
    """SUCCESS for a claimed pre-provisioned device: its **existing** credentials (spec §6)."""
    return ProvisionResult(
        status=ProvisionStatus.SUCCESS,
        device_id=str(device.id),
        device_name=name,
        credentials_type=CredentialsType(device.credentials_type),
        credentials_value=credentials_value,
        credentials_id=device.credentials_id,
    )


# --- replay (README "Guarantees") ------------------------------------------------------------------


def replay_key(req: ProvisionRequest, secret: bytes, replay_window_s: float) -> str:
    """The id under which this request's answer is kept and replayed.

    A named request is keyed by its content (an HMAC under a server secret, so the stored key reveals
    nothing), so the same device repeating the same request is the same request. An unnamed one (the
    server picks a random name) is keyed by its request id: each such request is a new device, and
    only a redelivery of that very message replays it. A window of 0 turns content keys off.
    """
    name = java_trim(req.device_name) if req.device_name else ""
    if not name or replay_window_s <= 0:
        return req.request_id
    material = json.dumps(
        [req.dialect.value, req.provision_key, req.provision_secret, name, req.device_key,
         req.credentials_type.value, req.credentials.model_dump(), req.gateway],
        separators=(",", ":"),
    )
    return "k:" + hmac.new(secret, material.encode(), hashlib.sha256).hexdigest()


def is_content_key(key: str) -> bool:
    """Whether ``key`` is a content key (expires after the replay window) rather than a message id."""
    return key.startswith("k:")


# --- X.509 certificate chain (spec §8) -----------------------------------------------------------------


@dataclass(frozen=True)
class X509Identity:
    """What a verified chain says: the profile whose CA it reaches, the leaf's CN and its credentials."""

    profile_id: uuid.UUID
    common_name: str | None
    credentials: PreparedCredentials


@dataclass(frozen=True)
class RotateX509Credentials:
    """The device exists in this profile with X.509 credentials: replace them by the new leaf (rotation)."""

    device_id: uuid.UUID


@dataclass(frozen=True)
class CreateX509Device:
    """No device of that name: create it with the leaf as its X.509 credentials."""

    name: str


def verified_identity(verified: VerifyChainResult) -> Refusal | X509Identity:
    """The credentials service's verdict on a presented chain; a refusal tells its reason."""
    if not verified.ok or verified.profile_id is None or not verified.leaf_body or not verified.leaf_credentials_id:
        return failure(verified.error_message or MSG_FAILURE, reason=Reason.CHAIN_INVALID)
    try:
        profile_id = uuid.UUID(verified.profile_id)
    except ValueError:
        return failure(reason=Reason.CHAIN_INVALID)
    return X509Identity(
        profile_id=profile_id,
        common_name=verified.leaf_common_name,
        credentials=PreparedCredentials(
            credentials_type=CredentialsType.X509_CERTIFICATE,
            credentials_id=verified.leaf_credentials_id,
            response_value=verified.leaf_body,
        ),
    )


@dataclass(frozen=True)
class X509Target:
    """The chain's profile (an X509_CERTIFICATE_CHAIN one) and the device name its leaf CN gives."""

    profile: ProfileRow
    name: str


def x509_target(profile: ProfileRow | None, common_name: str | None) -> Refusal | X509Target:
    """The device a chain reaching ``profile`` is about (spec §8.4): an X509_CERTIFICATE_CHAIN profile's
    pattern (default ``(.*)``) applied to the leaf CN; any other profile -> FAILURE, no name -> FAILURE
    with our reason."""
    if profile is None or profile.provision_strategy != ProvisionStrategy.X509_CERTIFICATE_CHAIN.value:
        return failure(reason=Reason.NOT_CHAIN_PROFILE)
    name = name_from_common_name(profile.certificate_regex or "(.*)", common_name)
    return X509Target(profile, name) if name else failure(MSG_CN_MISMATCH, reason=Reason.CN_MISMATCH)


def decide_x509_device(
    profile: ProfileRow, name: str, device: NamedDevice | None
) -> Refusal | RotateX509Credentials | CreateX509Device:
    """Rotate, create or refuse (spec §8.4), given the device stored under ``name``.

    A device of another profile, or whose credentials are not X.509, is never taken over (FAILURE);
    an unknown name is created only when the profile allows it.
    """
    if device is not None:
        if device.profile_id != profile.id or device.credentials_type != CredentialsType.X509_CERTIFICATE.value:
            return failure(reason=Reason.NAME_TAKEN)
        return RotateX509Credentials(device.id)
    if not profile.allow_create_by_x509:
        return failure(reason=Reason.CREATION_NOT_ALLOWED)
    return CreateX509Device(name)


def x509_result(device_id: uuid.UUID, name: str, credentials: PreparedCredentials) -> ProvisionResult:
    """SUCCESS for a chain: the leaf's body and hash as X509_CERTIFICATE credentials (spec §8.4)."""
    return ProvisionResult(
        status=ProvisionStatus.SUCCESS, device_id=str(device_id), device_name=name,
        credentials_type=CredentialsType.X509_CERTIFICATE, credentials_value=credentials.response_value,
        credentials_id=credentials.credentials_id,
    )
