"""``/api/devices/import`` and ``/api/devices/export``: bulk provisioning of pre-provisioned devices from a CSV
file or JSON lines (ThingsBoard's bulk provisioning), as a job whose progress is polled, and the devices of a
profile as CSV.

The upload is spooled to an unlinked temporary file (never held in memory), its header and records checked
(400 before any job exists when the file cannot be read), and a job is started that reads it back in batches
of :data:`BATCH_ROWS` rows. Each row is validated on its own with the same rules as ``POST /api/devices``
(``schemas.DeviceIn``, ``devices.supplied_credentials``) and its credentials prepared by the credentials
service over the bus (``PREPARE``; generated tokens in one ``MINT_TOKENS`` call per batch); a batch's
devices and their credentials are then written in one transaction (``repository.write_import_batch``), so a
device is never written without its credentials. ``atomic=true`` runs the whole import in one transaction,
rolled back when any row is rejected.

The job's runner holds a Postgres advisory lock for as long as it runs: when its process dies, the batch
in flight is rolled back by Postgres and the job is reported ``failed`` at the next read
(``repository.import_job``).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime
import enum
import io
import json
import logging
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import asyncpg
from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from provisioning_common.bus import Bus, RpcError
from provisioning_common.contract import MINT_TOKENS, PREPARE_MANY
from provisioning_common.db import repository
from provisioning_common.db.repository import ImportCounts, ImportedDevice, ImportRowError
from provisioning_common.device_link import end_sessions
from provisioning_common.models import (
    CredentialsType,
    MintTokensRequest,
    PrepareCredentialsRequest,
    PrepareCredentialsResult,
    PreparedCredentials,
    PrepareManyRequest,
    SuppliedCredentials,
)
from provisioning_common.secretbox import SecretBox
from pydantic import BaseModel, ValidationError

from ..dependencies import Box, BusDep, Pool, api_error
from ..schemas import PATTERN_MESSAGES, DeviceIn
from .devices import _CONFLICTS, supplied_credentials

log = logging.getLogger("admin_api.imports")

router = APIRouter(prefix="/devices")

#: Rows per batch: one look-up of taken names/keys, one of taken credentials, one write transaction.
BATCH_ROWS = 500
#: Largest upload (bytes), spooled to disk; more is answered 413.
MAX_IMPORT_BYTES = 512 * 1024 * 1024
#: Imports running at once in one admin API process (each holds two database connections); more: 429.
MAX_RUNNING_IMPORTS = 4
#: Rejected rows kept for the report (``rejected`` counts them all; ``errorsTruncated`` says when more).
MAX_REPORTED_ERRORS = 10_000
#: Rows per PREPARE_MANY call (a batch's calls are sent at once), and how long one may take: MQTT passwords
#: are hashed with scrypt (tens of milliseconds each, on the credentials service's threads).
PREPARE_CHUNK = 100
PREPARE_TIMEOUT_S = 60.0

#: The fields a row may carry (CSV columns after mapping, JSON lines' keys).
FIELDS = ("name", "deviceKey", "accessToken", "mqttClientId", "mqttUserName", "mqttPassword", "x509")
#: Fields accepted and not stored: ThingsBoard's label (only a pre-provisioning hook sets one here) and type
#: (this service has none), and the columns of our own export (so an export can be imported again).
IGNORED_FIELDS = ("label", "type", "provisionState", "credentialsType", "createdTime", "provisionedTime")
#: Header names (lower case, without spaces, ``_`` and ``-``) understood without a ``columns`` mapping.
ALIASES: dict[str, str] = {
    **{f.lower(): f for f in (*FIELDS, *IGNORED_FIELDS)},
    "devicename": "name",
    "key": "deviceKey",
    "token": "accessToken",
    "clientid": "mqttClientId",
    "username": "mqttUserName",
    "user": "mqttUserName",
    "password": "mqttPassword",
    "certificate": "x509",
    "certificatepem": "x509",
    "x509certificate": "x509",
    "x509pem": "x509",
    "pem": "x509",
    "devicetype": "type",
    "devicelabel": "label",
    "ignore": "",
    "": "",
}
_MQTT_FIELDS = {"mqttClientId": "clientId", "mqttUserName": "userName", "mqttPassword": "password"}
_OTHER_PROFILE = "Device with such name already exists in another profile!"
_CSV_TYPES = {"text/csv", "application/csv", "text/comma-separated-values"}
_NDJSON_TYPES = {"application/x-ndjson", "application/ndjson", "application/jsonl", "application/json-lines"}


class OnExisting(str, enum.Enum):
    """What a row naming an existing device of the same profile does."""

    SKIP = "skip"
    UPDATE = "update"


class ImportErrorOut(BaseModel):
    line: int
    field: str
    reason: str


class ImportStarted(BaseModel):
    id: str


class ImportJobOut(BaseModel):
    id: str
    deviceProfileId: str
    status: str
    message: str | None
    onExisting: str
    atomic: bool
    total: int | None
    processed: int
    created: int
    updated: int
    skipped: int
    rejected: int
    errors: list[ImportErrorOut]
    #: More rows were rejected than ``errors`` lists.
    errorsTruncated: bool
    createdTime: int
    updatedTime: int


def _normal(name: str) -> str:
    return "".join(ch for ch in name.strip().lower() if ch not in " _-")


class BadFile(ValueError):
    """The file cannot be read as asked (encoding, CSV syntax, header): the whole upload is refused (400)."""


@dataclass(frozen=True)
class Plan:
    """How to read an uploaded file, found by :func:`scan`."""

    kind: str  # "csv" or "ndjson"
    delimiter: str
    #: The field of each CSV column (None: ignored); empty for JSON lines.
    columns: tuple[str | None, ...]
    header: bool
    total: int


def _map_columns(names: Sequence[str], *, explicit: bool) -> tuple[str | None, ...]:
    mapped: list[str | None] = []
    for index, name in enumerate(names, start=1):
        field_name = ALIASES.get(_normal(name))
        if field_name is None:
            shown = name if len(name) <= 40 else name[:40] + "..."
            where = "columns entry" if explicit else "column"
            raise BadFile(
                f"{where} {index} ({shown!r}) is not a known field; known: {', '.join(FIELDS + IGNORED_FIELDS)}"
                + ("" if explicit else " (map columns with ?columns=, an empty entry ignores a column)")
            )
        mapped.append(None if not field_name or field_name in IGNORED_FIELDS else field_name)
    taken = [f for f in mapped if f is not None]
    for f in set(taken):
        if taken.count(f) > 1:
            raise BadFile(f"more than one column is mapped to {f}")
    if "name" not in taken:
        raise BadFile("no column is mapped to name")
    return tuple(mapped)


@contextlib.contextmanager
def _text(tmp: IO[bytes]) -> Iterator[io.TextIOWrapper]:
    """The spooled file from its start as text (UTF-8, a BOM dropped), left open when done."""
    tmp.seek(0)
    wrapper = io.TextIOWrapper(tmp, encoding="utf-8-sig", newline="")
    try:
        yield wrapper
    finally:
        wrapper.detach()


def scan(tmp: IO[bytes], kind: str, delimiter: str | None, columns: str | None, header: bool) -> Plan:
    """Check the file's encoding, syntax and header and count its rows (blank lines are not rows), reading
    it once without keeping it. Raises :class:`BadFile`."""
    try:
        if kind == "ndjson":
            total = 0
            with _text(tmp) as text:
                for line in text:
                    total += bool(line.strip())
            return Plan("ndjson", "", (), False, total)
        if delimiter is None:
            with _text(tmp) as text:
                first = text.readline(65536)
            try:
                delimiter = csv.Sniffer().sniff(first, delimiters=",;\t|").delimiter
            except csv.Error:
                delimiter = ","
        with _text(tmp) as text:
            reader = csv.reader(text, delimiter=delimiter, strict=True)
            mapped: tuple[str | None, ...] | None = None
            if columns is not None:
                mapped = _map_columns(columns.split(","), explicit=True)
            total = 0
            try:
                if header:
                    names = next(reader, None)
                    if names is None:
                        raise BadFile("the file is empty (a header row is expected)")
                    if mapped is None:
                        mapped = _map_columns(names, explicit=False)
                elif mapped is None:
                    raise BadFile("header=false needs columns= to say which field each column is")
                for record in reader:
                    total += any(cell.strip() for cell in record)
            except csv.Error as exc:
                raise BadFile(f"line {reader.line_num}: {exc}") from None
        return Plan("csv", delimiter, mapped, header, total)
    except UnicodeDecodeError:
        raise BadFile("the file is not UTF-8 text") from None


@dataclass(frozen=True)
class RawRow:
    line: int
    values: dict[str, str]
    #: Why the row could not even be read (its field and reason), instead of values.
    problem: tuple[str, str] | None = None


def read_rows(tmp: IO[bytes], plan: Plan) -> Iterator[RawRow]:
    """The file's rows with their line numbers (the line where a CSV record starts; the header is line 1)."""
    if plan.kind == "ndjson":
        with _text(tmp) as text:
            for number, line in enumerate(text, start=1):
                if line.strip():
                    yield _json_row(number, line)
        return
    with _text(tmp) as text:
        reader = csv.reader(text, delimiter=plan.delimiter, strict=True)
        if plan.header:
            next(reader, None)
        end = reader.line_num
        for record in reader:
            start, end = end + 1, reader.line_num
            if not any(cell.strip() for cell in record):
                continue
            if len(record) > len(plan.columns):
                yield RawRow(start, {}, ("line", f"{len(record)} columns where the header has {len(plan.columns)}"))
                continue
            yield RawRow(start, {f: v for f, v in zip(plan.columns, record, strict=False) if f is not None and v})


