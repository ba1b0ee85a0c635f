"""Start, watch and stop the services as child processes (``python -m <service>``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from provisioning_common.settings import Settings

#: Start order: back-end services first so gateways find their queues consumed.
SERVICES: tuple[str, ...] = (
    "credentials", "provisioning_core", "admin_api", "http_gateway", "mqtt_gateway", "coap_gateway",
)

#: How each service tells it is ready: an HTTP health URL (port variable) or a log line.
_HEALTH_PORT_VAR = {"http_gateway": "HTTP_PORT", "admin_api": "ADMIN_PORT"}
_READY_LINE = "ready"
#: Lines of an echoed process's output kept in memory (the rest went to the terminal).
ECHOED_LINES_KEPT = 2000


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_in_use(host: str, port: int, *, udp: bool = False) -> bool:
    """Whether ``port`` (TCP, or UDP with ``udp``) cannot be bound on ``host``."""
    with socket.socket(type=socket.SOCK_DGRAM if udp else socket.SOCK_STREAM) as sock:
        if not udp:  # UDP: no SO_REUSEADDR, which would let a bind succeed beside a live listener
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


@dataclass
class ServiceProcess:
    """One child process; its output is kept in ``lines`` (and echoed when ``echo`` is set).

    Echoed (``make up``, which may run for days at thousands of log lines a second) only the last
    ``ECHOED_LINES_KEPT`` lines (up to twice as many) are kept, for the error shown when the process exits
    early; tests, which read a short-lived stack's whole output, keep all of it.
    """

    name: str
    env: Mapping[str, str]
    echo: bool = False
    proc: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)
    _ready: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.name],
            env=dict(self.env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        threading.Thread(target=self._pump, name=f"log-{self.name}", daemon=True).start()

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if self.echo and len(self.lines) >= 2 * ECHOED_LINES_KEPT:
                del self.lines[:-ECHOED_LINES_KEPT]  # at most every ECHOED_LINES_KEPT lines: cheap
            if f"{self.name} ready" in line or f"{_READY_LINE} on queue" in line:
                self._ready.set()
            if self.echo:
                print(f"[{self.name}] {line}", flush=True)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        port_var = _HEALTH_PORT_VAR.get(self.name)
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.output[-4000:]}")
            if port_var is None:
                if self._ready.wait(0.05):
                    return
                continue
            port = self.env.get(port_var) or Settings.model_fields[port_var.lower()].default
            url = f"http://127.0.0.1:{port}/health"
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout:g}s:\n{self.output[-4000:]}")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class Stack:
    """A set of service processes sharing one environment."""

    def __init__(self, env: Mapping[str, str], services: Sequence[str] = SERVICES, *, echo: bool = False) -> None:
        self.env = {**os.environ, **env}
        self.processes = {name: ServiceProcess(name, self.env, echo=echo) for name in services}

    def start(self, timeout: float = 60.0) -> Stack:
        try:
            for process in self.processes.values():
                process.start()
            for process in self.processes.values():
                process.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.stop()

    def __getitem__(self, name: str) -> ServiceProcess:
        return self.processes[name]

    def output(self) -> str:
        return "\n".join(p.output for p in self.processes.values())
