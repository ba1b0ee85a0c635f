"""``python -m credentials``: serve the credentials RPC queue until SIGTERM."""

from __future__ import annotations

import asyncio
import logging

from provisioning_common import runtime
from provisioning_common.bus import Bus
from provisioning_common.db.migrate import create_pool
from provisioning_common.health import bus_check, pool_check, start_if_configured
from provisioning_common.secretbox import SecretBox
from provisioning_common.settings import Settings

from .service import SERVICE, CredentialsService

log = logging.getLogger("credentials")


async def main(settings: Settings, stop: asyncio.Event) -> None:
    pool = await create_pool(
        settings.database_url.get_secret_value(), min_size=settings.db_pool_min, max_size=settings.db_pool_max
    )
    bus = await Bus.connect(settings)
    box = SecretBox(settings.data_encryption_key.get_secret_value()) if settings.data_encryption_key else None
    await bus.serve(SERVICE, CredentialsService(pool, box).handlers())
    runtime.announce_ready("credentials", f"on queue {settings.queue(SERVICE)}")
    health = await start_if_configured(settings, bus_check(bus), pool_check(pool))
    await stop.wait()
    if health is not None:
        health.close()
    await bus.stop_consuming()
    await bus.close()
    await pool.close()


if __name__ == "__main__":
    runtime.run("credentials", main)
