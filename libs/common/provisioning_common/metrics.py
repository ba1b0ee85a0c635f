"""Every Prometheus metric of the services, defined once (prometheus-client's process-wide registry).

Served as ``GET /metrics`` (text format) beside ``/health`` by :mod:`.health`: on ``HEALTH_PORT`` for
the services without an HTTP port, on the app's own port for the HTTP gateway, the admin API and
broker_auth. Each service is its own process, so the one default registry is one service's.

Labels are bounded: transports, dialects, outcomes and the bus's declared methods; never a device
name, id, address or anything else a client chooses. ``deploy/monitoring`` (dashboard, alert rules)
uses only the names below (``tests/unit/common/test_metrics.py`` checks that).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .contract import Handler
from .models import ProvisionResult, ProvisionStatus

# No ``*_created`` series beside each counter and histogram: rate() does not need them.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: End-to-end and RPC latencies: from a few milliseconds to past PROVISION_TIMEOUT_S's default (10 s).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0)

# --- which process this is -------------------------------------------------------------------

SERVICE_INFO = Gauge("provisioning_service_info", "1 for each running service process (label: its name)",
                     ["service"])

# --- provisioning at the gateways (TransportApi.provision: every transport goes through it) ----

#: Outcomes of a provision request as the gateway answered it.
PROVISION_OUTCOMES = ("success", "not_found", "failure", "rate_limited", "bad_request", "timeout")
PROVISIONS = Counter(
    "provisioning_provisions_total",
    "Provision requests answered by the gateways, by outcome, transport and dialect",
    ["outcome", "transport", "dialect"],
)
PROVISION_SECONDS = Histogram(
    "provisioning_provision_duration_seconds",
    "End-to-end time of a provision request at the gateway (parse, core, answer rendered)",
    ["transport", "outcome"],
    buckets=LATENCY_BUCKETS,
)
X509_CHAIN_PROVISIONS = Counter(
    "provisioning_x509_chain_provisions_total",
    "TLS connects with an unknown leaf certificate handed to the core's X509_CERTIFICATE_CHAIN strategy",
    ["outcome", "transport"],
)

# --- the core's decisions ---------------------------------------------------------------------

CORE_DECISIONS = Counter(
    "provisioning_core_decisions_total",
    "Provisioning decisions answered by provisioning-core, by method and outcome",
    ["method", "outcome"],
)

# --- the bus (provisioning_common.bus) --------------------------------------------------------

#: Outcomes of one RPC, as its caller saw it (``client``) or its service answered it (``server``).
RPC_OUTCOMES = ("ok", "error", "timeout", "deadline", "unavailable", "connection_lost", "invalid")
RPC_CLIENT_SECONDS = Histogram(
    "provisioning_rpc_client_duration_seconds",
    "Time from sending an RPC on the bus to its answer (or giving up), by service and method",
    ["service", "method"],
    buckets=LATENCY_BUCKETS,
)
RPC_CLIENT_CALLS = Counter(
    "provisioning_rpc_client_calls_total",
    "RPCs sent on the bus, by service, method and outcome (timeout: no answer in time)",
    ["service", "method", "outcome"],
)
RPC_SERVER_SECONDS = Histogram(
    "provisioning_rpc_server_duration_seconds",
    "Time a service took to handle one RPC, by service and method",
    ["service", "method"],
    buckets=LATENCY_BUCKETS,
)
RPC_SERVER_CALLS = Counter(
    "provisioning_rpc_server_calls_total",
    "RPCs handled by this service, by method and outcome (deadline: it arrived or ran past its deadline)",
    ["service", "method", "outcome"],
)
BATCH_SIZE = Histogram(
    "provisioning_batch_size",
    "Items per batch of concurrent work done in one round trip (batching.Batcher), by what is batched",
    ["batch"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BUS_DISCONNECTS = Counter("provisioning_bus_disconnects_total", "RabbitMQ connections lost")
BUS_RECONNECTS = Counter("provisioning_bus_reconnects_total", "RabbitMQ connections restored after a loss")

# --- transports' own state --------------------------------------------------------------------

MQTT_CONNECTIONS = Gauge("provisioning_mqtt_connections", "Open MQTT connections (sessions) of this gateway")
COAP_IN_FLIGHT = Gauge("provisioning_coap_requests_in_flight",
                       "CoAP requests being handled (waiting for the core, the credentials service or the bus)")
COAP_EXCHANGES = Gauge("provisioning_coap_exchanges",
                       "CoAP exchanges remembered for deduplication (RFC 7252 EXCHANGE_LIFETIME)")


# --- database pools (asyncpg), read when scraped ----------------------------------------------


class _PoolCollector(Collector):
    """Size, connections in use and maximum of every asyncpg pool this process opened."""

    def __init__(self) -> None:
        # asyncpg's Pool has no weak references (__slots__): kept until it is closed, then dropped when scraped.
        self._pools: list[Any] = []

    def watch(self, pool: Any) -> None:
        self._pools.append(pool)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        pools = self._pools = [pool for pool in self._pools if not _closed(pool)]
        if not pools:
            return []
        size = sum(pool.get_size() for pool in pools)
        idle = sum(pool.get_idle_size() for pool in pools)
        return [
            GaugeMetricFamily("provisioning_db_pool_connections", "Open connections of the Postgres pool", size),
            GaugeMetricFamily("provisioning_db_pool_in_use", "Postgres pool connections in use", size - idle),
            GaugeMetricFamily("provisioning_db_pool_max", "Largest size of the Postgres pool (DB_POOL_MAX)",
                              sum(pool.get_max_size() for pool in pools)),
        ]

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []  # the families exist only while a pool is open


def _closed(pool: Any) -> bool:
    is_closing = getattr(pool, "is_closing", None)
    return bool(is_closing()) if callable(is_closing) else False


_POOLS = _PoolCollector()
REGISTRY.register(_POOLS)


def watch_pool(pool: Any) -> None:
    """Report ``pool`` (an asyncpg pool) as ``provisioning_db_pool_*`` while it is open."""
    _POOLS.watch(pool)


# --- helpers ----------------------------------------------------------------------------------


def provision_outcome(result: ProvisionResult) -> str:
    """A core's answer as a bounded outcome label."""
    if result.retry_after_s is not None:
        return "rate_limited"
    return {ProvisionStatus.SUCCESS: "success", ProvisionStatus.NOT_FOUND: "not_found"}.get(result.status, "failure")