def _json_row(number: int, line: str) -> RawRow:
    try:
        obj = json.loads(line)
    except ValueError:
        return RawRow(number, {}, ("line", "not a JSON object"))
    if not isinstance(obj, dict):
        return RawRow(number, {}, ("line", "not a JSON object"))
    values: dict[str, str] = {}
    for key, value in obj.items():
        name = ALIASES.get(_normal(str(key)))
        if name is None:
            return RawRow(number, {}, (str(key)[:40], "unknown field"))
        if not name or name in IGNORED_FIELDS or value is None:
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            return RawRow(number, {}, (name, "must be a string"))
        if value:
            values[name] = value
    return RawRow(number, values)


@dataclass(frozen=True)
class Candidate:
    """A row that passed validation, its credentials not yet prepared."""

    line: int
    name: str
    device_key: str | None
    credentials_type: CredentialsType | None
    supplied: SuppliedCredentials | None
    #: The column its credentials came from (for the report).
    credentials_field: str


def _reason(err: Any) -> str:
    pattern = (err.get("ctx") or {}).get("pattern")
    if isinstance(pattern, str) and pattern in PATTERN_MESSAGES:
        return PATTERN_MESSAGES[pattern]
    return str(err.get("msg", "invalid")).removeprefix("Value error, ")


