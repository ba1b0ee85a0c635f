"""Metrics and logs (issue 15) on real processes: every service answers GET /metrics beside /health and
the requests sent move its counters; with LOG_FORMAT=json every line of every service is one JSON object,
one request's gateway and core lines share its request id, a device name with CR/LF/ESC forges no line,
and no secret appears in any line."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiocoap
import httpx
import pytest
from devstack import ServiceProcess
from prometheus_client.parser import text_string_to_metric_families

from tests.ports import free_port

from .conftest import Admin, Env, tb_request
from .mqtt_clients import provision_json

#: Services without an HTTP port of their own serve /metrics on HEALTH_PORT (mqtt_bridge idle: no broker).
HEALTH_PORT_SERVICES = ("credentials", "provisioning_core", "mqtt_gateway", "coap_gateway", "mqtt_bridge")
FORGED_NAME = ('obs-evil\r\n{"time":"2026-01-01T00:00:00+00:00","level":"INFO","service":"provisioning_core",'
               '"logger":"forged","message":"FORGED"}\n2026-01-01 00:00:00,000 http_gateway INFO forged: FORGED\x1b[2K')
#: Secrets the module used (provision secrets, issued credentials): none may appear in any log line.
SECRETS: set[str] = set()

Services = dict[str, tuple[ServiceProcess, int]]


@pytest.fixture(scope="module")
def stack(env: Env) -> Iterator[Services]:
    """Every service (broker_auth and the idle mqtt_bridge too) with LOG_FORMAT=json, each with the port of
    its /health and /metrics (one environment per process: HEALTH_PORT differs)."""
    started: Services = {}
    variables = {**os.environ, **env.variables(LOG_FORMAT="json")}
    try:
        for name in HEALTH_PORT_SERVICES:
            port = free_port()
            started[name] = (ServiceProcess(name, {**variables, "HEALTH_PORT": str(port)}), port)
        started["http_gateway"] = (ServiceProcess("http_gateway", variables), env.http_port)
        started["admin_api"] = (ServiceProcess("admin_api", variables), env.admin_port)
        auth_port = free_port()
        started["broker_auth"] = (ServiceProcess("broker_auth", {**variables, "BRIDGE_AUTH_PORT": str(auth_port)}),
                                  auth_port)
        for process, _ in started.values():
            process.start()
        for process, _ in started.values():
            process.wait_ready(60)
        yield started
    finally:
        for process, _ in started.values():
            process.stop()


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, /, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, /, **labels: str) -> float:
    """The sum of ``name`` over every series whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, series), v in samples.items() if n == name and wanted <= series)


def records(stack: Services, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in list(stack[name][0].lines)]


