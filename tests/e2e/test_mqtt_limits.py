"""MQTT listener limits on real processes (issue 10): idle and half-sent connections are closed by their
documented deadlines while devices keep provisioning; the connection cap refuses cleanly and says so once;
running out of descriptors is said once and the listener survives it.

The deadlines are set small through the environment (MQTT_IDLE_TIMEOUT_S, MQTT_PACKET_TIMEOUT_S); every
other timer that could close the same sockets (connect timeout, keep-alive, close after provisioning) is set
far longer, so a closed socket proves the deadline under test did it. Waits are upper bounds for that
proof, never speed measurements.
"""

from __future__ import annotations

import asyncio
import json
import resource
import shutil
import ssl
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from devstack import Stack
from mqtt_gateway import codec
from provisioning_common import mqtt_client_packets as client_codec

from tests.ports import free_port

from . import mqtt_clients as mc
from .conftest import Admin, Env, tb_request

IDLE_S = 2
PACKET_S = 2
#: Longer than any wait below: a socket closed within it was closed by the deadline under test.
OTHER_TIMERS_S = 120
SERVICES = ["credentials", "provisioning_core", "admin_api", "mqtt_gateway"]

CONNACK_OK = b"\x20\x02\x00\x00"
CONNACK_UNAVAILABLE_311 = b"\x20\x02\x00\x03"
CONNACK_UNAVAILABLE_5 = b"\x20\x03\x00\x88\x00"
CAP_WARNING = "MQTT connection limit reached"
FD_WARNING = "MQTT listener out of file descriptors"


@pytest.fixture(scope="module")
def stack(env: Env) -> Iterator[Stack]:
    """The pipeline without the HTTP and CoAP gateways (not under test), with small MQTT deadlines."""
    variables = env.variables(
        MQTT_IDLE_TIMEOUT_S=str(IDLE_S),
        MQTT_PACKET_TIMEOUT_S=str(PACKET_S),
        MQTT_CONNECT_TIMEOUT_S=str(OTHER_TIMERS_S),
        MQTT_PROVISION_CLOSE_S=str(OTHER_TIMERS_S),
        MQTT_MAX_CONNECTIONS="5000",
    )
    running = Stack(variables, SERVICES).start(timeout=60)
    try:
        yield running
    finally:
        running.stop()


def _extra_gateway(env: Env, **variables: str) -> tuple[Stack, int, int]:
    """One more MQTT gateway on the module's bus (its own ports and settings): (stack, plain, TLS port)."""
    ports = {"MQTT_PORT": str(free_port()), "MQTTS_PORT": str(free_port())}
    ports.update(variables)
    gateway = Stack(env.variables(**ports), ["mqtt_gateway"])
    plain, tls = int(ports["MQTT_PORT"]), int(ports["MQTTS_PORT"])
    return gateway.start(timeout=60), plain, tls


def _tls_context(env: Env) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(env.ca_file))


