"""Transports for the MQTT gateway: plain TCP and TLS, behind one :class:`Connection` interface.

Why pyOpenSSL and not :mod:`ssl`: ThingsBoard devices authenticate with X.509 certificates that are often
self-signed and unknown to any CA. The TLS layer must *request* a client certificate and accept whatever
it gets; the MQTT CONNECT handler then looks the certificate up by its hash. The stdlib cannot do that
(``CERT_OPTIONAL`` without a matching CA fails the handshake, ``CERT_NONE`` never asks for a certificate,
and there is no verify callback: CPython issue #75425). pyOpenSSL can, and with memory BIOs it runs on the
asyncio event loop like any other protocol: bytes from the socket go into the SSL object, bytes the SSL
object produces go to the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from provisioning_common.certificates import validity_problem

from . import proxy_protocol

log = logging.getLogger(__name__)

__all__ = [
    "Admission",
    "Connection",
    "PlainConnection",
    "TlsConnection",
    "make_server_context",
    "start_plain_server",
    "start_tls_server",
]

#: Bytes asked of the SSL object per ``recv``/``bio_read``. A TLS record carries at most 16 KiB of plaintext.
_CHUNK = 65536


@runtime_checkable
class Connection(Protocol):
    """What the MQTT session needs from a client connection, the same for plain TCP and TLS."""

    reader: asyncio.StreamReader

    def write(self, data: bytes) -> None:
        """Queue ``data`` for sending; silently dropped once the connection is closing."""

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark.

        Raises :class:`ConnectionError` once the connection is lost.
        """

    def close(self) -> None:
        """Close the transport (buffered data is still flushed). Idempotent."""

    async def wait_closed(self) -> None:
        """Return once the transport is closed."""

    @property
    def peer_address(self) -> str:
        """``"ip:port"`` of the client."""

    @property
    def peer_certificate_chain(self) -> list[bytes]:
        """DER of the certificates the client presented, leaf first; ``[]`` for plain TCP or no certificate."""

    @property
    def is_closing(self) -> bool:
        """True once :meth:`close` was called or the connection was lost."""


ClientConnected = Callable[[Connection], Awaitable[None]]


class Admission(Protocol):
    """Counts connections from their TCP accept on (both listeners share one), for a connection cap."""

    def try_enter(self) -> bool:
        """Count a just-accepted connection in; False: refuse it (it was not counted)."""

    def leave(self) -> None:
        """A connection that was counted in is gone."""


def _format_peer(peername: object) -> str:
    # IPv4 ("ip", port) and IPv6 ("ip", port, flowinfo, scope_id) alike: "ip:port" (no brackets, so that
    # ``rsplit(":", 1)[0]`` gives the address back).
    if isinstance(peername, tuple) and len(peername) >= 2:
        return f"{peername[0]}:{peername[1]}"
    return str(peername) if peername else "unknown"


# --------------------------------------------------------------------------------------------------------------
# Plain TCP


