"""The MQTT gateway process: plain and TLS listeners, one :class:`MqttSession` per connection."""

from __future__ import annotations

import asyncio
import logging

from provisioning_common.runtime import announce_ready
from provisioning_common.settings import Settings
from provisioning_common.transport_api import TransportApi

from .session import MqttSession, SessionLimits
from .tls import Connection, make_server_context, start_plain_server, start_tls_server

log = logging.getLogger(__name__)


class MqttGateway:
    def __init__(self, api: TransportApi, settings: Settings) -> None:
        self._api = api
        self._settings = settings
        self._limits = SessionLimits(
            max_packet_bytes=settings.mqtt_max_packet_bytes,
            connect_timeout_s=settings.mqtt_connect_timeout_s,
            provision_close_s=settings.mqtt_provision_close_s,
        )
        self._servers: list[asyncio.Server] = []
        self._sessions: set[MqttSession] = set()
        self.ports: dict[str, int] = {}

    async def _on_connection(self, conn: Connection) -> None:
        session = MqttSession(conn, self._api, self._limits)
        self._sessions.add(session)
        try:
            await session.run()
        finally:
            self._sessions.discard(session)

    async def start(self) -> None:
        host = self._settings.bind_host
        if self._settings.mqtt_port:
            server = await start_plain_server(self._on_connection, host, self._settings.mqtt_port)
            self._servers.append(server)
            self.ports["mqtt"] = server.sockets[0].getsockname()[1]
        if self._settings.mqtts_port:
            cert, key = self._settings.mqtt_tls_cert_file, self._settings.mqtt_tls_key_file
            if not cert or not key:
                log.warning("MQTT_TLS_CERT_FILE / MQTT_TLS_KEY_FILE unset: TLS listener disabled")
            else:
                context = make_server_context(cert, key)
                server = await start_tls_server(self._on_connection, host, self._settings.mqtts_port, context)
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
        for server in self._servers:
            await server.wait_closed()