async def _open(port: int, data: bytes, *, expect: bytes = b"",
                tls: ssl.SSLContext | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect, send ``data``, and wait for ``expect`` (the CONNACK) when given."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None)
    writer.write(data)
    if expect:
        assert await asyncio.wait_for(reader.readexactly(len(expect)), 20) == expect
    return reader, writer


async def _open_many(count: int, port: int, data: bytes, *, expect: bytes = b"",
                     tls: ssl.SSLContext | None = None) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    opened = []
    for start in range(0, count, 50):
        opened += await asyncio.gather(*(_open(port, data, expect=expect, tls=tls)
                                         for _ in range(min(50, count - start))))
    return opened


async def _until_closed(reader: asyncio.StreamReader, within: float) -> bytes | None:
    """Everything the server sent until it closed the connection, or None if it was still open after ``within``."""
    data = b""
    try:
        async with asyncio.timeout(within):
            while chunk := await reader.read(4096):
                data += chunk
    except TimeoutError:
        return None
    except (ConnectionError, ssl.SSLError):
        pass
    return data


def _close_all(connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _, writer in connections:
        writer.close()


async def _mosquitto_rr(port: int, request: dict[str, Any], version: str) -> dict[str, Any]:
    """A real device: mosquitto_rr (MQTT 5 or 3.1.1) asks and waits for its answer."""
    tool = shutil.which("mosquitto_rr")
    assert tool is not None
    proc = await asyncio.create_subprocess_exec(
        tool, "-h", "127.0.0.1", "-p", str(port), "-u", "provision", "-V", version, "-q", "1",
        "-t", "/provision/request", "-e", "/provision/response", "-W", "20", "-m", json.dumps(request),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


async def _ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Whether the session still answers a PINGREQ."""
    writer.write(client_codec.encode_pingreq())
    try:
        return await asyncio.wait_for(reader.readexactly(2), 10) == b"\xd0\x00"
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
        return False


def _provision_and_connect(port: int, profile: dict[str, Any]) -> None:
    """A device provisions with paho (ThingsBoard's example client) and connects with its new token."""
    answer = mc.provision_json(port, tb_request(profile, deviceName=f"after-{uuid.uuid4().hex[:8]}"))
    assert answer["status"] == "SUCCESS", answer
    device = mc.connect(port, username=answer["credentialsValue"])
    try:
        assert mc.accepted(device)
    finally:
        device.stop()


# --- deadlines -------------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("mosquitto_rr") is None, reason="mosquitto-clients not installed")
async def test_idle_and_half_sent_connections_are_closed_while_devices_provision(
    env: Env, stack: Stack, admin: Admin
) -> None:
    profile = admin.create_profile()
    port = env.mqtt_port
    ka0 = client_codec.encode_connect("idle", username="provision", keep_alive=0)
    ka60 = client_codec.encode_connect("quiet", username="provision", keep_alive=60)
    half_publish = codec.encode_publish("/provision/request", b"{" + b" " * 300 + b"}", qos=1, packet_id=1)[:40]

    # Sessions that must survive: keep-alive 60 (1.5 x 60 s applies, not the idle deadline), and a
    # keep-alive-0 session that sends a packet more often than every IDLE_S.
    keeper = await _open(port, ka60, expect=CONNACK_OK)
    pinger = await _open(port, ka0, expect=CONNACK_OK)

    answers: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def devices() -> None:
        """Devices provision one after another (two at a time) for as long as the junk is being closed."""
        n = 0
        while not done.is_set() or n < 10:
            pair = [_mosquitto_rr(port, tb_request(profile, deviceName=f"busy-{n}-{i}"), v)
                    for i, v in enumerate(("5", "311"))]
            answers.extend(await asyncio.gather(*pair))
            n += 1

    async def keep_pinging() -> bool:
        while not done.is_set():
            if not await _ping(*pinger):
                return False
            await asyncio.sleep(IDLE_S / 4)
        return True

    device_task = asyncio.create_task(devices())
    ping_task = asyncio.create_task(keep_pinging())
    junk: dict[str, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}
    try:
        junk["keep-alive 0, idle"] = await _open_many(300, port, ka0, expect=CONNACK_OK)
        junk["keep-alive 0, idle, TLS"] = await _open_many(20, env.mqtts_port, ka0, expect=CONNACK_OK,
                                                           tls=_tls_context(env))
        # Connected with keep-alive 60, then half a PUBLISH: only the packet deadline can close these.
        junk["half a PUBLISH"] = await _open_many(200, port, ka60 + half_publish, expect=CONNACK_OK)
        # Half a CONNECT: the connect timeout is OTHER_TIMERS_S, so the packet deadline must close these.
        junk["half a CONNECT"] = await _open_many(100, port, ka0[:9])

        # One bound for all (well below OTHER_TIMERS_S): closed within it means closed by the deadlines.
        waits = {kind: asyncio.gather(*(_until_closed(r, OTHER_TIMERS_S / 4) for r, _ in conns))
                 for kind, conns in junk.items()}
        results = dict(zip(waits, await asyncio.gather(*waits.values()), strict=True))
        still_open = {kind: sum(r is None for r in rs) for kind, rs in results.items()}
        assert still_open == dict.fromkeys(junk, 0), still_open
        # Closed without a word: no provision answer, no CONNACK to a half CONNECT.
        assert all(r == b"" for r in results["half a CONNECT"] + results["half a PUBLISH"])

        # Now that the deadlines have visibly fired, the two sessions that obeyed the rules are still served.
        assert await _ping(*keeper)
        done.set()
        assert await asyncio.wait_for(ping_task, 20), "the pinging keep-alive-0 session was closed"
        await asyncio.wait_for(device_task, 120)
    finally:
        done.set()
        for conns in junk.values():
            _close_all(conns)
        _close_all([keeper, pinger])
        device_task.cancel()
        ping_task.cancel()
    assert len(answers) >= 20 and all(a["status"] == "SUCCESS" for a in answers), answers
    print(f"closed by the deadlines: {({k: len(v) for k, v in junk.items()})}; devices provisioned meanwhile: "
          f"{len(answers)}")
    await asyncio.to_thread(_provision_and_connect, port, profile)
    assert "Traceback" not in stack.output()


# --- connection cap --------------------------------------------------------------------------------------------


async def test_connection_cap_refuses_cleanly_and_warns_once(env: Env, stack: Stack, admin: Admin) -> None:
    profile = admin.create_profile()
    cap = 40
    gateway, plain, tls_port = await asyncio.to_thread(
        _extra_gateway, env, MQTT_MAX_CONNECTIONS=str(cap), MQTT_IDLE_TIMEOUT_S=str(OTHER_TIMERS_S))
    context = _tls_context(env)
    connect = client_codec.encode_connect("holder", username="provision", keep_alive=0)
    holders: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        # Plain and TLS connections count together.
        holders += await _open_many(30, plain, connect, expect=CONNACK_OK)
        holders += await _open_many(cap - 30, tls_port, connect, expect=CONNACK_OK, tls=context)

        # Over the cap: CONNACK "server unavailable" in the client's protocol level, then closed.
        refusals = {
            "3.1.1": (client_codec.encode_connect("x", username="provision", protocol_level=4),
                      CONNACK_UNAVAILABLE_311),
            "3.1": (client_codec.encode_connect("x", username="provision", protocol_level=3), CONNACK_UNAVAILABLE_311),
            "5": (client_codec.encode_connect("x", username="provision", protocol_level=5), CONNACK_UNAVAILABLE_5),
        }
        for level, (packet, expected) in refusals.items():
            for _ in range(20):
                reader, writer = await _open(plain, packet)
                try:
                    assert await _until_closed(reader, 20) == expected, level
                finally:
                    writer.close()
        # TLS over the cap is closed at accept: no handshake is spent on it.
        for _ in range(10):
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(_open(tls_port, connect, expect=CONNACK_OK, tls=context), 20)
        # ThingsBoard's example client sees the refusal as "Server unavailable" (0x88).
        refused = await asyncio.to_thread(mc.connect, plain, username="provision")
        refused.stop()
        assert mc.refusal_value(refused) == 0x88

        # 60 + 10 + 1 refusals: the operator is told once, with the setting's name.
        warnings = [line for line in gateway.output().splitlines() if CAP_WARNING in line]
        assert len(warnings) == 1, warnings
        assert " WARNING " in warnings[0] and "MQTT_MAX_CONNECTIONS" in warnings[0] and str(cap) in warnings[0]

        # The excess connections go: new devices get in again.
        _close_all(holders)
        holders = []
        await asyncio.to_thread(_retry_until_accepted, plain)
        for _ in range(3):
            await asyncio.to_thread(_provision_and_connect, plain, profile)
        tls_device = await _open(tls_port, connect, expect=CONNACK_OK, tls=context)
        _close_all([tls_device])
        output = gateway.output()
    finally:
        _close_all(holders)
        await asyncio.to_thread(gateway.stop)
    assert sum(CAP_WARNING in line for line in output.splitlines()) == 1
    assert "Traceback" not in output


def _retry_until_accepted(port: int, attempts: int = 50) -> None:
    """The gateway notices closed sockets a moment after the client closes them: retry the first connect."""
    for _ in range(attempts):
        client = mc.connect(port, username="provision")
        ok = mc.accepted(client)
        client.stop()
        if ok:
            return
        time.sleep(0.2)
    raise AssertionError("still refused after the excess connections closed")


# --- descriptors -----------------------------------------------------------------------------------------------


async def test_out_of_descriptors_is_logged_once_and_the_listener_keeps_serving(
    env: Env, stack: Stack, admin: Admin
) -> None:
    """A gateway whose descriptor limit is lowered under it (so its connection cap no longer fits): the
    operating system refuses the excess, the gateway says so once, and serves again once they close."""
    profile = admin.create_profile()
    gateway, plain, _ = await asyncio.to_thread(
        _extra_gateway, env, MQTTS_PORT="0", MQTT_IDLE_TIMEOUT_S=str(OTHER_TIMERS_S))
    pid = gateway["mqtt_gateway"].proc.pid  # type: ignore[union-attr]
    connect = client_codec.encode_connect("fd", username="provision", keep_alive=0)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (256, hard))
        conns = await _open_many(400, plain, connect)
        answers = await asyncio.gather(*(_first_bytes(r) for r, _ in conns))
        accepted = answers.count(CONNACK_OK)
        assert 100 < accepted < 256 and accepted + answers.count(b"") == 400, answers
        print(f"descriptor limit 256: {accepted} of 400 connections accepted, {answers.count(b'')} dropped")
        warnings = [line for line in gateway.output().splitlines() if FD_WARNING in line]
        assert len(warnings) == 1 and " WARNING " in warnings[0], warnings

        _close_all(conns)
        conns = []
        await asyncio.to_thread(_retry_until_accepted, plain)
        for _ in range(3):
            await asyncio.to_thread(_provision_and_connect, plain, profile)
        output = gateway.output()
    finally:
        _close_all(conns)
        await asyncio.to_thread(gateway.stop)
    assert sum(FD_WARNING in line for line in output.splitlines()) == 1
    assert "Traceback" not in output


async def _first_bytes(reader: asyncio.StreamReader) -> bytes:
    """The CONNACK, or b"" when the connection was dropped without one."""
    try:
        return await asyncio.wait_for(reader.readexactly(4), 20)
    except asyncio.IncompleteReadError as exc:
        return exc.partial
    except ConnectionError:
        return b""
