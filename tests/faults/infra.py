"""Private RabbitMQ and Postgres instances for fault tests, started on free ports and killed by PID.

Fault tests kill, restart and freeze the broker and the database. They must never do that to the
machine's shared servers (PostgreSQL on 5432, RabbitMQ on 5672 with its Erlang distribution port
25672 and epmd on 4369): other test runs and CI use those. So each instance here is a separate
process tree with its own ports, data directory, Erlang node name, epmd and cookie, and every
signal goes to a PID this module started (or a descendant of one) - never to a name, never through
``rabbitmqctl`` or ``pg_ctl`` against a default node or data directory.

Clean-up happens three ways, so no instance outlives the test run:

- ``stop()`` (context-manager exit, pytest finalizers);
- an ``atexit`` hook for instances still running when the interpreter exits;
- a watchdog process (:class:`Reaper`) that holds a pipe from this process: when this process dies
  in any way, even SIGKILL, the pipe closes and the watchdog kills every process tree still
  registered (identified by PID *and* start time, so a reused PID is never hit) and removes the
  temporary directories.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

# The machine's shared servers' ports and the choice of free ports: one place for every test (tests/ports.py).
from tests.ports import SHARED_PORTS, free_port  # noqa: E402,F401

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


# --- processes by PID ----------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent PID, start time in clock ticks) of ``pid`` from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may contain spaces; the fields after it are fixed.
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[19])


def start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid``: with the PID, identifies a process across PID reuse."""
    stat = _stat(pid)
    return None if stat is None else stat[2]


def is_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a zombie holds no port, no file, no CPU)."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, found through parent links in /proc.

    Needed because the processes we kill do not stay in our process group: Postgres backends and
    Erlang's ``erl_child_setup`` call setsid(), so ``killpg`` would miss them.
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None:
                children.setdefault(stat[1], []).append(int(entry))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def process_tree(roots: Iterable[int]) -> list[int]:
    """The live roots and all their descendants (collect this *before* killing: orphans lose their link)."""
    tree: list[int] = []
    for root in roots:
        if is_running(root):
            tree.append(root)
            tree.extend(d for d in descendants(root) if d not in tree)
    return tree


def signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` runs; returns the ones still running after ``timeout``."""
    pending = list(pids)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pending = [pid for pid in pending if is_running(pid)]
        if pending:
            time.sleep(0.02)
    return [pid for pid in pending if is_running(pid)]


# --- ports -----------------------------------------------------------------------------------


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``port`` right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def listeners(port: int) -> str:
    """Who listens on ``port`` (``ss -ltnp``), for error messages."""
    try:
        return subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True,
                              timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def ensure_port_free(port: int, wait_s: float = 10.0) -> None:
    """Refuse to start a server beside another one on ``port`` (after waiting ``wait_s`` for it to go)."""
    deadline = time.monotonic() + wait_s
    while port_accepts(port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"port {port} is taken by another process; refusing to start beside it: "
                               f"{listeners(port) or 'no listener (a connection to itself?)'}")
        time.sleep(0.2)


def run_coroutine_blocking(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from synchronous code, even when the caller's thread already
    runs an event loop (a fixture or an ``async def`` test calling a sync method): it runs on a
    private loop in a helper thread."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(factory())  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="infra-probe", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


# --- the watchdog -------------------------------------------------------------------------------

_WATCHDOG = r"""
import json, os, shutil, signal, sys, time
state_file = sys.argv[1]
sys.stdin.buffer.read()          # returns when the test process is gone (or closed the pipe)
def stat(pid):
    try:
        raw = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[19])
try:
    state = json.load(open(state_file))
except (OSError, ValueError):
    state = {}
children = {}
for entry in os.listdir("/proc"):
    if entry.isdigit():
        s = stat(int(entry))
        if s is not None:
            children.setdefault(s[1], []).append(int(entry))
victims = []
for item in state.values():
    for pid, started in item.get("pids", []):
        s = stat(pid)
        if s is None or s[2] != started or s[0] in "ZX":
            continue
        todo = [pid]
        while todo:
            p = todo.pop()
            victims.append(p)
            todo.extend(children.get(p, []))
for pid in victims:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
time.sleep(0.5)
for item in state.values():
    for path in item.get("dirs", []):
        shutil.rmtree(path, ignore_errors=True)
try:
    os.unlink(state_file)
except OSError:
    pass
"""


class Reaper:
    """Kills registered process trees if this (test) process dies without cleaning up, even by SIGKILL.

    One watchdog process per test process. It blocks reading a pipe whose only writer is this
    process; end of file means we are gone, and it then SIGKILLs every registered tree whose root
    still has the recorded start time, and removes the registered directories.
    """

    _instance: Reaper | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self._state_file = Path(tempfile.gettempdir()) / f"fault-reaper-{os.getpid()}-{uuid.uuid4().hex[:6]}.json"
        self._state: dict[str, dict[str, Any]] = {}
        self._write()
        read_end, self._write_end = os.pipe()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(self._state_file)],
            stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )
        os.close(read_end)
        os.set_inheritable(self._write_end, False)

    @classmethod
    def get(cls) -> Reaper:
        with cls._lock:
            if cls._instance is None:
                cls._instance = Reaper()
            return cls._instance

    def _write(self) -> None:
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state))
        os.replace(tmp, self._state_file)

    def track(self, key: str, pids: Iterable[int] = (), dirs: Iterable[str | Path] = ()) -> None:
        """Register (or replace) ``key``'s root PIDs and directories."""
        with self._lock:
            recorded = [[pid, start_time(pid)] for pid in pids if start_time(pid) is not None]
            self._state[key] = {"pids": recorded, "dirs": [str(d) for d in dirs]}
            self._write()

    def untrack(self, key: str) -> None:
        with self._lock:
            if self._state.pop(key, None) is not None:
                self._write()

    @property
    def watchdog_pid(self) -> int:
        return self._proc.pid


# --- common lifecycle -------------------------------------------------------------------------------

_LIVE: dict[int, _Instance] = {}


def _stop_all_at_exit() -> None:
    for instance in list(_LIVE.values()):
        with suppress(Exception):  # best effort at interpreter exit
            instance.stop()


atexit.register(_stop_all_at_exit)


class _Instance:
    """What both private servers share: a temporary directory, start timing, registration for clean-up."""

    kind = "instance"

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.key = f"{self.kind}-{uuid.uuid4().hex[:8]}"
        #: Seconds each start() took until the server accepted a real client connection.
        self.start_times: list[float] = []
        self._stopped = False

    # Subclasses: the root PIDs of everything they started.
    def root_pids(self) -> list[int]:
        raise NotImplementedError

    def pids(self) -> list[int]:
        """Every running process of this instance (roots and descendants)."""
        return process_tree(self.root_pids())

    def ports(self) -> list[int]:
        raise NotImplementedError

    def _register(self) -> None:
        _LIVE[id(self)] = self
        Reaper.get().track(self.key, self.root_pids(), [self.base_dir])

    def _unregister(self) -> None:
        _LIVE.pop(id(self), None)
        Reaper.get().untrack(self.key)

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self: T) -> T:
        self.start()  # type: ignore[attr-defined]
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _log_tail(self, path: Path, chars: int = 3000) -> str:
        try:
            return path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _reap(proc: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    """Collect our direct child's exit status so it does not linger as a zombie."""
    if proc is not None:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- RabbitMQ ---------------------------------------------------------------------------------------


class PrivateRabbitMQ(_Instance):
    """A RabbitMQ node of its own: node name ``fault-<random>@localhost``, its own AMQP port, Erlang
    distribution port, epmd (on its own port, so the machine's epmd on 4369 is never asked), cookie
    (its own HOME), data, log and configuration directories, and no plugins (so no management or
    Prometheus listener on a shared port).

    The machine's ``/etc/rabbitmq/rabbitmq-env.conf`` names the shared node; it is never read
    (``RABBITMQ_CONF_ENV_FILE`` points at our own file) and no ``RABBITMQ_*``/``ERL_*`` variable of the
    test's environment leaks in.
    """

    kind = "rabbitmq"

    def __init__(self, base_dir: str | Path | None = None, *, prefix: str = "fault", extra_config: str = "",
                 plugins: Iterable[str] = ()) -> None:
        """``extra_config``: rabbitmq.conf lines appended to this node's own; ``plugins``: enabled at boot
        (e.g. ``rabbitmq_mqtt``: its listener then belongs in ``extra_config``, on a port of ours)."""
        super().__init__(Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix=f"{prefix}-rabbit-")))
        self.amqp_port = free_port()
        self.dist_port = free_port({self.amqp_port})
        self.epmd_port = free_port({self.amqp_port, self.dist_port})
        self.node_name = f"{prefix}-{uuid.uuid4().hex[:8]}@localhost"
        self.home = self.base_dir / "home"
        self.mnesia_dir = self.base_dir / "mnesia"
        self.log_dir = self.base_dir / "log"
        for directory in (self.home, self.mnesia_dir, self.log_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.config_file = self.base_dir / "rabbitmq.conf"
        self.config_file.write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            "loopback_users.guest = true\n"
            "log.console = false\n"
            "log.file.level = info\n" + extra_config
        )
        self.env_file = self.base_dir / "rabbitmq-env.conf"
        self.env_file.write_text("# private node: nothing here (never the machine's /etc/rabbitmq/rabbitmq-env.conf)\n")
        self.plugins_file = self.base_dir / "enabled_plugins"
        self.plugins_file.write_text(f"[{','.join(plugins)}].\n")
        self.output_file = self.log_dir / "stdout.log"
        self._server: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """AMQP URL of this node (guest is loopback-only, which is where the services run)."""
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    def ports(self) -> list[int]:
        return [self.amqp_port, self.dist_port, self.epmd_port]

    def root_pids(self) -> list[int]:
        return [p.pid for p in (self._server, self._epmd) if p is not None and p.poll() is None]

    @property
    def beam_pid(self) -> int | None:
        """The Erlang VM's PID (the child of the ``rabbitmq-server`` shell wrapper)."""
        if self._server is None:
            return None
        for pid in descendants(self._server.pid):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip().startswith("beam"):
                    return pid
            except OSError:
                continue
        return None

    def _environment(self) -> dict[str, str]:
        return {
            "PATH": "/usr/sbin:/usr/bin:/bin",
            "HOME": str(self.home),  # the Erlang cookie lives here
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODENAME": self.node_name,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.mnesia_dir),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_CONFIG_FILE": str(self.config_file),
            "RABBITMQ_CONF_ENV_FILE": str(self.env_file),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base_dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.plugins_file),
            "RABBITMQ_PID_FILE": str(self.base_dir / "rabbitmq.pid"),
            # The distribution listener on loopback only (Erlang's default is every interface).
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def start(self, timeout: float = 90.0) -> float:
        """Start epmd and the node; return once AMQP accepts a real login. Returns the seconds it took."""
        if self._stopped:
            raise RuntimeError("stopped instances cannot be started again")
        if self.root_pids():
            raise RuntimeError(f"{self.node_name} is already running")
        for port in self.ports():
            ensure_port_free(port)
        began = time.monotonic()
        env = self._environment()
        with open(self.output_file, "ab") as out:
            # Our own epmd in the foreground, so its PID is ours (the node would otherwise spawn a
            # daemonised one we would have to hunt for).
            self._epmd = subprocess.Popen(
                ["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
            self._register()
            while not port_accepts(self.epmd_port):
                if self._epmd.poll() is not None or time.monotonic() - began > 10:
                    raise RuntimeError(f"epmd did not start on {self.epmd_port}:\n{self._log_tail(self.output_file)}")
                time.sleep(0.02)
            self._server = subprocess.Popen(
                [RABBITMQ_SERVER], cwd=self.base_dir, env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
            self._register()
        try:
            self._wait_accepting(began + timeout)
        except BaseException:
            self.kill()
            raise
        elapsed = time.monotonic() - began
        self.start_times.append(elapsed)
        self._register()  # the PIDs are final now
        return elapsed

    def _wait_accepting(self, deadline: float) -> None:
        import aio_pika

        async def login() -> None:
            connection = await aio_pika.connect(self.url, timeout=2)
            await connection.close()

        while True:
            if self._server is None or self._server.poll() is not None:
                raise RuntimeError(f"{self.node_name} exited while starting:\n{self._log_tail(self.output_file)}")
            if port_accepts(self.amqp_port):
                try:
                    run_coroutine_blocking(login)
                    return
                except Exception:  # noqa: BLE001 - still booting
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.node_name} not accepting AMQP on {self.amqp_port}:\n"
                                   f"{self._log_tail(self.output_file)}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the node - the shell wrapper, the Erlang VM, ``erl_child_setup`` - and our epmd, by PID.

        Like a crashed host: no connection is closed cleanly, nothing is flushed."""
        tree = self.pids()
        signal_pids(tree, signal.SIGKILL)
        left = wait_gone(tree, 10)
        _reap(self._server)
        _reap(self._epmd)
        self._server = self._epmd = None
        if left:
            raise RuntimeError(f"processes {left} of {self.node_name} survived SIGKILL")

    def restart(self, timeout: float = 90.0) -> float:
        """Kill the node (if running) and start it again: same node name, data directory and ports."""
        self.kill()
        return self.start(timeout)

    def stop(self) -> None:
        """Shut the node down (SIGTERM by PID, SIGKILL after 20 s), stop our epmd, remove the directory."""
        if self._stopped:
            return
        try:
            tree = self.pids()
            if self._server is not None and self._server.poll() is None:
                signal_pids([self._server.pid] + ([self.beam_pid] if self.beam_pid else []), signal.SIGTERM)
                if wait_gone([p for p in tree if p != (self._epmd.pid if self._epmd else None)], 20):
                    signal_pids(self.pids(), signal.SIGKILL)
            signal_pids(self.pids(), signal.SIGKILL)
            wait_gone(tree, 10)
            _reap(self._server)
            _reap(self._epmd)
            self._server = self._epmd = None
        finally:
            self._stopped = True
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self._unregister()


# --- Postgres --------------------------------------------------------------------------------------


def postgres_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` (Debian's layout), or the one holding ``initdb`` on PATH."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if candidates:
        return candidates[-1].parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise RuntimeError("no Postgres server binaries (initdb, postgres) found")


class PrivatePostgres(_Instance):
    """A Postgres cluster of its own (``initdb`` in a temporary directory), on its own port and socket
    directory, trust authentication for ``postgres`` on 127.0.0.1.

    Postgres refuses to run as root, so initdb and the server run as the ``postgres`` OS user (the
    child switches user before exec; the PID we hold is the postmaster's own).
    """

    kind = "postgres"

    def __init__(self, base_dir: str | Path | None = None, *, os_user: str = "postgres",
                 settings: dict[str, str] | None = None) -> None:
        super().__init__(Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="fault-pg-")))
        self.bin_dir = postgres_bin_dir()
        self.port = free_port()
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "sock"
        self.log_file = self.base_dir / "postgres.log"
        self.os_user = os_user
        user = pwd.getpwnam(os_user)
        self._uid, self._gid = user.pw_uid, user.pw_gid
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        for path in (self.base_dir, self.socket_dir):
            os.chown(path, self._uid, self._gid)
        #: Server settings: durable commits stay on (a restart must find every committed device);
        #: fsync is off because the host never crashes in these tests, only the server does.
        self.settings = {"listen_addresses": "127.0.0.1", "fsync": "off", "max_connections": "200",
                         "log_min_messages": "warning", **(settings or {})}
        self._postmaster: subprocess.Popen[bytes] | None = None
        self._paused: list[int] = []
        self.initdb_seconds: float | None = None

    @property
    def url(self) -> str:
        """URL of the maintenance database (tests create their own databases beside it)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def ports(self) -> list[int]:
        return [self.port]

    def root_pids(self) -> list[int]:
        return [self._postmaster.pid] if self._postmaster is not None and self._postmaster.poll() is None else []

    @property
    def postmaster_pid(self) -> int | None:
        pids = self.root_pids()
        return pids[0] if pids else None

    def _as_postgres(self) -> dict[str, Any]:
        return {"user": self._uid, "group": self._gid, "extra_groups": [], "cwd": self.base_dir,
                "env": {"PATH": f"{self.bin_dir}:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
                        "HOME": str(self.base_dir)}}

    def _initdb(self) -> None:
        began = time.monotonic()
        result = subprocess.run(
            [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
             "-E", "UTF8", "--no-sync", "--no-instructions"],
            stdin=subprocess.DEVNULL, capture_output=True, **self._as_postgres(),
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{result.stdout.decode()}\n{result.stderr.decode()}")
        self.initdb_seconds = time.monotonic() - began

    def start(self, timeout: float = 60.0) -> float:
        """initdb (first time only), start the postmaster, return once a client can log in; returns seconds."""
        if self._stopped:
            raise RuntimeError("stopped instances cannot be started again")
        if self.root_pids():
            raise RuntimeError(f"postgres on {self.port} is already running")
        ensure_port_free(self.port)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        # After a SIGKILL the lock file is stale; every process of ours is gone (kill() checked).
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        began = time.monotonic()
        args = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                "-k", str(self.socket_dir)]
        for name, value in self.settings.items():
            args += ["-c", f"{name}={value}"]
        with open(self.log_file, "ab") as out:
            os.chown(self.log_file, self._uid, self._gid)
            self._postmaster = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                                start_new_session=True, **self._as_postgres())
        self._register()
        try:
            self._wait_accepting(began + timeout)
        except BaseException:
            self.kill()
            raise
        elapsed = time.monotonic() - began
        self.start_times.append(elapsed)
        return elapsed

    def _wait_accepting(self, deadline: float) -> None:
        import asyncpg

        async def login() -> None:
            conn = await asyncpg.connect(self.url, timeout=2)
            await conn.close()

        while True:
            if self._postmaster is None or self._postmaster.poll() is not None:
                raise RuntimeError(f"postgres exited while starting:\n{self._log_tail(self.log_file)}")
            try:
                run_coroutine_blocking(login)
                return
            except Exception:  # noqa: BLE001 - still starting or recovering
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres not accepting on {self.port}:\n{self._log_tail(self.log_file)}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend and auxiliary process (each in its own session,
        so found through /proc), by PID. Like a crash: the next start runs crash recovery."""
        tree = self.pids()
        signal_pids(tree, signal.SIGKILL)  # SIGKILL also ends stopped (paused) processes
        self._paused = []
        left = wait_gone(tree, 10)
        _reap(self._postmaster)
        self._postmaster = None
        if left:
            raise RuntimeError(f"postgres processes {left} survived SIGKILL")

    def restart(self, timeout: float = 60.0) -> float:
        """Kill -9 (if running) and start again on the same data directory and port; returns start seconds."""
        self.kill()
        return self.start(timeout)

    def pause(self) -> list[int]:
        """SIGSTOP the postmaster and then every child: connections hang, nothing is refused or closed.

        The postmaster is frozen first so it cannot fork a backend we would miss; the children are
        listed twice to catch one forked just before. Returns the PIDs stopped."""
        root = self.postmaster_pid
        if root is None:
            raise RuntimeError("postgres is not running")
        os.kill(root, signal.SIGSTOP)
        stopped = [root]
        for _ in range(2):
            for pid in descendants(root):
                if pid not in stopped:
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append(pid)
        self._paused = stopped
        return stopped

    def resume(self) -> None:
        """SIGCONT everything pause() stopped, and anything else of the tree (nothing forks while its
        parent is stopped, but a SIGCONT to a running process is harmless)."""
        root = self.postmaster_pid
        current = process_tree([root]) if root is not None else []
        signal_pids([p for p in self._paused if p != root] + [p for p in current if p not in self._paused],
                    signal.SIGCONT)
        if root is not None:
            os.kill(root, signal.SIGCONT)
        self._paused = []

    @property
    def paused(self) -> bool:
        return bool(self._paused)

    @contextmanager
    def stalled(self) -> Iterator[None]:
        """Everything inside the block runs while Postgres is frozen; it is resumed however the block ends."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def stall(self, seconds: float) -> None:
        """Freeze Postgres for ``seconds`` (blocking: call it through ``asyncio.to_thread`` from a test's loop)."""
        with self.stalled():
            time.sleep(seconds)

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster, by PID), SIGKILL after 15 s; then remove the directory."""
        if self._stopped:
            return
        try:
            if self._paused:
                self.resume()
            tree = self.pids()
            if self._postmaster is not None and self._postmaster.poll() is None:
                self._postmaster.send_signal(signal.SIGINT)
                if wait_gone(tree, 15):
                    signal_pids(self.pids(), signal.SIGKILL)
            signal_pids(self.pids(), signal.SIGKILL)
            wait_gone(tree, 10)
            _reap(self._postmaster)
            self._postmaster = None
        finally:
            self._stopped = True
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self._unregister()
