"""``python -m provisioning_core``: serve provision requests until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from provisioning_common import runtime
from provisioning_common.bus import Bus
from provisioning_common.db.migrate import create_pool
from provisioning_common.health import bus_check, pool_check, start_if_configured
from provisioning_common.secretbox import SecretBox
from provisioning_common.settings import Settings

from .rate_limit import FailureLimiter
from .service import SERVICE, ProvisioningCore

log = logging.getLogger("provisioning_core")

#: Replayable answers are kept well past any redelivery (requests expire after PROVISION_TIMEOUT_S).
ANSWER_RETENTION_S = 3600.0


async def main(settings: Settings, stop: asyncio.Event) -> None:
    if settings.data_encryption_key is None:
        raise SystemExit("DATA_ENCRYPTION_KEY is required (a Fernet key shared with admin-api)")
    box = SecretBox(settings.data_encryption_key.get_secret_value())
    pool = await create_pool(
        settings.database_url.get_secret_value(), min_size=settings.db_pool_min, max_size=settings.db_pool_max
    )
    bus = await Bus.connect(settings)
    core = ProvisioningCore(pool, bus, box, FailureLimiter(settings.provision_failures_per_minute),
                            profile_ttl_s=settings.profile_cache_ttl_s,
                            replay_window_s=settings.provision_replay_window_s,
                            reply_grace_s=settings.bus_reply_grace_s)
    await bus.serve(SERVICE, core.handlers(), on_undelivered=core.on_undelivered)
    runtime.announce_ready("provisioning_core", f"on queue {settings.queue(SERVICE)}")
    health = await start_if_configured(settings, bus_check(bus), pool_check(pool))

    async def purge_forever() -> None:
        while True:
            with contextlib.suppress(Exception):
                await core.purge_answers(ANSWER_RETENTION_S)
            await asyncio.sleep(300)

    purger = asyncio.create_task(purge_forever())
    await stop.wait()
    if health is not None:
        health.close()
    purger.cancel()
    await bus.stop_consuming()
    await bus.close()
    await pool.close()


if __name__ == "__main__":
    runtime.run("provisioning_core", main)
