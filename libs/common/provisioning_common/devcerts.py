"""A development CA and MQTT TLS server certificate, made once per directory and reused.

For ``make up`` (``devstack``), the e2e tests and docker compose's one-shot ``mqtt-tls`` service
(``python -m mqtt_gateway.devcert``); a real deployment gives its own ``MQTT_TLS_CERT_FILE`` /
``MQTT_TLS_KEY_FILE``. Here rather than in the MQTT gateway so that nothing outside the gateway has
to import the gateway to make one.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["generate_dev_certificate"]

_CA_CERT = "ca.pem"
_CA_KEY = "ca.key"
_SERVER_CERT = "server.pem"
_SERVER_KEY = "server.key"
_PUBLIC_CA = "mqttserver.pub.pem"
_MIN_REMAINING = datetime.timedelta(days=1)
_CA_LIFETIME = datetime.timedelta(days=3650)
_SERVER_LIFETIME = datetime.timedelta(days=825)


def generate_dev_certificate(
    directory: str | Path, hostnames: Sequence[str] = ("localhost", "127.0.0.1")
) -> tuple[Path, Path, Path]:
    """Create (once) a development CA and a server certificate it signs, for the MQTT TLS listener.

    Files in ``directory``: ``ca.pem``/``ca.key`` (the CA), ``server.pem`` (server certificate followed by the
    CA certificate), ``server.key`` (mode 0600) and ``mqttserver.pub.pem`` (the CA certificate devices must
    trust; ThingsBoard's name for it). Existing files are reused while valid for more than a day and covering
    ``hostnames``; the CA is kept when only the server certificate must be renewed, so devices keep trusting it.
    The subject alternative names are always DNS:localhost and IP:127.0.0.1 plus ``hostnames``.

    Returns ``(server_cert_path, server_key_path, public_ca_path)``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / name for name in (_CA_CERT, _CA_KEY, _SERVER_CERT, _SERVER_KEY, _PUBLIC_CA)}
    sans = _subject_alternative_names(hostnames)
    with _directory_lock(directory):
        now = datetime.datetime.now(datetime.UTC)
        ca = _load_valid_ca(paths[_CA_CERT], paths[_CA_KEY], now)
        if ca is None:
            ca = _make_ca(now)
            _write(paths[_CA_KEY], _key_pem(ca[1]), private=True)
            _write(paths[_CA_CERT], ca[0].public_bytes(serialization.Encoding.PEM))
        ca_cert, ca_key = ca
        ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
        if not _server_is_valid(paths[_SERVER_CERT], paths[_SERVER_KEY], ca_cert, sans, now):
            server_cert, server_key = _make_server(ca_cert, ca_key, sans, now)
            _write(paths[_SERVER_KEY], _key_pem(server_key), private=True)
            _write(paths[_SERVER_CERT], server_cert.public_bytes(serialization.Encoding.PEM) + ca_pem)
        if not paths[_PUBLIC_CA].exists() or paths[_PUBLIC_CA].read_bytes() != ca_pem:
            _write(paths[_PUBLIC_CA], ca_pem)
    return paths[_SERVER_CERT], paths[_SERVER_KEY], paths[_PUBLIC_CA]


def _subject_alternative_names(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for raw in ("localhost", "127.0.0.1", *hostnames):
        host = raw.strip().strip("[]")
        if not host:
            continue
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            name = x509.DNSName(host.lower())
        if name not in names:
            names.append(name)
    return names


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """Serialise concurrent generators (several gateways starting at once) on one directory."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(directory / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write atomically (temporary file + rename); private files are created 0600 from the start."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o600 if private else 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _public_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _valid_long_enough(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - now > _MIN_REMAINING


def _load_valid_ca(
    cert_path: Path, key_path: Path, now: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or _public_der(key.public_key()) != _public_der(
        cert.public_key()
    ):
        return None
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None
    if not constraints.ca or not _valid_long_enough(cert, now):
        return None
    return cert, key


def _server_is_valid(
    cert_path: Path,
    key_path: Path,
    ca_cert: x509.Certificate,
    sans: list[x509.GeneralName],
    now: datetime.datetime,
) -> bool:
    try:
        chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        leaf = chain[0]
        leaf.verify_directly_issued_by(ca_cert)
        present = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except Exception:  # missing, unreadable, not ours, no SAN: make a new one
        return False
    if chain[1:] != [ca_cert]:
        return False
    if _public_der(key.public_key()) != _public_der(leaf.public_key()):
        return False
    if any(name not in present for name in sans):
        return False
    return _valid_long_enough(leaf, now)


def _make_ca(now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "IoT provisioning (development)"),
            x509.NameAttribute(NameOID.COMMON_NAME, "IoT provisioning development CA"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_server(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    sans: list[x509.GeneralName],
    now: datetime.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    first = sans[0]
    common_name = str(first.value)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    not_after = min(now + _SERVER_LIFETIME, ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key
