"""Listener limits of the MQTT gateway: read deadlines, the connection cap, descriptors, log episodes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from mqtt_gateway import codec
from mqtt_gateway.limits import (
    FD_RESERVE,
    ConnectionGate,
    EpisodeLog,
    effective_connection_cap,
)
from provisioning_common import mqtt_client_packets as client_codec

# --- read deadlines ----------------------------------------------------------------------------------


async def test_idle_deadline_waits_for_the_first_byte() -> None:
    reader = asyncio.StreamReader()
    with pytest.raises(TimeoutError, match="no packet within"):
        await codec.read_packet(reader, max_packet_size=1024, protocol_level=4, idle_timeout=0.05)


async def test_packet_deadline_runs_from_the_first_byte() -> None:
    reader = asyncio.StreamReader()
    publish = codec.encode_publish("/provision/request", b"{}" * 50, qos=1, packet_id=1)
    reader.feed_data(publish[:7])  # half a packet, then silence
    with pytest.raises(TimeoutError, match="packet incomplete"):
        # A generous idle deadline does not help half a packet: the packet deadline closes it.
        await codec.read_packet(reader, max_packet_size=1024, protocol_level=4, idle_timeout=60, packet_timeout=0.05)


async def test_packet_arriving_in_pieces_within_the_deadline_is_read() -> None:
    reader = asyncio.StreamReader()
    publish = codec.encode_publish("/provision/request", b"x" * 100, qos=1, packet_id=1)
    loop = asyncio.get_running_loop()
    for at, piece in ((0.0, publish[:40]), (0.02, publish[40:80]), (0.04, publish[80:])):
        loop.call_later(at, reader.feed_data, piece)
    packet = await codec.read_packet(reader, max_packet_size=1024, protocol_level=4, idle_timeout=1, packet_timeout=1)
    assert isinstance(packet, codec.Publish) and packet.payload == b"x" * 100


async def test_idle_deadline_does_not_cut_a_packet_that_started_in_time() -> None:
    """The idle deadline is for the first byte only; the rest has the packet deadline."""
    reader = asyncio.StreamReader()
    data = client_codec.encode_pingreq()
    loop = asyncio.get_running_loop()
    loop.call_later(0.02, reader.feed_data, data[:1])
    loop.call_later(0.15, reader.feed_data, data[1:])  # after the idle deadline, within the packet one
    packet = await codec.read_packet(reader, max_packet_size=1024, protocol_level=4, idle_timeout=0.1,
                                     packet_timeout=1)
    assert isinstance(packet, codec.PingReq)


@pytest.mark.parametrize("split", [1, 2, 3, 4, 10])
async def test_packet_buffered_in_part_is_read_whatever_the_split(split: int) -> None:
    """The packet head, a two-byte remaining length here, may arrive cut anywhere: a packet held whole in
    the buffer is read at once, one held in part waits (within the packet deadline) for the rest."""
    reader = asyncio.StreamReader()
    publish = codec.encode_publish("/provision/request", b"y" * 300, qos=1, packet_id=7)
    assert publish[1] & 0x80 and not publish[2] & 0x80  # remaining length takes two bytes
    reader.feed_data(publish[:split])
    asyncio.get_running_loop().call_later(0.02, reader.feed_data, publish[split:] + client_codec.encode_pingreq())
    first = await codec.read_packet(reader, max_packet_size=1024, protocol_level=4, idle_timeout=1, packet_timeout=1)
    assert isinstance(first, codec.Publish) and first.payload == b"y" * 300 and first.packet_id == 7
    second = await codec.read_packet(reader, max_packet_size=1024, protocol_level=4, idle_timeout=1, packet_timeout=1)
    assert isinstance(second, codec.PingReq)


@pytest.mark.parametrize("missing", [1, 2, 50])
async def test_whole_packet_then_part_of_one_still_times_out(missing: int) -> None:
    """A packet received whole is read without deadlines; one short of even its last byte still gets one."""
    reader = asyncio.StreamReader()
    publish = codec.encode_publish("/provision/request", b"{}" * 50, qos=1, packet_id=1)
    reader.feed_data(client_codec.encode_pingreq() + publish[:-missing])
    assert isinstance(await codec.read_packet(reader, max_packet_size=1024, protocol_level=4, idle_timeout=60,
                                              packet_timeout=0.05), codec.PingReq)
    with pytest.raises(TimeoutError, match="packet incomplete"):
        await codec.read_packet(reader, max_packet_size=1024, protocol_level=4, idle_timeout=60, packet_timeout=0.05)


async def test_oversize_packet_held_whole_is_still_refused() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(codec.encode_publish("/provision/request", b"z" * 2000, qos=0))
    with pytest.raises(codec.PacketTooLarge):
        await codec.read_packet(reader, max_packet_size=1024, protocol_level=4, idle_timeout=1, packet_timeout=1)


# --- episodes, the cap, descriptors ------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_episode_log_warns_once_per_episode(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    logger = logging.getLogger("test.episode")
    episode = EpisodeLog(logger, "limit reached (SETTING)", "over: {count} in {seconds} s", quiet_s=60, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.episode"):
        for _ in range(5000):
            episode.event()
            clock.now += 0.01
        clock.now += 61  # quiet: the next event starts a new episode, after the summary of the first
        episode.event()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert [w.getMessage() for w in warnings] == ["limit reached (SETTING)"] * 2
    assert infos == ["over: 5000 in 50.0 s"]
    assert episode.episodes == 2 and episode.active


async def test_episode_log_ends_by_itself_when_quiet(caplog: pytest.LogCaptureFixture) -> None:
    episode = EpisodeLog(logging.getLogger("test.episode2"), "start", "end: {count}", quiet_s=0.05)
    with caplog.at_level(logging.INFO, logger="test.episode2"):
        episode.event()
        episode.event()
        for _ in range(100):
            if not episode.active:
                break
            await asyncio.sleep(0.02)
    assert [r.getMessage() for r in caplog.records] == ["start", "end: 2"]


def test_connection_gate_refuses_at_the_cap_and_names_the_setting(caplog: pytest.LogCaptureFixture) -> None:
    gate = ConnectionGate(2)
    with caplog.at_level(logging.INFO, logger="mqtt_gateway.limits"):
        assert gate.try_enter() and gate.try_enter()
        assert [gate.try_enter() for _ in range(100)] == [False] * 100
        gate.leave()
        assert gate.try_enter()
    assert gate.open == 2 and gate.refused == 100
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "MQTT_MAX_CONNECTIONS" in warnings[0]


def test_cap_keeps_the_gateways_reserve_free() -> None:
    """The fitting itself is tested with provisioning_common.descriptors; here: the MQTT reserve."""
    assert effective_connection_cap(10_000, 1024) == 1024 - FD_RESERVE
    assert effective_connection_cap(50, 1024) == 50


# A listener whose process runs out of descriptors. It says "hi" to every connection it accepts and keeps
# it; after "release" on stdin it closes them all, then says "hi" and closes, until the next line on stdin.
_EMFILE_SERVER = """
    import asyncio, logging, resource, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s")
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    from mqtt_gateway.limits import ConnectionGate, DescriptorWatch
    from mqtt_gateway.tls import start_plain_server

    held = []

    async def main():
        loop = asyncio.get_running_loop()
        watch = DescriptorWatch()
        watch.install(loop)
        gate = ConnectionGate(100_000)

        class Admission:
            def try_enter(self):
                watch.after_accept()
                return gate.try_enter()

            def leave(self):
                gate.leave()

        released = asyncio.Event()

        async def hold(conn):
            conn.write(b"hi")
            if released.is_set():  # after the release, serve and close (the backlog's dead clients too)
                await conn.drain()
                conn.close()
                return
            held.append(conn)
            await conn.wait_closed()

        server = await start_plain_server(hold, "127.0.0.1", 0, admission=Admission())
        print("PORT", server.sockets[0].getsockname()[1], flush=True)
        assert (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "release"
        released.set()
        for conn in held:
            conn.close()
        print("RELEASED", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        print("SERVING", server.is_serving(), flush=True)
        for conn in held:
            conn.close()
        await asyncio.sleep(0.5)  # let the handlers see their connections closed

    if sys.argv[1] == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
"""


def _greeted(port: int) -> bool:
    """Connect; True when the server accepted us (said "hi")."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(5)
        try:
            return sock.recv(2) == b"hi"
        except OSError:
            return False


def _lines_until(proc: subprocess.Popen[str], marker: str) -> str:
    assert proc.stdout is not None
    lines = []
    while True:
        line = proc.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
        if line.strip() == marker:
            return "".join(lines)


def _count_greeted(socks: list[socket.socket]) -> int:
    """How many of these connections the server accepted; the others it dropped (uvloop) or left in the
    listen backlog (asyncio retries accept() a second later)."""
    greeted = 0
    for sock in socks:
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # nothing yet (still in the backlog) or reset
            greeted += sock.recv(2) == b"hi"
    return greeted


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_out_of_descriptors_is_logged_once_and_the_listener_survives(loop_kind: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_EMFILE_SERVER), loop_kind], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        line = proc.stdout.readline()
        assert line.startswith("PORT"), line + proc.stdout.read()
        port = int(line.split()[1])
        socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(120)]
        time.sleep(1.5)
        greeted = _count_greeted(socks)
        assert 20 < greeted < 64, greeted  # some were served, then the process ran out for the others
        proc.stdin.write("release\n")
        proc.stdin.flush()
        before = _lines_until(proc, "RELEASED")
        for sock in socks:
            sock.close()
        # The listener is still there: new clients are served once descriptors are free again.
        deadline = time.monotonic() + 10
        while not _greeted(port):
            assert time.monotonic() < deadline, "listener never served again"
            time.sleep(0.1)
        assert all(_greeted(port) for _ in range(10))
        proc.stdin.write("done\n")
        proc.stdin.flush()
        output, _ = proc.communicate(timeout=20)
        output = before + output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "SERVING True" in output
    assert output.count("out of file descriptors") == 1, output[-3000:]
    assert "WARNING mqtt_gateway.limits: MQTT listener out of file descriptors" in output
    assert "Traceback" not in output, output[-3000:]
