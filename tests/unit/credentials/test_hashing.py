"""Credential hashing and minting (thingsboard-provisioning.md §5, §7)."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from credentials import hashing

from tests.unit.conftest import SelfSignedCert


def sha3(s: str) -> str:
    return hashlib.sha3_256(s.encode("utf-8")).hexdigest()


# --- tb_trim / tb_sha3 ----------------------------------------------------------------------


def test_tb_trim_removes_markers_and_line_breaks_only() -> None:
    value = "-----BEGIN CERTIFICATE-----\r\nAB C\tD\n-----END CERTIFICATE-----\n"
    assert hashing.tb_trim(value) == "AB C\tD"


def test_tb_trim_keeps_other_marker_kinds() -> None:
    value = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"
    assert hashing.tb_trim(value) == "-----BEGIN PUBLIC KEY-----AAAA-----END PUBLIC KEY-----"


def test_tb_sha3_pem_and_bare_body_agree(self_signed_cert: SelfSignedCert) -> None:
    pem = self_signed_cert.pem
    assert "\n" in pem and "-----BEGIN CERTIFICATE-----" in pem
    bare = self_signed_cert.b64
    expected = hashlib.sha3_256(bare.encode("ascii")).hexdigest()
    assert hashing.tb_sha3(pem) == expected
    assert hashing.tb_sha3(pem.replace("\n", "\r\n")) == expected
    assert hashing.tb_sha3(bare) == expected
    # Newlines inside the body (64-column PEM lines) are removed too.
    assert hashing.tb_sha3("\n".join(bare[i:i + 64] for i in range(0, len(bare), 64))) == expected


def test_tb_sha3_known_vector() -> None:
    # FIPS-202 SHA3-256("abc"), not Keccak-256.
    assert hashing.tb_sha3("abc") == "3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532"


def test_tb_sha3_joins_parts_with_pipe() -> None:
    assert hashing.tb_sha3("c", "u") == sha3("c|u")
    assert hashing.tb_sha3("c", "u") != sha3("cu")


def test_tb_sha3_skips_empty_parts() -> None:
    assert hashing.tb_sha3("", "u") == sha3("u")
    assert hashing.tb_sha3("c", "") == sha3("c")
    assert hashing.tb_sha3("c") == sha3("c")


def test_tb_sha3_trims_mqtt_client_ids_too() -> None:
    # ThingsBoard applies certTrimNewLines to every input, including client ids.
    assert hashing.tb_sha3("cl\nient", "us\r\ner") == sha3("client|user")


def test_tb_sha3_is_lowercase_hex_and_utf8() -> None:
    digest = hashing.tb_sha3("điện")
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert digest == hashlib.sha3_256("điện".encode()).hexdigest()


def test_token_id_is_sha256_hex() -> None:
    assert hashing.token_id("A1b2C3") == hashlib.sha256(b"A1b2C3").hexdigest()
    assert hashing.token_id("a") != hashing.token_id("A")


# --- mint_token --------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [16, 20, 32, 64])
def test_mint_token_length_and_alphabet(length: int) -> None:
    for _ in range(50):
        token = hashing.mint_token(length)
        assert len(token) == length
        assert re.fullmatch(r"[A-Za-z0-9]+", token)


def test_mint_token_default_is_thingsboard_length() -> None:
    assert len(hashing.mint_token()) == 20


def test_mint_token_is_random_and_uses_whole_alphabet() -> None:
    tokens = {hashing.mint_token(32) for _ in range(200)}
    assert len(tokens) == 200
    seen = set("".join(tokens))
    # 6400 draws from 62 symbols: every class shows up.
    assert seen & set("abcdefghijklmnopqrstuvwxyz")
    assert seen & set("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    assert seen & set("0123456789")
    assert len(seen) > 55


@pytest.mark.parametrize(("value", "expected"), [
    ("plain", False), ("tab\there", True), ("nl\n", True), ("\x00", True), ("del\x7f", True),
    ("\x1f", True), ("space ok", False), ("\u00a0nbsp", False), ("\x80", False), ("日本", False),
])
def test_has_control_chars(value: str, expected: bool) -> None:
    assert hashing.has_control_chars(value) is expected


# --- certificate_body ---------------------------------------------------------------------------


def test_certificate_body_accepts_pem(self_signed_cert: SelfSignedCert) -> None:
    assert hashing.certificate_body(self_signed_cert.pem) == self_signed_cert.b64


def test_certificate_body_accepts_pem_with_crlf(self_signed_cert: SelfSignedCert) -> None:
    assert hashing.certificate_body(self_signed_cert.pem.replace("\n", "\r\n")) == self_signed_cert.b64


def test_certificate_body_accepts_bare_base64(self_signed_cert: SelfSignedCert) -> None:
    assert hashing.certificate_body(self_signed_cert.b64) == self_signed_cert.b64


@pytest.mark.parametrize(
    "bad",
    [
        "testHash", "", "not base64 at all!", "MIIB", "AAAA" * 20,
        "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----",
    ],
)
def test_certificate_body_rejects_non_certificates(bad: str) -> None:
    with pytest.raises(ValueError, match="X.509"):
        hashing.certificate_body(bad)


def test_certificate_body_rejects_truncated_certificate(self_signed_cert: SelfSignedCert) -> None:
    truncated = base64.b64encode(self_signed_cert.der[:-10]).decode()
    with pytest.raises(ValueError, match="X.509"):
        hashing.certificate_body(truncated)


def test_certificate_body_rejects_invalid_version_with_value_error(self_signed_cert: SelfSignedCert) -> None:
    der = self_signed_cert.der
    marker = bytes.fromhex("a003020102")  # [0] EXPLICIT INTEGER 2 (= v3)
    at = der.index(marker)
    bad = der[: at + 4] + b"\x05" + der[at + 5:]
    with pytest.raises(ValueError, match="X.509"):
        hashing.certificate_body(base64.b64encode(bad).decode())


# --- passwords -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stored_hash() -> str:
    return hashing.hash_password("correct horse battery")


def test_password_verifies(stored_hash: str) -> None:
    assert hashing.verify_password("correct horse battery", stored_hash) is True


@pytest.mark.parametrize("wrong", ["correct horse batter", "Correct horse battery", "", "correct horse battery "])
def test_wrong_password_fails(stored_hash: str, wrong: str) -> None:
    assert hashing.verify_password(wrong, stored_hash) is False


def test_hash_does_not_contain_password(stored_hash: str) -> None:
    assert "correct horse battery" not in stored_hash
    assert stored_hash.startswith("scrypt$")


def test_same_password_hashes_differ_by_salt(stored_hash: str) -> None:
    again = hashing.hash_password("correct horse battery")
    assert again != stored_hash
    assert hashing.verify_password("correct horse battery", again)


def test_unicode_password() -> None:
    stored = hashing.hash_password("mật khẩu")
    assert hashing.verify_password("mật khẩu", stored)
    assert not hashing.verify_password("mat khau", stored)


@pytest.mark.parametrize("stored", ["", "garbage", "bcrypt$1$2$3$YQ==$YQ==", "scrypt$x$8$1$YQ==$YQ==",
                                    "scrypt$16384$8$1$!!!$YQ=="])
def test_verify_rejects_malformed_hash_without_raising(stored: str) -> None:
    assert hashing.verify_password("anything", stored) is False


def test_verify_rejects_tampered_digest(stored_hash: str) -> None:
    parts = stored_hash.split("$")
    digest = bytearray(base64.b64decode(parts[5]))
    digest[0] ^= 1
    parts[5] = base64.b64encode(bytes(digest)).decode()
    assert hashing.verify_password("correct horse battery", "$".join(parts)) is False