class PlainConnection:
    """:class:`Connection` over the ``(reader, writer)`` pair of :func:`asyncio.start_server`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self._writer = writer
        self._peer = _format_peer(writer.get_extra_info("peername"))
        self._closed = False

    async def read_proxy_header(self, timeout: float) -> bool:
        """``MQTT_PROXY_PROTOCOL``: take the client's address from the PROXY header; False (closed): none."""
        try:
            async with asyncio.timeout(timeout):
                address = await proxy_protocol.read_header(self.reader)
        except (proxy_protocol.ProxyHeaderError, asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
            log.debug("closing %s: no valid PROXY header (%s)", self._peer, type(exc).__name__)
            self.close()
            return False
        if address is not None:
            self._peer = address
        return True

    def write(self, data: bytes) -> None:
        if self._closed or self._writer.is_closing():
            return
        self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()

    @property
    def peer_address(self) -> str:
        return self._peer

    @property
    def peer_certificate_chain(self) -> list[bytes]:
        return []

    @property
    def is_closing(self) -> bool:
        return self._closed or self._writer.is_closing()

    def __repr__(self) -> str:
        return f"<PlainConnection {self._peer}>"


async def start_plain_server(
    client_connected: ClientConnected,
    host: str,
    port: int,
    *,
    backlog: int = 1024,
    admission: Admission | None = None,
    refuse: ClientConnected | None = None,
    proxy_protocol_timeout: float | None = None,
) -> asyncio.Server:
    """Listen on ``host:port`` (plain TCP) and run ``client_connected(connection)`` per client, as a task.

    With ``admission``, a client it does not let in is handed to ``refuse`` instead (which may answer
    it before closing), or closed at once when there is no ``refuse``. With ``proxy_protocol_timeout``,
    every connection must start with a PROXY header within that many seconds (:mod:`.proxy_protocol`).
    """

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = PlainConnection(reader, writer)
        admitted = admission is None or admission.try_enter()
        handler = client_connected if admitted else refuse
        try:
            if proxy_protocol_timeout is not None and not await connection.read_proxy_header(proxy_protocol_timeout):
                return
            if handler is None:
                connection.close()
            else:
                await handler(connection)
        except Exception:
            log.exception("connection handler failed for %s", connection.peer_address)
            connection.close()
        finally:
            if admitted and admission is not None:
                admission.leave()

    return await asyncio.start_server(on_client, host, port, backlog=backlog)


# --------------------------------------------------------------------------------------------------------------
# TLS (pyOpenSSL over memory BIOs)


#: OpenSSL's verification errors for a certificate outside its validity period (X509_V_ERR_*).
_CERT_NOT_YET_VALID, _CERT_HAS_EXPIRED = 9, 10

#: TLS 1.2 suites: forward-secret key exchange (ECDHE) with an AEAD cipher (AES-GCM, ChaCha20-Poly1305) only -
#: no static RSA key exchange, no CBC. TLS 1.3's suites all are, and are configured separately.
TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


def _accept_any_certificate(
    connection: SSL.Connection, certificate: crypto.X509, errno: int, depth: int, preverify_ok: int
) -> bool:
    """Authentication is done at MQTT CONNECT by the certificate's hash, not by a CA: any issuer is accepted
    here. But the client's own certificate must be within its validity period (issue 13): OpenSSL reports
    that after the issuer errors it goes on past, and refusing then ends the handshake with the TLS alert
    that says so (certificate_expired, or bad_certificate for not yet valid); the gateway logs why at INFO.
    (``TlsConnection`` checks the leaf again once the handshake is done, should OpenSSL not have reported it.)"""
    if depth != 0 or errno not in (_CERT_NOT_YET_VALID, _CERT_HAS_EXPIRED):
        return True
    log.info("TLS client certificate refused: %s",
             validity_problem(certificate.to_cryptography()) or "outside its validity period")
    return False


def make_server_context(cert_file: str, key_file: str) -> SSL.Context:
    """A server context that requests (but does not require) a client certificate and accepts any.

    ``cert_file`` is PEM, the server certificate optionally followed by its intermediates/CA.
    """
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_NO_TICKET
        | SSL.OP_CIPHER_SERVER_PREFERENCE
    )
    # Devices connect once to provision: no session resumption (no cache, no tickets).
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.set_cipher_list(TLS12_CIPHERS)
    context.use_certificate_chain_file(cert_file)
    context.use_privatekey_file(key_file)
    context.check_privatekey()
    # VERIFY_PEER on a server = send a CertificateRequest; without VERIFY_FAIL_IF_NO_PEER_CERT a client
    # without a certificate is still let in; the callback makes any presented certificate acceptable.
    context.set_verify(SSL.VERIFY_PEER, _accept_any_certificate)
    return context


