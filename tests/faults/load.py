"""Load under faults: many named devices provisioning at once, what each client was told, and the checker
of issue 10's "Must show" for a fault scenario.

The driver is deliberately a plain device population: each device sends one request and records
exactly what it got (an answer, a status code, or a broken connection). It does not retry on its own;
the checker's single retry of the *same* request after recovery is the device's retry.
"""

from __future__ import annotations

import asyncio
import enum
import json
import re
import secrets
import string
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from credentials.hashing import token_id, verify_password


class Kind(str, enum.Enum):
    """What a device's client saw."""

    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"  # 200 with status FAILURE (e.g. "name taken")
    NOT_FOUND = "NOT_FOUND"  # 200 with status NOT_FOUND
    UNAVAILABLE = "503"  # HTTP 503 "Provisioning timed out" (MQTT: FAILURE "Provisioning timed out")
    OTHER_STATUS = "other HTTP status"
    CONNECTION_ERROR = "connection error"  # no answer at all: refused, reset, closed, client time-out


#: The gateways' time-out message (models.MSG_TIMEOUT): over MQTT it comes as a FAILURE answer.
TIMED_OUT = "Provisioning timed out"


@dataclass
class DeviceRequest:
    """One device's provision request; retried verbatim by the checker."""

    name: str
    body: dict[str, Any]
    #: "generated" (server mints the token), "ACCESS_TOKEN" (device-chosen token) or "MQTT_BASIC".
    credentials: str
    #: Secrets the device itself put in the request (its chosen token or password).
    secrets: tuple[str, ...] = ()
    #: "http" or "mqtt" (ThingsBoard's /provision/request over a plain MQTT connection).
    transport: str = "http"


@dataclass
class Outcome:
    name: str
    kind: Kind
    #: The client received an answer (an HTTP response, an MQTT /provision/response); a broken
    #: connection or a client-side time-out told it nothing.
    told: bool
    status_code: int | None = None
    body: dict[str, Any] | None = None
    error: str | None = None
    transport: str = "http"
    #: Seconds since the load started, when the request was sent and when its outcome was known.
    sent_at: float = 0.0
    done_at: float = 0.0

    @property
    def credentials_value(self) -> Any:
        return (self.body or {}).get("credentialsValue")

    def returned_secrets(self) -> list[str]:
        """Secrets the service handed back in this answer (a token, or an MQTT_BASIC password)."""
        value = self.credentials_value
        if isinstance(value, str):
            return [value]
        if isinstance(value, dict) and value.get("password"):
            return [str(value["password"])]
        return []


_ALNUM = string.ascii_letters + string.digits


def _random(length: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(length))


def make_requests(profile: Mapping[str, Any], count: int, tag: str, *, chosen_token_every: int = 4,
                  mqtt_basic_every: int = 0, over_mqtt_every: int = 0) -> list[DeviceRequest]:
    """``count`` uniquely named ThingsBoard requests for ``profile``.

    Most let the server mint a token; every ``chosen_token_every``-th brings its own ACCESS_TOKEN and
    every ``mqtt_basic_every``-th (0: none) MQTT_BASIC credentials, so the secret scan also covers
    secrets that exist whether or not the device was answered. Every ``over_mqtt_every``-th device
    (0: none) provisions over MQTT instead of HTTP."""
    requests: list[DeviceRequest] = []
    for i in range(count):
        transport = "mqtt" if over_mqtt_every and i % over_mqtt_every == 1 % over_mqtt_every else "http"
        name = f"{tag}-{i:05d}"
        body: dict[str, Any] = {"deviceName": name, "provisionDeviceKey": profile["provisionDeviceKey"],
                                "provisionDeviceSecret": profile["provisionDeviceSecret"]}
        if mqtt_basic_every and i % mqtt_basic_every == mqtt_basic_every - 1:
            password = _random(24)
            body.update(credentialsType="MQTT_BASIC", clientId=f"c{_random(16)}", username=f"u{_random(16)}",
                        password=password)
            requests.append(DeviceRequest(name, body, "MQTT_BASIC", (password,), transport))
        elif chosen_token_every and i % chosen_token_every == chosen_token_every - 1:
            token = _random(24)
            body.update(credentialsType="ACCESS_TOKEN", token=token)
            requests.append(DeviceRequest(name, body, "ACCESS_TOKEN", (token,), transport))
        else:
            requests.append(DeviceRequest(name, body, "generated", (), transport))
    return requests