def count_decisions(handlers: Sequence[Handler]) -> list[Handler]:
    """``handlers`` with every answer that is a :class:`ProvisionResult` counted in
    ``provisioning_core_decisions_total`` (method, outcome): the core's side of the gateways' counts."""

    def counted(handler: Handler) -> Handler:
        func, method = handler.func, handler.method.name

        @functools.wraps(func)  # the handler's own annotations, which the contract checks
        async def decide(request: Any) -> object:
            answer = await func(request)
            if isinstance(answer, ProvisionResult):
                series(CORE_DECISIONS, method, provision_outcome(answer)).inc()
            return answer

        return Handler(handler.method, decide)

    return [counted(handler) if handler.replies else handler for handler in handlers]


def set_service(name: str) -> None:
    """Mark this process as ``name`` (``provisioning_service_info{service=name} 1``)."""
    SERVICE_INFO.labels(service=name).set(1)


def render() -> tuple[bytes, str]:
    """The exposition of every metric of this process, and its Content-Type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


@functools.cache
def series(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, looked up once per label set (``labels()`` takes a lock and builds its key at
    every call; the hot path of every provision asks for the same few). Bounded as the labels are (above)."""
    return metric.labels(*labels)


#: Every metric family name the services expose (histograms as their base name), for the checks of
#: deploy/monitoring's dashboard and alert rules.
NAMES = frozenset({
    "provisioning_service_info", "provisioning_provisions_total", "provisioning_provision_duration_seconds",
    "provisioning_x509_chain_provisions_total", "provisioning_core_decisions_total",
    "provisioning_rpc_client_duration_seconds", "provisioning_rpc_client_calls_total",
    "provisioning_rpc_server_duration_seconds", "provisioning_rpc_server_calls_total",
    "provisioning_batch_size", "provisioning_bus_disconnects_total", "provisioning_bus_reconnects_total",
    "provisioning_mqtt_connections",
    "provisioning_coap_requests_in_flight", "provisioning_coap_exchanges", "provisioning_db_pool_connections",
    "provisioning_db_pool_in_use", "provisioning_db_pool_max",
})