def validate_row(row: RawRow, profile_id: uuid.UUID) -> Candidate | ImportRowError:
    """The same checks as ``POST /api/devices`` (``DeviceIn``, ``supplied_credentials``) on one row."""
    if row.problem is not None:
        return ImportRowError(row.line, *row.problem)
    values = row.values
    kinds = [k for k, given in (("accessToken", "accessToken" in values),
                                ("mqtt", any(f in values for f in _MQTT_FIELDS)), ("x509", "x509" in values)) if given]
    if len(kinds) > 1:
        return ImportRowError(row.line, "credentials", f"more than one kind of credentials given ({', '.join(kinds)})")
    credentials: dict[str, Any] | None = None
    creds_field = "credentials"
    if kinds == ["accessToken"]:
        credentials = {"credentialsType": "ACCESS_TOKEN", "credentialsValue": values["accessToken"]}
        creds_field = "accessToken"
    elif kinds == ["x509"]:
        credentials = {"credentialsType": "X509_CERTIFICATE", "credentialsValue": values["x509"]}
        creds_field = "x509"
    elif kinds == ["mqtt"]:
        credentials = {"credentialsType": "MQTT_BASIC",
                       "credentialsValue": {v: values[f] for f, v in _MQTT_FIELDS.items() if f in values}}
        creds_field = next(f for f in _MQTT_FIELDS if f in values)
    try:
        body = DeviceIn.model_validate({
            "name": values.get("name", ""), "deviceProfileId": profile_id, "deviceKey": values.get("deviceKey"),
            "credentials": credentials,
        })
    except ValidationError as exc:
        problems = exc.errors()
        # MQTT basic's object is the second branch of credentialsValue's union: its own error, not the string's.
        err = next((e for e in problems if any(str(p) in _MQTT_FIELDS.values() for p in e.get("loc", ()))),
                   problems[0])
        loc = [str(p) for p in err.get("loc", ())]
        where = loc[0] if loc else "line"
        if where == "credentials":
            mqtt_key = next((f for f, v in _MQTT_FIELDS.items() if v in loc), None)
            where = mqtt_key or creds_field
        if where == "name" and not values.get("name"):
            return ImportRowError(row.line, "name", "must not be empty")
        return ImportRowError(row.line, where, _reason(err))
    if body.credentials is None:
        return Candidate(row.line, body.name, body.device_key, None, None, creds_field)
    try:
        ctype, supplied = supplied_credentials(body.credentials)
    except HTTPException as exc:
        return ImportRowError(row.line, creds_field, str(exc.detail))
    return Candidate(row.line, body.name, body.device_key, ctype, supplied, creds_field)