def classify(status_code: int, body: dict[str, Any] | None) -> Kind:
    """An answer's kind; MQTT answers are classified as if they came with 200."""
    if status_code == 503:
        return Kind.UNAVAILABLE
    if status_code != 200 or body is None:
        return Kind.OTHER_STATUS
    status = body.get("status")
    if status == "SUCCESS" and body.get("credentialsValue"):
        return Kind.SUCCESS
    if status == "NOT_FOUND":
        return Kind.NOT_FOUND
    if status == "FAILURE":
        return Kind.UNAVAILABLE if body.get("errorMsg") == TIMED_OUT else Kind.FAILURE
    return Kind.OTHER_STATUS


class RawHttpClient:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams, for load.

    httpx costs about 8 ms of CPU per request here: on two shared cores the test process, not the
    services, was the bottleneck (one full core at ~110 requests/s), so few requests were ever
    in flight inside the services when a fault hit - exactly where answers get lost. This client
    does only what the gateway's answers need (Content-Length bodies) and several times less work.
    """

    def __init__(self, base_url: str, timeout: float) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout = timeout
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._open: set[asyncio.StreamWriter] = set()

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """(status, body); raises OSError/EOFError/TimeoutError/ValueError when no answer came back."""
        reader, writer = self._idle.pop() if self._idle else await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), self.timeout)
        self._open.add(writer)
        keep = False
        try:
            async with asyncio.timeout(self.timeout):
                writer.write(b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self.host.encode(), self.port,
                                                                  len(body), body))
                status_line = await reader.readline()
                if not status_line:
                    raise EOFError("connection closed before an answer")
                status = int(status_line.split()[1])
                length, keep = 0, True
                while True:
                    line = await reader.readline()
                    if not line:
                        raise EOFError("connection closed in the answer's head")
                    if line in (b"\r\n", b"\n"):
                        break
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"connection" and value.strip().lower() == b"close":
                        keep = False
                answer = await reader.readexactly(length)
        finally:
            if keep:
                self._idle.append((reader, writer))
            else:
                self._open.discard(writer)
                writer.close()
        return status, answer

    async def close(self) -> None:
        for writer in self._open:
            writer.close()
        self._open.clear()
        self._idle.clear()


async def provision_http(client: RawHttpClient, request: DeviceRequest, clock: float = 0.0) -> Outcome:
    """POST one request and record exactly what came back (never raises for network trouble)."""
    sent = time.monotonic() - clock
    try:
        status, raw = await client.post("/api/v1/provision", json.dumps(request.body).encode())
    except (OSError, EOFError, TimeoutError, ValueError, IndexError) as exc:  # refused, reset, closed, time-out
        return Outcome(request.name, Kind.CONNECTION_ERROR, False, error=f"{type(exc).__name__}: {exc}"[:200],
                       sent_at=sent, done_at=time.monotonic() - clock)
    try:
        body = json.loads(raw)
        body = body if isinstance(body, dict) else None
    except ValueError:
        body = None
    return Outcome(request.name, classify(status, body), True, status, body,
                   sent_at=sent, done_at=time.monotonic() - clock)


async def provision_mqtt(port: int, request: DeviceRequest, timeout: float, clock: float = 0.0) -> Outcome:
    """Provision over MQTT as ThingsBoard's example client does (CONNECT as "provision", SUBSCRIBE
    /provision/response, PUBLISH /provision/request QoS 1), on plain asyncio streams (paho's select()
    loop cannot hold this many sockets). No answer (closed, refused, time-out) is a connection error."""
    from tests.e2e.mqtt_clients import raw_provision

    sent = time.monotonic() - clock
    try:
        payload = await raw_provision(port, json.dumps(request.body).encode(), timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - refused, closed (IncompleteReadError, codec errors), time-out
        return Outcome(request.name, Kind.CONNECTION_ERROR, False, error=f"{type(exc).__name__}: {exc}"[:200],
                       transport="mqtt", sent_at=sent, done_at=time.monotonic() - clock)
    try:
        body = json.loads(payload)
        body = body if isinstance(body, dict) else None
    except ValueError:
        body = None
    return Outcome(request.name, classify(200, body), True, None, body, transport="mqtt",
                   sent_at=sent, done_at=time.monotonic() - clock)


@dataclass
class LoadResult:
    requests: dict[str, DeviceRequest]
    outcomes: dict[str, Outcome]
    duration: float

    def counts(self) -> dict[str, int]:
        return dict(Counter(o.kind.value for o in self.outcomes.values()))

    def names(self, *kinds: Kind) -> list[str]:
        return [name for name, o in self.outcomes.items() if o.kind in kinds]


class Load:
    """N devices provisioning over HTTP with at most ``concurrency`` requests in flight, optionally paced
    at ``rate`` requests per second so that the load spans the fault instead of finishing before it.

    ``await load.reached(n)`` lets a test inject its fault once ``n`` devices have their outcome."""

    def __init__(self, http_url: str, requests: Iterable[DeviceRequest], *, concurrency: int = 64,
                 rate: float | None = None, client_timeout: float = 30.0, mqtt_port: int | None = None) -> None:
        self.http_url = http_url
        self.mqtt_port = mqtt_port
        self.requests = {r.name: r for r in requests}
        self.concurrency = concurrency
        self.rate = rate
        self.client_timeout = client_timeout
        self.outcomes: dict[str, Outcome] = {}
        self._progress = asyncio.Condition()
        self._task: asyncio.Task[LoadResult] | None = None
        self.clock = 0.0

    def start(self) -> Load:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> LoadResult:
        self.clock = time.monotonic()
        limit = asyncio.Semaphore(self.concurrency)
        client = RawHttpClient(self.http_url, self.client_timeout)
        try:

            async def one(request: DeviceRequest) -> None:
                try:
                    if request.transport == "mqtt":
                        assert self.mqtt_port, "MQTT devices need mqtt_port"
                        outcome = await provision_mqtt(self.mqtt_port, request, self.client_timeout, self.clock)
                    else:
                        outcome = await provision_http(client, request, self.clock)
                finally:
                    limit.release()
                self.outcomes[request.name] = outcome
                async with self._progress:
                    self._progress.notify_all()

            tasks = []
            for i, request in enumerate(self.requests.values()):
                if self.rate:
                    delay = self.clock + i / self.rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await limit.acquire()
                tasks.append(asyncio.create_task(one(request)))
            await asyncio.gather(*tasks)
        finally:
            await client.close()
        return LoadResult(self.requests, self.outcomes, time.monotonic() - self.clock)

    async def reached(self, completed: int, timeout: float = 60.0) -> None:
        """Wait until ``completed`` devices have an outcome."""
        async with self._progress:
            await asyncio.wait_for(self._progress.wait_for(lambda: len(self.outcomes) >= completed), timeout)

    async def result(self) -> LoadResult:
        assert self._task is not None, "start() first"
        return await self._task

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()


async def run_load(http_url: str, requests: Iterable[DeviceRequest], *, concurrency: int = 64,
                   rate: float | None = None, client_timeout: float = 30.0,
                   mqtt_port: int | None = None) -> LoadResult:
    """The whole load at once (no fault injected from outside)."""
    return await Load(http_url, requests, concurrency=concurrency, rate=rate, client_timeout=client_timeout,
                      mqtt_port=mqtt_port).start().result()


# --- the checker -----------------------------------------------------------------------------------------


@dataclass
class FaultReport:
    """Issue 10's numbers for one scenario; ``violations()`` lists every part of "Must show" that failed."""

    scenario: str
    devices: int
    first_outcomes: dict[str, int]
    #: (a) devices in the database although their client was told something other than SUCCESS.
    committed_but_told_otherwise: list[str] = field(default_factory=list)
    committed_told_by_kind: dict[str, int] = field(default_factory=dict)
    #: Devices in the database whose client got no answer at all (a broken connection); not an (a)
    #: violation (it was told nothing), but its retry must then get SUCCESS (b).
    committed_untold: list[str] = field(default_factory=list)
    #: SUCCESS answers whose device is missing or whose stored credentials are not the returned ones.
    success_not_stored: list[str] = field(default_factory=list)
    #: (b) non-SUCCESS names whose one retry (same request, after recovery) did not get SUCCESS.
    stuck: list[str] = field(default_factory=list)
    retry_outcomes: dict[str, int] = field(default_factory=dict)
    stuck_by_first_kind: dict[str, int] = field(default_factory=dict)
    #: (c) more than one device per name, devices nobody was told about, the same token twice.
    duplicates: list[str] = field(default_factory=list)
    extra_devices: list[str] = field(default_factory=list)
    shared_tokens: int = 0
    #: (d) secrets found in service output: service -> number of distinct secrets (and lines).
    secrets_in_logs: dict[str, int] = field(default_factory=dict)
    secret_lines_in_logs: dict[str, int] = field(default_factory=dict)
    secret_log_examples: list[str] = field(default_factory=list)
    #: (e) "Traceback" in service output: service -> count, and what they were (log line -> exception).
    tracebacks: dict[str, int] = field(default_factory=dict)
    traceback_examples: list[str] = field(default_factory=list)
    #: (f) services that died or were replaced although the test did not kill them, or never came back.
    service_problems: list[str] = field(default_factory=list)
    settle_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def violations(self) -> list[str]:
        found = []
        if self.committed_but_told_otherwise:
            found.append(f"(a) {len(self.committed_but_told_otherwise)} devices committed whose client was told "
                         f"otherwise {self.committed_told_by_kind}: {self.committed_but_told_otherwise[:5]}")
        if self.success_not_stored:
            found.append(f"(a') {len(self.success_not_stored)} SUCCESS answers without their stored credentials: "
                         f"{self.success_not_stored[:5]}")
        if self.stuck:
            found.append(f"(b) {len(self.stuck)} stuck names (retry outcomes {self.retry_outcomes}, by first "
                         f"outcome {self.stuck_by_first_kind}): {self.stuck[:5]}")
        if self.duplicates or self.extra_devices or self.shared_tokens:
            found.append(f"(c) duplicates {len(self.duplicates)}, extra devices {len(self.extra_devices)}, "
                         f"tokens handed to two devices {self.shared_tokens}")
        if self.secrets_in_logs:
            found.append(f"(d) secrets in logs (distinct secrets per service) {self.secrets_in_logs}, lines "
                         f"{self.secret_lines_in_logs}: {self.secret_log_examples[:3]}")
        if self.tracebacks:
            found.append(f"(e) tracebacks {self.tracebacks}: {self.traceback_examples[:6]}")
        for problem in self.service_problems:
            found.append(f"(f) {problem}")
        return found

    def summary(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario, "devices": self.devices, "first_outcomes": self.first_outcomes,
            "a_committed_but_told_otherwise": len(self.committed_but_told_otherwise),
            "a_by_kind": self.committed_told_by_kind,
            "committed_with_no_answer": len(self.committed_untold),
            "success_not_stored": len(self.success_not_stored),
            "b_stuck": len(self.stuck), "b_retry_outcomes": self.retry_outcomes,
            "b_stuck_by_first_outcome": self.stuck_by_first_kind,
            "c_duplicates": len(self.duplicates), "c_extra_devices": len(self.extra_devices),
            "c_shared_tokens": self.shared_tokens,
            "d_secrets_in_logs": self.secrets_in_logs, "d_secret_lines": self.secret_lines_in_logs,
            "e_tracebacks": self.tracebacks, "e_examples": self.traceback_examples[:6],
            "f_services": self.service_problems, "settle_s": round(self.settle_seconds, 1), "notes": self.notes,
        }

    def assert_ok(self) -> None:
        problems = self.violations()
        assert not problems, (f"scenario {self.scenario!r} violates issue 10:\n  - " + "\n  - ".join(problems)
                              + f"\nsummary: {json.dumps(self.summary())}")


