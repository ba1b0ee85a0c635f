"""A private Mosquitto for one test module: its own port, config, password file and persistence folder.

Started from ``/usr/sbin/mosquitto`` with a generated config that uses the shipped ACL file
(``deploy/brokers/mosquitto/acl``); the machine's own Mosquitto (and its port 1883) is never touched.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from devstack import free_port

REPO = Path(__file__).resolve().parents[2]
SHIPPED_ACL = REPO / "deploy" / "brokers" / "mosquitto" / "acl"
BRIDGE_USER = "provisioning-bridge"


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )


def password_line(username: str, password: str) -> str:
    """A Mosquitto 2.x password file entry (``$7$``: PBKDF2-HMAC-SHA512, 101 iterations), as mosquitto_passwd writes."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return f"{username}:$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}\n"


class Mosquitto:
    def __init__(self, binary: str, folder: Path, tls: tuple[Path, Path] | None = None) -> None:
        """``tls``: (server certificate chain, key) for a second, TLS listener on ``tls_port``."""
        self.binary = binary
        self.folder = folder
        self.port = free_port()
        self.tls_port = free_port() if tls else 0
        self.bridge_password = secrets.token_urlsafe(16)
        self.log_file = folder / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        (folder / "passwd").write_text(password_line(BRIDGE_USER, self.bridge_password))
        lines = [
            # Mosquitto 2 started as root switches to the "mosquitto" user unless told to stay.
            "user root" if os.geteuid() == 0 else "",
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"password_file {folder / 'passwd'}",
            f"acl_file {SHIPPED_ACL}",
            "persistence true",
            f"persistence_location {folder}/",
            "max_queued_messages 100000",
            f"log_dest file {self.log_file}",
            "log_type all",
        ]
        if tls:  # listener options follow their listener line
            lines += [f"listener {self.tls_port} 127.0.0.1", f"certfile {tls[0]}", f"keyfile {tls[1]}"]
        self.config = folder / "mosquitto.conf"
        self.config.write_text("\n".join(line for line in lines if line) + "\n")

    @property
    def bridge_url(self) -> str:
        return f"mqtt://{BRIDGE_USER}:{self.bridge_password}@127.0.0.1:{self.port}"

    @property
    def bridge_tls_url(self) -> str:
        return f"mqtts://{BRIDGE_USER}:{self.bridge_password}@localhost:{self.tls_port}"

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not listen in time")

    def stop(self) -> None:
        """SIGTERM: Mosquitto writes its persistence file (queued QoS 1 messages, sessions) and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
