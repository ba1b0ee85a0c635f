"""Credential hashing and minting: ThingsBoard's formats where devices depend on them (spec §5, §7)."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import string

from cryptography import x509

# ThingsBoard's certificate/id hash format lives with the shared contract; re-exported here.
from provisioning_common.certificates import tb_sha3, tb_trim, validity_problem

# Password hashing is shared with the admin API's operator accounts; re-exported here.
from provisioning_common.passwords import dummy_hash, hash_password, verify_or_burn, verify_password

__all__ = [
    "tb_sha3", "tb_trim", "mint_token", "token_id", "certificate_body", "hash_password", "verify_password",
    "weak_token_problem", "verify_or_burn", "dummy_hash",
]

TOKEN_ALPHABET = string.ascii_letters + string.digits
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

#: Ours (issue 13): a token a device chooses itself must have at least this many characters, all URL-unreserved
#: (RFC 3986: [A-Za-z0-9._~-], so it sits in /api/v1/{token}/... unescaped). 16 such characters are >= 96 bits
#: when random; ThingsBoard accepts any non-empty token. A profile with allowWeakTokens waives it.
MIN_DEVICE_TOKEN_LENGTH = 16
_DEVICE_TOKEN = re.compile(r"[A-Za-z0-9._~-]+")
MSG_WEAK_TOKEN = (
    f"Access token is too weak: at least {MIN_DEVICE_TOKEN_LENGTH} characters of A-Z a-z 0-9 . _ ~ - are required"
)



def mint_token(length: int = 20) -> str:
    """A random token of ``length`` characters from [A-Za-z0-9] (ThingsBoard: 20, Innoway: 32)."""
    return "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(length))


def has_control_chars(value: str) -> bool:
    return bool(_CONTROL.search(value))


def weak_token_problem(token: str) -> str | None:
    """Why a device-chosen access token is refused (:data:`MSG_WEAK_TOKEN`), or None when it is strong enough."""
    if len(token) < MIN_DEVICE_TOKEN_LENGTH or not _DEVICE_TOKEN.fullmatch(token):
        return MSG_WEAK_TOKEN
    return None


def token_id(token: str) -> str:
    """Stored lookup key of an access token: a dump of the table does not reveal the token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def certificate_body(value: str) -> str:
    """The base64 body of a PEM or bare-base64 certificate, validated to parse as X.509.

    Raises ValueError with a message fit for the device.
    """
    body = tb_trim(value)
    compact = "".join(body.split())
    try:
        der = base64.b64decode(compact, validate=True)
        cert = x509.load_der_x509_certificate(der)
    except Exception:  # binascii.Error, ValueError, x509.InvalidVersion, ...: all mean "not a certificate"
        raise ValueError("X509_CERTIFICATE value is not a valid X.509 certificate (PEM or base64 DER)") from None
    problem = validity_problem(cert)
    if problem:
        raise ValueError(problem)
    return body