async def _devices(database_url: str, profile_id: str) -> dict[str, list[asyncpg.Record]]:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT d.name, c.credentials_type, c.credentials_id, c.secret_hash FROM devices d"
            " LEFT JOIN device_credentials c ON c.device_id = d.id WHERE d.profile_id = $1::uuid", profile_id)
    finally:
        await conn.close()
    by_name: dict[str, list[asyncpg.Record]] = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(row)
    return by_name


async def settle(database_url: str, profile_id: str, *, minimum_s: float, stable_s: float = 2.0,
                 maximum_s: float = 60.0) -> float:
    """Wait until no more devices of the profile appear: at least ``minimum_s`` (work still held by a
    core can commit seconds after its client gave up - that is what (a) looks for), then until the
    count has not changed for ``stable_s``. Returns the seconds waited."""
    began = time.monotonic()
    last_count, last_change = -1, began
    while True:
        now = time.monotonic()
        try:
            count = sum(len(v) for v in (await _devices(database_url, profile_id)).values())
        except (TimeoutError, OSError, asyncpg.PostgresError):
            count = last_count
        if count != last_count:
            last_count, last_change = count, now
        if now - began >= minimum_s and now - last_change >= stable_s:
            return now - began
        if now - began >= maximum_s:
            return now - began
        await asyncio.sleep(0.5)


