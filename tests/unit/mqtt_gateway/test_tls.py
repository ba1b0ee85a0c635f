"""The MQTT gateway's transports over real sockets on 127.0.0.1 (ephemeral ports): TLS via pyOpenSSL, plain TCP."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import os
import socket
import ssl
import stat
import threading
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mqtt_gateway.tls import (
    Connection,
    PlainConnection,
    TlsConnection,
    make_server_context,
    start_plain_server,
    start_tls_server,
)
from OpenSSL import SSL
from provisioning_common.devcerts import generate_dev_certificate

HOST = "127.0.0.1"
TIMEOUT = 5.0


# --- certificates --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevCert:
    cert: Path
    key: Path
    public_ca: Path


@dataclass(frozen=True)
class ClientCert:
    certfile: Path  # leaf (+ intermediates)
    keyfile: Path
    ders: list[bytes]  # what the client sends, leaf first


@pytest.fixture(scope="module")
def dev_cert(tmp_path_factory: pytest.TempPathFactory) -> DevCert:
    return DevCert(*generate_dev_certificate(tmp_path_factory.mktemp("mqtt-tls")))


@pytest.fixture(scope="module")
def server_context(dev_cert: DevCert) -> SSL.Context:
    return make_server_context(str(dev_cert.cert), str(dev_cert.key))


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


def _write_client(
    directory: Path, stem: str, certs: list[x509.Certificate], key: ec.EllipticCurvePrivateKey
) -> ClientCert:
    certfile, keyfile = directory / f"{stem}.pem", directory / f"{stem}.key"
    certfile.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    keyfile.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ClientCert(certfile, keyfile, [c.public_bytes(serialization.Encoding.DER) for c in certs])


@pytest.fixture(scope="module")
def self_signed_device(tmp_path_factory: pytest.TempPathFactory) -> ClientCert:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue("self-signed-device", key, "self-signed-device", key, ca=False)
    return _write_client(tmp_path_factory.mktemp("device"), "device", [cert], key)


@pytest.fixture(scope="module")
def chained_device(tmp_path_factory: pytest.TempPathFactory) -> ClientCert:
    root_key, inter_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    inter = _issue("test intermediate", inter_key, "test root", root_key, ca=True)
    leaf = _issue("chained-device", leaf_key, "test intermediate", inter_key, ca=False)
    return _write_client(tmp_path_factory.mktemp("chained"), "device", [leaf, inter], leaf_key)


def _client_context(dev_cert: DevCert, client: ClientCert | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(dev_cert.public_ca))
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    if client is not None:
        ctx.load_cert_chain(str(client.certfile), str(client.keyfile))
    return ctx


# --- servers -------------------------------------------------------------------------------------------------


@dataclass
class Running:
    port: int
    connections: asyncio.Queue[Connection]


async def _echo(conn: Connection) -> None:
    try:
        while data := await conn.reader.read(65536):
            conn.write(data)
            await conn.drain()
    except ConnectionError:
        pass
    finally:
        conn.close()
        await conn.wait_closed()


@contextlib.asynccontextmanager
async def _serve(
    context: SSL.Context | None,
    handler: Callable[[Connection], Awaitable[None]] = _echo,
    *,
    handshake_timeout: float = 10.0,
) -> AsyncIterator[Running]:
    seen: asyncio.Queue[Connection] = asyncio.Queue()

    async def on_connection(conn: Connection) -> None:
        seen.put_nowait(conn)
        await handler(conn)

    if context is None:
        server = await start_plain_server(on_connection, HOST, 0)
    else:
        server = await start_tls_server(on_connection, HOST, 0, context, handshake_timeout=handshake_timeout)
    port = server.sockets[0].getsockname()[1]
    assert port not in (1883, 8883)
    try:
        yield Running(port, seen)
    finally:
        server.close()
        await server.wait_closed()


async def _tls_open(
    port: int, ctx: ssl.SSLContext, server_hostname: str = "localhost"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection(HOST, port, ssl=ctx, server_hostname=server_hostname), TIMEOUT
    )


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), TIMEOUT)


async def _roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.write(payload)
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(len(payload)), TIMEOUT) == payload


async def _read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes (a reset counts as closed)."""
    received = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(65536), TIMEOUT):
            received += chunk
    return received


# --- development certificate ---------------------------------------------------------------------------------


