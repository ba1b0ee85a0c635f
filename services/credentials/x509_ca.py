"""Certificate-chain verification and certificate issuance, with ``cryptography`` doing the X.509 work.

Chain verification is RFC 5280 path validation (``cryptography.x509.verification``): signatures,
validity dates, basic constraints and key usage of every CA certificate, path length, up to the
profile's CA as the only trust anchor. Stricter than ThingsBoard, which only checks that each
certificate signs the next.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError
from provisioning_common.certificates import (
    CertificateRefused,
    SigningKey,
    load_pem_chain,
    load_signing_pair,
    validity_problem,
)

__all__ = ["CertificateRefused", "verify_chain", "common_name", "issue_for_csr", "load_signing_pair"]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def verify_chain(chain: list[x509.Certificate], ca_pem: str) -> x509.Certificate:
    """Validate ``chain`` (leaf first, then intermediates) up to the CA in ``ca_pem``; returns the leaf."""
    anchors = load_pem_chain(ca_pem)[:1]
    leaf, intermediates = chain[0], [c for c in chain[1:] if c != anchors[0]]
    problem = validity_problem(leaf, _now())
    if problem:
        raise CertificateRefused(problem)
    verifier = (
        PolicyBuilder()
        .store(Store(anchors))
        .time(_now())
        .max_chain_depth(8)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all())
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, intermediates)
    except VerificationError as exc:
        raise CertificateRefused(f"certificate chain does not verify: {exc}") from None
    return leaf


def common_name(cert: x509.Certificate) -> str | None:
    """The first CN of the subject, RFC 4514 escaped (as ThingsBoard's IETFUtils.valueToString)."""
    for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        return attribute.rfc4514_string().split("=", 1)[1]
    return None


def _signature_hash(key: object) -> hashes.SHA256 | None:
    return None if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)) else hashes.SHA256()


def issue_for_csr(
    csr_pem: str, device_name: str, signing_chain: list[x509.Certificate], signing_key: SigningKey, validity_days: int
) -> x509.Certificate:
    """A client certificate for the CSR's key with CN = device name, signed by the profile's CA."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except Exception:
        raise CertificateRefused("csr is not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise CertificateRefused("csr signature does not verify")
    public_key = csr.public_key()
    ca = signing_chain[0]
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_name)]))
        .issuer_name(ca.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=validity_days), ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey), data_encipherment=False,
                key_agreement=isinstance(public_key, ec.EllipticCurvePublicKey), key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), critical=False)
    )
    return builder.sign(signing_key, _signature_hash(signing_key))