def _stored_matches(request: DeviceRequest, outcome: Outcome, rows: list[asyncpg.Record]) -> bool:
    """The one stored credentials row is the one this answer handed out: SHA-256 of the returned token
    (credentials.hashing.token_id), or the scrypt hash of the MQTT_BASIC password."""
    if len(rows) != 1:
        return False
    row, value = rows[0], outcome.credentials_value
    if request.credentials == "MQTT_BASIC":
        password = value.get("password") if isinstance(value, dict) else None
        return bool(password and row["secret_hash"] and verify_password(password, row["secret_hash"]))
    return isinstance(value, str) and row["credentials_id"] == token_id(value)


def traceback_summaries(outputs: Mapping[str, str], limit: int = 10) -> list[str]:
    """For each distinct traceback: "[service] <log line before it> -> <exception line>"."""
    seen: dict[str, None] = {}
    for service, text in outputs.items():
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("Traceback"):
                continue
            before = lines[i - 1] if i else ""
            before = before.split(": ", 1)[-1] if ": " in before else before
            exception = ""
            for follow in lines[i + 1:]:
                if follow.startswith(("Traceback", "During handling", "The above")):
                    continue
                if follow and not follow.startswith(" "):
                    exception = follow
                    break
            seen.setdefault(f"[{service}] {before[:120]} -> {exception[:160]}", None)
    return list(seen)[:limit]