@dataclass(frozen=True)
class Planned:
    """A batch ready to be written: its rejected rows so far, and the devices to create or update."""

    size: int
    errors: list[ImportRowError]
    skipped: int
    new: list[ImportedDevice]
    updates: list[ImportedDevice]


class ImportAborted(Exception):
    """The import cannot go on (not the rows' fault); the message is for the job's report."""


class _Rollback(Exception):
    """Ends an atomic import's transaction without committing."""


@dataclass
class Job:
    """One import in progress: what it has seen so far (duplicates in the file) and its counters."""

    id: uuid.UUID
    profile_id: uuid.UUID
    on_existing: OnExisting
    atomic: bool
    bus: Bus
    box: SecretBox
    names: dict[str, int] = field(default_factory=dict)
    device_keys: dict[str, int] = field(default_factory=dict)
    credentials: dict[str, int] = field(default_factory=dict)
    processed: int = 0
    created: int = 0
    updated: int = 0
    skipped: int = 0
    rejected: int = 0
    reported: int = 0
    #: Devices whose credentials an update replaced: their live sessions are ended once the import is over.
    replaced: list[uuid.UUID] = field(default_factory=list)

    def counts(self) -> ImportCounts:
        return ImportCounts(self.processed, self.created, self.updated, self.skipped, self.rejected)

    async def prepare(self, rows: Sequence[Candidate]) -> list[PreparedCredentials | str]:
        """Each row's credentials prepared by the credentials service (``PREPARE_MANY``: ``PREPARE``'s checks,
        in chunks of :data:`PREPARE_CHUNK` sent at once), or why they were refused."""

        async def chunk(part: Sequence[Candidate]) -> list[PrepareCredentialsResult]:
            items = []
            for row in part:
                assert row.credentials_type is not None and row.supplied is not None
                items.append(PrepareCredentialsRequest(credentials_type=row.credentials_type, credentials=row.supplied))
            reply = await self.bus.call(PREPARE_MANY, PrepareManyRequest(items=items), timeout=PREPARE_TIMEOUT_S)
            if len(reply.results) != len(items):
                raise ImportAborted("the credentials service answered for other rows than asked")
            return list(reply.results)

        parts = [rows[i:i + PREPARE_CHUNK] for i in range(0, len(rows), PREPARE_CHUNK)]
        try:
            replies = await asyncio.gather(*(chunk(part) for part in parts))
        except RpcError:
            raise ImportAborted("credentials service unavailable; rows written before stay") from None
        return [
            r.prepared if r.ok and r.prepared is not None else (r.error_message or "invalid credentials")
            for reply in replies for r in reply
        ]

    async def mint(self, count: int) -> list[PreparedCredentials]:
        if not count:
            return []
        try:
            reply = await self.bus.call(MINT_TOKENS, MintTokensRequest(count=count), timeout=PREPARE_TIMEOUT_S)
        except RpcError:
            raise ImportAborted("credentials service unavailable; rows written before stay") from None
        return list(reply.tokens)

    async def batch(self, conn: Any, raw: Sequence[RawRow]) -> list[ImportRowError]:
        """Plan and write one batch on ``conn`` (in its transaction); returns its rejected rows."""
        return await self.write(conn, await self.plan(conn, raw))

    async def plan(self, conn: Any, raw: Sequence[RawRow]) -> Planned:
        """Validate a batch, look up what its rows would collide with (on ``conn``), prepare and encrypt their
        credentials: everything but the write. Batches are planned one after the other (the duplicates in the
        file are found in the names, keys and credentials of the batches planned before); a batch may be
        planned while the one before is written."""
        errors: list[ImportRowError] = []
        skipped = 0
        candidates: list[Candidate] = []
        for row in raw:
            checked = validate_row(row, self.profile_id)
            if isinstance(checked, ImportRowError):
                errors.append(checked)
                continue
            first = self.names.setdefault(checked.name, checked.line)
            if first != checked.line:
                errors.append(ImportRowError(checked.line, "name", f"duplicate name in the file (line {first})"))
                continue
            if checked.device_key is not None:
                first = self.device_keys.setdefault(checked.device_key, checked.line)
                if first != checked.line:
                    errors.append(
                        ImportRowError(checked.line, "deviceKey", f"duplicate deviceKey in the file (line {first})")
                    )
                    continue
            candidates.append(checked)
        taken = await repository.existing_for_import(
            conn, self.profile_id, [c.name for c in candidates],
            [c.device_key for c in candidates if c.device_key is not None], [],
        )
        new: list[Candidate] = []
        updates: list[tuple[Candidate, uuid.UUID]] = []
        for c in candidates:
            holder = taken.names.get(c.name)
            key_holder = taken.device_keys.get(c.device_key) if c.device_key is not None else None
            if holder is not None and holder[1] != self.profile_id:
                errors.append(ImportRowError(c.line, "name", _OTHER_PROFILE))
            elif holder is not None and self.on_existing is OnExisting.SKIP:
                skipped += 1
            elif key_holder is not None and (holder is None or key_holder != holder[0]):
                errors.append(ImportRowError(c.line, "deviceKey", _CONFLICTS["device_key"]))
            elif holder is not None:
                updates.append((c, holder[0]))
            else:
                new.append(c)
        # Credentials: supplied ones prepared (checked, hashed) one by one, generated tokens in one call.
        supplied = [c for c in new if c.supplied is not None] + [c for c, _ in updates if c.supplied is not None]
        prepared_supplied = dict(zip((c.line for c in supplied), await self.prepare(supplied), strict=True))
        minted = iter(await self.mint(sum(1 for c in new if c.supplied is None)))
        ready: list[tuple[Candidate, uuid.UUID, PreparedCredentials | None, bool]] = []
        for c, device_id, is_new in [(c, uuid.uuid4(), True) for c in new] + [(c, i, False) for c, i in updates]:
            prepared: PreparedCredentials | str | None
            prepared = prepared_supplied[c.line] if c.supplied is not None else (next(minted) if is_new else None)
            if isinstance(prepared, str):
                errors.append(ImportRowError(c.line, c.credentials_field, prepared))
                continue
            if prepared is not None:
                first = self.credentials.setdefault(prepared.credentials_id, c.line)
                if first != c.line:
                    errors.append(ImportRowError(c.line, c.credentials_field,
                                                 f"duplicate credentials in the file (line {first})"))
                    continue
            ready.append((c, device_id, prepared, is_new))
        holders = (await repository.existing_for_import(
            conn, self.profile_id, [], [], [p.credentials_id for _, _, p, _ in ready if p is not None],
        )).credentials
        rows_new: list[ImportedDevice] = []
        rows_updated: list[ImportedDevice] = []
        for c, device_id, prepared, is_new in ready:
            if prepared is not None and holders.get(prepared.credentials_id, device_id) != device_id:
                errors.append(ImportRowError(c.line, c.credentials_field, _CONFLICTS["credentials"]))
                continue
            device = ImportedDevice(
                c.line, device_id, c.name, c.device_key, prepared,
                None if prepared is None else self.box.encrypt_json(prepared.response_value),
            )
            (rows_new if is_new else rows_updated).append(device)
        return Planned(len(raw), errors, skipped, rows_new, rows_updated)

    async def write(self, conn: Any, planned: Planned) -> list[ImportRowError]:
        """Write a planned batch in ``conn``'s transaction and count it; returns its rejected rows."""
        errors = planned.errors + await self._write(conn, planned.new, planned.updates)
        errors.sort(key=lambda e: e.line)
        self.processed += planned.size
        self.skipped += planned.skipped
        self.rejected += len(errors)
        return errors

    async def _write(
        self, conn: Any, new: list[ImportedDevice], updates: list[ImportedDevice]
    ) -> list[ImportRowError]:
        """Write the batch in one savepoint; when a uniqueness rule refuses it (another writer took a name or
        credentials meanwhile), row by row to find which."""
        try:
            async with conn.transaction():
                await repository.write_import_batch(conn, self.profile_id, new, updates)
        except asyncpg.UniqueViolationError:
            pass
        else:
            self.created += len(new)
            self.updated += len(updates)
            self.replaced += [d.device_id for d in updates if d.prepared is not None]
            return []
        errors: list[ImportRowError] = []
        for device, is_new in [(d, True) for d in new] + [(d, False) for d in updates]:
            try:
                async with conn.transaction():
                    await repository.write_import_batch(
                        conn, self.profile_id, [device] if is_new else [], [] if is_new else [device]
                    )
            except asyncpg.UniqueViolationError as exc:
                what = repository.import_conflict(exc)
                where = {"name": "name", "device_key": "deviceKey"}.get(what, "credentials")
                errors.append(ImportRowError(device.line, where, _CONFLICTS[what]))
                continue
            if is_new:
                self.created += 1
            else:
                self.updated += 1
                if device.prepared is not None:
                    self.replaced.append(device.device_id)
        return errors

    def to_report(self, errors: list[ImportRowError]) -> list[ImportRowError]:
        kept = errors[: max(0, MAX_REPORTED_ERRORS - self.reported)]
        self.reported += len(kept)
        return kept


