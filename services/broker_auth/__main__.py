"""``python -m broker_auth``: serve BRIDGE_AUTH_PORT (8090) for EMQX and RabbitMQ; 0 keeps it off."""

from __future__ import annotations

import asyncio
import logging

from provisioning_common import runtime
from provisioning_common.settings import Settings, get_settings

from .app import create_app

log = logging.getLogger("broker_auth")


async def _idle(_settings: Settings, stop: asyncio.Event) -> None:
    log.info("broker_auth disabled: BRIDGE_AUTH_PORT=0")
    runtime.announce_ready("broker_auth", "(disabled)")
    await stop.wait()


def main() -> None:
    settings = get_settings()
    if not settings.bridge_auth_port:
        runtime.run("broker_auth", _idle)
        return
    runtime.setup_logging(settings, "broker_auth")
    # No access log: RabbitMQ's GET requests carry the password in the query string.
    runtime.serve_http(create_app(settings), settings.bridge_auth_port, settings)

if __name__ == "__main__":
    main()
