"""A test PKI made with ``cryptography``: CAs, intermediates, device leaves and CSRs (unit and e2e tests)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

NOW = datetime.datetime.now(datetime.UTC)


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def key_pem(self) -> str:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()).decode()

    @property
    def body(self) -> str:
        return pem_body(self.pem)

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


def issue(cn: str, issuer: Issued | None = None, *, ca: bool = False, days: int = 30,
          not_before: datetime.datetime | None = None, key: ec.EllipticCurvePrivateKey | None = None) -> Issued:
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    signer_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), critical=False)
    )
    return Issued(builder.sign(signer_key, hashes.SHA256()), key)


def csr_for(key: ec.EllipticCurvePrivateKey, cn: str = "ignored") -> str:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def write_client_files(directory: Path, leaf: Issued, *chain: Issued) -> tuple[str, str]:
    """(certfile with leaf then intermediates, keyfile) as paho's tls_set wants them."""
    stem = directory / leaf.cert.serial_number.to_bytes(20, "big").hex()[:16]
    cert_file, key_file = stem.with_suffix(".pem"), stem.with_suffix(".key")
    cert_file.write_text(leaf.pem + "".join(c.pem for c in chain))
    key_file.write_text(leaf.key_pem)
    return str(cert_file), str(key_file)


def self_signed_pem(common_name: str = "device") -> str:
    """A self-signed device certificate, as ThingsBoard's X.509 example makes it."""
    return issue(common_name).pem


def pem_body(pem: str) -> str:
    """The base64 body of a PEM certificate: what ThingsBoard stores and answers."""
    return "".join(line for line in pem.splitlines() if "CERTIFICATE" not in line)
