"""The credentials service's two entry points: ``prepare`` (before storing) and ``authenticate``."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import os
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from provisioning_common.bus import DeadlineExceeded, current_deadline
from provisioning_common.certificates import name_hash, to_pem
from provisioning_common.contract import (
    AUTHENTICATE,
    ISSUE_CERTIFICATE,
    MINT_TOKENS,
    PREPARE,
    PREPARE_MANY,
    VERIFY_CHAIN,
    Handler,
)
from provisioning_common.db import repository
from provisioning_common.db.guard import DatabaseGuard
from provisioning_common.models import (
    AuthenticateRequest,
    AuthenticateResult,
    CredentialsType,
    IssueCertificateRequest,
    IssueCertificateResult,
    MintTokensRequest,
    MintTokensResult,
    PrepareCredentialsRequest,
    PrepareCredentialsResult,
    PreparedCredentials,
    PrepareManyRequest,
    PrepareManyResult,
    VerifyChainRequest,
    VerifyChainResult,
)
from provisioning_common.secretbox import InvalidToken, SecretBox

from . import hashing, x509_ca

Req = TypeVar("Req")
Resp = TypeVar("Resp")
T = TypeVar("T")

_DENIED = AuthenticateResult(authenticated=False)


class CredentialsRefused(ValueError):
    """Supplied credentials break a rule; the message is safe to show to the device."""


@dataclass(frozen=True)
class _Stored:
    device_id: str
    device_name: str
    credentials_type: CredentialsType
    secret_hash: str | None
    public: dict[str, Any]


#: Password hashes (scrypt, ~80 ms of CPU each) computed at once, in threads; the others wait their turn in
#: :func:`hash_off_loop`, where a request whose deadline passed meanwhile gives up instead of hashing for nobody.
#: Without it every request held in the prefetch window queued in the thread pool, and after a burst (or a
#: broker restart that left its callers gone) the hashes of requests nobody waited for any more delayed the
#: next ones past their deadlines.
HASHES_AT_ONCE = max(2, os.cpu_count() or 2)
_hash_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


async def hash_off_loop(func: Callable[..., T], *args: Any) -> T:
    """``func(*args)`` (a password hash or check) in a thread, at most :data:`HASHES_AT_ONCE` at a time; raises
    :class:`DeadlineExceeded` instead when the request's deadline passed while it waited."""
    loop = asyncio.get_running_loop()
    slots = _hash_slots.get(loop)
    if slots is None:
        slots = _hash_slots[loop] = asyncio.Semaphore(HASHES_AT_ONCE)
    async with slots:
        deadline = current_deadline()
        if deadline is not None and time.time() >= deadline:
            raise DeadlineExceeded("deadline passed while waiting to hash a password")
        return await asyncio.to_thread(func, *args)


def minted_token(length: int) -> PreparedCredentials:
    """A new random access token, ready to store (by its hash) and to hand to the device."""
    token = hashing.mint_token(length)
    return PreparedCredentials(
        credentials_type=CredentialsType.ACCESS_TOKEN, credentials_id=hashing.token_id(token), response_value=token
    )


async def prepare_credentials(req: PrepareCredentialsRequest) -> PreparedCredentials:
    """Mint or validate-and-hash credentials (spec §5). Raises :class:`CredentialsRefused`."""
    supplied = req.credentials
    if not supplied.any_given():
        return minted_token(req.token_length)
    ctype = req.credentials_type
    if ctype is CredentialsType.ACCESS_TOKEN:
        if not supplied.token or hashing.has_control_chars(supplied.token):
            raise CredentialsRefused("Access token is empty or contains control characters")
        if req.enforce_token_minimum:
            problem = hashing.weak_token_problem(supplied.token)
            if problem:
                raise CredentialsRefused(problem)
        return PreparedCredentials(
            credentials_type=ctype, credentials_id=hashing.token_id(supplied.token), response_value=supplied.token
        )
    if ctype is CredentialsType.MQTT_BASIC:
        client_id, username, password = supplied.client_id, supplied.username, supplied.password
        if not client_id and not username:
            raise CredentialsRefused("Both mqtt client id and user name are empty!")
        if client_id and password and not username:
            raise CredentialsRefused("Password cannot be specified along with client id")
        if any(hashing.has_control_chars(v) for v in (client_id, username, password)):
            raise CredentialsRefused("MQTT credentials contain control characters")
        if not client_id:
            credentials_id = username
        elif not username:
            credentials_id = hashing.tb_sha3(client_id)
        else:
            credentials_id = hashing.tb_sha3(client_id, username)
        secret_hash = await hash_off_loop(hashing.hash_password, password) if password else None
        return PreparedCredentials(
            credentials_type=ctype,
            credentials_id=credentials_id,
            secret_hash=secret_hash,
            response_value={"clientId": client_id, "userName": username, "password": password},
        )
    if ctype is CredentialsType.X509_CERTIFICATE:
        try:
            body = hashing.certificate_body(supplied.certificate)
        except ValueError as exc:
            raise CredentialsRefused(str(exc)) from None
        return PreparedCredentials(credentials_type=ctype, credentials_id=hashing.tb_sha3(body), response_value=body)
    raise CredentialsRefused(f"Credentials type {ctype.value} cannot be provisioned")


