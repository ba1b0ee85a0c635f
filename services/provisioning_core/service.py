"""provisioning-core: ThingsBoard's ``DeviceProvisionServiceImpl`` (spec §4-§6, §8) around its rules.

The rules themselves (which strategy, status and message; names; claim; X.509 rotation) are pure
functions in :mod:`provisioning_core.rules`; every SQL statement is in
:mod:`provisioning_common.db.repository`. This module orchestrates: it reads through the repository,
asks the rules, calls the credentials service over the bus, writes through the repository, and keeps
the deadline, replay and undo guarantees (README "Guarantees").

Every transport's request ends up in :meth:`ProvisioningCore.provision`. Idempotency: the
request's *replay key* is claimed in ``provision_requests`` inside the same transaction that
writes the device, so a redelivered request either waits for the first attempt and replays its
answer, or (if the first attempt rolled back) does the work once. For a named device the key is
derived from the request's content (key, secret, name, credentials), so a device that repeats a
request after a time-out or a lost answer gets that answer too, within
``PROVISION_REPLAY_WINDOW_S``, instead of "name taken".

Writes in batches: the devices of concurrent requests go to Postgres together (:class:`batching.Batcher`,
``PROVISION_WRITE_BATCH_MAX``), one statement and one commit per batch, each device in its own subtransaction,
so each is still written whole or not at all and answered as if it had been alone; a lone request goes at once.

Deadlines: nothing is written past the request's deadline (:func:`bus.current_deadline`; the
write checks it in the same statement), and work whose answer provably reached nobody (it came
back from the broker, or was ready only after the caller gave up) is undone, unless a retry was
handed it meanwhile.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from typing import NamedTuple

import asyncpg
from provisioning_common.batching import Batcher
from provisioning_common.bus import (
    Bus,
    DeadlineExceeded,
    RpcError,
    RpcTimeout,
    Unavailable,
    current_deadline,
)
from provisioning_common.context import current_request_id
from provisioning_common.contract import (
    ABANDON,
    ISSUE_CERTIFICATE,
    PREPARE,
    PROVISION,
    PROVISION_X509_CHAIN,
    REPORT_TIMEOUT,
    VERIFY_CHAIN,
    Handler,
)
from provisioning_common.db import repository
from provisioning_common.db.guard import DatabaseGuard
from provisioning_common.device_link import end_sessions
from provisioning_common.events import EventSink, Outcome, ProvisionEvent, Reason, elapsed_ms
from provisioning_common.models import (
    AbandonResult,
    Dialect,
    IssueCertificateRequest,
    IssueCertificateResult,
    PrepareCredentialsRequest,
    PreparedCredentials,
    ProvisionRequest,
    ProvisionResult,
    ProvisionStatus,
    Transport,
    VerifyChainRequest,
    X509ChainProvisionRequest,
)
from provisioning_common.secretbox import InvalidToken, SecretBox
from pydantic import BaseModel

from . import rules
from .hook import ProvisionHooks
from .profile_cache import ProfileCache
from .rate_limit import RateLimiter, Refused, Verdict
from .token_pool import TokenPool

log = logging.getLogger(__name__)


class _Decided(NamedTuple):
    """An answer with its provisioning event's reason and, when known, the profile it was about."""

    result: ProvisionResult
    reason: Reason
    profile_id: uuid.UUID | None = None
    #: The device's name when the request did not say it (an X.509 chain's CN gave it).
    device_name: str | None = None


def _refused(refusal: rules.Refusal, profile_id: uuid.UUID | None = None) -> _Decided:
    return _Decided(refusal.result(), refusal.reason, profile_id)