def test_dev_certificate_files_and_reuse(tmp_path: Path) -> None:
    cert_path, key_path, public_path = generate_dev_certificate(tmp_path, ("mqtt.example.test", "10.1.2.3"))
    assert (cert_path.name, key_path.name, public_path.name) == ("server.pem", "server.key", "mqttserver.pub.pem")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600

    chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate(public_path.read_bytes())
    assert len(chain) == 2 and chain[1] == ca  # server.pem = leaf + CA
    chain[0].verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(chain[0].public_key(), ec.EllipticCurvePublicKey)
    assert chain[0].public_key().curve.name == "secp256r1"
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "mqtt.example.test"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.1.2.3"}
    remaining = chain[0].not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert remaining > datetime.timedelta(days=30)

    before = {p.name: p.read_bytes() for p in (cert_path, key_path, public_path)}
    assert generate_dev_certificate(tmp_path, ("mqtt.example.test", "10.1.2.3")) == (cert_path, key_path, public_path)
    assert {p.name: p.read_bytes() for p in (cert_path, key_path, public_path)} == before  # reused as is

    # A new name renews the server certificate but keeps the CA that devices already trust.
    generate_dev_certificate(tmp_path, ("other.example.test",))
    assert public_path.read_bytes() == before["mqttserver.pub.pem"]
    assert cert_path.read_bytes() != before["server.pem"]
    renewed = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
    renewed.verify_directly_issued_by(ca)
    assert "other.example.test" in renewed.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName)


