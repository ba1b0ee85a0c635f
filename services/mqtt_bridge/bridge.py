"""The bridge: a paho-mqtt (MQTT 5) client on the operator's broker, answering provision requests.

Threads: paho runs its network loop in its own thread and calls the ``_on_*`` callbacks there.
Those only hand work to the asyncio loop (``call_soon_threadsafe``); the bus call and the answer
happen on the loop, and answers and acknowledgements go back through ``client.publish`` and
``client.ack``, which paho makes thread-safe.

Delivery: QoS 1, a persistent session (``clean_start=False``, a session expiry) and manual
acknowledgement. A request is acknowledged only after its answer was accepted by the broker
(PUBACK of the answer), so a bridge that dies in between leaves the request with the broker,
which delivers it again; the request id derived from the message (:func:`topics.request_id`)
makes the core replay the first answer instead of provisioning twice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from provisioning_common.models import Dialect, Transport
from provisioning_common.runtime import announce_ready
from provisioning_common.settings import Settings
from provisioning_common.transport_api import OutcomeKind, TransportApi

from . import topics

log = logging.getLogger(__name__)

#: How long the broker keeps the bridge's session (and the requests queued for it) while it is away.
SESSION_EXPIRY_S = 3600
#: Unacknowledged requests the broker may have in flight to one bridge instance (MQTT 5 Receive Maximum).
RECEIVE_MAXIMUM = 256
#: Answers published and not yet acknowledged by the broker, at most (paho queues the rest).
ANSWERS_IN_FLIGHT = 20
#: Answers older than this are dropped by the broker instead of reaching a device that reconnects later.
ANSWER_EXPIRY_S = 3600
#: A graceful stop ends once no request arrived for this long (after leaving the share group).
DRAIN_QUIET_S = 0.3
#: Reconnect back-off (seconds), doubled by paho from the minimum up to the maximum.
RECONNECT_MIN_S, RECONNECT_MAX_S = 1, 30

_CONTENT_TYPE = {Dialect.PROTOBUF: "application/x-protobuf"}


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None = None

    def __repr__(self) -> str:  # never print the password
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://[user[:password]@]host[:port]`` (1883) or ``mqtts://...`` (8883); percent-escapes allowed."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError("MQTT_BROKER_URL must look like mqtt://user:password@host:1883 or mqtts://host:8883")
    tls = parts.scheme == "mqtts"
    return BrokerAddress(
        host=parts.hostname,
        port=parts.port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def instance_client_id(prefix: str) -> str:
    return f"{prefix}-{socket.gethostname()}"


@dataclass
class _Delivery:
    """One PUBLISH received from the broker, as handed from paho's thread to the loop."""

    mid: int
    qos: int
    topic: str
    payload: bytes
    response_topic: str | None
    correlation_data: bytes | None
    #: The connection it arrived on: a PUBACK is only valid on that same connection.
    epoch: int
    #: A retained message handed out on subscribing, not a request someone just made.
    retained: bool = False


