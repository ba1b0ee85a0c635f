"""``/api/device-profiles``: create, list, read, replace and delete device profiles.

A profile body is validated here into the columns stored (:class:`~provisioning_common.db.repository.ProfileFields`):
generated provision key and secret, the X509_CERTIFICATE_CHAIN CA and name regex, the CSR signing CA with
its key encrypted. The statements are in ``provisioning_common.db.repository``.
"""

from __future__ import annotations

import re
import secrets
import string
import uuid
import warnings
from typing import Any

from fastapi import APIRouter, Query, Response
from provisioning_common.certificates import (
    CertificateRefused,
    check_ca,
    load_pem_chain,
    load_signing_pair,
    name_hash,
    tb_sha3,
    to_pem,
)
from provisioning_common.db import repository
from provisioning_common.db.repository import ProfileFields, ProfileRecord
from provisioning_common.models import ProvisionStrategy
from provisioning_common.secretbox import InvalidToken, SecretBox

from ..auth import may_see_secrets
from ..dependencies import Box, Pool, SettingsDep, api_error
from ..schemas import MAX_PAGE, MAX_PAGE_SIZE, DeviceProfileIn, Page

router = APIRouter(prefix="/device-profiles")

_KEY_ALPHABET = string.digits + string.ascii_lowercase


def generate_profile_secret() -> str:
    """20 characters of [0-9a-z], like ThingsBoard's UI generates provision keys and secrets."""
    return "".join(secrets.choice(_KEY_ALPHABET) for _ in range(20))


def open_secret(profile: ProfileRecord, box: SecretBox) -> str | None:
    """The profile's provision secret in clear, for the operator (stored encrypted, migration 0008)."""
    if profile.provision_secret_enc is None:
        return None
    try:
        return str(box.decrypt_json(profile.provision_secret_enc))
    except InvalidToken:
        raise api_error(500, "the provision secret cannot be decrypted: DATA_ENCRYPTION_KEY differs from"
                        " the key it was stored with") from None


def profile_json(profile: ProfileRecord, box: SecretBox) -> dict[str, Any]:
    """A profile as the API shows it (ThingsBoard's field names): the provision secret decrypted for the
    authorised operator (as ThingsBoard shows it), the signing key only as ``hasSigningKey``."""
    body: dict[str, Any] = {
        "id": str(profile.id),
        "name": profile.name,
        "provisionStrategy": profile.provision_strategy,
        "provisionDeviceKey": profile.provision_key,
        # Shown to operators and admins, as ThingsBoard shows it to the tenant; never to a viewer.
        "provisionDeviceSecret": open_secret(profile, box) if may_see_secrets() else None,
        "allowWeakTokens": profile.allow_weak_tokens,
        "reprovisionPolicy": profile.reprovision_policy,
        "provisionHook": None if profile.hook_url is None else {
            "url": profile.hook_url, "timeoutMs": profile.hook_timeout_ms, "failOpen": profile.hook_fail_open},
        "createdTime": int(profile.created_at.timestamp() * 1000),
    }
    if profile.provision_strategy == ProvisionStrategy.X509_CERTIFICATE_CHAIN.value:
        body.update(
            certificatePem=profile.certificate_pem,
            certificateRegExPattern=profile.certificate_regex,
            allowCreateNewDevicesByX509Certificate=profile.allow_create_by_x509,
        )
    if profile.signing_certificate_pem:
        body.update(
            signingCertificatePem=profile.signing_certificate_pem,
            hasSigningKey=profile.signing_key_enc is not None,
            issuedCertificateValidityDays=profile.issued_validity_days,
        )
    return body


def _hook_fields(body: DeviceProfileIn, box: SecretBox, existing: ProfileRecord | None,
                 allow_http: bool) -> tuple[str | None, bytes | None, int, bool]:
    """The hook's columns (url, encrypted secret, time-out, fail-open); HTTP 400 when it is not valid."""
    hook = body.provision_hook
    if hook is None:
        return None, None, 2000, False
    if not hook.url.startswith("https://") and not allow_http:
        raise api_error(400, "provisionHook.url must be https:// (PROVISION_HOOK_ALLOW_HTTP allows http://)")
    if hook.secret is not None:
        secret_enc = box.encrypt_json(hook.secret)
    elif existing is not None and existing.hook_secret_enc is not None:
        secret_enc = existing.hook_secret_enc
    else:
        raise api_error(400, "provisionHook.secret is required (at least 16 characters)")
    return hook.url, secret_enc, hook.timeout_ms, hook.fail_open