def test_expiring_dev_certificate_is_replaced(tmp_path: Path) -> None:
    cert_path, key_path, public_path = generate_dev_certificate(tmp_path)
    ca_key = serialization.load_pem_private_key((tmp_path / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate(public_path.read_bytes())
    leaf = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
    now = datetime.datetime.now(datetime.UTC)
    server_key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    short = (
        x509.CertificateBuilder(extensions=list(leaf.extensions))
        .subject_name(leaf.subject)
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(hours=12))
        .sign(ca_key, hashes.SHA256())
    )
    cert_path.write_bytes(short.public_bytes(serialization.Encoding.PEM) + public_path.read_bytes())
    generate_dev_certificate(tmp_path)
    renewed = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
    assert renewed.not_valid_after_utc - now > datetime.timedelta(days=1)


def test_server_context_rejects_mismatched_key(tmp_path: Path, dev_cert: DevCert) -> None:
    other_key = tmp_path / "other.key"
    other_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(SSL.Error):
        make_server_context(str(dev_cert.cert), str(other_key))


# --- TLS -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
async def test_echo_with_hostname_check(dev_cert: DevCert, server_context: SSL.Context, server_hostname: str) -> None:
    async with _serve(server_context) as srv:
        reader, writer = await _tls_open(srv.port, _client_context(dev_cert), server_hostname)
        try:
            tls_object = writer.get_extra_info("ssl_object")
            assert tls_object.version() in ("TLSv1.2", "TLSv1.3")
            await _roundtrip(reader, writer, b"\x10hello")
            big = os.urandom(200 * 1024)  # many TLS records in both directions
            await _roundtrip(reader, writer, big)
            conn = await asyncio.wait_for(srv.connections.get(), TIMEOUT)
            assert isinstance(conn, TlsConnection)
            ip, port = writer.get_extra_info("sockname")[:2]
            assert conn.peer_address == f"{ip}:{port}"
            assert not conn.is_closing
        finally:
            await _close(writer)


async def test_tls12_client_accepted(
    dev_cert: DevCert, server_context: SSL.Context, self_signed_device: ClientCert
) -> None:
    ctx = _client_context(dev_cert, self_signed_device)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    async with _serve(server_context) as srv:
        reader, writer = await _tls_open(srv.port, ctx)
        try:
            assert writer.get_extra_info("ssl_object").version() == "TLSv1.2"
            await _roundtrip(reader, writer, b"over TLS 1.2")
            conn = await asyncio.wait_for(srv.connections.get(), TIMEOUT)
            assert conn.peer_certificate_chain == self_signed_device.ders
        finally:
            await _close(writer)


async def test_unknown_self_signed_client_certificate_is_accepted(
    dev_cert: DevCert, server_context: SSL.Context, self_signed_device: ClientCert
) -> None:
    async with _serve(server_context) as srv:
        reader, writer = await _tls_open(srv.port, _client_context(dev_cert, self_signed_device))
        try:
            await _roundtrip(reader, writer, b"ping")
            conn = await asyncio.wait_for(srv.connections.get(), TIMEOUT)
            assert conn.peer_certificate_chain == self_signed_device.ders
            assert conn.peer_certificate_chain[0] == self_signed_device.ders[0]
        finally:
            await _close(writer)


async def test_client_chain_is_leaf_first(
    dev_cert: DevCert, server_context: SSL.Context, chained_device: ClientCert
) -> None:
    async with _serve(server_context) as srv:
        reader, writer = await _tls_open(srv.port, _client_context(dev_cert, chained_device))
        try:
            await _roundtrip(reader, writer, b"ping")
            conn = await asyncio.wait_for(srv.connections.get(), TIMEOUT)
            chain = conn.peer_certificate_chain
            assert len(chain) == 2
            assert chain == chained_device.ders  # [leaf, intermediate]
            assert x509.load_der_x509_certificate(chain[0]).subject == _name("chained-device")
        finally:
            await _close(writer)


async def test_client_without_certificate_is_accepted(dev_cert: DevCert, server_context: SSL.Context) -> None:
    async with _serve(server_context) as srv:
        reader, writer = await _tls_open(srv.port, _client_context(dev_cert))
        try:
            await _roundtrip(reader, writer, b"ping")
            conn = await asyncio.wait_for(srv.connections.get(), TIMEOUT)
            assert conn.peer_certificate_chain == []
        finally:
            await _close(writer)


async def test_tls11_client_is_refused(
    dev_cert: DevCert, server_context: SSL.Context, caplog: pytest.LogCaptureFixture
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
            # Make sure this OpenSSL can still say a TLS 1.1 ClientHello at all (else the test proves nothing).
            probe = ctx.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO())
            with contextlib.suppress(ssl.SSLWantReadError):
                probe.do_handshake()
            if not outgoing.pending:
                raise ssl.SSLError("no ClientHello produced")
        except (ValueError, ssl.SSLError) as exc:
            pytest.skip(f"the local OpenSSL cannot make a TLS 1.1 client: {exc}")
    caplog.set_level(logging.DEBUG, logger="mqtt_gateway.tls")
    async with _serve(server_context) as srv:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _, writer = await _tls_open(srv.port, ctx)
            await _close(writer)
        assert srv.connections.empty()
        # The refusal came from the server's handshake (not the client giving up before sending).
        for _ in range(50):
            if any("handshake failed" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.02)
        failures = [r.getMessage() for r in caplog.records if "handshake failed" in r.getMessage()]
        assert failures and all(r.levelno == logging.DEBUG for r in caplog.records if "handshake" in r.getMessage())


async def test_silent_client_is_dropped_after_handshake_timeout(
    dev_cert: DevCert, server_context: SSL.Context
) -> None:
    async with _serve(server_context, handshake_timeout=0.5) as srv:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(HOST, srv.port)
        try:
            assert await _read_until_closed(reader) == b""
            elapsed = time.monotonic() - started
            assert 0.4 <= elapsed < 3.0, elapsed
        finally:
            await _close(writer)
        # The server still serves (and the timer does not hit clients that complete the handshake in time).
        reader, writer = await _tls_open(srv.port, _client_context(dev_cert))
        try:
            await _roundtrip(reader, writer, b"before")
            await asyncio.sleep(0.7)
            await _roundtrip(reader, writer, b"after the handshake timeout")
        finally:
            await _close(writer)


async def test_garbage_closes_only_that_connection(dev_cert: DevCert, server_context: SSL.Context) -> None:
    async with _serve(server_context) as srv:
        good_reader, good_writer = await _tls_open(srv.port, _client_context(dev_cert))
        try:
            await _roundtrip(good_reader, good_writer, b"first")
            for garbage in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x10\x0c\x00\x04MQTT\x04\x02\x00<\x00\x00"):
                reader, writer = await asyncio.open_connection(HOST, srv.port)
                try:
                    writer.write(garbage)
                    await writer.drain()
                    answer = await _read_until_closed(reader)
                    assert answer == b"" or answer[0] == 0x15  # nothing, or a TLS alert record
                finally:
                    await _close(writer)
            await _roundtrip(good_reader, good_writer, b"still here")
            assert srv.connections.qsize() == 1
        finally:
            await _close(good_writer)


async def test_client_rejecting_server_certificate_does_not_hurt_the_server(
    dev_cert: DevCert, server_context: SSL.Context
) -> None:
    async with _serve(server_context) as srv:
        untrusting = ssl.create_default_context()  # system CAs: our development CA is unknown
        with pytest.raises(ssl.SSLCertVerificationError):
            await _tls_open(srv.port, untrusting)
        reader, writer = await _tls_open(srv.port, _client_context(dev_cert))
        try:
            await _roundtrip(reader, writer, b"ok")
        finally:
            await _close(writer)


async def test_drain_waits_for_a_slow_reader(dev_cert: DevCert, server_context: SSL.Context) -> None:
    total = 8 * 1024 * 1024  # well above the socket buffers and the transport's high-water mark
    payload = os.urandom(total)
    done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def blast(conn: Connection) -> None:
        started = time.monotonic()
        for offset in range(0, total, 64 * 1024):
            conn.write(payload[offset : offset + 64 * 1024])
            await conn.drain()
        done.set_result(time.monotonic() - started)
        conn.close()
        await conn.wait_closed()

    async with _serve(server_context, blast) as srv:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (HOST, srv.port))
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(sock=sock, ssl=_client_context(dev_cert), server_hostname="localhost"), TIMEOUT
        )
        try:
            await asyncio.sleep(0.5)  # the server must be held up by drain() meanwhile
            assert not done.done()
            received = await asyncio.wait_for(reader.readexactly(total), TIMEOUT)
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
            assert await asyncio.wait_for(done, TIMEOUT) >= 0.45
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # clean close (close_notify)
        finally:
            await _close(writer)