class CredentialsService:
    """RPC entry points; reads ``device_credentials`` and CA profiles, never writes."""

    def __init__(self, pool: asyncpg.Pool, box: SecretBox | None = None) -> None:
        self._pool = pool
        self._box = box
        self._guard = DatabaseGuard(logging.getLogger(__name__))

    def handlers(self) -> list[Handler]:
        """The entry points, one per method of :data:`contract.CREDENTIALS`."""
        return [
            PREPARE.handler(self.prepare),
            PREPARE_MANY.handler(self.prepare_many),
            MINT_TOKENS.handler(self.mint_tokens),
            VERIFY_CHAIN.handler(self._guarded(self.verify_chain)),
            ISSUE_CERTIFICATE.handler(self.issue_certificate),
            AUTHENTICATE.handler(self._guarded(self.authenticate)),
        ]

    def _guarded(self, func: Callable[[Req], Awaitable[Resp]]) -> Callable[[Req], Awaitable[Resp]]:
        """A handler that reads Postgres: an outage answers "unavailable" instead of a traceback."""

        @functools.wraps(func)  # keeps func's annotations, which Bus.serve checks against the contract
        async def guarded(req: Req) -> Resp:
            return await self._guard.run(func(req))

        return guarded

    async def prepare(self, req: PrepareCredentialsRequest) -> PrepareCredentialsResult:
        try:
            return PrepareCredentialsResult(ok=True, prepared=await prepare_credentials(req))
        except CredentialsRefused as exc:
            return PrepareCredentialsResult(ok=False, error_message=str(exc))

    async def prepare_many(self, req: PrepareManyRequest) -> PrepareManyResult:
        """:meth:`prepare` for each item, at once (MQTT passwords are hashed in threads)."""
        return PrepareManyResult(results=list(await asyncio.gather(*(self.prepare(item) for item in req.items))))

    async def mint_tokens(self, req: MintTokensRequest) -> MintTokensResult:
        return MintTokensResult(tokens=[minted_token(req.token_length) for _ in range(req.count)])

    async def verify_chain(self, req: VerifyChainRequest) -> VerifyChainResult:
        """Which X509_CERTIFICATE_CHAIN profile's CA the chain reaches, found by issuer name (indexed)."""
        try:
            chain = [x509.load_der_x509_certificate(base64.b64decode(c, validate=True)) for c in req.chain]
        except Exception:
            return VerifyChainResult(ok=False, error_message="presented certificates do not parse")
        issuers = list({name_hash(cert.issuer) for cert in chain})
        candidates = await repository.chain_profiles_by_ca_subject(self._pool, issuers)
        error = "no device profile holds the CA of this chain"
        for candidate in candidates:
            try:
                leaf = await asyncio.to_thread(x509_ca.verify_chain, chain, candidate.certificate_pem)
            except x509_ca.CertificateRefused as exc:
                error = str(exc)
                continue
            body = base64.b64encode(leaf.public_bytes(Encoding.DER)).decode()
            return VerifyChainResult(
                ok=True,
                profile_id=str(candidate.id),
                leaf_common_name=x509_ca.common_name(leaf),
                leaf_body=body,
                leaf_credentials_id=hashing.tb_sha3(body),
            )
        return VerifyChainResult(ok=False, error_message=error)

    async def issue_certificate(self, req: IssueCertificateRequest) -> IssueCertificateResult:
        """Sign a device certificate for a CSR with the profile's CA (its key decrypted only here)."""
        if self._box is None:
            return IssueCertificateResult(ok=False, error_message="certificate issuance needs DATA_ENCRYPTION_KEY")
        try:
            key_pem = self._box.decrypt_json(req.signing_key_enc.encode())
            chain, key = x509_ca.load_signing_pair(req.signing_certificate, key_pem)
            cert = await asyncio.to_thread(
                x509_ca.issue_for_csr, req.csr, req.device_name, chain, key, req.validity_days
            )
        except InvalidToken:
            return IssueCertificateResult(ok=False, error_message="signing key cannot be decrypted")
        except x509_ca.CertificateRefused as exc:
            return IssueCertificateResult(ok=False, error_message=str(exc))
        pem = to_pem(cert)
        return IssueCertificateResult(
            ok=True,
            prepared=PreparedCredentials(
                credentials_type=CredentialsType.X509_CERTIFICATE,
                credentials_id=hashing.tb_sha3(pem),
                response_value=pem,
            ),
            ca_certificates=[to_pem(c) for c in chain],
        )

    async def _lookup(self, credentials_id: str) -> _Stored | None:
        row = await repository.credentials_by_id(self._pool, credentials_id)
        if row is None:
            return None
        public = json.loads(row.public_value) if row.public_value else {}
        return _Stored(str(row.device_id), row.device_name, CredentialsType(row.credentials_type),
                       row.secret_hash, public)

    @staticmethod
    def _ok(stored: _Stored) -> AuthenticateResult:
        return AuthenticateResult(
            authenticated=True,
            device_id=stored.device_id,
            device_name=stored.device_name,
            credentials_type=stored.credentials_type,
        )

    async def authenticate(self, req: AuthenticateRequest) -> AuthenticateResult:
        if req.certificate:
            stored = await self._lookup(hashing.tb_sha3(req.certificate))
            ok = stored is not None and stored.credentials_type is CredentialsType.X509_CERTIFICATE
            return self._ok(stored) if ok else _DENIED  # type: ignore[arg-type]
        if req.token:
            return await self._by_token(req.token)
        if req.client_id or req.username:
            return await self._mqtt_basic(req)
        return _DENIED

    async def _by_token(self, token: str) -> AuthenticateResult:
        stored = await self._lookup(hashing.token_id(token))
        if stored is not None and stored.credentials_type is CredentialsType.ACCESS_TOKEN:
            return self._ok(stored)
        return _DENIED

    async def _mqtt_basic(self, req: AuthenticateRequest) -> AuthenticateResult:
        """ThingsBoard's MQTT_BASIC check (spec §9), including its fallback to a token as username.

        Uniform work (issue 13): a login that presents a password costs exactly one password hash, whether
        or not a device has these credentials - when no stored hash was checked, the password is checked
        against a dummy hash - so known and unknown users take the same time, and the hash cost is paid
        alike by everyone (it was 31 ms for a known user, 2 ms for an unknown one)."""
        checks = _PasswordChecks()
        result = await self._mqtt_basic_lookup(req, checks)
        if req.password and not checks.hashed and not await self._is_token(req.password):
            await hash_off_loop(hashing.verify_or_burn, req.password, None)
        return result

    async def _is_token(self, password: str) -> bool:
        """Whether ``password`` is a device's access token: Innoway's login (any user name, the token as password)
        then succeeds by the token rule (device_auth), so it skips the dummy hash - it reveals nothing its
        presenter does not learn from that success, and a fleet's reconnects cost no scrypt each."""
        stored = await self._lookup(hashing.token_id(password))
        return stored is not None and stored.credentials_type is CredentialsType.ACCESS_TOKEN

    async def _mqtt_basic_lookup(self, req: AuthenticateRequest, checks: _PasswordChecks) -> AuthenticateResult:
        if not req.username:
            stored = await self._lookup(hashing.tb_sha3(req.client_id))
            if (
                stored
                and stored.credentials_type is CredentialsType.MQTT_BASIC
                and await self._basic_match(stored, req, checks) == "VALID"
            ):
                return self._ok(stored)
            return _DENIED
        stored = await self._lookup(hashing.tb_sha3(req.client_id, req.username))
        if stored and stored.credentials_type is CredentialsType.MQTT_BASIC:
            verdict = await self._basic_match(stored, req, checks)
            if verdict == "VALID":
                return self._ok(stored)
            if verdict == "PASSWORD_MISMATCH":
                return _DENIED
        stored = await self._lookup(req.username)
        if stored and stored.credentials_type is CredentialsType.MQTT_BASIC:
            return self._ok(stored) if await self._basic_match(stored, req, checks) == "VALID" else _DENIED
        return await self._by_token(req.username)

    @staticmethod
    async def _basic_match(stored: _Stored, req: AuthenticateRequest, checks: _PasswordChecks) -> str:
        client_id, username = stored.public.get("clientId") or "", stored.public.get("userName") or ""
        if (client_id and client_id != req.client_id) or (username and username != req.username):
            return "HASH_MISMATCH"
        if stored.secret_hash:
            if not req.password:
                return "PASSWORD_MISMATCH"
            checks.hashed = True
            if not await hash_off_loop(hashing.verify_or_burn, req.password, stored.secret_hash):
                return "PASSWORD_MISMATCH"
        return "VALID"


@dataclass
class _PasswordChecks:
    """Whether one login already paid for a password hash (see ``CredentialsService._mqtt_basic``)."""

    hashed: bool = False