class ProvisioningCore:
    def __init__(
        self,
        pool: asyncpg.Pool,
        bus: Bus,
        box: SecretBox,
        limiter: RateLimiter,
        profile_ttl_s: float = 1.0,
        *,
        replay_window_s: float = 600.0,
        reply_grace_s: float = 2.0,
        events: EventSink | None = None,
        hooks: ProvisionHooks | None = None,
        write_batch_max: int = 64,
    ) -> None:
        self._pool = pool
        #: Devices written together: the concurrent requests' in one statement (README PROVISION_WRITE_BATCH_MAX).
        self._devices: Batcher[repository.NewDevice, bool] = Batcher(
            functools.partial(repository.insert_devices, pool), max_batch=write_batch_max, name="devices")
        #: Asks profiles' pre-provisioning hooks (README "Pre-provisioning hook"); None: hooks are not called.
        self._hooks = hooks
        self._profiles = ProfileCache(pool, profile_ttl_s, box=box)
        self._bus = bus
        self._tokens = TokenPool(bus)
        self._box = box
        self._limiter = limiter
        self._replay_window_s = replay_window_s
        self._reply_grace_s = reply_grace_s
        self._replay_secret = box.derive_key(b"provision-replay-key")
        self._db = DatabaseGuard(log).run
        #: Where every decision's provisioning event goes (README "Provisioning events"); by default nowhere.
        self._events = events if events is not None else EventSink()

    def handlers(self) -> list[Handler]:
        """The entry points, one per method of :data:`contract.CORE`."""
        return [
            PROVISION.handler(self.provision),
            PROVISION_X509_CHAIN.handler(self.provision_x509_chain),
            ABANDON.handler(self.abandon),
            REPORT_TIMEOUT.handler(self.report_timeout),
        ]

    def replay_key(self, req: ProvisionRequest) -> str:
        """The id under which this request's answer is kept and replayed (:func:`rules.replay_key`)."""
        return rules.replay_key(req, self._replay_secret, self._replay_window_s)

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
        if (
            isinstance(request, ProvisionRequest)
            and isinstance(reply, ProvisionResult)
            and reply.status is ProvisionStatus.SUCCESS
        ):
            await self.undo(self.replay_key(request))

    async def abandon(self, req: ProvisionRequest) -> AbandonResult:
        """A gateway told the device "timed out" without an answer from us (no reply in time, or the bus
        dropped): whatever this request committed is undone, unless a retry has been handed it since."""
        await self.undo(self.replay_key(req))
        return AbandonResult()

    async def report_timeout(self, event: ProvisionEvent) -> None:
        """A gateway answered "timed out": its TIMED_OUT event joins the others (a gateway reports nothing else)."""
        if event.outcome is Outcome.TIMED_OUT:
            self._events.emit(event)

    def _emit(self, outcome: Outcome, decided: _Decided, started: float, *, transport: Transport,
              dialect: Dialect | None, source_address: str, request_id: str, device_name: str | None) -> None:
        """The decision's one provisioning event (the writer only queues it: nothing here waits)."""
        if not self._events.enabled:
            return
        result = decided.result
        try:  # trusted: every value below is already typed (validating cost more than the rest of the event)
            event = ProvisionEvent.trusted(
                outcome=outcome, reason=decided.reason, transport=transport, dialect=dialect,
                source_address=source_address, device_profile_id=decided.profile_id,
                device_id=uuid.UUID(result.device_id) if result.device_id else None,
                device_name=result.device_name or decided.device_name or device_name, request_id=request_id,
                latency_ms=elapsed_ms(started),
            )
        except ValueError as exc:  # pydantic's ValidationError too: a record never costs the device its answer
            log.warning("provisioning event not recorded: %s", type(exc).__name__)
            return
        self._events.emit(event)

    async def provision(self, req: ProvisionRequest) -> ProvisionResult:
        started = time.perf_counter()
        decided = await self._db(self._provision(req))
        if decided.reason in (Reason.TOO_MANY_FAILURES, Reason.TOO_MANY_PROVISIONS):
            outcome = Outcome.RATE_LIMITED
        else:
            outcome = Outcome(decided.result.status.value)
        self._emit(outcome, decided, started, transport=req.transport, dialect=req.dialect,
                   source_address=req.source_address, request_id=current_request_id() or req.request_id,
                   device_name=rules.java_trim(req.device_name) or None)
        return decided.result

    async def _provision(self, req: ProvisionRequest) -> _Decided:
        # A duplicate delivery is detected where the device is written (the replay key is
        # claimed in the same statement), so the common case costs no extra query.
        checked = rules.check_request(req)
        if isinstance(checked, rules.Refusal):
            return _refused(checked)
        profile = await self._profiles.get(req.provision_key)
        profile_id = profile.id if profile is not None else None
        decision = rules.decide_strategy(req, profile, checked.name)
        # The rate limits (one transaction per batch of concurrent requests): whatever the secret, a source over
        # its wrong-secret limit gets the same refusal, so it learns nothing from its guesses; a right secret never
        # meets others' failures.
        if isinstance(decision, rules.Refusal):
            if decision.failed_attempt:
                verdict = await self._limiter.wrong_secret(req)
            else:
                verdict = await self._limiter.check_source(req)
            return _refused(decision, profile_id) if verdict.admitted else _too_many(verdict, profile_id)
        assert profile is not None  # decide_strategy refuses a request without a profile
        verdict = await self._limiter.right_secret(req, profile.id)
        if not verdict.admitted:
            return _too_many(verdict, profile.id)
        name = decision.name
        if profile.hook_url and self._hooks is not None:
            hook = await self._hooks.decide(req, profile, name, self.replay_key(req))
            if not hook.allow:
                return _refused(rules.hook_refusal(hook.reason), profile.id)
            if hook.device_name and isinstance(decision, rules.CreateDevice):
                name = hook.device_name  # the hook names the device (a pre-provisioned one keeps its name)
        if isinstance(decision, rules.CreateDevice):
            decided = await self._create_device(req, profile, name)
        else:
            decided = await self._claim_pre_provisioned(req, profile, name)
        return decided._replace(profile_id=profile.id)

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
        """Claim the replay key in this transaction; False when another attempt already holds it.

        A content key older than the replay window is forgotten first; a message id never expires.
        """
        expire_after_s = self._replay_window_s if rules.is_content_key(key) else None
        return await repository.claim_request_id(conn, key, expire_after_s)

    async def _record_answer(self, conn: asyncpg.Connection, key: str, result: ProvisionResult) -> None:
        await repository.record_answer(
            conn,
            key,
            uuid.UUID(result.device_id) if result.device_id else None,
            self._box.encrypt_json(result.model_dump(mode="json")),
        )

    async def _create_device(
        self, req: ProvisionRequest, profile: repository.ProfileRow, name: str
    ) -> _Decided:
        key = self.replay_key(req)
        token_length = rules.token_length(req.dialect)
        source = rules.credentials_source(req)
        ca_certificates: list[str] | None = None
        try:
            if source is rules.CredentialsSource.ISSUED_FROM_CSR:
                refusal = rules.issue_refusal(req, profile)
                if refusal is not None:
                    return _refused(refusal)
                issued = await self._issue_certificate(req, profile, name)
                if not issued.ok or issued.prepared is None:
                    return _refused(rules.issue_failure(issued.error_message))
                prepared, ca_certificates = issued.prepared, issued.ca_certificates
            elif source is rules.CredentialsSource.GENERATED_TOKEN:
                prepared = await self._tokens.take(token_length)
            else:
                reply = await self._bus.call(PREPARE, PrepareCredentialsRequest(
                    credentials_type=req.credentials_type, credentials=req.credentials, token_length=token_length,
                    enforce_token_minimum=not profile.allow_weak_tokens,
                ))
                if not reply.ok or reply.prepared is None:
                    return _refused(rules.prepare_failure(reply.error_message))
                prepared = reply.prepared
        except RpcError as exc:
            # A repeated request whose first attempt committed needs no new credentials.
            replayed = await self._replay(key) if key != req.request_id else None
            if replayed is not None:
                return _Decided(replayed, Reason.REPLAYED)
            if isinstance(exc, RpcTimeout):
                raise DeadlineExceeded("credentials service did not answer in time") from None
            raise Unavailable("credentials service unavailable") from None
        device_id = uuid.uuid4()
        result = rules.created_result(device_id, name, prepared, ca_certificates)
        answer_enc = self._box.encrypt_json(result.model_dump(mode="json"))
        for _ in range(2):  # a claim undone between our insert and our replay: write again
            try:
                created = await self._write(repository.NewDevice(
                    device_id=device_id,
                    name=name,
                    profile_id=profile.id,
                    device_key=req.device_key or str(device_id),
                    gateway=req.gateway,
                    provision_state=rules.PROVISIONED,
                    prepared=prepared,
                    value_enc=None,
                    request_id=key,
                    answer_enc=answer_enc,
                    deadline=current_deadline(),
                    replay_window_s=self._replay_window_s if key != req.request_id else None,
                ))
            except repository.DeviceConflict as exc:
                if exc.what == "name" and profile.reprovision_policy != rules.REPROVISION_NEVER:
                    return await self._reprovision(req, profile, name, prepared, ca_certificates, key)
                log.info("provision refused: %s already taken (profile %s)", exc.what, profile.name)
                return _refused(rules.conflict(exc.what))
            except repository.Expired:
                log.info("device %s not written: its request's deadline passed (the device may retry)", name)
                raise DeadlineExceeded("deadline passed before the device was written") from None
            if created:
                log.info("provisioned device %s (%s) in profile %s via %s", device_id,
                         prepared.credentials_type.value, profile.name, req.transport.value)
                return _Decided(await self._deliverable(key, result), Reason.CREATED)
            replayed = await self._replay(key)
            if replayed is not None:
                return _Decided(replayed, Reason.REPLAYED)
        return _Decided(ProvisionResult.failure(), Reason.INTERNAL_ERROR)

    async def _write(self, device: repository.NewDevice) -> bool:
        """Write ``device`` with the concurrent requests' devices (one statement per batch): True written, False
        a duplicate request (replay its answer); raises DeviceConflict and Expired as :func:`repository.insert_device`
        does, and :class:`Unavailable` ("retry later") when the database failed this device alone."""
        try:
            return await self._devices.submit(device)
        except repository.RowFailed as exc:
            log.warning("device %s not written: %s; its request is answered 'retry later'", device.device_id, exc)
            raise Unavailable("database error") from None

    async def _reprovision(
        self, req: ProvisionRequest, profile: repository.ProfileRow, name: str, prepared: PreparedCredentials,
        ca_certificates: list[str] | None, key: str,
    ) -> _Decided:
        """The name is taken: by a device of this profile that provisioned before and asks again (a factory reset),
        the profile's reprovisionPolicy may give it new credentials (the ones just prepared), revoking the old."""
        refusal = rules.reprovision_refusal(req, profile)
        if refusal is not None:
            return _refused(refusal)

        answers: dict[uuid.UUID, ProvisionResult] = {}

        def answer_for(device_id: uuid.UUID) -> bytes:
            answers[device_id] = rules.created_result(device_id, name, prepared, ca_certificates)
            return self._box.encrypt_json(answers[device_id].model_dump(mode="json"))

        try:
            device_id = await repository.reprovision_device(
                self._pool, name=name, profile_id=profile.id, device_key=rules.reprovision_proof(req, profile),
                prepared=prepared, request_id=key, answer_for=answer_for,
                replay_window_s=self._replay_window_s if key != req.request_id else None,
            )
        except repository.DeviceConflict as exc:
            log.info("re-provisioning of %s refused: %s (profile %s)", name, exc.what, profile.name)
            return _refused(rules.conflict(exc.what))
        if device_id is None:
            replayed = await self._replay(key)
            return _Decided(replayed, Reason.REPLAYED) if replayed is not None else \
                _Decided(ProvisionResult.failure(), Reason.INTERNAL_ERROR)
        log.info("re-provisioned device %s (%s) in profile %s via %s: its old credentials are revoked", device_id,
                 prepared.credentials_type.value, profile.name, req.transport.value)
        # Before the device hears its answer: sessions still open with the old credentials end (the device's own,
        # opened with the new ones once it has them, stay).
        await end_sessions(self._bus, device_id)
        return _Decided(await self._deliverable(key, answers[device_id]), Reason.REPROVISIONED)

    async def _issue_certificate(
        self, req: ProvisionRequest, profile: repository.ProfileRow, name: str
    ) -> IssueCertificateResult:
        """A certificate for the device's CSR, issued by credentials with the profile's signing CA.

        Called once :func:`rules.issue_refusal` found the profile's signing CA and the request's CSR.
        """
        assert profile.signing_certificate_pem is not None and profile.signing_key_enc is not None
        return await self._bus.call(ISSUE_CERTIFICATE, IssueCertificateRequest(
            csr=req.credentials.csr,
            device_name=name,
            signing_certificate=profile.signing_certificate_pem,
            signing_key_enc=profile.signing_key_enc,
            validity_days=profile.issued_validity_days,
        ))

    async def provision_x509_chain(self, req: X509ChainProvisionRequest) -> ProvisionResult:
        """ThingsBoard's X.509 chain strategy (spec §8): create, rotate, or refuse on a TLS connect."""
        started = time.perf_counter()
        decided = await self._db(self._provision_x509_chain(req))
        if decided.result.status is not ProvisionStatus.SUCCESS:
            outcome = Outcome.X509_REFUSED
        else:
            outcome = Outcome.X509_ROTATED if decided.reason is Reason.ROTATED else Outcome.X509_ACCEPTED
        self._emit(outcome, decided, started, transport=req.transport, dialect=None,
                   source_address=req.source_address, request_id=current_request_id() or req.request_id,
                   device_name=None)
        return decided.result

    async def _provision_x509_chain(self, req: X509ChainProvisionRequest) -> _Decided:
        try:
            verified = await self._bus.call(VERIFY_CHAIN, VerifyChainRequest(chain=req.chain))
        except RpcError as exc:
            log.warning("credentials service unavailable: %s", exc)
            return _Decided(ProvisionResult.failure(), Reason.UNAVAILABLE)
        identity = rules.verified_identity(verified)
        if isinstance(identity, rules.Refusal):
            log.info("x509 chain refused: %s", verified.error_message)
            return _refused(identity)
        profile = await repository.profile_by_id(self._pool, identity.profile_id)
        target = rules.x509_target(profile, identity.common_name)
        if isinstance(target, rules.Refusal):
            log.info("x509 chain refused: %s", target.message)
            return _refused(target, profile.id if profile is not None else None)
        profile, name, prepared = target.profile, target.name, identity.credentials
        for _ in range(2):  # a concurrent first connect of the same device turns creation into rotation
            device = await repository.device_by_name(self._pool, name)
            decision = rules.decide_x509_device(profile, name, device)
            if isinstance(decision, rules.Refusal):
                if device is None:
                    log.info("x509 chain refused: device %s unknown and creation not allowed", name)
                return _refused(decision, profile.id)._replace(device_name=name)
            if isinstance(decision, rules.RotateX509Credentials):
                try:
                    await repository.replace_credentials_id(self._pool, decision.device_id, prepared.credentials_id)
                except repository.DeviceConflict:  # this leaf belongs to another device
                    return _refused(rules.conflict("credentials"), profile.id)
                return _Decided(rules.x509_result(decision.device_id, name, prepared), Reason.ROTATED, profile.id)
            device_id = uuid.uuid4()
            try:
                await self._write(repository.NewDevice(
                    device_id=device_id, name=name, profile_id=profile.id, device_key=str(device_id),
                    gateway=False, provision_state=rules.PROVISIONED, prepared=prepared, value_enc=None,
                    deadline=current_deadline(),
                ))
            except repository.Expired:
                raise DeadlineExceeded("deadline passed before the device was written") from None
            except repository.DeviceConflict as exc:
                if exc.what == "name":
                    continue
                return _refused(rules.conflict(exc.what), profile.id)
            log.info("provisioned device %s by X.509 chain in profile %s", device_id, profile.name)
            return _Decided(rules.x509_result(device_id, name, prepared), Reason.CREATED, profile.id)
        return _refused(rules.conflict("name"), profile.id)

    async def _claim_pre_provisioned(
        self, req: ProvisionRequest, profile: repository.ProfileRow, name: str
    ) -> _Decided:
        key = self.replay_key(req)
        deadline = current_deadline()
        if deadline is not None and time.time() > deadline:
            raise DeadlineExceeded("deadline passed before the device was claimed")
        async with self._pool.acquire() as conn:
            try:
                async with conn.transaction():
                    if not await self._claim_request(conn, key):
                        raise _AlreadyHandled
                    device = await repository.lock_device_by_name(conn, name)
                    claim = rules.decide_claim(profile, device)
                    if isinstance(claim, rules.Refusal):
                        raise _Refused(claim)
                    result = rules.claimed_result(claim.device, name, self._box.decrypt_json(claim.value_enc))
                    await repository.set_provision_state(conn, claim.device.id, rules.PROVISIONED)
                    # Handed out: from now on only the hash remains.
                    await repository.clear_credentials_value(conn, claim.device.id)
                    await self._record_answer(conn, key, result)
                    if await repository.deadline_passed(conn, deadline):
                        raise _Expired
            except _AlreadyHandled:
                replayed = await self._replay(key)
                if replayed is None:
                    return _Decided(ProvisionResult.failure(), Reason.INTERNAL_ERROR)
                return _Decided(replayed, Reason.REPLAYED)
            except _Refused as refused:
                return _refused(refused.refusal)
            except _Expired:
                log.info("device %s not claimed: its request's deadline passed (the device may retry)", name)
                raise DeadlineExceeded("deadline passed before the claim could commit") from None
            except InvalidToken:
                log.error("cannot decrypt pre-provisioned credentials; is DATA_ENCRYPTION_KEY the admin API's?")
                return _Decided(ProvisionResult.failure(), Reason.INTERNAL_ERROR)
        log.info("pre-provisioned device %s claimed in profile %s", result.device_id, profile.name)
        return _Decided(await self._deliverable(key, result), Reason.CLAIMED)

    async def purge_answers(self, older_than_s: float) -> int:
        """Forget replayable answers once no redelivery can still arrive (they expire with their TTL)."""
        return await repository.purge_answers(self._pool, older_than_s)


def _too_many(verdict: Verdict, profile_id: uuid.UUID | None) -> _Decided:
    log.debug("provision request refused by the %s limit", verdict.refused)
    failures = verdict.refused is Refused.FAILURES
    return _Decided(rules.too_many(failures=failures, retry_after_s=verdict.retry_after_s),
                    rules.too_many_reason(failures=failures), profile_id)


class _AlreadyHandled(Exception):
    """Another delivery of the same request id committed first."""


class _Refused(Exception):
    """Roll back and answer ``refusal``."""

    def __init__(self, refusal: rules.Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


class _Expired(Exception):
    """Roll back: the deadline passed before the commit."""