async def test_close_is_idempotent_and_sends_eof(dev_cert: DevCert, server_context: SSL.Context) -> None:
    async def close_twice(conn: Connection) -> None:
        conn.write(b"bye")
        conn.close()
        conn.close()
        assert conn.is_closing
        conn.write(b"dropped")  # ignored after close, no error
        await asyncio.wait_for(conn.wait_closed(), TIMEOUT)
        await asyncio.wait_for(conn.wait_closed(), TIMEOUT)
        with pytest.raises(ConnectionError):
            await conn.drain()

    async with _serve(server_context, close_twice) as srv:
        reader, writer = await _tls_open(srv.port, _client_context(dev_cert))
        try:
            assert await _read_until_closed(reader) == b"bye"
        finally:
            await _close(writer)


async def test_client_eof_reaches_the_reader(dev_cert: DevCert, server_context: SSL.Context) -> None:
    results: asyncio.Queue[bytes] = asyncio.Queue()

    async def read_all(conn: Connection) -> None:
        results.put_nowait(await conn.reader.read())
        conn.close()

    async with _serve(server_context, read_all) as srv:
        reader, writer = await _tls_open(srv.port, _client_context(dev_cert))
        writer.write(b"last words")
        await writer.drain()
        await _close(writer)  # close_notify + FIN
        assert await asyncio.wait_for(results.get(), TIMEOUT) == b"last words"


def _half_closing_client(port: int, ctx: ssl.SSLContext, payload: bytes) -> bytes:
    """Blocking TLS client on a memory BIO: sends ``payload``, then a TCP FIN *without* close_notify, and
    returns what the server sends back until it closes."""
    with socket.create_connection((HOST, port), timeout=TIMEOUT) as sock:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")

        def flush() -> None:
            if outgoing.pending:
                sock.sendall(outgoing.read())

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                flush()
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed during the handshake") from None
                incoming.write(chunk)
        flush()
        tls.write(payload)
        flush()
        sock.shutdown(socket.SHUT_WR)
        received = b""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                data = tls.read(65536)
                if not data:  # close_notify
                    return received
                received += data
                continue
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return received
            chunk = sock.recv(65536)
            if not chunk:
                return received
            incoming.write(chunk)
        raise TimeoutError(f"no close from the server; received {received!r}")


async def test_tcp_half_close_reaches_the_reader_and_answers_still_go_out(
    dev_cert: DevCert, server_context: SSL.Context
) -> None:
    async def answer_after_eof(conn: Connection) -> None:
        data = await conn.reader.read()  # until EOF
        conn.write(b"got %d" % len(data))
        await conn.drain()
        conn.close()

    async with _serve(server_context, answer_after_eof) as srv:
        answer = await asyncio.wait_for(
            asyncio.to_thread(_half_closing_client, srv.port, _client_context(dev_cert), b"0123456789"), TIMEOUT + 1
        )
    assert answer == b"got 10"