def wait_for_record(stack: Services, name: str, predicate: Any, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in records(stack, name):
            if predicate(record):
                return record
        time.sleep(0.05)
    raise AssertionError(f"no such line from {name}:\n" + "\n".join(stack[name][0].lines[-20:]))


def http_provision(env: Env, profile: dict[str, Any], name: str, **headers: str) -> httpx.Response:
    request = tb_request(profile, deviceName=name)
    SECRETS.add(profile["provisionDeviceSecret"])
    response = httpx.post(f"{env.http_url}/api/v1/provision", json=request, headers=headers, timeout=15)
    credentials = response.json().get("credentialsValue")
    if isinstance(credentials, str):
        SECRETS.add(credentials)
    return response


def test_every_service_serves_metrics_beside_health(stack: Services) -> None:
    for name, (_, port) in stack.items():
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200, name
        samples = scrape(port)
        assert value(samples, "provisioning_service_info", service=name) == 1, name
        assert value(samples, "process_resident_memory_bytes") > 0, name
    for name in ("provisioning_core", "credentials", "admin_api"):  # the services with a Postgres pool
        samples = scrape(stack[name][1])
        assert value(samples, "provisioning_db_pool_max") >= 1, name
        assert value(samples, "provisioning_db_pool_connections") >= 1, name
    assert "provisioning_mqtt_connections" in {n for n, _ in scrape(stack["mqtt_gateway"][1])}
    assert "provisioning_coap_requests_in_flight" in {n for n, _ in scrape(stack["coap_gateway"][1])}


async def test_requests_move_the_counters(stack: Services, env: Env, admin: Admin) -> None:
    profile = admin.create_profile()
    ports = {name: port for name, (_, port) in stack.items()}
    before = {name: scrape(ports[name]) for name in ("http_gateway", "mqtt_gateway", "coap_gateway",
                                                     "provisioning_core", "credentials")}
    assert http_provision(env, profile, f"obs-http-{uuid.uuid4().hex[:8]}").json()["status"] == "SUCCESS"
    wrong = {**profile, "provisionDeviceSecret": "not-the-secret"}
    assert http_provision(env, wrong, "obs-wrong").json()["status"] == "NOT_FOUND"
    assert httpx.post(f"{env.http_url}/api/v1/provision", content=b"{not json", timeout=15).status_code == 400
    answer = await asyncio.to_thread(provision_json, env.mqtt_port,
                                     tb_request(profile, deviceName=f"obs-mqtt-{uuid.uuid4().hex[:8]}"))
    assert answer["status"] == "SUCCESS"
    SECRETS.add(answer["credentialsValue"])
    client = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        body = json.dumps(tb_request(profile, deviceName=f"obs-coap-{uuid.uuid4().hex[:8]}")).encode()
        message = aiocoap.Message(code=aiocoap.POST, uri=f"coap://127.0.0.1:{env.coap_port}/api/v1/provision",
                                  payload=body)
        async with asyncio.timeout(30):
            response = await client.request(message).response
    finally:
        await client.shutdown()
    assert json.loads(response.payload)["status"] == "SUCCESS"
    SECRETS.add(json.loads(response.payload)["credentialsValue"])
    after = {name: scrape(ports[name]) for name in before}

    def moved(where: str, metric: str, /, **labels: str) -> float:
        return value(after[where], metric, **labels) - value(before[where], metric, **labels)

    tb = "thingsboard"
    assert moved("http_gateway", "provisioning_provisions_total", outcome="success", transport="HTTP", dialect=tb) == 1
    assert moved("http_gateway", "provisioning_provisions_total", outcome="not_found", transport="HTTP",
                 dialect=tb) == 1
    assert moved("http_gateway", "provisioning_provisions_total", outcome="bad_request", transport="HTTP",
                 dialect=tb) == 1
    assert moved("http_gateway", "provisioning_provision_duration_seconds_count", transport="HTTP",
                 outcome="success") == 1
    assert moved("http_gateway", "provisioning_rpc_client_calls_total", service="provisioning_core",
                 method="provision", outcome="ok") == 2
    assert moved("mqtt_gateway", "provisioning_provisions_total", outcome="success", transport="MQTT", dialect=tb) == 1
    assert moved("coap_gateway", "provisioning_provisions_total", outcome="success", transport="COAP", dialect=tb) == 1
    assert moved("provisioning_core", "provisioning_core_decisions_total", method="provision", outcome="success") == 3
    assert moved("provisioning_core", "provisioning_core_decisions_total", method="provision",
                 outcome="not_found") == 1
    assert moved("provisioning_core", "provisioning_rpc_server_calls_total", service="provisioning_core",
                 method="provision", outcome="ok") == 4
    assert moved("provisioning_core", "provisioning_rpc_server_duration_seconds_count", service="provisioning_core",
                 method="provision") == 4
    # The core asked the credentials service for new devices' credentials (tokens in batches: token_pool).
    assert total(after["credentials"], "provisioning_rpc_server_calls_total", outcome="ok") \
        > total(before["credentials"], "provisioning_rpc_server_calls_total", outcome="ok")


def test_one_request_id_in_the_gateway_and_the_core(stack: Services, env: Env, admin: Admin) -> None:
    profile = admin.create_profile()
    chosen = f"obs-{uuid.uuid4().hex}"
    response = http_provision(env, profile, f"obs-rid-{uuid.uuid4().hex[:8]}", **{"X-Request-Id": chosen})
    assert response.json()["status"] == "SUCCESS"
    assert response.headers["x-request-id"] == chosen
    gateway = wait_for_record(stack, "http_gateway", lambda r: r.get("request_id") == chosen)
    core = wait_for_record(stack, "provisioning_core", lambda r: r.get("request_id") == chosen)
    assert gateway["service"] == "http_gateway" and "success" in gateway["message"]
    assert core["service"] == "provisioning_core" and core["level"] == "INFO"

    # Without a header (or with one that is not a valid id) the gateway makes one, and answers with it.
    for headers in ({}, {"X-Request-Id": "not a valid id"}, {"X-Request-Id": "x" * 65}):
        response = http_provision(env, profile, f"obs-rid-{uuid.uuid4().hex[:8]}", **headers)
        made = response.headers["x-request-id"]
        assert len(made) == 32 and made != headers.get("X-Request-Id")
        wait_for_record(stack, "http_gateway", lambda r, made=made: r.get("request_id") == made)
        wait_for_record(stack, "provisioning_core", lambda r, made=made: r.get("request_id") == made)


def test_every_line_is_json_and_a_device_name_forges_none(stack: Services, env: Env, admin: Admin) -> None:
    profile = admin.create_profile()
    response = http_provision(env, profile, FORGED_NAME)
    assert response.json()["status"] == "SUCCESS", response.text
    request_id = response.headers["x-request-id"]
    line = wait_for_record(stack, "http_gateway", lambda r: r.get("request_id") == request_id)
    assert "obs-evil\\r\\n{\"time\"" in line["message"] and "FORGED\\x1b[2K" in line["message"]
    wait_for_record(stack, "provisioning_core", lambda r: r.get("request_id") == request_id)
    for name, (process, _) in stack.items():
        assert process.lines, name
        for raw in list(process.lines):
            assert "\x1b" not in raw and "\r" not in raw, (name, raw)
            record = json.loads(raw)  # every line is one JSON object: nothing else was printed
            assert isinstance(record, dict), (name, raw)
            assert {"time", "level", "service", "logger", "message"} <= set(record), (name, raw)
            assert record["service"] == name, (name, raw)
            assert record["logger"] != "forged" and record["message"] != "FORGED", (name, raw)
            assert not record["message"].startswith(("FORGED", "2026-01-01")), (name, raw)


def test_no_secret_in_any_log_line(stack: Services) -> None:
    """Last: after the other tests' requests were logged (each waited for its lines)."""
    assert len(SECRETS) >= 5
    output = "\n".join(line for process, _ in stack.values() for line in process.lines)
    assert "provision over HTTP" in output and "provision over MQTT" in output and "provision over COAP" in output
    for secret in SECRETS:
        assert secret not in output
