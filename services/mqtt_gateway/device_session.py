"""The device API of an authenticated MQTT session: ThingsBoard's ``MqttTransportHandler`` after CONNACK.

What a device may do (``topics`` names the topics):

* **publish** telemetry and client attributes (PUBACK once forwarded / stored), attribute requests and
  client-side RPCs (PUBACK at once; the answer comes on the matching ``.../response/{id}`` topic from a
  task, so a slow backend never blocks the read loop), and answers to server-side RPCs;
* **subscribe** to the device-API filters ThingsBoard grants (QoS = min(requested, 1)); everything else
  gets ``0x8F`` (MQTT 5) / ``0x80`` (3.1.1), as in ThingsBoard;
* **receive** shared-attribute updates (while subscribed to them) and server-side RPCs, which come from
  :class:`~provisioning_common.device_link.DeviceLinks` (this process's downlink queue, bound by device
  id while the session lives) and are written by a delivery task, one at a time, with back-pressure.

Refusals are ThingsBoard's (``processDevicePublish``, ``sendResponseForAdaptorErrorOrCloseContext``,
``getPubAckCallback``): a topic it does not define gets PUBACK ``0x90`` and the session stays; a payload
it cannot read gets PUBACK ``0x99`` on MQTT 5 QoS 1 (the session stays) and otherwise a close (MQTT 5:
DISCONNECT ``0x99``); more messages than the rate limit allows, or a backend that cannot take them, close
the session (MQTT 5: DISCONNECT ``0x83``) without storing anything; more requests in flight than
``DEVICE_MAX_INFLIGHT`` close it with ``0x97`` (quota exceeded). Nothing a device sends here reaches
another device's session.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, Protocol, TypeVar

from provisioning_common.bus import RpcError
from provisioning_common.contract import DOWNLINK_ATTRIBUTES, DOWNLINK_REVOKED, DOWNLINK_RPC
from provisioning_common.device_api import (
    SESSION_LIMITS_METHOD,
    DeviceApiError,
    RateLimit,
    parse_attributes,
    parse_attributes_request,
    parse_rpc_call,
    parse_rpc_response,
    render_attribute_update,
    render_attributes,
    render_server_rpc,
)
from provisioning_common.device_link import Attachment, Downlink
from provisioning_common.models import AttributesQuery
from provisioning_common.transport_api import TransportApi, is_json_document

from . import codec, topics
from .codec import PubAck, Publish, Subscribe, Unsubscribe
from .limits import EpisodeLog
from .topics import Family, Kind, Subscription

log = logging.getLogger(__name__)

# One WARNING when sessions start being closed for a reason, one INFO line with the count once it stops:
# an outage of the bus or of device_api, or a flood, closes thousands of sessions within seconds.
_BACKEND_FAILED = EpisodeLog(
    log, "device messages not forwarded (bus or device_api unavailable or too slow): their sessions are closed",
    "device sessions closed because a message could not be forwarded: {count} in {seconds} s")
_RATE_EXCEEDED = EpisodeLog(
    log, "devices over DEVICE_MESSAGES_RATE_LIMIT: their sessions are closed",
    "device sessions closed for the message rate limit: {count} in {seconds} s")
_QUOTA_EXCEEDED = EpisodeLog(
    log, "devices with more than DEVICE_MAX_INFLIGHT requests in flight: their sessions are closed",
    "device sessions closed for too many requests in flight: {count} in {seconds} s")

_T = TypeVar("_T")

# MQTT 5 reason codes (PUBACK, SUBACK, UNSUBACK, DISCONNECT).
SUCCESS = 0x00
NO_SUBSCRIPTION_EXISTED = 0x11
UNSPECIFIED_ERROR = 0x80
IMPLEMENTATION_SPECIFIC_ERROR = 0x83
NOT_AUTHORIZED = 0x87
TOPIC_FILTER_INVALID = 0x8F
TOPIC_NAME_INVALID = 0x90
QUOTA_EXCEEDED = 0x97
PAYLOAD_FORMAT_INVALID = 0x99

#: MQTT 5 CONNECT properties a device may send that bound what we send it.
RECEIVE_MAXIMUM = 0x21
MAXIMUM_PACKET_SIZE = 0x27

#: What a PUBLISH of the device API adds to its payload at most: fixed header (1 + up to 4 bytes of
#: remaining length), topic (2 + at most 64 bytes: every device-API topic with a 10-digit id fits),
#: packet id (2) and an empty MQTT 5 property block (1). ``getSessionLimits`` reports
#: MQTT_MAX_PACKET_BYTES minus this as ``maxPayloadSize``: a payload that size always gets through.
PUBLISH_OVERHEAD = 1 + 4 + 2 + 64 + 2 + 1


def _json_document(payload: bytes) -> bool:
    try:
        return is_json_document(payload)
    except RecursionError:
        return False


class Close(Exception):
    """End this session (after whatever was already written)."""


class Wire(Protocol):
    """What a device session needs of its connection (``session.MqttSession`` provides it)."""

    @property
    def level(self) -> int: ...

    def send(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def disconnect(self, reason_code: int) -> NoReturn:
        """MQTT 5: DISCONNECT with ``reason_code``; then end the session (raises :class:`Close`)."""

    def abort(self, reason_code: int) -> None:
        """Like :meth:`disconnect`, from outside the read loop: closes the connection instead of raising."""


class DeviceSession:
    """One authenticated device's side of the device API; the connection itself stays in ``MqttSession``."""

    def __init__(self, wire: Wire, api: TransportApi, device_id: str, *, max_packet_bytes: int,
                 connect_properties: dict[int, object] | None = None) -> None:
        settings = api.settings
        self._wire = wire
        self._api = api
        self.device_id = device_id
        #: When the device logged in (Unix time): a revocation after it ends the session (Downlink.revokes).
        self._since = time.time()
        self._max_inflight = settings.device_max_inflight
        self._rate = RateLimit(settings.device_messages_rate_limit)
        #: What ``getSessionLimits`` reports and what always fits in one PUBLISH of ours or the device's.
        self.max_payload_size = max_packet_bytes - PUBLISH_OVERHEAD
        properties = connect_properties or {}
        receive_maximum = properties.get(RECEIVE_MAXIMUM)
        client_max_packet = properties.get(MAXIMUM_PACKET_SIZE)
        #: MQTT 5 Receive Maximum: QoS 1 publishes of ours the device has not acknowledged yet, at most.
        self._receive_maximum = receive_maximum if isinstance(receive_maximum, int) else 65535
        self._client_max_packet = client_max_packet if isinstance(client_max_packet, int) else None
        #: Filter -> granted QoS (ThingsBoard's mqttQoSMap).
        self._subscriptions: dict[str, int] = {}
        #: Where attribute updates / server-side RPCs go; None while not subscribed to them.
        self._updates: Family | None = None
        self._rpc: Family | None = None
        #: Our QoS 1 publishes awaiting the device's PUBACK.
        self._unacked: set[int] = set()
        self._next_packet_id = 0
        #: Server-side RPCs delivered and awaiting the device's answer, by the id in their topic.
        self._pending: dict[int, Downlink] = {}
        self._next_rpc_id = 0
        #: Downlink messages not written yet, and RPCs held until the device subscribes to RPC.
        self._inbox: collections.deque[Downlink] = collections.deque()
        self._held: collections.deque[Downlink] = collections.deque()
        self._deliverer: asyncio.Task[None] | None = None
        #: Attribute requests and client-side RPCs being answered.
        self._tasks: set[asyncio.Task[None]] = set()
        self._attachment: Attachment | None = None
        self._closed = False

    # --- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Bind this process's downlink queue to the device: from now on its messages reach this session.
        Raises :class:`RpcError` when the broker is unreachable (the caller refuses the CONNECT)."""
        self._attachment = await self._api.links.attach(self.device_id, self._sink)

    async def close(self) -> None:
        """Stop receiving (always called, also after a failed open); drop what nobody can answer any more."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._deliverer is not None:
            self._deliverer.cancel()
        self._inbox.clear()
        self._held.clear()
        if self._pending:
            log.debug("session of %s ended with %d server-side RPCs unanswered", self.device_id, len(self._pending))
            self._pending.clear()
        if self._attachment is not None:
            attachment, self._attachment = self._attachment, None
            await self._api.links.detach(attachment)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1)

    # --- SUBSCRIBE / UNSUBSCRIBE / PUBACK ---------------------------------------------------------

    def on_subscribe(self, packet: Subscribe) -> bytes:
        level = self._wire.level
        codes: list[int] = []
        for topic_filter, qos in packet.topics:
            kind, family = topics.classify_filter(topic_filter)
            if kind is Subscription.REFUSED:
                log.debug("%s: subscription to %r refused", self.device_id, topic_filter)
                codes.append(TOPIC_FILTER_INVALID if level == 5 else UNSPECIFIED_ERROR)
                continue
            granted = min(qos, 1)
            self._subscriptions[topic_filter] = granted
            codes.append(granted)
            if kind is Subscription.ATTRIBUTE_UPDATES:
                self._updates = family
            elif kind is Subscription.RPC_REQUESTS:
                self._rpc = family
                if self._held:
                    self._inbox.extend(self._held)
                    self._held.clear()
                    self._wake()
        return codec.encode_suback(packet.packet_id, codes, protocol_level=level)

    def on_unsubscribe(self, packet: Unsubscribe) -> bytes:
        codes: list[int] = []
        for topic_filter in packet.topics:
            if self._subscriptions.pop(topic_filter, None) is None:
                codes.append(NO_SUBSCRIPTION_EXISTED)
                continue
            kind, _ = topics.classify_filter(topic_filter)
            if kind is Subscription.ATTRIBUTE_UPDATES:
                self._updates = None
            elif kind is Subscription.RPC_REQUESTS:
                self._rpc = None
            codes.append(SUCCESS)
        return codec.encode_unsuback(packet.packet_id, codes, protocol_level=self._wire.level)

    def on_puback(self, packet: PubAck) -> None:
        self._unacked.discard(packet.packet_id)

    # --- PUBLISH ---------------------------------------------------------------------------------

    async def on_publish(self, packet: Publish) -> None:
        route = topics.route_publish(packet.topic)
        kind = route.kind
        if kind is Kind.GATEWAY:
            # ThingsBoard: the gateway API of a device that is no gateway is ignored, without a PUBACK.
            log.debug("%s: %s is the gateway API; this device is no gateway", self.device_id, packet.topic)
            return
        if kind is Kind.UNKNOWN:
            log.debug("%s: publish to %r: not a topic of the device API", self.device_id, packet.topic)
            self._ack(packet, TOPIC_NAME_INVALID)
            return
        if kind is Kind.TELEMETRY:
            await self._telemetry(packet)
        elif kind is Kind.ATTRIBUTES:
            await self._attributes(packet)
        elif kind is Kind.ATTRIBUTES_REQUEST:
            self._attributes_request(packet, route.family, route.request_id)
        elif kind is Kind.RPC_REQUEST:
            self._client_rpc(packet, route.family, route.request_id)
        else:
            await self._rpc_response(packet, route.request_id)

    def _ack(self, packet: Publish, reason_code: int = SUCCESS) -> None:
        if packet.qos == 1 and packet.packet_id is not None:
            self._wire.send(codec.encode_puback(packet.packet_id, reason_code=reason_code,
                                                protocol_level=self._wire.level))

    def _invalid(self, packet: Publish, why: str) -> None:
        """ThingsBoard's answer to a payload it cannot read: PUBACK 0x99 where the device can see it (MQTT 5,
        QoS 1) and the session stays; otherwise the session is closed (MQTT 5: DISCONNECT 0x99)."""
        log.debug("%s: %s: %s", self.device_id, packet.topic, why)
        if self._wire.level == 5 and packet.qos == 1:
            self._ack(packet, PAYLOAD_FORMAT_INVALID)
            return
        self._wire.disconnect(PAYLOAD_FORMAT_INVALID)

    def _check_rate(self) -> None:
        """ThingsBoard's rate limit (transport.rate_limits / the tenant profile's device limits): a message
        over it is not processed and the session is closed (``getPubAckCallback.onError``)."""
        if not self._rate.allow():
            _RATE_EXCEEDED.event(f"device {self.device_id}, limit {self._rate.spec}")
            self._wire.disconnect(IMPLEMENTATION_SPECIFIC_ERROR)

    def _failed(self, what: str, exc: RpcError) -> NoReturn:
        _BACKEND_FAILED.event(f"{what} of {self.device_id}: {exc}")
        self._wire.disconnect(IMPLEMENTATION_SPECIFIC_ERROR)

    async def _telemetry(self, packet: Publish) -> None:
        if not _json_document(packet.payload):
            self._invalid(packet, "telemetry must be a JSON object or array")
            return
        self._check_rate()
        try:
            await self._api.publish_telemetry(self.device_id, packet.payload)
        except RpcError as exc:
            self._failed("telemetry", exc)
        self._ack(packet)

    async def _attributes(self, packet: Publish) -> None:
        try:
            values = parse_attributes(packet.payload)
        except DeviceApiError as exc:
            self._invalid(packet, str(exc))
            return
        self._check_rate()
        try:
            await self._api.save_client_attributes(self.device_id, values)
        except RpcError as exc:
            self._failed("client attributes", exc)
        self._ack(packet)

    def _attributes_request(self, packet: Publish, family: Family, raw_id: str) -> None:
        request_id = topics.parse_request_id(raw_id)
        if request_id is None:
            self._invalid(packet, f"request id {raw_id[:32]!r} is not a number")
            return
        try:
            query = parse_attributes_request(self.device_id, packet.payload)
        except DeviceApiError as exc:
            self._invalid(packet, str(exc))
            return
        self._check_rate()
        self._ack(packet)  # at once, in order; the answer follows on the response topic
        self._spawn(self._answer_attributes, family.attributes_response + str(request_id), query)

    def _client_rpc(self, packet: Publish, family: Family, raw_id: str) -> None:
        request_id = topics.parse_request_id(raw_id)
        if request_id is None:
            self._invalid(packet, f"request id {raw_id[:32]!r} is not a number")
            return
        try:
            call = parse_rpc_call(packet.payload)
        except DeviceApiError as exc:
            self._invalid(packet, str(exc))
            return
        if call["method"] != SESSION_LIMITS_METHOD:  # ThingsBoard answers this one without counting it
            self._check_rate()
        self._ack(packet)
        self._spawn(self._answer_client_rpc, family.rpc_response + str(request_id), call)

    async def _rpc_response(self, packet: Publish, raw_id: str) -> None:
        request_id = topics.parse_request_id(raw_id)
        if request_id is None:
            self._invalid(packet, f"request id {raw_id[:32]!r} is not a number")
            return
        try:
            body = parse_rpc_response(packet.payload)
        except DeviceApiError as exc:
            self._invalid(packet, str(exc))
            return
        self._check_rate()
        downlink = self._pending.pop(request_id, None)
        if downlink is None:
            # Not a request of this session (never sent, answered already, expired, or another device's).
            log.debug("%s answered RPC %d, which it has no request of", self.device_id, request_id)
        else:
            try:
                await self._api.links.answer(downlink, body)
            except RpcError as exc:
                self._failed("RPC answer", exc)
        self._ack(packet)

    # --- answers from tasks ----------------------------------------------------------------------

    def _spawn(self, answer: Callable[[str, _T], Awaitable[None]], topic: str, request: _T) -> None:
        if len(self._tasks) >= self._max_inflight:
            # ThingsBoard's message queue per device is full: DISCONNECT "quota exceeded".
            _QUOTA_EXCEEDED.event(f"device {self.device_id}, limit {self._max_inflight}")
            self._wire.disconnect(QUOTA_EXCEEDED)
        task = asyncio.create_task(self._guard(answer, topic, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guard(self, answer: Callable[[str, _T], Awaitable[None]], topic: str, request: _T) -> None:
        try:
            await answer(topic, request)
        except (ConnectionError, Close):
            pass
        except Exception:  # a bug: one request's failure never ends the gateway
            log.exception("answering %s failed", self.device_id)
            self._wire.abort(IMPLEMENTATION_SPECIFIC_ERROR)

    async def _answer_attributes(self, topic: str, query: AttributesQuery) -> None:
        try:
            snapshot = await self._api.get_attributes(query)
        except RpcError as exc:
            _BACKEND_FAILED.event(f"attribute request of {self.device_id}: {exc}")
            self._wire.abort(IMPLEMENTATION_SPECIFIC_ERROR)
            return
        self._publish(topic, render_attributes(snapshot))
        await self._wire.drain()

    async def _answer_client_rpc(self, topic: str, call: dict[str, Any]) -> None:
        answer = await self._api.client_rpc(self.device_id, call, max_payload_size=self.max_payload_size)
        if answer is None:
            return  # no backend answered in time: the device gets nothing, as from ThingsBoard
        self._publish(topic, answer)
        await self._wire.drain()

    # --- downlink ----------------------------------------------------------------------------------

    def _sink(self, downlink: Downlink) -> None:
        """DeviceLinks' callback (must not block): queue, and make sure the delivery task runs."""
        if self._closed:
            return
        if downlink.kind == DOWNLINK_REVOKED:
            if not downlink.revokes(self._since):
                return  # it logged in after the revocation, with what is valid now
            # Its credentials were revoked or replaced: the session ends now, whatever is queued (MQTT 5: 0x87).
            log.info("session of %s closed: its credentials were revoked", self.device_id)
            self._closed = True
            self._wire.abort(NOT_AUTHORIZED)
            return
        if len(self._inbox) >= self._max_inflight:
            log.debug("%s is not reading: a %s message was dropped", self.device_id, downlink.kind)
            return
        self._inbox.append(downlink)
        self._wake()

    def _wake(self) -> None:
        if self._inbox and (self._deliverer is None or self._deliverer.done()) and not self._closed:
            self._deliverer = asyncio.create_task(self._deliver())

    async def _deliver(self) -> None:
        try:
            while self._inbox and not self._closed:
                self._deliver_one(self._inbox.popleft())
                await self._wire.drain()
        except (ConnectionError, Close):
            pass
        except Exception:  # a bug: this session stops receiving, the gateway goes on
            log.exception("delivering to %s failed", self.device_id)
            self._wire.abort(IMPLEMENTATION_SPECIFIC_ERROR)

    def _deliver_one(self, downlink: Downlink) -> None:
        if downlink.expired():
            return
        if downlink.kind == DOWNLINK_ATTRIBUTES:
            if self._updates is None:
                log.debug("%s is not subscribed to attribute updates: one dropped", self.device_id)
                return
            self._publish(self._updates.attributes, render_attribute_update(downlink))
        elif downlink.kind == DOWNLINK_RPC:
            self._deliver_rpc(downlink)

    def _deliver_rpc(self, downlink: Downlink) -> None:
        if self._rpc is None:
            # As ThingsBoard's device actor: an RPC waits (until its deadline) for the device to subscribe.
            self._prune(self._held)
            if len(self._held) >= self._max_inflight:
                log.debug("%s: RPC %r not delivered (not subscribed, %d waiting)", self.device_id,
                          downlink.body.get("method"), len(self._held))
                return
            self._held.append(downlink)
            return
        if downlink.two_way:
            for request_id in [i for i, d in self._pending.items() if d.expired()]:
                del self._pending[request_id]
            if len(self._pending) >= self._max_inflight:
                log.debug("%s: RPC %r not delivered (%d unanswered)", self.device_id, downlink.body.get("method"),
                          len(self._pending))
                return
        self._next_rpc_id += 1
        request_id = self._next_rpc_id
        if self._publish(self._rpc.rpc_request + str(request_id), render_server_rpc(downlink)) and downlink.two_way:
            self._pending[request_id] = downlink

    @staticmethod
    def _prune(queue: collections.deque[Downlink]) -> None:
        kept = [d for d in queue if not d.expired()]
        if len(kept) != len(queue):
            queue.clear()
            queue.extend(kept)

    def _publish(self, topic: str, payload: bytes) -> bool:
        """Write one PUBLISH at the QoS of the device's matching subscription (ThingsBoard: QoS 1 when none
        matches). False when it cannot go: too many unacknowledged (MQTT 5 Receive Maximum) or larger than
        the device's Maximum Packet Size (MQTT-3.1.2-25: discarded)."""
        qos = next((granted for f, granted in self._subscriptions.items() if topics.filter_matches(f, topic)), 1)
        packet_id = None
        if qos:
            if len(self._unacked) >= min(self._receive_maximum, 65535):
                log.debug("%s: %d publishes unacknowledged; one to %s dropped", self.device_id, len(self._unacked),
                          topic)
                return False
            packet_id = self._packet_id()
        data = codec.encode_publish(topic, payload, qos=qos, packet_id=packet_id, protocol_level=self._wire.level)
        if self._client_max_packet is not None and len(data) > self._client_max_packet:
            log.debug("%s: a %d-byte publish to %s exceeds the device's maximum packet size", self.device_id,
                      len(data), topic)
            return False
        if packet_id is not None:
            self._unacked.add(packet_id)
        self._wire.send(data)
        return True

    def _packet_id(self) -> int:
        while True:
            self._next_packet_id = self._next_packet_id % 0xFFFF + 1
            if self._next_packet_id not in self._unacked:
                return self._next_packet_id

    # --- for tests ----------------------------------------------------------------------------------

    @property
    def pending_rpcs(self) -> int:
        return len(self._pending)