def _make_ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    return _issue(cn, key, cn, key, ca=True), key


async def test_server_certificate_file_may_hold_a_chain(tmp_path: Path) -> None:
    root, root_key = _make_ca("test server root")
    inter_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    inter = _issue("test server intermediate", inter_key, "test server root", root_key, ca=True)
    now = datetime.datetime.now(datetime.UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(inter.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(inter_key, hashes.SHA256())
    )
    server = _write_client(tmp_path, "server", [leaf, inter], leaf_key)
    (tmp_path / "root.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    ctx = ssl.create_default_context(cafile=str(tmp_path / "root.pem"))  # trusts the root only
    async with _serve(make_server_context(str(server.certfile), str(server.keyfile))) as srv:
        reader, writer = await _tls_open(srv.port, ctx)  # needs the intermediate from the server
        try:
            await _roundtrip(reader, writer, b"chained")
        finally:
            await _close(writer)


async def test_handler_exception_closes_only_that_connection(dev_cert: DevCert, server_context: SSL.Context) -> None:
    async def explode(conn: Connection) -> None:
        if await conn.reader.readexactly(1) == b"!":
            raise RuntimeError("handler bug")
        await _echo(conn)

    async with _serve(server_context, explode) as srv:
        reader, writer = await _tls_open(srv.port, _client_context(dev_cert))
        try:
            writer.write(b"!")
            assert await _read_until_closed(reader) == b""
        finally:
            await _close(writer)
        reader, writer = await _tls_open(srv.port, _client_context(dev_cert))
        try:
            writer.write(b"?")
            await _roundtrip(reader, writer, b"fine")
        finally:
            await _close(writer)


async def test_paho_client_with_self_signed_certificate(
    dev_cert: DevCert, server_context: SSL.Context, self_signed_device: ClientCert
) -> None:
    first_bytes: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def mqtt_peek(conn: Connection) -> None:
        header = await asyncio.wait_for(conn.reader.readexactly(2), TIMEOUT)
        rest = await asyncio.wait_for(conn.reader.readexactly(header[1]), TIMEOUT)  # remaining length < 128 here
        first_bytes.set_result(header + rest)
        conn.close()

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="paho-tls-test", protocol=paho.MQTTv311)
    client.tls_set(
        ca_certs=str(dev_cert.public_ca),
        certfile=str(self_signed_device.certfile),
        keyfile=str(self_signed_device.keyfile),
    )
    client.username_pw_set("provision")
    async with _serve(server_context, mqtt_peek) as srv:

        def connect() -> None:  # TCP + TLS handshake (with hostname check) happen here, blocking
            client.connect(HOST, srv.port, keepalive=30)

        await asyncio.wait_for(asyncio.to_thread(connect), TIMEOUT)
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                client.loop(timeout=0.05)

        pump = asyncio.create_task(asyncio.to_thread(loop))
        try:
            connect_packet = await asyncio.wait_for(first_bytes, TIMEOUT)
            conn = await asyncio.wait_for(srv.connections.get(), TIMEOUT)
        finally:
            stop.set()
            await pump
            client.disconnect()
    assert connect_packet[0] == 0x10  # CONNECT
    assert b"MQTT" in connect_packet and b"paho-tls-test" in connect_packet and b"provision" in connect_packet
    assert conn.peer_certificate_chain == self_signed_device.ders


# --- plain TCP -----------------------------------------------------------------------------------------------


async def test_plain_server_echo() -> None:
    async with _serve(None) as srv:
        reader, writer = await asyncio.open_connection(HOST, srv.port)
        try:
            await _roundtrip(reader, writer, b"\x10plain")
            await _roundtrip(reader, writer, os.urandom(200 * 1024))
            conn = await asyncio.wait_for(srv.connections.get(), TIMEOUT)
            assert isinstance(conn, PlainConnection)
            assert isinstance(conn, Connection)
            assert conn.peer_certificate_chain == []
            ip, port = writer.get_extra_info("sockname")[:2]
            assert conn.peer_address == f"{ip}:{port}"
        finally:
            await _close(writer)
        assert await asyncio.wait_for(conn.reader.read(), TIMEOUT) == b""
        conn.close()
        conn.close()
        assert conn.is_closing
        await asyncio.wait_for(conn.wait_closed(), TIMEOUT)
