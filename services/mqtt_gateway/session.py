"""One device connection: CONNECT, then either a provisioning session or an authenticated device session.

Behaviour follows ThingsBoard's ``MqttTransportHandler`` (spec §3.2, §7, §9): the provisioning
rules themselves live in provisioning-core and who may connect in ``provisioning_common.device_auth``
(shared with broker_auth); this class only speaks MQTT and calls ``TransportApi``. What an
authenticated device may do after CONNACK (telemetry, attributes, RPC) is ``device_session``'s.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import uuid
from dataclasses import dataclass
from typing import NoReturn

from provisioning_common import device_auth
from provisioning_common.bus import RpcError
from provisioning_common.device_auth import Presented, Verdict
from provisioning_common.dialects import render_error
from provisioning_common.models import MSG_TIMEOUT, Dialect, ProvisionStatus, Transport
from provisioning_common.mqtt_topics import GATEWAY_REQUEST_TOPIC, GATEWAY_RESPONSE_TOPIC
from provisioning_common.transport_api import OutcomeKind, TransportApi

from . import codec
from .codec import (
    Connect,
    Disconnect,
    IdentifierRejected,
    PingReq,
    ProtocolError,
    PubAck,
    Publish,
    Subscribe,
    Unsubscribe,
    UnsupportedProtocol,
)
from .device_session import NO_SUBSCRIPTION_EXISTED, TOPIC_FILTER_INVALID, Close, DeviceSession
from .tls import Connection

log = logging.getLogger(__name__)

REQUEST_TOPIC = GATEWAY_REQUEST_TOPIC
RESPONSE_TOPIC = GATEWAY_RESPONSE_TOPIC

# CONNACK return codes (3.1/3.1.1) and their MQTT 5 reason codes.
ACCEPTED = 0
_REFUSED_PROTOCOL = {3: 0x01, 4: 0x01, 5: 0x84}
_REFUSED_IDENTIFIER = {3: 0x02, 4: 0x02, 5: 0x85}
#: MQTT 5 CONNACK property: the client identifier the server assigned to an empty one.
ASSIGNED_CLIENT_IDENTIFIER = 0x12
_SERVER_UNAVAILABLE = {3: 0x03, 4: 0x03, 5: 0x88}
_NOT_AUTHORIZED = {3: 0x05, 4: 0x05, 5: 0x87}
_CONNECTION_RATE_EXCEEDED = 0x9F

# MQTT 5 reason codes used on PUBACK / SUBACK / DISCONNECT.
RC_UNSPECIFIED = 0x80
RC_IMPLEMENTATION_SPECIFIC = 0x83
RC_TOPIC_FILTER_INVALID = TOPIC_FILTER_INVALID
RC_TOPIC_NAME_INVALID = 0x90
RC_PAYLOAD_FORMAT_INVALID = 0x99
RC_QOS_NOT_SUPPORTED = 0x9B
#: A rate limit refused the request (README "Rate limits"), or a second provision request on one connection.
RC_QUOTA_EXCEEDED = 0x97


@dataclass(frozen=True)
class SessionLimits:
    """Per-connection limits (settings ``MQTT_*``); every one bounds how long a socket can be held."""

    max_packet_bytes: int
    #: From TCP accept to a complete CONNECT.
    connect_timeout_s: float
    provision_close_s: float
    #: A connection with keep-alive 0 is closed after this long without a packet (keep-alive > 0: 1.5 x it).
    idle_timeout_s: float = 300.0
    #: From the first byte of a packet, the rest must arrive within this.
    packet_timeout_s: float = 30.0


#: Device sessions' downlink releases still running after their session ended (kept referenced until done).
_RELEASING: set[asyncio.Future[None]] = set()


class MqttSession:
    def __init__(self, conn: Connection, api: TransportApi, limits: SessionLimits) -> None:
        self._conn = conn
        self._api = api
        self._limits = limits
        self._level = 4
        self._keep_alive = 0
        self._device: DeviceSession | None = None
        self._provisioning = False
        #: A provisioning connection serves one provision request (README "MQTT"); set at the first.
        self._requested = False
        #: QoS granted on /provision/response, None while not subscribed (ThingsBoard then uses 1).
        self._response_qos: int | None = None
        self._protobuf = False
        self._next_packet_id = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()
        #: Closes a provisioning connection MQTT_PROVISION_CLOSE_S after its answer; cancelled when the session
        #: ends first (the device disconnected), else it keeps the connection (transport, streams) until it fires.
        self._close_timer: asyncio.TimerHandle | None = None

    @property
    def busy(self) -> bool:
        """True while a provision request of this session is being answered."""
        return bool(self._tasks)

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        accepted = False
        try:
            try:
                async with asyncio.timeout(self._limits.connect_timeout_s):
                    connect = await self._read(None)
            except UnsupportedProtocol:
                # The client's level is unknown to us: answer in 3.1.1's format (0x01), as brokers do.
                self._send(codec.encode_connack(_REFUSED_PROTOCOL[4], protocol_level=4))
                return
            except IdentifierRejected as exc:
                level = exc.protocol_level if exc.protocol_level in _REFUSED_IDENTIFIER else 4
                self._send(codec.encode_connack(_REFUSED_IDENTIFIER[level], protocol_level=level))
                return
            if not isinstance(connect, Connect):  # decode_packet guarantees it; defensive
                return
            self._level = connect.protocol_level
            self._keep_alive = connect.keep_alive
            if not await self._accept(connect):
                return
            accepted = True
            await self._serve()
        except ProtocolError as exc:
            if accepted and self._level == 5:
                # MQTT 5 tells the client why (0x81 malformed, 0x82 protocol error, 0x95 packet too large), as
                # ThingsBoard does on a decoding failure; 3.1/3.1.1 just close.
                self._send(codec.encode_disconnect(exc.reason_code, protocol_level=5))
            log.debug("closing %s: %s", self._conn.peer_address, type(exc).__name__)
        except (Close, asyncio.IncompleteReadError, ConnectionError, TimeoutError, EOFError) as exc:
            log.debug("closing %s: %s", self._conn.peer_address, type(exc).__name__)
        finally:
            await self._finish()

    async def _finish(self) -> None:
        if self._device is not None:
            # The socket first (what was written still goes out), then the downlink binding, always. Waited for
            # at most the bus timeout, but never cancelled: an AMQP unbind cancelled in flight closes the
            # downlink channel (and with it the gateway's queue); when thousands of sessions end at once
            # their unbinds queue up on that channel for longer than that.
            self._conn.close()
            closing = asyncio.ensure_future(self._device.close())
            _RELEASING.add(closing)
            closing.add_done_callback(_RELEASING.discard)
            await asyncio.wait([closing], timeout=self._api.timeout)
        if self._tasks:
            # Let answers in flight reach the device before the socket goes (bounded by the bus timeout).
            await asyncio.wait(list(self._tasks), timeout=self._api.timeout + 1)
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._closed.set()
        self._conn.close()
        with contextlib.suppress(Exception):
            await self._conn.wait_closed()

    async def finished(self) -> None:
        """Returns once the session is over (its device's downlink binding released)."""
        await self._closed.wait()

    async def close_gracefully(self, timeout: float) -> None:
        """Used on shutdown: wait (bounded) for in-flight answers, then close."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        self._conn.close()

    # --- io -------------------------------------------------------------------------------

    async def _read(self, level: int | None, idle_timeout: float | None = None) -> codec.Packet:
        return await codec.read_packet(
            self._conn.reader,
            max_packet_size=self._limits.max_packet_bytes,
            protocol_level=level,
            idle_timeout=idle_timeout,
            packet_timeout=self._limits.packet_timeout_s,
        )

    def _send(self, data: bytes) -> None:
        if data and not self._conn.is_closing:
            self._conn.write(data)

    def _disconnect(self, reason_code: int) -> NoReturn:
        """MQTT 5 tells the client why; 3.1/3.1.1 just close."""
        if self._level == 5:
            self._send(codec.encode_disconnect(reason_code, protocol_level=5))
        raise Close

    # ``device_session.Wire``: what the device API writes through.

    @property
    def level(self) -> int:
        return self._level

    def send(self, data: bytes) -> None:
        self._send(data)

    async def drain(self) -> None:
        await self._conn.drain()

    def disconnect(self, reason_code: int) -> NoReturn:
        self._disconnect(reason_code)

    def abort(self, reason_code: int) -> None:
        if self._level == 5:
            self._send(codec.encode_disconnect(reason_code, protocol_level=5))
        self._conn.close()

    def _packet_id(self) -> int:
        self._next_packet_id = self._next_packet_id % 0xFFFF + 1
        return self._next_packet_id

    # --- CONNECT ----------------------------------------------------------------------------

    async def _accept(self, connect: Connect) -> bool:
        """CONNACK by the device-authentication policy: a provisioning session, a device, or a refusal."""
        chain = [base64.b64encode(der).decode() for der in self._conn.peer_certificate_chain]
        presented = Presented.from_connect(connect.client_id, connect.username, connect.password, chain)
        decision = await device_auth.decide(presented, self._api.authenticate, self._provision_chain,
                                            failures=self._api.auth_failures,
                                            source=self._conn.peer_address.rsplit(":", 1)[0])
        if decision.verdict is Verdict.PROVISIONING:
            self._provisioning = True
        elif decision.verdict is Verdict.AUTHENTICATED and decision.device_id:
            if not await self._open_device(decision.device_id, connect):
                return False
        else:
            if decision.verdict is Verdict.UNAVAILABLE:
                # ThingsBoard's answer when the credentials check fails (onError): retry later, not a denial.
                log.warning("authentication unavailable: %s", decision.detail)
                code = _SERVER_UNAVAILABLE[self._level]
            elif decision.verdict is Verdict.LIMITED:
                # Too many wrong logins from this address (AUTH_FAILURES_PER_MINUTE): MQTT 5 "connection rate
                # exceeded"; 3.1.1 has no such code, so "not authorized".
                code = _CONNECTION_RATE_EXCEEDED if self._level == 5 else _NOT_AUTHORIZED[self._level]
            else:
                code = _NOT_AUTHORIZED[self._level]
            self._send(codec.encode_connack(code, protocol_level=self._level))
            return False
        properties: dict[int, object] = {}
        if self._level == 5 and not connect.client_id:
            # MQTT-3.2.2-16: a server that accepts an empty identifier tells the client the one it assigned.
            properties[ASSIGNED_CLIENT_IDENTIFIER] = f"auto-{uuid.uuid4().hex}"
        self._send(codec.encode_connack(ACCEPTED, protocol_level=self._level, properties=properties))
        return True

    async def _open_device(self, device_id: str, connect: Connect) -> bool:
        """Bind the device's downlink before CONNACK, so that a device told it is connected can be reached;
        a broker that cannot bind it gets ThingsBoard's answer to a failed session open (server unavailable)."""
        self._device = DeviceSession(self, self._api, device_id, max_packet_bytes=self._limits.max_packet_bytes,
                                     connect_properties=connect.properties)
        try:
            await self._device.open()
        except RpcError as exc:
            log.warning("device session not opened: %s", exc)
            self._send(codec.encode_connack(_SERVER_UNAVAILABLE[self._level], protocol_level=self._level))
            return False
        return True

    async def _provision_chain(self, chain: list[str]) -> str | None:
        """An unknown leaf: maybe its chain reaches the CA of an X509_CERTIFICATE_CHAIN profile (spec §8)."""
        provisioned = await self._api.provision_x509_chain(
            chain, transport=Transport.MQTT, source_address=self._conn.peer_address.rsplit(":", 1)[0]
        )
        if provisioned.status is ProvisionStatus.SUCCESS and provisioned.device_id:
            return provisioned.device_id
        return None

    # --- packets ----------------------------------------------------------------------------

    async def _serve(self) -> None:
        # MQTT's rule for keep-alive > 0; keep-alive 0 ("never") would let an idle socket stay for ever,
        # so such sessions get the inactivity limit ThingsBoard applies (transport.sessions.inactivity_timeout).
        idle_limit = self._keep_alive * 1.5 if self._keep_alive else self._limits.idle_timeout_s
        while True:
            try:
                packet = await self._read(self._level, idle_limit)
            except TimeoutError as exc:
                log.debug("closing %s: %s", self._conn.peer_address, exc)
                raise Close from None
            device = self._device
            if isinstance(packet, PingReq):
                self._send(codec.encode_pingresp())
            elif isinstance(packet, Publish):
                if packet.qos == 2:
                    # QoS 2 would be acknowledged with PUBREC, not PUBACK: refuse it outright.
                    self._disconnect(RC_QOS_NOT_SUPPORTED)
                if device is not None:
                    await device.on_publish(packet)
                else:
                    await self._on_publish(packet)
            elif isinstance(packet, Subscribe):
                self._send(device.on_subscribe(packet) if device is not None else self._on_subscribe(packet))
            elif isinstance(packet, Unsubscribe):
                self._send(device.on_unsubscribe(packet) if device is not None else self._on_unsubscribe(packet))
            elif isinstance(packet, Disconnect):
                raise Close
            elif isinstance(packet, PubAck):
                if device is not None:
                    device.on_puback(packet)  # acknowledgement of our QoS 1 publish
                continue
            else:
                raise ProtocolError("unexpected packet", 0x82)
            await self._conn.drain()

    # --- the provisioning session (an authenticated device's is device_session's) -------------------

    def _on_subscribe(self, packet: Subscribe) -> bytes:
        refused = RC_TOPIC_FILTER_INVALID if self._level == 5 else RC_UNSPECIFIED
        codes: list[int] = []
        for topic, qos in packet.topics:
            if self._provisioning and topic == RESPONSE_TOPIC:
                granted = min(qos, 1)
                self._response_qos = granted
                codes.append(granted)
            else:
                codes.append(refused)
        return codec.encode_suback(packet.packet_id, codes, protocol_level=self._level)

    def _on_unsubscribe(self, packet: Unsubscribe) -> bytes:
        """ThingsBoard's provisioning session: 0x00 for /provision/response when subscribed, 0x11 (no
        subscription existed) otherwise (MQTT 5 only carries the codes)."""
        codes: list[int] = []
        for topic in packet.topics:
            if topic == RESPONSE_TOPIC and self._response_qos is not None:
                self._response_qos = None
                codes.append(0)
            else:
                codes.append(NO_SUBSCRIPTION_EXISTED)
        return codec.encode_unsuback(packet.packet_id, codes, protocol_level=self._level)

    async def _on_publish(self, packet: Publish) -> None:
        if packet.topic != REQUEST_TOPIC:
            self._puback_then_disconnect(packet, RC_TOPIC_NAME_INVALID)
        if self._requested:
            # One provision request per connection (as ThingsBoard, which ends a provisioning session once it
            # has answered): a second one is not processed; PUBACK 0x97 (quota exceeded, MQTT 5), then the
            # connection is closed (the first request's answer still goes out).
            self._puback_then_disconnect(packet, RC_QUOTA_EXCEEDED)
        self._requested = True
        task = asyncio.create_task(self._provision(packet))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _puback_then_disconnect(self, packet: Publish, reason_code: int) -> NoReturn:
        """ThingsBoard acknowledges with a reason code (visible in MQTT 5 only), then disconnects."""
        if packet.qos >= 1 and packet.packet_id is not None:
            self._send(codec.encode_puback(packet.packet_id, reason_code=reason_code, protocol_level=self._level))
        self._disconnect(reason_code)

    # --- provisioning ------------------------------------------------------------------------

    async def _provision(self, packet: Publish) -> None:
        try:
            await self._answer_provision(packet)
        except Close:
            self._conn.close()
        except ConnectionError:
            log.debug("%s left before its provision answer", self._conn.peer_address)
            self._conn.close()
        except Exception:  # never let one request kill the server
            log.exception("provision request failed on %s", self._conn.peer_address)
            self._conn.close()

    async def _answer_provision(self, packet: Publish) -> None:
        outcome = await self._api.provision(
            packet.payload,
            transport=Transport.MQTT,
            source_address=self._conn.peer_address.rsplit(":", 1)[0],
            protobuf_fallback=True,
        )
        if outcome.kind is OutcomeKind.BAD_REQUEST:
            if outcome.dialect is Dialect.PROTOBUF:
                # Neither JSON nor protobuf: ThingsBoard's AdaptorException.
                if self._level == 5:
                    self._puback_then_disconnect(packet, RC_PAYLOAD_FORMAT_INVALID)
                raise Close
            self._puback_then_disconnect(packet, RC_IMPLEMENTATION_SPECIFIC)
        if outcome.dialect is Dialect.PROTOBUF:
            self._protobuf = True  # sticky for the session, as in ThingsBoard
        body = outcome.body
        if outcome.kind is OutcomeKind.UNAVAILABLE:
            # Never silence: tell the device, then close as ThingsBoard does on a core error.
            if self._protobuf:
                body = render_error(Dialect.PROTOBUF, MSG_TIMEOUT)
            self._publish_response(body)
            self._puback_then_disconnect(packet, RC_IMPLEMENTATION_SPECIFIC)
        if outcome.result is not None and outcome.result.retry_after_s is not None:
            # A rate limit: the FAILURE answer ("retry later"), PUBACK 0x97 (quota exceeded, MQTT 5), then closed.
            self._publish_response(body)
            self._puback_then_disconnect(packet, RC_QUOTA_EXCEEDED)
        # PUBACK and the answer in one write (one system call, one segment): the order the device sees is the same.
        puback = (codec.encode_puback(packet.packet_id, protocol_level=self._level)
                  if packet.qos == 1 and packet.packet_id is not None else b"")
        self._send(puback + self._response(body))
        await self._conn.drain()
        if self._limits.provision_close_s > 0:
            self._close_timer = asyncio.get_running_loop().call_later(self._limits.provision_close_s, self._conn.close)

    def _publish_response(self, body: bytes) -> None:
        self._send(self._response(body))

    def _response(self, body: bytes) -> bytes:
        """The PUBLISH of ``body`` on the response topic, at the QoS the device subscribed with (1 unsubscribed)."""
        qos = 1 if self._response_qos is None else self._response_qos
        return codec.encode_publish(
            RESPONSE_TOPIC, body, qos=qos, packet_id=self._packet_id() if qos else None, protocol_level=self._level
        )