async def run(job: Job, pool: Any, conn: Any, tmp: IO[bytes], plan: Plan) -> None:
    """Run an import on ``conn`` (which holds the job's advisory lock); the file is closed and the connection
    given back at the end, whatever happens."""
    try:
        status, message = await _import(job, pool, conn, tmp, plan)
        await repository.finish_import_job(conn, job.id, status, message, job.counts())
        await repository.release_import_job(conn, job.id)
        for device_id in job.replaced:  # their old credentials are revoked: end the sessions that used them
            await end_sessions(job.bus, device_id)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await repository.finish_import_job(
                pool, job.id, "failed", "the admin API stopped during the import; rows written before stay"
            )
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. the database went away: the lock goes with the connection
        log.error("import %s could not be finished: %s", job.id, type(exc).__name__)
    finally:
        tmp.close()
        with contextlib.suppress(Exception):
            await pool.release(conn)


async def _import(job: Job, pool: Any, conn: Any, tmp: IO[bytes], plan: Plan) -> tuple[str, str | None]:
    """The import itself: its final status and message."""
    try:
        if job.atomic:
            try:
                async with conn.transaction():
                    for raw in _batches(tmp, plan):
                        errors = await job.batch(conn, raw)
                        await repository.record_import_progress(pool, job.id, job.counts(), job.to_report(errors))
                    if job.rejected:
                        raise _Rollback
            except _Rollback:
                job.created = job.updated = 0
                job.replaced.clear()
                return "failed", f"atomic import: {job.rejected} rows rejected, nothing was written"
        else:
            await _pipelined(job, pool, conn, tmp, plan)
    except ImportAborted as exc:
        return "failed", str(exc)
    except (asyncio.CancelledError, asyncpg.PostgresConnectionError, OSError):
        raise
    except Exception as exc:  # noqa: BLE001 - the job reports it; the process goes on serving
        log.error("import %s failed: %s", job.id, type(exc).__name__)
        return "failed", f"internal error ({type(exc).__name__}); rows written before stay"
    return "done", None