_WORDS = re.compile(r"[A-Za-z0-9]{8,}")


def scan_logs(
    outputs: Mapping[str, str], secrets_to_find: Iterable[str]
) -> tuple[dict[str, int], dict[str, int], list[str]]:
    """(distinct secrets found per service, lines holding one per service, a few redacted example lines).

    Alphanumeric secrets (tokens, passwords, provision secrets here) are looked up as whole words
    (maximal alphanumeric runs of a line in a set: thousands of secrets over megabytes of log in
    well under a second); any other secret by substring."""
    wanted = {s for s in secrets_to_find if s and len(s) >= 8}
    words = {s for s in wanted if s.isascii() and s.isalnum()}
    others = wanted - words
    found: dict[str, int] = {}
    lines_found: dict[str, int] = {}
    examples: list[str] = []
    for service, text in outputs.items():
        hits: set[str] = set()
        line_hits = 0
        for line in text.splitlines():
            in_line = {w for w in _WORDS.findall(line) if w in words} | {s for s in others if s in line}
            if in_line:
                line_hits += 1
                hits |= in_line
                if len(examples) < 5:
                    redacted = line
                    for secret in in_line:
                        redacted = redacted.replace(secret, secret[:3] + "…")
                    examples.append(f"[{service}] {redacted[:300]}")
        if hits:
            found[service] = len(hits)
            lines_found[service] = line_hits
    return found, lines_found, examples