def profile_fields(body: DeviceProfileIn, box: SecretBox, existing: ProfileRecord | None = None, *,
                   allow_http_hooks: bool = False) -> ProfileFields:
    """Validate a profile body into its stored columns; HTTP 400 with the reason when it is not valid."""
    key, secret = body.provision_device_key, body.provision_device_secret
    certificate_pem = regex = ca_hash = None
    if body.provision_strategy is ProvisionStrategy.X509_CERTIFICATE_CHAIN:
        if not body.certificate_pem:
            raise api_error(400, "certificatePem is required for X509_CERTIFICATE_CHAIN")
        try:
            ca = load_pem_chain(body.certificate_pem)[0]
            check_ca(ca, "certificatePem")
        except ValueError as exc:  # CertificateRefused is a ValueError
            raise api_error(400, f"certificatePem: {exc}") from None
        try:
            with warnings.catch_warnings():  # e.g. "possible nested set": the admin gets errors, not log lines
                warnings.simplefilter("ignore")
                groups = re.compile(body.certificate_regex).groups
        except re.error as exc:
            raise api_error(400, f"certificateRegExPattern is not a valid regular expression: {exc}") from None
        except (OverflowError, RecursionError):  # a repeat count over 2**32, thousands of nested groups
            raise api_error(400, "certificateRegExPattern is not a valid regular expression: too large") from None
        if groups < 1:
            raise api_error(400, "certificateRegExPattern needs a capture group for the device name")
        certificate_pem, regex, ca_hash = to_pem(ca), body.certificate_regex, name_hash(ca.subject)
        # As ThingsBoard: the profile's provision key is the CA's hash (unique), with no secret, so
        # JSON provision requests cannot use this profile.
        key, secret = tb_sha3(certificate_pem), None
    elif body.provision_strategy is not ProvisionStrategy.DISABLED:
        key, secret = key or generate_profile_secret(), secret or generate_profile_secret()
    signing_pem = signing_enc = None
    if body.signing_certificate_pem or body.signing_key_pem:
        signing_pem = body.signing_certificate_pem
        key_pem = body.signing_key_pem
        if key_pem is None and existing is not None and existing.signing_certificate_pem == signing_pem:
            signing_enc = existing.signing_key_enc  # unchanged CA: keep the stored key
        elif not signing_pem or not key_pem:
            raise api_error(400, "signingCertificatePem and signingKeyPem go together")
        else:
            try:
                load_signing_pair(signing_pem, key_pem)
            except CertificateRefused as exc:
                raise api_error(400, str(exc)) from None
            signing_enc = box.encrypt_json(key_pem).decode()
    hook_url, hook_secret_enc, hook_timeout_ms, hook_fail_open = _hook_fields(body, box, existing, allow_http_hooks)
    return ProfileFields(
        name=body.name,
        provision_strategy=body.provision_strategy.value,
        provision_key=key,
        provision_secret_enc=None if secret is None else box.encrypt_json(secret),
        certificate_pem=certificate_pem,
        certificate_regex=regex,
        ca_subject_hash=ca_hash,
        signing_certificate_pem=signing_pem,
        signing_key_enc=signing_enc,
        allow_create_by_x509=body.allow_create_by_x509,
        issued_validity_days=body.issued_validity_days,
        allow_weak_tokens=body.allow_weak_tokens,
        reprovision_policy=body.reprovision_policy,
        hook_url=hook_url,
        hook_secret_enc=hook_secret_enc,
        hook_timeout_ms=hook_timeout_ms,
        hook_fail_open=hook_fail_open,
    )


def _conflict(exc: repository.ProfileConflict, fields: ProfileFields) -> Exception:
    if exc.what == "provision_key":
        if fields.provision_strategy == ProvisionStrategy.X509_CERTIFICATE_CHAIN.value:
            return api_error(409, "Device profile with such certificate already exists!")
        return api_error(409, "Device profile with such provision device key already exists!")
    return api_error(409, "Device profile with such name already exists!")


async def _existing(pool: Any, profile_id: uuid.UUID) -> ProfileRecord:
    profile = await repository.profile_record(pool, profile_id)
    if profile is None:
        raise api_error(404, f"Device profile {profile_id} not found")
    return profile


@router.post("", status_code=201)
async def create_profile(body: DeviceProfileIn, pool: Pool, box: Box, settings: SettingsDep) -> dict[str, Any]:
    fields = profile_fields(body, box, allow_http_hooks=settings.provision_hook_allow_http)
    try:
        profile = await repository.insert_profile(pool, uuid.uuid4(), fields)
    except repository.ProfileConflict as exc:
        raise _conflict(exc, fields) from None
    return profile_json(profile, box)


@router.get("")
async def list_profiles(
    pool: Pool, box: Box, page: int = Query(0, ge=0, le=MAX_PAGE), pageSize: int = Query(100, ge=1, le=MAX_PAGE_SIZE)
) -> Page:
    profiles, total = await repository.list_profiles(pool, limit=pageSize, offset=page * pageSize)
    return Page(data=[profile_json(p, box) for p in profiles], totalElements=total,
                hasNext=(page + 1) * pageSize < total)


@router.get("/{profile_id}")
async def get_profile(profile_id: uuid.UUID, pool: Pool, box: Box) -> dict[str, Any]:
    return profile_json(await _existing(pool, profile_id), box)


@router.put("/{profile_id}")
async def update_profile(
    profile_id: uuid.UUID, body: DeviceProfileIn, pool: Pool, box: Box, settings: SettingsDep
) -> dict[str, Any]:
    fields = profile_fields(body, box, await _existing(pool, profile_id),
                            allow_http_hooks=settings.provision_hook_allow_http)
    try:
        profile = await repository.update_profile(pool, profile_id, fields)
    except repository.ProfileConflict as exc:
        raise _conflict(exc, fields) from None
    if profile is None:  # deleted meanwhile
        raise api_error(404, f"Device profile {profile_id} not found")
    return profile_json(profile, box)


@router.delete("/{profile_id}", status_code=204)
async def delete_profile(profile_id: uuid.UUID, pool: Pool) -> Response:
    try:
        deleted = await repository.delete_profile(pool, profile_id)
    except repository.ProfileInUse:
        raise api_error(409, "The device profile is referenced by devices; delete them first") from None
    if not deleted:
        raise api_error(404, f"Device profile {profile_id} not found")
    return Response(status_code=204)
