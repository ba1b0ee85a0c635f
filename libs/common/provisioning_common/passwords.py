"""Password hashing (scrypt: memory-hard, ~16 MiB and tens of milliseconds per hash), for every password we
keep: devices' MQTT_BASIC passwords (credentials service) and operators' console passwords (admin API).

Always run off the event loop (``asyncio.to_thread``). :func:`verify_or_burn` costs the same whether or not
there is a stored hash, so that response times do not tell known users from unknown ones.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import secrets

__all__ = ["dummy_hash", "hash_password", "verify_or_burn", "verify_password"]

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    salt_b64 = base64.b64encode(salt).decode()
    digest_b64 = base64.b64encode(digest).decode()
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt_b64}${digest_b64}"


@functools.cache
def dummy_hash() -> str:
    """A hash of a random password with the current cost, made once per process: checking a password against it
    costs what checking a real one does, and matches nothing."""
    return hash_password(secrets.token_urlsafe(32))


def verify_or_burn(password: str, stored: str | None) -> bool:
    """:func:`verify_password` against ``stored``, or against :func:`dummy_hash` when there is nothing stored
    (an unknown user): the same work either way, so a caller cannot tell known users from unknown ones by time."""
    if stored is None:
        verify_password(password, dummy_hash())
        return False
    return verify_password(password, stored)


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest_b64)
        actual = hashlib.scrypt(
            password.encode("utf-8"),
            salt=base64.b64decode(salt_b64),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
        )
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(actual, expected)
