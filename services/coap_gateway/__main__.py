"""``python -m coap_gateway``: serve CoAP on UDP COAP_PORT until SIGTERM."""

from __future__ import annotations

import logging

from provisioning_common import metrics, runtime
from provisioning_common.transport_api import TransportApi

from .server import CoapGateway


async def start(context: runtime.Context) -> runtime.Running:
    settings = context.settings
    if not settings.coap_port:
        # COAP_PORT=0 disables the listener, as MQTT_PORT=0 does; never "a random port".
        return runtime.Running(ready="; listener disabled (COAP_PORT=0)")
    # aiocoap logs every duplicate datagram and stray ACK at INFO: noise at thousands of requests per second.
    logging.getLogger("coap-server").setLevel(max(logging.WARNING, logging.getLogger().level))
    gateway = CoapGateway(TransportApi(await context.bus(), settings), settings)
    await gateway.start()
    metrics.COAP_IN_FLIGHT.set_function(lambda: gateway.in_progress.total)
    metrics.COAP_EXCHANGES.set_function(lambda: len(gateway.exchanges))
    return runtime.Running(
        # /live also asks the UDP listener itself (a CoAP ping): a listener that stopped reading is dead.
        live=(gateway.listener_answers,),
        stop=[lambda: gateway.stop(drain_timeout=settings.provision_timeout_s)],
        ready=f"on udp {settings.coap_port}",
    )


if __name__ == "__main__":
    # asyncio's selector loop, not uvloop: aiocoap's udp6 transport watches its socket with add_reader and
    # asks for ICMP errors (IP_RECVERR), which the kernel signals with POLLERR until they are read from the
    # error queue. The selector loop calls the reader, aiocoap reads the error and drops the client's
    # exchanges. libuv (uvloop's add_reader is a uv_poll_t) stops a poll handle on POLLERR instead and
    # uvloop closes it: one client that vanished before its answer (ICMP port unreachable) and the listener
    # read nothing more, silently. udp6 is the transport to keep (pktinfo: answers from the address asked;
    # ICMP errors end retransmissions to vanished clients, as RFC 7252 wants); the loop is what changes.
    runtime.run_service("coap_gateway", start, stdlib_loop=True)