async def _pipelined(job: Job, pool: Any, conn: Any, tmp: IO[bytes], plan: Plan) -> None:
    """Each batch in its own transaction on ``conn``, the next one planned meanwhile on a second connection
    (its look-ups need not see the batch being written: rows of the same file collide in memory)."""
    lookup = await pool.acquire()
    try:
        await lookup.execute("SET plan_cache_mode = force_custom_plan")  # see repository.hold_import_job
        planned: Planned | None = None
        for raw in _batches(tmp, plan):
            planning = asyncio.create_task(job.plan(lookup, raw))
            try:
                if planned is not None:
                    await _commit(job, conn, planned)
                planned = await planning
            finally:
                if not planning.done():
                    planning.cancel()
                    with contextlib.suppress(BaseException):
                        await planning
        if planned is not None:
            await _commit(job, conn, planned)
    finally:
        await pool.release(lookup)


async def _commit(job: Job, conn: Any, planned: Planned) -> None:
    async with conn.transaction():
        errors = await job.write(conn, planned)
        await repository.record_import_progress(conn, job.id, job.counts(), job.to_report(errors))


def _batches(tmp: IO[bytes], plan: Plan) -> Iterator[list[RawRow]]:
    batch: list[RawRow] = []
    for row in read_rows(tmp, plan):
        batch.append(row)
        if len(batch) >= BATCH_ROWS:
            yield batch
            batch = []
    if batch:
        yield batch


