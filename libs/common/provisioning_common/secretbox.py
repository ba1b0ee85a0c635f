"""Symmetric encryption of values that must be readable again (Fernet: AES-128-CBC + HMAC-SHA256).

Used for the credentials of a pre-provisioned device until it collects them, and for the
answers replayed on broker redelivery: a database dump alone reveals neither.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

__all__ = ["SecretBox", "InvalidToken", "generate_key"]


def generate_key() -> str:
    return Fernet.generate_key().decode()


class SecretBox:
    """Encrypts with the first key, decrypts with any (comma-separated keys allow rotation)."""

    def __init__(self, keys: str) -> None:
        parts = [k.strip() for k in keys.split(",") if k.strip()]
        if not parts:
            raise ValueError("DATA_ENCRYPTION_KEY is empty")
        try:
            self._fernet = MultiFernet([Fernet(k.encode()) for k in parts])
        except (ValueError, TypeError) as exc:
            raise ValueError("DATA_ENCRYPTION_KEY must be Fernet keys (32 url-safe base64 bytes)") from exc
        self._primary = parts[0].encode()

    def derive_key(self, purpose: bytes) -> bytes:
        """A 32-byte key for ``purpose`` derived from the newest key (HMAC-SHA256), e.g. to key hashes
        that every instance must compute alike but a database dump must not let anyone recompute."""
        return hmac.new(self._primary, b"provisioning:" + purpose, hashlib.sha256).digest()

    def encrypt_json(self, value: Any) -> bytes:
        return self._fernet.encrypt(json.dumps(value, separators=(",", ":")).encode())

    def decrypt_json(self, token: bytes) -> Any:
        return json.loads(self._fernet.decrypt(bytes(token)))
