"""Small X.509 helpers shared by the admin API (storing CAs) and credentials (matching chains to them)."""

from __future__ import annotations

import datetime
import hashlib
import re

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

_PEM_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----\s*.*?\s*-----END CERTIFICATE-----", re.DOTALL)


def tb_trim(value: str) -> str:
    """ThingsBoard's ``certTrimNewLines``: drop PEM markers and line breaks, nothing else."""
    return (
        value.replace("-----BEGIN CERTIFICATE-----", "")
        .replace("\n", "")
        .replace("\r", "")
        .replace("-----END CERTIFICATE-----", "")
    )


def tb_sha3(*parts: str) -> str:
    """ThingsBoard's ``getSha3Hash``: SHA3-256 hex of the non-empty parts joined by ``|``, trimmed."""
    joined = "|".join(p for p in parts if p)
    return hashlib.sha3_256(tb_trim(joined).encode("utf-8")).hexdigest()



def name_hash(name: x509.Name) -> str:
    """SHA-256 hex of a DER-encoded distinguished name: how a CA is indexed and an issuer found."""
    return hashlib.sha256(name.public_bytes()).hexdigest()


def load_pem_chain(text: str) -> list[x509.Certificate]:
    """Every certificate in a PEM text, in order; ValueError when there is none or one does not parse."""
    blocks = _PEM_BLOCK.findall(text or "")
    if not blocks:
        raise ValueError("no PEM certificate found")
    try:
        return [x509.load_pem_x509_certificate(block.encode()) for block in blocks]
    except Exception as exc:  # cryptography raises ValueError and friends
        raise ValueError(f"a certificate does not parse: {type(exc).__name__}") from None


def to_pem(cert: x509.Certificate) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.PEM).decode()


class CertificateRefused(ValueError):
    """A certificate, key or CSR is not acceptable; the message is safe to log and show."""


def check_ca(cert: x509.Certificate, field: str) -> None:
    """Refuse a certificate that may not act as a CA (basicConstraints cA, keyUsage keyCertSign)."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise CertificateRefused(f"{field} is not a CA certificate (no basicConstraints)") from None
    if not constraints.ca:
        raise CertificateRefused(f"{field} is not a CA certificate (basicConstraints cA is false)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise CertificateRefused(f"{field} may not sign certificates (keyUsage lacks keyCertSign)")


#: Private keys that can sign a certificate (what ``CertificateBuilder.sign`` accepts).
SigningKey = (
    rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)


def load_signing_pair(certificate_pem: str, key_pem: str) -> tuple[list[x509.Certificate], SigningKey]:
    """Parse and check a signing CA: a CA certificate allowed to sign certificates, and its matching key."""
    try:
        chain = load_pem_chain(certificate_pem)
    except ValueError as exc:
        raise CertificateRefused(f"signingCertificatePem: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except Exception:
        raise CertificateRefused("signingKeyPem is not an unencrypted PEM private key") from None
    if not isinstance(
        key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey,
              dsa.DSAPrivateKey)
    ):
        raise CertificateRefused("signingKeyPem is not a key that can sign certificates")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if chain[0].public_key().public_bytes(serialization.Encoding.DER, spki) != key.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ):
        raise CertificateRefused("signingKeyPem does not match signingCertificatePem")
    check_ca(chain[0], "signingCertificatePem")
    return chain, key


def validity_problem(cert: x509.Certificate, now: datetime.datetime | None = None) -> str | None:
    """Why ``cert`` is not valid at ``now`` (default: the current time), or None (issue 13).

    Expired and not-yet-valid device certificates are refused at provisioning (credentials) and at the TLS
    handshake (mqtt_gateway.tls) with this reason; ThingsBoard's X.509 checks refuse them too (checkValidity).
    """
    now = now or datetime.datetime.now(datetime.UTC)
    if now > cert.not_valid_after_utc:
        return f"X.509 certificate has expired (not valid after {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})"
    if now < cert.not_valid_before_utc:
        return f"X.509 certificate is not yet valid (not valid before {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ})"
    return None