def _running(app: FastAPI) -> set[asyncio.Task[None]]:
    tasks: set[asyncio.Task[None]] | None = getattr(app.state, "imports", None)
    if tasks is None:
        tasks = app.state.imports = set()
    return tasks


async def stop_imports(app: FastAPI) -> None:
    """Cancel the imports still running (shutdown): each is marked failed and gives its connection back."""
    tasks = list(_running(app))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


_UPLOAD_BODY = {
    "required": True,
    "content": {
        "text/csv": {"schema": {"type": "string"}},
        "application/x-ndjson": {"schema": {"type": "string"}},
    },
}


def _kind(content_type: str) -> str:
    media = content_type.split(";", 1)[0].strip().lower()
    if media in _CSV_TYPES:
        return "csv"
    if media in _NDJSON_TYPES:
        return "ndjson"
    raise api_error(415, "the body must be text/csv or application/x-ndjson")


@router.post("/import", status_code=202, openapi_extra={"requestBody": _UPLOAD_BODY})
async def start_import(
    request: Request,
    pool: Pool,
    bus: BusDep,
    box: Box,
    deviceProfileId: uuid.UUID,
    onExisting: OnExisting = OnExisting.SKIP,
    atomic: bool = False,
    delimiter: str | None = Query(None, min_length=1, max_length=1, pattern=r"^[^\r\n\"]$"),
    columns: str | None = Query(None, max_length=4096),
    header: bool = True,
) -> ImportStarted:
    kind = _kind(request.headers.get("content-type", ""))
    if not await repository.profile_exists(pool, deviceProfileId):
        raise api_error(400, f"deviceProfileId {deviceProfileId} does not exist")
    running = _running(request.app)
    if len(running) >= MAX_RUNNING_IMPORTS:
        raise HTTPException(429, f"{MAX_RUNNING_IMPORTS} imports are running; retry later",
                            headers={"Retry-After": "5"})
    tmp = tempfile.TemporaryFile()  # noqa: SIM115 - handed to the job, which closes it; unlinked at once: gone with the process, whatever happens
    try:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_IMPORT_BYTES:
                raise api_error(413, f"the file is larger than {MAX_IMPORT_BYTES} bytes")
            tmp.write(chunk)
        try:
            plan = await asyncio.to_thread(scan, tmp, kind, delimiter, columns, header)
        except BadFile as exc:
            raise api_error(400, str(exc)) from None
        job = Job(uuid.uuid4(), deviceProfileId, onExisting, atomic, bus, box)
        conn = await pool.acquire()
    except BaseException:
        tmp.close()
        raise
    try:
        # The lock first: a reader never sees the job running without its runner.
        await repository.hold_import_job(conn, job.id)
        await repository.create_import_job(conn, job.id, deviceProfileId, on_existing=onExisting.value,
                                           atomic=atomic, total=plan.total)
    except BaseException:
        tmp.close()
        await pool.release(conn)
        raise
    task = asyncio.create_task(run(job, pool, conn, tmp, plan), name=f"import-{job.id}")
    running.add(task)
    task.add_done_callback(running.discard)
    return ImportStarted(id=str(job.id))


