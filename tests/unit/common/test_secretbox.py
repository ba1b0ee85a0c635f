"""SecretBox: Fernet encryption of JSON values with key rotation."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from provisioning_common.secretbox import InvalidToken, SecretBox, generate_key

VALUE = {"credentialsValue": "A1b2C3d4E5f6G7h8I9j0", "status": "SUCCESS", "nested": {"n": [1, 2.5, None, True]},
         "unicode": "mật khẩu"}


def test_round_trip() -> None:
    box = SecretBox(generate_key())
    token = box.encrypt_json(VALUE)
    assert isinstance(token, bytes)
    assert box.decrypt_json(token) == VALUE


@pytest.mark.parametrize("value", ["plain string", 0, None, [], {"a": ""}])
def test_round_trip_scalars(value: object) -> None:
    box = SecretBox(generate_key())
    assert box.decrypt_json(box.encrypt_json(value)) == value


def test_ciphertext_hides_plaintext_and_is_randomised() -> None:
    box = SecretBox(generate_key())
    a, b = box.encrypt_json(VALUE), box.encrypt_json(VALUE)
    assert b"A1b2C3d4E5f6G7h8I9j0" not in a
    assert a != b


def test_decrypt_accepts_memoryview_and_bytearray() -> None:
    # asyncpg returns bytea as bytes, but buffers must work too (decrypt_json calls bytes()).
    box = SecretBox(generate_key())
    token = box.encrypt_json(VALUE)
    assert box.decrypt_json(bytearray(token)) == VALUE
    assert box.decrypt_json(memoryview(token)) == VALUE


def test_wrong_key_raises_invalid_token() -> None:
    token = SecretBox(generate_key()).encrypt_json(VALUE)
    with pytest.raises(InvalidToken):
        SecretBox(generate_key()).decrypt_json(token)


def test_tampered_ciphertext_raises_invalid_token() -> None:
    box = SecretBox(generate_key())
    token = bytearray(box.encrypt_json(VALUE))
    token[-5] = ord("A") if token[-5] != ord("A") else ord("B")
    with pytest.raises(InvalidToken):
        box.decrypt_json(bytes(token))


def test_rotation_decrypts_old_ciphertext_and_encrypts_with_first_key() -> None:
    old, new = generate_key(), generate_key()
    old_token = SecretBox(old).encrypt_json(VALUE)
    rotated = SecretBox(f"{new}, {old}")
    assert rotated.decrypt_json(old_token) == VALUE
    fresh = rotated.encrypt_json(VALUE)
    assert SecretBox(new).decrypt_json(fresh) == VALUE
    with pytest.raises(InvalidToken):
        SecretBox(old).decrypt_json(fresh)


def test_rotation_ignores_blank_entries() -> None:
    key = generate_key()
    box = SecretBox(f" ,{key},, ")
    assert SecretBox(key).decrypt_json(box.encrypt_json(VALUE)) == VALUE


def test_generate_key_is_a_fernet_key() -> None:
    key = generate_key()
    assert isinstance(key, str)
    Fernet(key.encode())  # raises if not 32 url-safe base64 bytes
    assert generate_key() != key


@pytest.mark.parametrize(
    "bad",
    ["not-a-key", "c2hvcnQ=", "A" * 43, generate_key()[:-2], generate_key() + ",garbage", "!" * 44],
    ids=["not-a-key", "short", "43-chars", "truncated-key", "key-then-garbage", "not-base64"],  # same on every worker
)
def test_bad_key_raises_value_error(bad: str) -> None:
    with pytest.raises(ValueError, match="Fernet"):
        SecretBox(bad)


@pytest.mark.parametrize("empty", ["", " ", ",", " , ,"])
def test_empty_key_raises_value_error(empty: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        SecretBox(empty)
