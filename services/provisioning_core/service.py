"""The provisioning rules (ThingsBoard's ``DeviceProvisionServiceImpl``, spec §4-§6), in one place.

Every transport's request ends up in :meth:`ProvisioningCore.provision`. Idempotency: the
request's *replay key* is claimed in ``provision_requests`` inside the same transaction that
writes the device, so a redelivered request either waits for the first attempt and replays its
answer, or (if the first attempt rolled back) does the work once. For a named device the key is
derived from the request's content (key, secret, name, credentials), so a device that repeats a
request after a time-out or a lost answer gets that answer too, within
``PROVISION_REPLAY_WINDOW_S``, instead of "name taken".

Deadlines: nothing is written past the request's deadline (:func:`bus.current_deadline`; the
write checks it in the same statement), and work whose answer provably reached nobody (it came
back from the broker, or was ready only after the caller gave up) is undone, unless a retry was
handed it meanwhile.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import string
import time
import uuid

import asyncpg
from provisioning_common.bus import (
    Bus,
    DeadlineExceeded,
    RpcError,
    RpcTimeout,
    Unavailable,
    current_deadline,
)
from provisioning_common.contract import (
    ABANDON,
    ISSUE_CERTIFICATE,
    PREPARE,
    PROVISION,
    PROVISION_X509_CHAIN,
    VERIFY_CHAIN,
    Handler,
)
from provisioning_common.db import repository
from provisioning_common.db.guard import DatabaseGuard
from provisioning_common.dialects import innoway
from provisioning_common.dialects.limits import field_problem
from provisioning_common.models import (
    MSG_FAILURE,
    AbandonResult,
    CredentialsType,
    Dialect,
    IssueCertificateRequest,
    IssueCertificateResult,
    PrepareCredentialsRequest,
    PreparedCredentials,
    ProvisionRequest,
    ProvisionResult,
    ProvisionStatus,
    ProvisionStrategy,
    VerifyChainRequest,
    X509ChainProvisionRequest,
)
from provisioning_common.secretbox import InvalidToken, SecretBox
from pydantic import BaseModel

from .profile_cache import ProfileCache
from .rate_limit import FailureLimiter
from .token_pool import TokenPool

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
        self,
        pool: asyncpg.Pool,
        bus: Bus,
        box: SecretBox,
        limiter: FailureLimiter,
        profile_ttl_s: float = 1.0,
        *,
        replay_window_s: float = 600.0,
        reply_grace_s: float = 2.0,
    ) -> None:
        self._pool = pool
        self._profiles = ProfileCache(pool, profile_ttl_s)
        self._bus = bus
        self._tokens = TokenPool(bus)
        self._box = box
        self._limiter = limiter
        self._replay_window_s = replay_window_s
        self._reply_grace_s = reply_grace_s
        self._replay_secret = box.derive_key(b"provision-replay-key")
        self._db = DatabaseGuard(log).run

    def handlers(self) -> list[Handler]:
        """The entry points, one per method of :data:`contract.CORE`."""
        return [
            PROVISION.handler(self.provision),
            PROVISION_X509_CHAIN.handler(self.provision_x509_chain),
            ABANDON.handler(self.abandon),
        ]

    def replay_key(self, req: ProvisionRequest) -> str:
        """The id under which this request's answer is kept and replayed.

        A named request is keyed by its content (an HMAC under a server secret, so the stored key
        reveals nothing), so the same device repeating the same request is the same request. An
        unnamed one (the server picks a random name) is keyed by its request id: each such request
        is a new device, and only a redelivery of that very message replays it.
        """
        name = java_trim(req.device_name) if req.device_name else ""
        if not name or self._replay_window_s <= 0:
            return req.request_id
        material = json.dumps(
            [req.dialect.value, req.provision_key, req.provision_secret, name, req.device_key,
             req.credentials_type.value, req.credentials.model_dump(), req.gateway],
            separators=(",", ":"),
        )
        return "k:" + hmac.new(self._replay_secret, material.encode(), hashlib.sha256).hexdigest()

    def _caller_gave_up(self) -> bool:
        """Whether an answer sent now may arrive after the caller stopped waiting (deadline + grace)."""
        deadline = current_deadline()
        return deadline is not None and time.time() > deadline + self._reply_grace_s / 2

    async def _deliverable(self, key: str, result: ProvisionResult) -> ProvisionResult:
        """``result`` of work just committed, or undo it when its caller can no longer receive it."""
        if result.status is ProvisionStatus.SUCCESS and self._caller_gave_up():
            await self.undo(key)
            raise DeadlineExceeded("answer ready after the caller gave up; undone")
        return result

    async def undo(self, key: str) -> None:
        """Undo the work of ``key`` whose answer reached nobody (no-op once a retry was handed it)."""
        undone = await self._db(repository.undo_unanswered(self._pool, key, self._credentials_again))
        if undone is not None:
            log.info("undid device %s: its answer reached nobody (the device may retry)", undone)

    def _credentials_again(self, answer_enc: bytes) -> bytes | None:
        """The encrypted credentials of a pre-provisioned device, from the stored answer that handed them out."""
        value = ProvisionResult.model_validate(self._box.decrypt_json(answer_enc)).credentials_value
        return None if value is None else self._box.encrypt_json(value)

    async def on_undelivered(self, request: BaseModel, reply: BaseModel) -> None:
        """Bus hook: the broker returned our answer (the caller is gone), so nobody was told."""
        if isinstance(request, ProvisionRequest) and isinstance(reply, ProvisionResult):
            if reply.status is ProvisionStatus.SUCCESS:
                await self.undo(self.replay_key(request))

    async def abandon(self, req: ProvisionRequest) -> AbandonResult:
        """A gateway told the device "timed out" without an answer from us (no reply in time, or the bus
        dropped): whatever this request committed is undone, unless a retry has been handed it since."""
        await self.undo(self.replay_key(req))
        return AbandonResult()

    async def provision(self, req: ProvisionRequest) -> ProvisionResult:
        return await self._db(self._provision(req))

    async def _provision(self, req: ProvisionRequest) -> ProvisionResult:
        # A duplicate delivery is detected where the device is written (the replay key is
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

    async def _replay(self, key: str) -> ProvisionResult | None:
        answer = await repository.replay_answer(self._pool, key)
        if answer is None:
            return None
        try:
            return ProvisionResult.model_validate(self._box.decrypt_json(answer))
        except InvalidToken:
            log.error("cannot decrypt the stored answer of a redelivered request; is DATA_ENCRYPTION_KEY shared?")
            return ProvisionResult.failure()

    async def _claim_request(self, conn: asyncpg.Connection, key: str) -> bool:
        """Claim the replay key in this transaction; False when another attempt already holds it."""
        if key.startswith("k:"):
            await conn.execute(
                "DELETE FROM provision_requests WHERE request_id = $1"
                " AND created_at < clock_timestamp() - make_interval(secs => $2)",
                key, self._replay_window_s,
            )
        claimed = await conn.fetchval(
            "INSERT INTO provision_requests (request_id, kind) VALUES ($1, 'claimed') ON CONFLICT DO NOTHING RETURNING 1",
            key,
        )
        return claimed is not None

    async def _record_answer(self, conn: asyncpg.Connection, key: str, result: ProvisionResult) -> None:
        await conn.execute(
            "UPDATE provision_requests SET device_id = $2, answer_enc = $3 WHERE request_id = $1",
            key,
            uuid.UUID(result.device_id) if result.device_id else None,
            self._box.encrypt_json(result.model_dump(mode="json")),
        )

    async def _create_device(
        self, req: ProvisionRequest, profile: repository.ProfileRow, name: str
    ) -> ProvisionResult:
        key = self.replay_key(req)
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
                reply = await self._bus.call(PREPARE, PrepareCredentialsRequest(
                    credentials_type=req.credentials_type, credentials=req.credentials, token_length=token_length
                ))
                if not reply.ok or reply.prepared is None:
                    return ProvisionResult.failure(_failure_message(reply.error_message))
                prepared = reply.prepared
        except RpcError as exc:
            # A repeated request whose first attempt committed needs no new credentials.
            replayed = await self._replay(key) if key != req.request_id else None
            if replayed is not None:
                return replayed
            if isinstance(exc, RpcTimeout):
                raise DeadlineExceeded("credentials service did not answer in time") from None
            raise Unavailable("credentials service unavailable") from None
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
        answer_enc = self._box.encrypt_json(result.model_dump(mode="json"))
        for _ in range(2):  # a claim undone between our insert and our replay: write again
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
                    request_id=key,
                    answer_enc=answer_enc,
                    deadline=current_deadline(),
                    replay_window_s=self._replay_window_s if key != req.request_id else None,
                )
            except repository.DeviceConflict as exc:
                log.info("provision refused: %s already taken (profile %s)", exc.what, profile.name)
                return ProvisionResult.failure()
            except repository.Expired:
                log.info("device %s not written: its request's deadline passed (the device may retry)", name)
                raise DeadlineExceeded("deadline passed before the device was written") from None
            if created:
                log.info("provisioned device %s (%s) in profile %s via %s", device_id,
                         prepared.credentials_type.value, profile.name, req.transport.value)
                return await self._deliverable(key, result)
            replayed = await self._replay(key)
            if replayed is not None:
                return replayed
        return ProvisionResult.failure()

    async def _issue_certificate(
        self, req: ProvisionRequest, profile: repository.ProfileRow, name: str
    ) -> IssueCertificateResult:
        """A certificate for the device's CSR, issued by credentials with the profile's signing CA."""
        if not profile.signing_certificate_pem or not profile.signing_key_enc:
            return IssueCertificateResult(ok=False, error_message="This device profile does not issue certificates")
        if not req.credentials.csr:
            return IssueCertificateResult(ok=False, error_message="X509_CSR requires a csr (PEM)")
        return await self._bus.call(ISSUE_CERTIFICATE, IssueCertificateRequest(
            csr=req.credentials.csr,
            device_name=name,
            signing_certificate=profile.signing_certificate_pem,
            signing_key_enc=profile.signing_key_enc,
            validity_days=profile.issued_validity_days,
        ))

    async def provision_x509_chain(self, req: X509ChainProvisionRequest) -> ProvisionResult:
        """ThingsBoard's X.509 chain strategy (spec §8): create, rotate, or refuse on a TLS connect."""
        return await self._db(self._provision_x509_chain(req))

    async def _provision_x509_chain(self, req: X509ChainProvisionRequest) -> ProvisionResult:
        try:
            verified = await self._bus.call(VERIFY_CHAIN, VerifyChainRequest(chain=req.chain))
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
                    deadline=current_deadline(),
                )
            except repository.Expired:
                raise DeadlineExceeded("deadline passed before the device was written") from None
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
        key = self.replay_key(req)
        deadline = current_deadline()
        if deadline is not None and time.time() > deadline:
            raise DeadlineExceeded("deadline passed before the device was claimed")
        async with self._pool.acquire() as conn:
            try:
                async with conn.transaction():
                    if not await self._claim_request(conn, key):
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
                    await self._record_answer(conn, key, result)
                    if await repository.deadline_passed(conn, deadline):
                        raise _Expired
            except _AlreadyHandled:
                return await self._replay(key) or ProvisionResult.failure()
            except _Refused:
                return ProvisionResult.failure()
            except _Expired:
                log.info("device %s not claimed: its request's deadline passed (the device may retry)", name)
                raise DeadlineExceeded("deadline passed before the claim could commit") from None
            except InvalidToken:
                log.error("cannot decrypt pre-provisioned credentials; is DATA_ENCRYPTION_KEY the admin API's?")
                return ProvisionResult.failure()
        log.info("pre-provisioned device %s claimed in profile %s", result.device_id, profile.name)
        return await self._deliverable(key, result)

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


class _Expired(Exception):
    """Roll back: the deadline passed before the commit."""


def _name_from_common_name(pattern: str, common_name: str | None) -> str | None:
    """ThingsBoard: ``Pattern.compile(regex).matcher(CN).find()`` then ``group(1)`` (spec §8)."""
    if common_name is None:
        return None
    try:
        match = re.search(pattern, common_name)
        name = match.group(1) if match else None
    except (re.error, IndexError):
        return None
    name = java_trim(name) if name else None
    # The same rule as a name sent in a request (at most 255 characters, no NUL).
    return name if name and field_problem("device_name", name) is None else None


def _failure_message(credentials_error: str | None) -> str:
    """Credential errors keep ThingsBoard's generic message, except certificates that do not parse
    (our documented deviation: ThingsBoard stores any string)."""
    if credentials_error and "X.509" in credentials_error:
        return credentials_error
    return MSG_FAILURE