def _ms(moment: datetime.datetime) -> int:
    return int(moment.timestamp() * 1000)


@router.get("/import/{job_id}")
async def import_status(job_id: uuid.UUID, pool: Pool) -> ImportJobOut:
    job = await repository.import_job(pool, job_id, max_errors=MAX_REPORTED_ERRORS)
    if job is None:
        raise api_error(404, f"Import {job_id} not found")
    return ImportJobOut(
        id=str(job.id), deviceProfileId=str(job.profile_id), status=job.status, message=job.message,
        onExisting=job.on_existing, atomic=job.atomic, total=job.total, processed=job.processed,
        created=job.created, updated=job.updated, skipped=job.skipped, rejected=job.rejected,
        errors=[ImportErrorOut(line=e.line, field=e.field, reason=e.reason) for e in job.errors],
        errorsTruncated=job.rejected > len(job.errors), createdTime=_ms(job.created_at),
        updatedTime=_ms(job.updated_at),
    )


EXPORT_COLUMNS = ("name", "deviceKey", "provisionState", "credentialsType", "createdTime", "provisionedTime")


def _iso(moment: datetime.datetime | None) -> str:
    return "" if moment is None else moment.astimezone(datetime.UTC).isoformat(timespec="milliseconds")


@router.get("/export", response_class=StreamingResponse,
            responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}}}})
async def export_devices(pool: Pool, deviceProfileId: uuid.UUID) -> StreamingResponse:
    """The devices of a profile as CSV (never a credential's value), streamed from a database cursor."""
    if not await repository.profile_exists(pool, deviceProfileId):
        raise api_error(400, f"deviceProfileId {deviceProfileId} does not exist")

    async def lines() -> AsyncIterator[str]:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(EXPORT_COLUMNS)
        async for chunk in repository.export_devices(pool, deviceProfileId):
            for d in chunk:
                provisioned = None if d.provisioned_ts is None else datetime.datetime.fromtimestamp(
                    d.provisioned_ts / 1000, datetime.UTC)
                writer.writerow((d.name, d.device_key, d.provision_state or "", d.credentials_type or "",
                                 _iso(d.created_at), _iso(provisioned)))
            yield out.getvalue()
            out.seek(0)
            out.truncate()
        if out.tell():
            yield out.getvalue()

    return StreamingResponse(
        lines(), media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="devices-{deviceProfileId}.csv"'},
    )
