"""A backend's side of the device data on RabbitMQ (README, "Device data on RabbitMQ"), with aio-pika only.

    python examples/backend_consumer.py --amqp amqp://backend:<RABBITMQ_BACKEND_PASSWORD>@rabbitmq:5672/
    python examples/backend_consumer.py --amqp ... --device <device id>   # also: RPC + attribute push to it

It consumes every device's telemetry and client attributes, answers the devices' client-side RPCs
(``getTime``: the server's time in ms; anything else: an error object), and, with ``--device``, sends
that device a two-way server-side RPC and a shared-attribute update. Copy what you need: each part is a
few lines. Every exchange is a durable topic exchange whose routing key is the device id; put your
BUS_NAMESPACE in front of the names (``--namespace``).

It needs only the ``backend`` RabbitMQ user's permissions (README, "Bus permissions"): queues named
``backend.*``, the exchanges looked up (a deployment declares them), answers published to ``rpc.replies``
with routing key = the asker's queue, and its own reply queue bound there for its server-side RPCs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractIncomingMessage

TELEMETRY = "device.telemetry"  # device -> backend: JSON object or array
ATTRIBUTES = "device.attributes"  # device -> backend: the client attributes it published, once stored
RPC_REQUESTS = "device.rpc"  # device -> backend: {"method", "params"}; answer to reply_to + correlation_id
DOWNLINK = "device.downlink"  # backend -> device: type "rpc" ({"method", "params"}) or "attributes"
#: Answers (ours to client-side RPCs, the devices' to our server-side RPCs) go through this topic exchange,
#: routing key = the asker's reply queue.
REPLIES = "rpc.replies"


class DeviceOffline(Exception):
    """The device has no session on any gateway now (the message was unroutable)."""


class Backend:
    def __init__(self, channel: AbstractChannel, namespace: str = "") -> None:
        self.channel, self.ns = channel, namespace
        self.connection: AbstractConnection | None = None
        self._answers: dict[str, asyncio.Future[bytes]] = {}
        self._reply_queue = f"{namespace}backend.replies.{uuid.uuid4().hex}"
        self._exchanges: dict[str, AbstractExchange] = {}

    @classmethod
    async def connect(cls, url: str, namespace: str = "") -> Backend:
        connection = await aio_pika.connect_robust(url, client_properties={"connection_name": "backend"})
        # Publisher confirms + returns raised: a mandatory message nobody can take raises DeliveryError.
        backend = cls(await connection.channel(publisher_confirms=True, on_return_raises=True), namespace)
        backend.connection = connection
        return backend

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()

    async def start(self) -> None:
        """Consume telemetry, attributes and client-side RPCs of every device (binding key ``#``)."""
        for name, handler in ((TELEMETRY, self._telemetry), (ATTRIBUTES, self._attributes),
                              (RPC_REQUESTS, self._client_rpc)):
            exchange = await self.exchange(name)
            # A durable queue of our own keeps the data while this backend restarts.
            queue = await self.channel.declare_queue(f"{self.ns}backend.{name}", durable=True)
            await queue.bind(exchange, routing_key="#")
            await queue.consume(handler)
        # Where the devices' answers to our server-side RPCs come back: bound to rpc.replies by its name.
        reply_queue = await self.channel.declare_queue(self._reply_queue, exclusive=True)
        await reply_queue.bind(await self.exchange(REPLIES), routing_key=self._reply_queue)
        await reply_queue.consume(self._rpc_answer, no_ack=True)

    async def exchange(self, name: str) -> AbstractExchange:
        """A durable topic exchange, looked up (the backend user may not declare it: the deployment does);
        declared only when missing, on a development broker whose guest may."""
        if name in self._exchanges:
            return self._exchanges[name]
        assert self.connection is not None
        probe = await self.connection.channel()
        try:
            await probe.declare_exchange(self.ns + name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            await self.channel.declare_exchange(self.ns + name, aio_pika.ExchangeType.TOPIC, durable=True)
        finally:
            if not probe.is_closed:
                await probe.close()
        self._exchanges[name] = await self.channel.get_exchange(self.ns + name, ensure=False)
        return self._exchanges[name]

    # --- uplink: override these three ------------------------------------------------------------------

    async def on_telemetry(self, device_id: str, data: Any) -> None:
        print(f"telemetry  {device_id}: {data}")

    async def on_attributes(self, device_id: str, attributes: dict[str, Any]) -> None:
        print(f"attributes {device_id}: {attributes}")

    async def answer(self, device_id: str, method: str, params: Any) -> Any:
        """A device's client-side RPC; whatever this returns (as JSON) is what the device receives."""
        if method == "getTime":
            return {"time": int(time.time() * 1000)}
        return {"error": f"unknown method {method}"}

    async def _telemetry(self, message: AbstractIncomingMessage) -> None:
        async with message.process():
            await self.on_telemetry(message.routing_key or "", json.loads(message.body))

    async def _attributes(self, message: AbstractIncomingMessage) -> None:
        async with message.process():
            await self.on_attributes(message.routing_key or "", json.loads(message.body))

    async def _client_rpc(self, message: AbstractIncomingMessage) -> None:
        async with message.process():
            call = json.loads(message.body)
            result = await self.answer(message.routing_key or "", call["method"], call.get("params"))
            if message.reply_to:  # the device's gateway waits on reply_to for our correlation_id
                await (await self.exchange(REPLIES)).publish(
                    aio_pika.Message(json.dumps(result).encode(), content_type="application/json",
                                     correlation_id=message.correlation_id),
                    routing_key=message.reply_to)

    # --- downlink ---------------------------------------------------------------------------------------

    async def _downlink(self, device_id: str, body: Any, kind: str, timeout: float, **properties: Any) -> None:
        exchange = await self.exchange(DOWNLINK)
        message = aio_pika.Message(json.dumps(body).encode(), content_type="application/json", type=kind,
                                   expiration=timeout, headers={"x-deadline": f"{time.time() + timeout:.3f}"},
                                   **properties)
        try:
            await exchange.publish(message, routing_key=device_id, mandatory=True)
        except aio_pika.exceptions.DeliveryError:
            raise DeviceOffline(device_id) from None

    async def rpc(self, device_id: str, method: str, params: Any = None, timeout: float = 10.0) -> Any:
        """A two-way server-side RPC: the device's answer. Raises DeviceOffline, or TimeoutError."""
        correlation_id = uuid.uuid4().hex
        answer = self._answers[correlation_id] = asyncio.get_running_loop().create_future()
        try:
            await self._downlink(device_id, {"method": method, "params": params}, "rpc", timeout,
                                 reply_to=self._reply_queue, correlation_id=correlation_id)
            return json.loads(await asyncio.wait_for(answer, timeout))
        finally:
            self._answers.pop(correlation_id, None)

    async def rpc_oneway(self, device_id: str, method: str, params: Any = None, timeout: float = 10.0) -> None:
        """A one-way server-side RPC, handed to the device's session. Raises DeviceOffline."""
        await self._downlink(device_id, {"method": method, "params": params}, "rpc", timeout)

    async def push_shared_attributes(self, device_id: str, values: dict[str, Any], timeout: float = 60.0) -> None:
        """Push shared attributes to the device's live session. Not stored: to store them too (so that the
        device reads them on its next attribute request, even when offline now), POST them to the admin
        API's /api/devices/{id}/attributes/shared instead, which does both. Raises DeviceOffline."""
        await self._downlink(device_id, values, "attributes", timeout)

    async def _rpc_answer(self, message: AbstractIncomingMessage) -> None:
        future = self._answers.get(message.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(message.body)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--namespace", default="", help="BUS_NAMESPACE of the deployment")
    parser.add_argument("--device", help="a device id to send an RPC and a shared-attribute update to")
    args = parser.parse_args()
    backend = await Backend.connect(args.amqp, args.namespace)
    await backend.start()
    if args.device:
        try:
            print("answer:", await backend.rpc(args.device, "getState", {"verbose": True}))
            await backend.push_shared_attributes(args.device, {"targetTemperature": 21.5})
        except DeviceOffline:
            print(f"{args.device} is offline")
        except TimeoutError:
            print(f"{args.device} did not answer")
    await asyncio.Event().wait()  # consume until Ctrl-C


if __name__ == "__main__":
    asyncio.run(main())