class TlsConnection(asyncio.Protocol):
    """One TLS client: the :class:`asyncio.Protocol` the server's transport drives *and* the
    :class:`Connection` the MQTT session uses."""

    def __init__(
        self,
        context: SSL.Context,
        client_connected: ClientConnected,
        handshake_timeout: float,
        tasks: set[asyncio.Task[None]],
        admission: Admission | None = None,
        proxy_protocol: bool = False,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        #: MQTT_PROXY_PROTOCOL: bytes received before the PROXY header was complete (None: no header expected).
        self._proxy_buffer: bytes | None = b"" if proxy_protocol else None
        self._ssl = SSL.Connection(context, None)
        self._ssl.set_accept_state()
        self._client_connected = client_connected
        self._handshake_timeout = handshake_timeout
        self._tasks = tasks
        self.reader = asyncio.StreamReader(loop=self._loop)
        self._transport: asyncio.Transport | None = None
        self._peer = "unknown"
        self._chain: list[bytes] = []
        self._handshake_done = False
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._lost = False
        self._eof = False
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._closed_future: asyncio.Future[None] = self._loop.create_future()
        self._admission = admission
        self._admitted = False

    # --- asyncio.Protocol ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; rely on the interface only.
        self._transport = transport  # type: ignore[assignment]
        self._peer = _format_peer(transport.get_extra_info("peername"))
        if self._admission is not None:
            if not self._admission.try_enter():
                # Over the connection cap: closed at accept, before any handshake work is spent on it.
                self._closing = True
                self._lost = True
                transport.close()
                return
            self._admitted = True
        # Read-side flow control: the StreamReader pauses the socket when its buffer is full.
        self.reader.set_transport(transport)
        self._handshake_timer = self._loop.call_later(self._handshake_timeout, self._on_handshake_timeout)

    def data_received(self, data: bytes) -> None:
        if self._lost or self._transport is None:
            return
        if self._proxy_buffer is not None:
            # The PROXY header comes before the TLS handshake (within its timeout), then TLS goes on as usual.
            self._proxy_buffer += data
            try:
                parsed = proxy_protocol.parse(self._proxy_buffer)
            except proxy_protocol.ProxyHeaderError as exc:
                self._fail(f"no valid PROXY header: {exc}")
                return
            if parsed is None:
                return
            length, address = parsed
            if address is not None:
                self._peer = address
            data, self._proxy_buffer = self._proxy_buffer[length:], None
            if not data:
                return
        try:
            self._ssl.bio_write(data)
        except SSL.Error as exc:  # should not happen with a memory BIO
            self._fail(f"bio_write: {exc!r}")
            return
        if not self._handshake_done and not self._do_handshake():
            return
        self._receive_plaintext()
        self._flush()  # reading may produce output (alerts, key updates)

    def eof_received(self) -> bool:
        if self._lost:
            return False
        if not self._handshake_done:
            log.debug("TLS client %s closed before the handshake finished", self._peer)
            self._cancel_handshake_timer()
            return False  # the transport closes itself
        # Like asyncio.start_server for plain TCP: the reader sees EOF, the session decides when to close.
        self._feed_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._closing = True
        if self._admitted and self._admission is not None:
            self._admitted = False
            self._admission.leave()
        self._cancel_handshake_timer()
        self._feed_eof()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("Connection lost"))
        self._drain_waiters.clear()
        if not self._closed_future.done():
            self._closed_future.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # --- handshake and record layer --------------------------------------------------------------------------

    def _do_handshake(self) -> bool:
        """Advance the handshake; True once it is complete."""
        try:
            self._ssl.do_handshake()
        except SSL.WantReadError:
            self._flush()
            return False
        except SSL.Error as exc:
            self._fail(f"TLS handshake failed: {_describe(exc)}")
            return False
        self._handshake_done = True
        self._cancel_handshake_timer()
        self._flush()
        self._chain = self._read_peer_chain()
        problem = validity_problem(x509.load_der_x509_certificate(self._chain[0])) if self._chain else None
        if problem:
            self._fail(f"TLS client certificate refused: {problem}")
            return False
        log.debug(
            "TLS handshake with %s done: %s %s, %d client certificate(s)",
            self._peer,
            self._ssl.get_protocol_version_name(),
            self._ssl.get_cipher_name(),
            len(self._chain),
        )
        task = self._loop.create_task(self._run_client())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _read_peer_chain(self) -> list[bytes]:
        # On the server side SSL_get_peer_cert_chain() does not contain the client's own certificate:
        # prepend SSL_get_peer_certificate() (and drop it from the rest should a library include it).
        leaf = self._ssl.get_peer_certificate(as_cryptography=True)
        if leaf is None:
            return []
        leaf_der = leaf.public_bytes(serialization.Encoding.DER)
        rest = [
            cert.public_bytes(serialization.Encoding.DER)
            for cert in self._ssl.get_peer_cert_chain(as_cryptography=True) or []
        ]
        if rest and rest[0] == leaf_der:
            rest = rest[1:]
        return [leaf_der, *rest]

    def _receive_plaintext(self) -> None:
        while True:
            try:
                data = self._ssl.recv(_CHUNK)
            except SSL.WantReadError:
                return
            except SSL.ZeroReturnError:
                # The client sent close_notify: end of its stream; the session closes (and answers it).
                self._feed_eof()
                return
            except (SSL.SysCallError, SSL.Error) as exc:
                self._fail(f"TLS read error: {_describe(exc)}")
                return
            if not data:
                return
            if not self._eof:
                self.reader.feed_data(data)

    def _feed_eof(self) -> None:
        if not self._eof:
            self._eof = True
            self.reader.feed_eof()

    def _flush(self) -> None:
        """Move what the SSL object produced to the socket."""
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self._ssl.bio_read(_CHUNK)
            except SSL.WantReadError:
                break
            except SSL.Error:
                break
            if not chunk:
                break
            chunks.append(chunk)
        if chunks and self._transport is not None and not self._lost:
            self._transport.write(b"".join(chunks))

    def _fail(self, reason: str) -> None:
        """A broken connection: send the alert OpenSSL may have produced, then drop the socket."""
        log.debug("closing TLS connection from %s: %s", self._peer, reason)
        self._cancel_handshake_timer()
        self._flush()
        self._feed_eof()
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def _on_handshake_timeout(self) -> None:
        self._handshake_timer = None
        if self._handshake_done or self._lost:
            return
        log.debug("TLS handshake with %s timed out after %.1f s", self._peer, self._handshake_timeout)
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def _cancel_handshake_timer(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    async def _run_client(self) -> None:
        try:
            await self._client_connected(self)
        except Exception:
            log.exception("connection handler failed for %s", self._peer)
            self.close()

    # --- Connection --------------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._closing or self._lost or not self._handshake_done or not data:
            return
        try:
            self._ssl.sendall(data)
        except SSL.Error as exc:
            self._fail(f"TLS write error: {_describe(exc)}")
            return
        self._flush()

    async def drain(self) -> None:
        if self._lost:
            raise ConnectionResetError("Connection lost")
        if not self._paused:
            return
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._cancel_handshake_timer()
        if self._handshake_done and not self._lost:
            # close_notify, so the client can tell a clean close from a truncation.
            with contextlib.suppress(SSL.Error):
                self._ssl.shutdown()
            self._flush()
        if self._transport is not None:
            self._transport.close()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed_future)

    @property
    def peer_address(self) -> str:
        return self._peer

    @property
    def peer_certificate_chain(self) -> list[bytes]:
        return list(self._chain)

    @property
    def is_closing(self) -> bool:
        return self._closing or self._lost or (self._transport is not None and self._transport.is_closing())

    def __repr__(self) -> str:
        return f"<TlsConnection {self._peer}>"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SSL.Error) and exc.args:
        return f"{type(exc).__name__}: {exc.args[0]}"
    return repr(exc)


async def start_tls_server(
    client_connected: ClientConnected,
    host: str,
    port: int,
    context: SSL.Context,
    *,
    handshake_timeout: float = 10.0,
    backlog: int = 1024,
    admission: Admission | None = None,
    proxy_protocol: bool = False,
) -> asyncio.Server:
    """Listen on ``host:port`` (TLS with ``context``) and run ``client_connected(connection)`` per client,
    as a task, once its handshake has succeeded. A failed or timed-out handshake closes that socket only.

    With ``admission``, a connection it does not let in is closed at accept: answering it would first
    cost a TLS handshake, the most expensive work a client can ask of us, at the moment we are full."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    return await loop.create_server(
        lambda: TlsConnection(context, client_connected, handshake_timeout, tasks, admission, proxy_protocol),
        host,
        port,
        backlog=backlog,
    )
