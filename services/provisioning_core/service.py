"""The provisioning rules (ThingsBoard's ``DeviceProvisionServiceImpl``, spec §4-§6), in one place.

Every transport's request ends up in :meth:`ProvisioningCore.provision`. Idempotency: the
request id is claimed in ``provision_requests`` inside the same transaction that writes the
device, so a redelivered request either waits for the first attempt and replays its answer, or
(if the first attempt rolled back) does the work once.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import string
import uuid

import asyncpg

from provisioning_common.bus import CORE_SERVICE, CREDENTIALS_SERVICE, Bus, Handler, RpcError
from provisioning_common.db import repository
from provisioning_common.dialects import innoway
from provisioning_common.models import (
    MSG_FAILURE,
    CredentialsType,
    Dialect,
    IssueCertificateRequest,
    IssueCertificateResult,
    PreparedCredentials,
    VerifyChainRequest,
    VerifyChainResult,
    X509ChainProvisionRequest,
    PrepareCredentialsRequest,
    PrepareCredentialsResult,
    ProvisionRequest,
    ProvisionResult,
    ProvisionStatus,
    ProvisionStrategy,
)
from provisioning_common.secretbox import InvalidToken, SecretBox

from .profile_cache import ProfileCache
from .rate_limit import FailureLimiter
from .token_pool import TokenPool

SERVICE = CORE_SERVICE
PROVISIONED = "provisioned"
_NAME_ALPHABET = string.ascii_letters + string.digits

log = logging.getLogger(__name__)


def java_trim(value: str) -> str:
    """Java's ``String.trim()``: strips characters <= U+0020 at both ends (spec §4.1)."""
    return value.strip("".join(chr(c) for c in range(0x21)))


def _random_name() -> str:
    return "".join(secrets.choice(_NAME_ALPHABET) for _ in range(20))


