"""``python -m broker_auth``: serve BRIDGE_AUTH_PORT (8090) for EMQX and RabbitMQ; 0 keeps it off."""

from __future__ import annotations

import asyncio
import logging

import uvicorn

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
    uvicorn.run(
        create_app(settings),
        host=settings.bind_host,
        port=settings.bridge_auth_port,
        loop="uvloop",
        http="httptools",
        # RabbitMQ's GET requests carry the password in the query string: no access log.
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=int(settings.provision_timeout_s) + 5,
    )


if __name__ == "__main__":
    main()