async def check_no_stuck_devices(
    load: LoadResult,
    *,
    scenario: str,
    http_url: str,
    database_url: str,
    profile: Mapping[str, Any],
    outputs: Callable[[], Mapping[str, str]],
    provision_timeout_s: float,
    mqtt_port: int | None = None,
    extra_secrets: Iterable[str] = (),
    retry_concurrency: int = 16,
) -> FaultReport:
    """Issue 10's "Must show" for one fault scenario, measured after the services have recovered:

    (a) 0 devices committed whose client was told anything but SUCCESS (and every SUCCESS stored with
        exactly the credentials it returned);
    (b) every non-SUCCESS name, retried once with the same request, gets SUCCESS (0 stuck names);
    (c) 0 duplicates: one device per name, no device nobody was told about, no token handed out twice;
    (d) 0 secrets (returned tokens and passwords, device-chosen ones, the provision secret) in any
        service's output;
    (e) 0 "Traceback" in any service's output.

    Returns the report; call ``assert_ok()`` on it (the test does, after printing the numbers).
    """
    report = FaultReport(scenario, len(load.requests), load.counts())
    # Work a core held when its client was answered may still commit: wait for it before judging (a).
    report.settle_seconds = await settle(database_url, str(profile["id"]), minimum_s=provision_timeout_s + 3)
    stored = await _devices(database_url, str(profile["id"]))

    for name, outcome in load.outcomes.items():
        if outcome.kind is Kind.SUCCESS:
            if not _stored_matches(load.requests[name], outcome, stored.get(name, [])):
                report.success_not_stored.append(name)
        elif name in stored:
            if outcome.told:
                report.committed_but_told_otherwise.append(name)
            else:
                report.committed_untold.append(name)
    report.committed_told_by_kind = dict(
        Counter(load.outcomes[n].kind.value for n in report.committed_but_told_otherwise)
    )

    # (b) the device's one retry: the same request, now that everything is back.
    to_retry = [load.requests[name] for name, o in load.outcomes.items() if o.kind is not Kind.SUCCESS]
    retried = await run_load(http_url, to_retry, concurrency=retry_concurrency, mqtt_port=mqtt_port,
                             client_timeout=provision_timeout_s + 10) if to_retry else LoadResult({}, {}, 0.0)
    report.retry_outcomes = retried.counts()
    report.stuck = [name for name, o in retried.outcomes.items() if o.kind is not Kind.SUCCESS]
    report.stuck_by_first_kind = dict(Counter(load.outcomes[n].kind.value for n in report.stuck))

    # (c) and the stored credentials of the retries' SUCCESS answers.
    stored = await _devices(database_url, str(profile["id"]))
    final: dict[str, Outcome] = {n: o for n, o in load.outcomes.items() if o.kind is Kind.SUCCESS}
    final.update({n: o for n, o in retried.outcomes.items() if o.kind is Kind.SUCCESS})
    for name, outcome in retried.outcomes.items():
        if outcome.kind is Kind.SUCCESS and not _stored_matches(load.requests[name], outcome, stored.get(name, [])):
            report.success_not_stored.append(name)
    report.duplicates = [name for name, rows in stored.items() if len(rows) > 1]
    report.extra_devices = [name for name in stored if name not in final]
    tokens = [s for o in final.values() for s in o.returned_secrets()]
    report.shared_tokens = len(tokens) - len(set(tokens))

    # (d) and (e) over every process's whole output.
    secrets_to_find = {profile["provisionDeviceSecret"], *extra_secrets}
    for request in load.requests.values():
        secrets_to_find.update(request.secrets)
    for outcome in list(load.outcomes.values()) + list(retried.outcomes.values()):
        secrets_to_find.update(outcome.returned_secrets())
    texts = outputs()
    report.secrets_in_logs, report.secret_lines_in_logs, report.secret_log_examples = scan_logs(texts, secrets_to_find)
    # asyncio's "Future exception was never retrieved" is an unhandled error too, whether or not it shows a traceback.
    report.tracebacks = {service: count for service, text in texts.items()
                         if (count := text.count("Traceback") + text.count("exception was never retrieved"))}
    report.traceback_examples = traceback_summaries(texts)
    return report