class MqttBridge:
    def __init__(self, api: TransportApi, settings: Settings, broker: BrokerAddress) -> None:
        self._api = api
        self._settings = settings
        self._broker = broker
        self._client_id = instance_client_id(settings.mqtt_bridge_client_id)
        self._filter = topics.subscription(settings.mqtt_bridge_share_group)
        #: MQTT 5 (properties, session expiry) or 3.1.1 (brokers without MQTT 5, e.g. RabbitMQ before 3.13).
        self._v5 = settings.mqtt_bridge_protocol == "5"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        #: Connection generation, bumped by paho's thread on connect and disconnect (under ``_lock``).
        self._epoch = 0
        self._connected = False
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._stopping = False
        #: Answers waiting for the broker's PUBACK, by paho message id.
        self._published: dict[int, asyncio.Future[bool]] = {}
        #: Requests being answered, by request id: a redelivery arriving meanwhile waits for the first.
        self._in_progress: dict[str, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._unsubscribed: asyncio.Future[None] | None = None
        self.counters: collections.Counter[str] = collections.Counter()

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (in paho's thread, retrying with back-off) and return.

        :meth:`wait_ready` waits for the subscription."""
        self._loop = asyncio.get_running_loop()
        # Reading the CA file is blocking file I/O: keep it off the loop.
        self._client = await asyncio.to_thread(self._make_client)
        if self._v5:
            self._client.connect_async(self._broker.host, self._broker.port, keepalive=30, clean_start=False,
                                       properties=self._connect_properties())
        else:  # MQTT 3.1.1: a persistent session is clean_session=False, set on the client
            self._client.connect_async(self._broker.host, self._broker.port, keepalive=30)
        self._client.loop_start()

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
            clean_session=None if self._v5 else False,
            manual_ack=True,
        )
        if self._broker.username is not None:
            client.username_pw_set(self._broker.username, self._broker.password)
        if self._broker.tls:
            context = ssl.create_default_context(cafile=self._settings.mqtt_broker_ca_file)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            client.tls_set_context(context)
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        # Answers in flight at once towards the broker; more wait in paho's queue. 20 is what brokers
        # accept by default (Mosquitto's max_inflight_messages), and PUBACKs come back in a millisecond.
        client.max_inflight_messages_set(ANSWERS_IN_FLIGHT)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    @staticmethod
    def _connect_properties() -> Properties:
        props = _properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        return props

    async def wait_ready(self) -> None:
        await self._ready.wait()

    @property
    def connected(self) -> bool:
        """Connected to the broker, and subscribed at least once (readiness of ``HEALTH_PORT``'s ``/health``)."""
        return self._connected and self._ready.is_set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Leave the share group, answer what is still coming (bounded), then disconnect.

        In a share group, a graceful stop first unsubscribes: Mosquitto keeps handing a share of the
        requests to a member that is merely offline (queued in its session until it returns), so a
        member that stays subscribed while it is away, or never comes back, would strand its share.
        Requests already queued for this session still arrive and are answered during the drain.
        Alone (no share group, e.g. RabbitMQ), the subscription stays: the broker queues requests for
        the persistent session until the bridge is back. What is left unacknowledged at the end is
        delivered again when an instance with this client id reconnects.
        """
        client = self._client
        if client is not None and self._settings.mqtt_bridge_share_group and self._connected:
            unsubscribed = asyncio.get_running_loop().create_future()
            self._unsubscribed = unsubscribed
            client.unsubscribe(self._filter)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(drain_timeout, 5.0)):
                    await unsubscribed
        deadline = asyncio.get_running_loop().time() + drain_timeout
        quiet_since = None
        while asyncio.get_running_loop().time() < deadline:
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
                quiet_since = None
                continue
            # No request in hand: wait a moment for stragglers already queued for this session.
            now = asyncio.get_running_loop().time()
            quiet_since = quiet_since or now
            if now - quiet_since >= DRAIN_QUIET_S:
                break
            await asyncio.sleep(0.05)
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        if client is not None:
            client.disconnect()
            await asyncio.to_thread(client.loop_stop)
        log.info("mqtt_bridge stopped: %s", self.summary())

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.counters.items())) or "no requests"

    # --- paho's thread -------------------------------------------------------------------

    def _call(self, func: Any, *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            self._loop.call_soon_threadsafe(func, *args)

    def _on_connect(self, client: mqtt.Client, _userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._call(log.warning, "broker %r refused the connection: %s", self._broker, reason)
            return
        with self._lock:
            self._epoch += 1
            self._connected = True
        if getattr(props, "ReceiveMaximum", ANSWERS_IN_FLIGHT) < ANSWERS_IN_FLIGHT:
            self._call(log.warning, "the broker's Receive Maximum (%s) is below %d answers in flight",
                       props.ReceiveMaximum, ANSWERS_IN_FLIGHT)
        # Subscribe on every connect: cheap, and correct even if the broker lost the session.
        if self._v5:
            client.subscribe(self._filter, options=SubscribeOptions(
                qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND))
        else:
            client.subscribe(self._filter, qos=1)
        self._call(log.info, "connected to %r as %s (session present: %s)", self._broker, self._client_id,
                   bool(flags.session_present))

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        with self._lock:
            self._epoch += 1
            was_connected, self._connected = self._connected, False
        if was_connected and not self._stopping:
            self._call(log.warning, "lost the broker %r (%s); reconnecting", self._broker, reason)

    def _on_subscribe(self, _client: mqtt.Client, _userdata: Any, _mid: int, codes: list[Any], _props: Any) -> None:
        if any(code.is_failure for code in codes):
            self._call(log.error, "the broker refused the subscription %s (%s): check its ACL for %s",
                       self._filter, codes[0], self._client_id)
            return
        self._call(self._subscribed)

    def _on_unsubscribe(self, _client: mqtt.Client, _userdata: Any, _mid: int, _codes: Any, _props: Any) -> None:
        if self._unsubscribed is not None:
            future = self._unsubscribed
            self._call(lambda: None if future.done() else future.set_result(None))

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        props = getattr(message, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None)
        correlation = getattr(props, "CorrelationData", None)
        with self._lock:
            epoch = self._epoch
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = ""
        delivery = _Delivery(message.mid, message.qos, topic, bytes(message.payload), response_topic,
                             bytes(correlation) if correlation is not None else None, epoch, bool(message.retain))
        self._call(self._dispatch, delivery)

    def _on_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, reason: Any, _props: Any) -> None:
        self._call(self._answer_acknowledged, mid, not getattr(reason, "is_failure", False))

    # --- the loop --------------------------------------------------------------------------

    def _subscribed(self) -> None:
        if not self._ready.is_set():
            announce_ready("mqtt_bridge", f": subscribed to {self._filter} on {self._broker!r}")
            self._ready.set()
        else:
            log.info("subscribed again to %s", self._filter)

    def _answer_acknowledged(self, mid: int, ok: bool) -> None:
        future = self._published.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(ok)

    def _dispatch(self, delivery: _Delivery) -> None:
        if self._stopping:
            return  # not acknowledged: the broker delivers it again to this session later
        task = asyncio.create_task(self._handle(delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ack(self, delivery: _Delivery) -> None:
        """PUBACK a request, only on the connection it came on (a packet id means nothing on another)."""
        if delivery.qos != 1 or self._client is None:
            return
        with self._lock:
            if delivery.epoch == self._epoch and self._connected:
                self._client.ack(delivery.mid, delivery.qos)

    async def _handle(self, delivery: _Delivery) -> None:
        target = topics.route(delivery.topic, delivery.response_topic, delivery.correlation_data)
        if delivery.retained:
            # A retained request would be answered again on every resubscription: never a new request.
            target = topics.Ignored.RETAINED
        if isinstance(target, topics.Ignored):
            self.counters[target.value] += 1
            count = self.counters[target.value]
            if count & (count - 1) == 0:  # the 1st, 2nd, 4th, 8th...: visible, yet no log flood
                if target is topics.Ignored.FOREIGN_RESPONSE_TOPIC:
                    # Someone asked for an answer on another client's topic (topics only: no payload, no secret).
                    log.warning("refused a request on %r whose Response Topic %r is not its own: %s (%d so far)",
                                delivery.topic[:200], (delivery.response_topic or "")[:200], target.value, count)
                else:
                    log.info("ignored a message on %r: %s (%d so far)", delivery.topic[:200], target.value, count)
            self._ack(delivery)
            return
        request_id = topics.request_id(delivery.topic, delivery.payload, target)
        first = self._in_progress.get(request_id)
        if first is not None:
            # The broker delivered it again while the first delivery is being answered
            # (a reconnect in between): the first one's answer is this one's too.
            self.counters["duplicates"] += 1
            with contextlib.suppress(Exception):
                await asyncio.shield(first)
            self._ack(delivery)
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._in_progress[request_id] = done
        try:
            if await self._answer(delivery, target, request_id):
                self._ack(delivery)
        except Exception:  # never let one request stop the bridge
            self.counters["errors"] += 1
            log.exception("provision request on %r failed", delivery.topic[:200])
        finally:
            del self._in_progress[request_id]
            done.set_result(None)

    async def _answer(self, delivery: _Delivery, target: topics.Route, request_id: str) -> bool:
        """Provision and publish the answer; True once the broker has it (then the request may be acked)."""
        outcome = await self._api.provision(
            delivery.payload,
            transport=Transport.MQTT,
            source_address=topics.rate_limit_key(target),
            protobuf_fallback=True,
            request_id=request_id,
        )
        self.counters[outcome.kind.value] += 1
        if outcome.kind is OutcomeKind.UNAVAILABLE:
            # The device is told (as the MQTT gateway tells it); nothing stays provisioned behind this
            # answer's back (deadlines and abandon, README Guarantees). TransportApi logs the outage once.
            log.debug("answered %s with a time-out", target.response_topic[:200])
        props = self._answer_properties(target, outcome.dialect) if self._v5 else None
        assert self._client is not None
        info = self._client.publish(target.response_topic, outcome.body, qos=1, retain=False, properties=props)
        acked: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._published[info.mid] = acked
        try:
            async with asyncio.timeout(self._settings.provision_timeout_s):
                ok = await acked
        except TimeoutError:
            self._published.pop(info.mid, None)
            log.warning("the broker did not acknowledge an answer in time; the request stays unacknowledged")
            return False
        if not ok:
            # Retrying cannot help (the broker's ACL says no): acknowledge, or the request would
            # come back on every reconnect.
            self.counters["answers_refused"] += 1
            log.warning("the broker refused to take an answer for %s: check its ACL for %s",
                        target.response_topic[:200], self._client_id)
        return True

    @staticmethod
    def _answer_properties(target: topics.Route, dialect: Dialect) -> Properties:
        props = _properties(PacketTypes.PUBLISH)
        if target.correlation_data is not None:
            props.CorrelationData = target.correlation_data
        props.ContentType = _CONTENT_TYPE.get(dialect, "application/json")
        if dialect is not Dialect.PROTOBUF:
            props.PayloadFormatIndicator = 1  # UTF-8 text
        props.MessageExpiryInterval = ANSWER_EXPIRY_S
        return props

    async def log_summary_every(self, interval_s: float) -> None:
        """An INFO line with the counters now and then, when they changed."""
        last = ""
        while True:
            await asyncio.sleep(interval_s)
            current = self.summary()
            if current != last and self.counters:
                log.info("mqtt_bridge: %s", current)
                last = current


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho's constructor is unannotated
