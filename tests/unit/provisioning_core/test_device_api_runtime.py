"""The provisioning-core process serves two queues: provisioning (``provisioning_core``) and device traffic
(``device_api``), each on its own consumer, announced in its ready line (in-memory broker, no database)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import provisioning_core.__main__ as core_main
import pytest
from provisioning_common import runtime
from provisioning_common.contract import GET_ATTRIBUTES
from provisioning_common.db import repository
from provisioning_common.db.repository import AttributeRow
from provisioning_common.models import AttributesQuery, AttributesSnapshot
from provisioning_common.secretbox import generate_key
from provisioning_common.settings import Settings

from tests.unit.common.fake_broker import connect, install


async def test_the_core_process_serves_its_queue_and_the_device_api_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    broker, _ = install(monkeypatch)
    ready: list[str] = []
    monkeypatch.setattr(runtime, "announce_ready", lambda name, detail="": ready.append(f"{name} ready {detail}"))

    async def no_pool(self: runtime.Context) -> Any:
        return object()

    async def stored(conn: Any, device_id: uuid.UUID, **scopes: Any) -> list[AttributeRow]:
        return [AttributeRow("shared", "interval", 5, 1)]

    async def idle_purge(*_: Any) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(runtime.Context, "pool", no_pool)
    monkeypatch.setattr(repository, "get_attributes", stored)
    monkeypatch.setattr(repository, "seal_profile_secrets", lambda pool, encrypt: asyncio.sleep(0, 0))
    monkeypatch.setattr(core_main, "purge_forever", idle_purge)
    settings = Settings(bus_namespace="unit.", data_encryption_key=generate_key())  # type: ignore[arg-type]
    stop = asyncio.Event()
    service = asyncio.create_task(runtime.serve_until("provisioning_core", core_main.start, settings, stop))
    while not ready:
        await asyncio.sleep(0.01)
    assert ready == ["provisioning_core ready on queue unit.provisioning_core, unit.device_api"]
    assert {"unit.provisioning_core", "unit.device_api"} <= set(broker.consumers)
    client = await connect("unit_gateway")
    answer = await client.call(GET_ATTRIBUTES, AttributesQuery(device_id=str(uuid.uuid4()), shared_keys=[]))
    assert answer == AttributesSnapshot(shared={"interval": 5})
    stop.set()
    await asyncio.wait_for(service, 5)
    assert not {"unit.provisioning_core", "unit.device_api"} & set(broker.consumers)
    await client.close()
