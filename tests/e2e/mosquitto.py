"""A private Mosquitto for one test module: its own ports, password file and persistence folder.

Started from ``/usr/sbin/mosquitto`` with the shipped ``deploy/brokers/mosquitto/mosquitto.conf`` and its
ACL files, unchanged but for ports (on 127.0.0.1), file paths, the log (a file, everything) and, as root,
``user root``; the machine's own Mosquitto (and its port 1883) is never touched. A TLS listener, when
asked for, is added with the accounts listener's settings.
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

from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "deploy" / "brokers" / "mosquitto"
SHIPPED_CONF = SHIPPED / "mosquitto.conf"
SHIPPED_ACL = SHIPPED / "acl"
SHIPPED_LISTENER_ACL = SHIPPED / "provisioning-listener.acl"
BRIDGE_USER = "provisioning-bridge"


def shipped_config(replacements: dict[str, str]) -> str:
    """The shipped mosquitto.conf with each ``old`` line (or path) replaced; every one must occur."""
    text = SHIPPED_CONF.read_text()
    for old, new in replacements.items():
        if old not in text:
            raise AssertionError(f"{old!r} is no longer in {SHIPPED_CONF}: update tests/e2e/mosquitto.py")
        text = text.replace(old, new)
    return text


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
        self.provisioning_port = free_port()
        self.passwd = folder / "passwd"
        self.passwd.write_text(password_line(BRIDGE_USER, self.bridge_password))
        text = shipped_config({
            "listener 1883\n": f"listener {self.port} 127.0.0.1\n",
            "listener 1884\n": f"listener {self.provisioning_port} 127.0.0.1\n",
            "/etc/mosquitto/passwd": str(self.passwd),
            "/etc/mosquitto/provisioning.acl": str(SHIPPED_ACL),
            "/etc/mosquitto/provisioning-listener.acl": str(SHIPPED_LISTENER_ACL),
            "/var/lib/mosquitto/": f"{folder}/",
        })
        # Mosquitto 2 started as root switches to the "mosquitto" user unless told to stay.
        head = "user root\n" if os.geteuid() == 0 else ""
        tail = f"\nlog_dest file {self.log_file}\nlog_type all\n"
        if tls:  # listener options follow their listener line; per_listener_settings: its own auth
            tail += (f"listener {self.tls_port} 127.0.0.1\ncertfile {tls[0]}\nkeyfile {tls[1]}\n"
                     f"allow_anonymous true\npassword_file {self.passwd}\nacl_file {SHIPPED_ACL}\n")
        self.config = folder / "mosquitto.conf"
        self.config.write_text(head + text + tail)

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