class ProvisioningCore:
    def __init__(
        self, pool: asyncpg.Pool, bus: Bus, box: SecretBox, limiter: FailureLimiter, profile_ttl_s: float = 1.0
    ) -> None:
        self._pool = pool
        self._profiles = ProfileCache(pool, profile_ttl_s)
        self._bus = bus
        self._tokens = TokenPool(bus)
        self._box = box
        self._limiter = limiter

    def handlers(self) -> dict[str, Handler]:
        return {
            "provision": Handler(ProvisionRequest, self.provision),
            "provision_x509_chain": Handler(X509ChainProvisionRequest, self.provision_x509_chain),
        }

    async def provision(self, req: ProvisionRequest) -> ProvisionResult:
        # A duplicate delivery is detected where the device is written (the request id is
        # claimed in the same statement), so the common case costs no extra query.
        name = req.device_name
        if name:
            name = java_trim(name)
            if not name:
                return ProvisionResult.failure()
        if not req.provision_key or not req.provision_secret:
            return ProvisionResult.not_found()
        if self._limiter.blocked(req.provision_key, req.source_address):
            return ProvisionResult.failure("Too many failed provisioning attempts; retry later")
        profile = await self._profiles.get(req.provision_key)
        if (
            profile is None
            or profile.provision_secret is None
            or profile.provision_strategy == ProvisionStrategy.DISABLED.value
        ):
            self._limiter.record_failure(req.provision_key, req.source_address)
            return ProvisionResult.not_found()
        if not hmac.compare_digest(profile.provision_secret.encode(), req.provision_secret.encode()):
            self._limiter.record_failure(req.provision_key, req.source_address)
            return ProvisionResult.not_found()
        if profile.provision_strategy == ProvisionStrategy.ALLOW_CREATE_NEW_DEVICES.value:
            return await self._create_device(req, profile, name or _random_name())
        if not name:
            return ProvisionResult.failure()
        return await self._claim_pre_provisioned(req, profile, name)

    async def _replay(self, request_id: str) -> ProvisionResult | None:
        answer = await self._pool.fetchval(
            "SELECT answer_enc FROM provision_requests WHERE request_id = $1", request_id
        )
        if answer is None:
            return None
        try:
            return ProvisionResult.model_validate(self._box.decrypt_json(answer))
        except InvalidToken:
            log.error("cannot decrypt the stored answer of a redelivered request; is DATA_ENCRYPTION_KEY shared?")
            return ProvisionResult.failure()

    async def _claim_request(self, conn: asyncpg.Connection, request_id: str) -> bool:
        """Claim the request id in this transaction; False when another attempt already holds it."""
        claimed = await conn.fetchval(
            "INSERT INTO provision_requests (request_id) VALUES ($1) ON CONFLICT DO NOTHING RETURNING 1",
            request_id,
        )
        return claimed is not None

    async def _record_answer(self, conn: asyncpg.Connection, request_id: str, result: ProvisionResult) -> None:
        await conn.execute(
            "UPDATE provision_requests SET device_id = $2, answer_enc = $3 WHERE request_id = $1",
            request_id,
            uuid.UUID(result.device_id) if result.device_id else None,
            self._box.encrypt_json(result.model_dump(mode="json")),
        )

    async def _create_device(
        self, req: ProvisionRequest, profile: repository.ProfileRow, name: str
    ) -> ProvisionResult:
        token_length = innoway.TOKEN_LENGTH if req.dialect is Dialect.INNOWAY else 20
        ca_certificates: list[str] | None = None
        try:
            if req.credentials_type is CredentialsType.X509_CSR:
                issued = await self._issue_certificate(req, profile, name)
                if not issued.ok or issued.prepared is None:
                    return ProvisionResult.failure(issued.error_message or MSG_FAILURE)
                prepared, ca_certificates = issued.prepared, issued.ca_certificates
            elif not req.credentials.any_given():
                prepared = await self._tokens.take(token_length)
            else:
                reply = await self._bus.call(
                    CREDENTIALS_SERVICE,
                    "prepare",
                    PrepareCredentialsRequest(
                        credentials_type=req.credentials_type, credentials=req.credentials, token_length=token_length
                    ),
                    PrepareCredentialsResult,
                )
                if not reply.ok or reply.prepared is None:
                    return ProvisionResult.failure(_failure_message(reply.error_message))
                prepared = reply.prepared
        except RpcError as exc:
            log.warning("credentials service unavailable: %s", exc)
            return ProvisionResult.failure()
        device_id = uuid.uuid4()
        result = ProvisionResult(
            status=ProvisionStatus.SUCCESS,
            device_id=str(device_id),
            device_name=name,
            credentials_type=prepared.credentials_type,
            credentials_value=prepared.response_value,
            credentials_id=prepared.credentials_id,
            ca_certificates=ca_certificates,
        )
        try:
            created = await repository.insert_device(
                self._pool,
                device_id=device_id,
                name=name,
                profile_id=profile.id,
                device_key=req.device_key or str(device_id),
                gateway=req.gateway,
                provision_state=PROVISIONED,
                prepared=prepared,
                value_enc=None,
                request_id=req.request_id,
                answer_enc=self._box.encrypt_json(result.model_dump(mode="json")),
            )
        except repository.DeviceConflict as exc:
            log.info("provision refused: %s already taken (profile %s)", exc.what, profile.name)
            return ProvisionResult.failure()
        if not created:
            return await self._replay(req.request_id) or ProvisionResult.failure()
        log.info("provisioned device %s (%s) in profile %s via %s", device_id, prepared.credentials_type.value,
                 profile.name, req.transport.value)
        return result

    async def _issue_certificate(
        self, req: ProvisionRequest, profile: repository.ProfileRow, name: str
    ) -> IssueCertificateResult:
        """A certificate for the device's CSR, issued by credentials with the profile's signing CA."""
        if not profile.signing_certificate_pem or not profile.signing_key_enc:
            return IssueCertificateResult(ok=False, error_message="This device profile does not issue certificates")
        if not req.credentials.csr:
            return IssueCertificateResult(ok=False, error_message="X509_CSR requires a csr (PEM)")
        return await self._bus.call(
            CREDENTIALS_SERVICE,
            "issue_certificate",
            IssueCertificateRequest(
                csr=req.credentials.csr,
                device_name=name,
                signing_certificate=profile.signing_certificate_pem,
                signing_key_enc=profile.signing_key_enc,
                validity_days=profile.issued_validity_days,
            ),
            IssueCertificateResult,
        )

    async def provision_x509_chain(self, req: X509ChainProvisionRequest) -> ProvisionResult:
        """ThingsBoard's X.509 chain strategy (spec §8): create, rotate, or refuse on a TLS connect."""
        try:
            verified = await self._bus.call(
                CREDENTIALS_SERVICE, "verify_chain", VerifyChainRequest(chain=req.chain), VerifyChainResult
            )
        except RpcError as exc:
            log.warning("credentials service unavailable: %s", exc)
            return ProvisionResult.failure()
        if not verified.ok or verified.profile_id is None or not verified.leaf_body or not verified.leaf_credentials_id:
            log.info("x509 chain refused: %s", verified.error_message)
            return ProvisionResult.failure(verified.error_message or MSG_FAILURE)
        profile = await repository.profile_by_id(self._pool, uuid.UUID(verified.profile_id))
        if profile is None or profile.provision_strategy != ProvisionStrategy.X509_CERTIFICATE_CHAIN.value:
            return ProvisionResult.failure()
        name = _name_from_common_name(profile.certificate_regex or "(.*)", verified.leaf_common_name)
        if not name:
            log.info("x509 chain refused: CN does not match the pattern of profile %s", profile.name)
            return ProvisionResult.failure("Certificate CN does not match the device profile's pattern")
        prepared = PreparedCredentials(
            credentials_type=CredentialsType.X509_CERTIFICATE,
            credentials_id=verified.leaf_credentials_id,
            response_value=verified.leaf_body,
        )
        for _ in range(2):  # a concurrent first connect of the same device turns creation into rotation
            row = await self._pool.fetchrow(
                "SELECT d.id, d.profile_id, c.credentials_type FROM devices d"
                " JOIN device_credentials c ON c.device_id = d.id WHERE d.name = $1",
                name,
            )
            if row is not None:
                if row["profile_id"] != profile.id or row["credentials_type"] != CredentialsType.X509_CERTIFICATE.value:
                    return ProvisionResult.failure()
                try:
                    await self._pool.execute(
                        "UPDATE device_credentials SET credentials_id = $2, value_enc = NULL WHERE device_id = $1",
                        row["id"], prepared.credentials_id,
                    )
                except asyncpg.UniqueViolationError:
                    return ProvisionResult.failure()  # this leaf belongs to another device
                return self._x509_success(str(row["id"]), name, prepared)
            if not profile.allow_create_by_x509:
                log.info("x509 chain refused: device %s unknown and creation not allowed", name)
                return ProvisionResult.failure()
            device_id = uuid.uuid4()
            try:
                await repository.insert_device(
                    self._pool, device_id=device_id, name=name, profile_id=profile.id, device_key=str(device_id),
                    gateway=False, provision_state=PROVISIONED, prepared=prepared, value_enc=None,
                )
            except repository.DeviceConflict as exc:
                if exc.what == "name":
                    continue
                return ProvisionResult.failure()
            log.info("provisioned device %s by X.509 chain in profile %s", device_id, profile.name)
            return self._x509_success(str(device_id), name, prepared)
        return ProvisionResult.failure()

    @staticmethod
    def _x509_success(device_id: str, name: str, prepared: PreparedCredentials) -> ProvisionResult:
        return ProvisionResult(
            status=ProvisionStatus.SUCCESS, device_id=device_id, device_name=name,
            credentials_type=CredentialsType.X509_CERTIFICATE, credentials_value=prepared.response_value,
            credentials_id=prepared.credentials_id,
        )

    async def _claim_pre_provisioned(
        self, req: ProvisionRequest, profile: repository.ProfileRow, name: str
    ) -> ProvisionResult:
        async with self._pool.acquire() as conn:
            try:
                async with conn.transaction():
                    if not await self._claim_request(conn, req.request_id):
                        raise _AlreadyHandled
                    row = await conn.fetchrow(
                        "SELECT d.id, d.profile_id, d.provision_state, c.credentials_type, c.credentials_id,"
                        " c.value_enc FROM devices d JOIN device_credentials c ON c.device_id = d.id"
                        " WHERE d.name = $1 FOR UPDATE OF d",
                        name,
                    )
                    if row is None or row["profile_id"] != profile.id or row["provision_state"] is not None:
                        raise _Refused
                    if row["value_enc"] is None:
                        raise _Refused
                    result = ProvisionResult(
                        status=ProvisionStatus.SUCCESS,
                        device_id=str(row["id"]),
                        device_name=name,
                        credentials_type=row["credentials_type"],
                        credentials_value=self._box.decrypt_json(row["value_enc"]),
                        credentials_id=row["credentials_id"],
                    )
                    await conn.execute(
                        "UPDATE devices SET provision_state = $2 WHERE id = $1", row["id"], PROVISIONED
                    )
                    # Handed out: from now on only the hash remains.
                    await conn.execute("UPDATE device_credentials SET value_enc = NULL WHERE device_id = $1", row["id"])
                    await self._record_answer(conn, req.request_id, result)
            except _AlreadyHandled:
                return await self._replay(req.request_id) or ProvisionResult.failure()
            except _Refused:
                return ProvisionResult.failure()
            except InvalidToken:
                log.error("cannot decrypt pre-provisioned credentials; is DATA_ENCRYPTION_KEY the admin API's?")
                return ProvisionResult.failure()
        log.info("pre-provisioned device %s claimed in profile %s", result.device_id, profile.name)
        return result

    async def purge_answers(self, older_than_s: float) -> int:
        """Forget replayable answers once no redelivery can still arrive (they expire with their TTL)."""
        status = await self._pool.execute(
            "DELETE FROM provision_requests WHERE created_at < now() - make_interval(secs => $1)", older_than_s
        )
        return int(status.split()[-1])


class _AlreadyHandled(Exception):
    """Another delivery of the same request id committed first."""


class _Refused(Exception):
    """Roll back and answer FAILURE."""


def _name_from_common_name(pattern: str, common_name: str | None) -> str | None:
    """ThingsBoard: ``Pattern.compile(regex).matcher(CN).find()`` then ``group(1)`` (spec §8)."""
    if common_name is None:
        return None
    try:
        match = re.search(pattern, common_name)
        name = match.group(1) if match else None
    except (re.error, IndexError):
        return None
    return java_trim(name) if name else None


def _failure_message(credentials_error: str | None) -> str:
    """Credential errors keep ThingsBoard's generic message, except certificates that do not parse
    (our documented deviation: ThingsBoard stores any string)."""
    if credentials_error and "X.509" in credentials_error:
        return credentials_error
    return MSG_FAILURE
