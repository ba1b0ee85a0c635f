"""The MQTT gateway process: plain and TLS listeners, one :class:`MqttSession` per connection."""

from __future__ import annotations

import asyncio
import logging

from provisioning_common.runtime import announce_ready
from provisioning_common.settings import Settings
from provisioning_common.transport_api import TransportApi

from . import codec
from .limits import FD_RESERVE, ConnectionGate, DescriptorWatch, effective_connection_cap, raise_nofile_limit
from .session import MqttSession, SessionLimits
from .tls import Connection, make_server_context, start_plain_server, start_tls_server

log = logging.getLogger(__name__)

#: Connections over the cap that may be waiting for their CONNECT at once, to be answered "server
#: unavailable"; beyond that they are closed at accept. Their descriptors come out of FD_RESERVE.
MAX_REFUSING = 64
#: How long a refused connection may take to send its CONNECT (a device sends it right after connecting).
REFUSE_READ_S = 2.0
#: CONNACK "server unavailable": 3 in 3.1/3.1.1, 0x88 in MQTT 5.
_SERVER_UNAVAILABLE = {3: 0x03, 4: 0x03, 5: 0x88}


class _Admission:
    """The gateway's :class:`tls.Admission`: the connection cap, plus the descriptor check at each accept."""

    def __init__(self, gate: ConnectionGate, watch: DescriptorWatch) -> None:
        self._gate = gate
        self._watch = watch

    def try_enter(self) -> bool:
        self._watch.after_accept()
        return self._gate.try_enter()

    def leave(self) -> None:
        self._gate.leave()


class MqttGateway:
    def __init__(self, api: TransportApi, settings: Settings) -> None:
        self._api = api
        self._settings = settings
        self._limits = SessionLimits(
            max_packet_bytes=settings.mqtt_max_packet_bytes,
            connect_timeout_s=settings.mqtt_connect_timeout_s,
            provision_close_s=settings.mqtt_provision_close_s,
            idle_timeout_s=settings.mqtt_idle_timeout_s,
            packet_timeout_s=settings.mqtt_packet_timeout_s,
        )
        self._servers: list[asyncio.Server] = []
        self._sessions: set[MqttSession] = set()
        self.ports: dict[str, int] = {}
        self.gate = ConnectionGate(settings.mqtt_max_connections)
        self._watch: DescriptorWatch | None = None
        self._refusing = 0

    async def _on_connection(self, conn: Connection) -> None:
        session = MqttSession(conn, self._api, self._limits)
        self._sessions.add(session)
        try:
            await session.run()
        finally:
            self._sessions.discard(session)

    async def _refuse(self, conn: Connection) -> None:
        """Over the cap: read the CONNECT (briefly) and answer "server unavailable", so that the device
        knows to retry later rather than seeing a bare reset; anything else is simply closed."""
        if self._refusing >= MAX_REFUSING:
            conn.close()
            return
        self._refusing += 1
        try:
            async with asyncio.timeout(REFUSE_READ_S):
                connect = await codec.read_packet(
                    conn.reader, max_packet_size=self._limits.max_packet_bytes, protocol_level=None
                )
            if isinstance(connect, codec.Connect):
                level = connect.protocol_level
                conn.write(codec.encode_connack(_SERVER_UNAVAILABLE.get(level, 3), protocol_level=level))
                await conn.drain()
        except (codec.ProtocolError, asyncio.IncompleteReadError, ConnectionError, TimeoutError, EOFError):
            pass
        finally:
            self._refusing -= 1
            conn.close()
            await conn.wait_closed()

    def _apply_descriptor_limit(self) -> None:
        """Raise the soft descriptor limit and keep the connection cap within it (clean refusals, not EMFILE)."""
        before, soft = raise_nofile_limit()
        if soft > before:
            log.info("descriptor limit (RLIMIT_NOFILE) raised from %d to %d", before, soft)
        cap = effective_connection_cap(self._settings.mqtt_max_connections, soft)
        if cap < self._settings.mqtt_max_connections:
            log.warning(
                "MQTT_MAX_CONNECTIONS=%d does not fit the descriptor limit %d (hard limit; %d kept for the "
                "process itself): at most %d connections are accepted; raise the hard limit (ulimit -n, "
                "LimitNOFILE=, docker --ulimit nofile=) to allow more",
                self._settings.mqtt_max_connections, soft, FD_RESERVE, cap,
            )
        self.gate = ConnectionGate(cap)

    async def start(self) -> None:
        host = self._settings.bind_host
        self._apply_descriptor_limit()
        self._watch = DescriptorWatch()
        self._watch.install(asyncio.get_running_loop())
        admission = _Admission(self.gate, self._watch)
        if self._settings.mqtt_port:
            server = await start_plain_server(
                self._on_connection, host, self._settings.mqtt_port, admission=admission, refuse=self._refuse,
                proxy_protocol_timeout=self._settings.mqtt_connect_timeout_s if self._settings.mqtt_proxy_protocol
                else None,
            )
            self._servers.append(server)
            self.ports["mqtt"] = server.sockets[0].getsockname()[1]
        if self._settings.mqtts_port:
            cert, key = self._settings.mqtt_tls_cert_file, self._settings.mqtt_tls_key_file
            if not cert or not key:
                log.warning("MQTT_TLS_CERT_FILE / MQTT_TLS_KEY_FILE unset: TLS listener disabled")
            else:
                context = make_server_context(cert, key)
                server = await start_tls_server(
                    self._on_connection, host, self._settings.mqtts_port, context,
                    handshake_timeout=self._settings.mqtt_connect_timeout_s, admission=admission,
                    proxy_protocol=self._settings.mqtt_proxy_protocol,
                )
                self._servers.append(server)
                self.ports["mqtts"] = server.sockets[0].getsockname()[1]
        announce_ready("mqtt_gateway", ": " + ", ".join(f"{k}={v}" for k, v in self.ports.items()))

    @property
    def connections(self) -> int:
        return len(self._sessions)

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop accepting, let in-flight provision answers go out (bounded), then close every connection."""
        for server in self._servers:
            server.close()
        busy = [s for s in self._sessions if s.busy]
        if busy:
            await asyncio.wait([asyncio.create_task(s.close_gracefully(drain_timeout)) for s in busy],
                               timeout=drain_timeout + 1)
        for session in list(self._sessions):
            await session.close_gracefully(0)
        if self._sessions:
            # Each session releases its device's downlink binding as it ends: let that happen on the bus.
            await asyncio.wait([asyncio.create_task(s.finished()) for s in self._sessions], timeout=5)
        for server in self._servers:
            await server.wait_closed()
        self.gate.episode.close()
        if self._watch is not None:
            self._watch.close()
