"""The ``provisioning`` command: device profiles, devices (bulk import and export, credentials rotation and
revocation), operator accounts and personal API tokens, over the admin API (HTTP).

Built on typer (commands, options, help) and rich (tables, the import's progress bar). Configuration:
``--url`` / ``PROVISIONING_URL`` (default ``http://127.0.0.1:8081``, the admin API of ``make up``) and
``--token`` / ``PROVISIONING_TOKEN`` / ``ADMIN_API_TOKEN``: an operator's personal API token (it acts with
that operator's role, and the audit log names them) or the shared bootstrap token (default:
``.local/stack.env`` as ``make up`` writes it). ``--json`` prints the API's JSON instead of tables. Passwords
are never arguments (they would show in ``ps`` and shell history): a hidden prompt, or one line on stdin.

Exit codes (for scripts): 0 done; 1 unexpected error; 2 bad usage; 3 the admin API cannot be reached;
4 the token was refused; 5 the API refused the request (not found, invalid, conflict, ...); 6 an import
finished with rejected rows, or failed.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TOKEN, EXIT_REFUSED, EXIT_REJECTED = 0, 1, 2, 3, 4, 5, 6
DEFAULT_URL = "http://127.0.0.1:8081"
STACK_ENV = Path(".local/stack.env")

HELP = """Operate the provisioning service through its admin API: device profiles, devices, bulk import and export,
credentials rotation, operator accounts and personal API tokens.

Configured by --url / PROVISIONING_URL (default http://127.0.0.1:8081, the admin API `make up` starts) and
--token / PROVISIONING_TOKEN / ADMIN_API_TOKEN: a personal API token (`provisioning tokens create`, or the
console's "My API tokens"), or the shared admin token (default: .local/stack.env, written by `make up`).

Exit codes: 0 done; 1 unexpected error; 2 bad usage; 3 the admin API cannot be reached; 4 the token was
refused; 5 the API refused the request (not found, invalid, conflict); 6 an import finished with rejected
rows, or failed."""

app = typer.Typer(help=HELP, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
profiles_app = typer.Typer(help="Device profiles.", no_args_is_help=True)
devices_app = typer.Typer(help="Devices: list, show, create, delete, rotate or revoke credentials, import, export.",
                          no_args_is_help=True)
operators_app = typer.Typer(help="Operator accounts (admin role): list, create, roles, disable, enable, delete.",
                            no_args_is_help=True)
tokens_app = typer.Typer(help="Personal API tokens: create (shown once), list, revoke. Your own by default.",
                         no_args_is_help=True)
app.add_typer(profiles_app, name="profiles")
app.add_typer(devices_app, name="devices")
app.add_typer(operators_app, name="operators")
app.add_typer(tokens_app, name="tokens")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class Strategy(str, Enum):
    ALLOW_CREATE_NEW_DEVICES = "ALLOW_CREATE_NEW_DEVICES"
    CHECK_PRE_PROVISIONED_DEVICES = "CHECK_PRE_PROVISIONED_DEVICES"
    DISABLED = "DISABLED"


class Role(str, Enum):
    viewer = "viewer"
    operator = "operator"
    admin = "admin"


class OnExisting(str, Enum):
    skip = "skip"
    update = "update"


def fail(message: str, code: int) -> NoReturn:
    """One line on stderr, then exit with ``code``."""
    err.print(f"error: {message}", markup=False)
    raise typer.Exit(code)


def _stack_env_token() -> str | None:
    if STACK_ENV.is_file():
        for line in STACK_ENV.read_text().splitlines():
            if line.startswith("ADMIN_API_TOKEN="):
                return line.split("=", 1)[1].strip() or None
    return None


@dataclass
class Api:
    """The admin API at ``url`` with the bearer ``token``; every failure becomes one line and an exit code."""

    url: str
    token: str | None
    as_json: bool

    def client(self, timeout: float = 30.0) -> httpx.Client:
        if not self.token:
            fail("no admin token: pass --token, set ADMIN_API_TOKEN, or run from the directory of `make up`"
                 " (.local/stack.env)", EXIT_USAGE)
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=timeout)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self.client() as client:
            return self.send(client, method, path, **kwargs)

    def send(self, client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            fail(f"cannot reach the admin API at {self.url} ({type(exc).__name__}: {exc})", EXIT_UNREACHABLE)
        return checked(response, self.url)

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()


def checked(response: httpx.Response, url: str) -> httpx.Response:
    if response.status_code == 401:
        fail(f"the admin API at {url} refused the token (401: unknown, revoked, or its operator disabled):"
             " check --token / PROVISIONING_TOKEN / ADMIN_API_TOKEN", EXIT_TOKEN)
    if response.status_code >= 400:
        try:
            message = response.json().get("message") or response.text
        except ValueError:
            message = response.text[:200]
        fail(f"{response.status_code}: {message}", EXIT_REFUSED)
    return response


def api(ctx: typer.Context) -> Api:
    found: Api = ctx.obj
    return found


@app.callback()
def configure(
    ctx: typer.Context,
    url: Annotated[str, typer.Option(envvar="PROVISIONING_URL", help="The admin API's base URL.")] = DEFAULT_URL,
    token: Annotated[str | None, typer.Option(envvar=["PROVISIONING_TOKEN", "ADMIN_API_TOKEN"], show_default=False,
                                              help="A personal API token, or the admin token"
                                                   " (default: .local/stack.env).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    ctx.obj = Api(url.rstrip("/"), token or _stack_env_token(), as_json)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def delete(a: Api, path: str, object_id: str, what: str) -> None:
    """DELETE ``path`` and say so: ``{"deleted": id}`` with --json, else "deleted <what>"."""
    a.request("DELETE", path)
    if a.as_json:
        print_json({"deleted": object_id})
    else:
        out.print(f"deleted {what}", markup=False)


def table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    view = Table(title=title, show_lines=False)
    for column in columns:
        view.add_column(column, overflow="fold")
    for row in rows:
        view.add_row(*("" if v is None else str(v) for v in row))
    out.print(view)


def _when(ms: int | None) -> str:
    return "" if not ms else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


# --- profiles ---------------------------------------------------------------------------------------


def all_profiles(a: Api) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    with a.client() as client:
        page = 0
        while True:
            body = a.send(client, "GET", "/api/device-profiles", params={"page": page, "pageSize": 1000}).json()
            found.extend(body["data"])
            if not body["hasNext"]:
                return found
            page += 1


def find_profile(a: Api, name_or_id: str) -> dict[str, Any]:
    """A profile by id, or by its exact name."""
    try:
        profile_id = uuid.UUID(name_or_id)
    except ValueError:
        matches = [p for p in all_profiles(a) if p["name"] == name_or_id]
        if not matches:
            fail(f"no device profile named {name_or_id!r}", EXIT_REFUSED)
        return matches[0]
    result: dict[str, Any] = a.json("GET", f"/api/device-profiles/{profile_id}")
    return result


def show_profile(a: Api, profile: dict[str, Any]) -> None:
    if a.as_json:
        print_json(profile)
        return
    rows = [[key, profile.get(key)] for key in ("id", "name", "provisionStrategy", "provisionDeviceKey",
                                                "provisionDeviceSecret", "allowWeakTokens")]
    rows.append(["createdTime", _when(profile.get("createdTime"))])
    table(None, ["field", "value"], rows)


@profiles_app.command("list")
def profiles_list(ctx: typer.Context) -> None:
    """Every device profile."""
    a = api(ctx)
    found = all_profiles(a)
    if a.as_json:
        print_json(found)
        return
    table(f"{len(found)} device profiles", ["name", "id", "strategy", "provision key"],
          [[p["name"], p["id"], p["provisionStrategy"], p.get("provisionDeviceKey")] for p in found])


@profiles_app.command("show")
def profiles_show(ctx: typer.Context, profile: Annotated[str, typer.Argument(help="Name or id.")]) -> None:
    """One profile, with its provision key and secret."""
    a = api(ctx)
    show_profile(a, find_profile(a, profile))


@profiles_app.command("create")
def profiles_create(
    ctx: typer.Context,
    name: str,
    strategy: Annotated[Strategy, typer.Option(help="Provision strategy.")] = Strategy.CHECK_PRE_PROVISIONED_DEVICES,
    key: Annotated[str | None, typer.Option(help="Provision device key (default: generated).")] = None,
    secret: Annotated[str | None, typer.Option(help="Provision device secret (default: generated).")] = None,
    allow_weak_tokens: Annotated[bool, typer.Option(help="Devices may choose short tokens.")] = False,
) -> None:
    """Create a profile; prints the provision key and secret to put into the firmware."""
    a = api(ctx)
    body: dict[str, Any] = {"name": name, "provisionStrategy": strategy.value, "allowWeakTokens": allow_weak_tokens}
    if key:
        body["provisionDeviceKey"] = key
    if secret:
        body["provisionDeviceSecret"] = secret
    show_profile(a, a.json("POST", "/api/device-profiles", json=body))


_PROFILE_BODY = ("name", "provisionStrategy", "provisionDeviceKey", "provisionDeviceSecret", "allowWeakTokens")


@profiles_app.command("update")
def profiles_update(
    ctx: typer.Context,
    profile: Annotated[str, typer.Argument(help="Name or id.")],
    name: Annotated[str | None, typer.Option(help="New name.")] = None,
    strategy: Annotated[Strategy | None, typer.Option(help="New provision strategy.")] = None,
    key: Annotated[str | None, typer.Option(help="New provision device key.")] = None,
    secret: Annotated[str | None, typer.Option(help="New provision device secret.")] = None,
) -> None:
    """Change a profile's name, strategy, key or secret (the rest is kept)."""
    a = api(ctx)
    current = find_profile(a, profile)
    body = {k: current[k] for k in _PROFILE_BODY if current.get(k) is not None}
    for field, value in (("name", name), ("provisionDeviceKey", key), ("provisionDeviceSecret", secret),
                         ("provisionStrategy", strategy.value if strategy else None)):
        if value is not None:
            body[field] = value
    show_profile(a, a.json("PUT", f"/api/device-profiles/{current['id']}", json=body))


@profiles_app.command("delete")
def profiles_delete(ctx: typer.Context, profile: Annotated[str, typer.Argument(help="Name or id.")]) -> None:
    """Delete a profile (refused while devices use it)."""
    a = api(ctx)
    current = find_profile(a, profile)
    delete(a, f"/api/device-profiles/{current['id']}", current["id"], f"profile {current['name']} ({current['id']})")


# --- devices ----------------------------------------------------------------------------------------


def show_devices(a: Api, body: dict[str, Any], title: str) -> None:
    if a.as_json:
        print_json(body)
        return
    table(title, ["name", "id", "device key", "state", "credentials", "created"],
          [[d["name"], d["id"], d["deviceKey"], d.get("provisionState") or "-", d.get("credentialsType"),
            _when(d.get("createdTime"))] for d in body["data"]])


@devices_app.command("list")
def devices_list(
    ctx: typer.Context,
    profile: Annotated[str | None, typer.Option(help="Only this profile's devices (name or id).")] = None,
    search: Annotated[str | None, typer.Option(help="Name contains (case-insensitive).")] = None,
    page: Annotated[int, typer.Option(min=0)] = 0,
    page_size: Annotated[int, typer.Option(min=1, max=1000)] = 100,
) -> None:
    """One page of devices, oldest first."""
    a = api(ctx)
    params: dict[str, Any] = {"page": page, "pageSize": page_size}
    if profile:
        params["deviceProfileId"] = find_profile(a, profile)["id"]
    if search:
        params["textSearch"] = search
    body = a.json("GET", "/api/devices", params=params)
    show_devices(a, body, f"devices {page * page_size + 1}-{page * page_size + len(body['data'])}"
                          f" of {body['totalElements']}")


@devices_app.command("show")
def devices_show(ctx: typer.Context, device_id: uuid.UUID) -> None:
    """One device (its credentials' type, never their value)."""
    a = api(ctx)
    device = a.json("GET", f"/api/devices/{device_id}")
    show_devices(a, {"data": [device]} if not a.as_json else device, "device")


@devices_app.command("create")
def devices_create(
    ctx: typer.Context,
    name: str,
    profile: Annotated[str, typer.Option(help="Profile name or id.")],
    device_key: Annotated[str | None, typer.Option(help="Device key (default: the device id).")] = None,
    token: Annotated[str | None, typer.Option(help="Access token (default: generated).")] = None,
    client_id: Annotated[str | None, typer.Option(help="MQTT basic client id.")] = None,
    user_name: Annotated[str | None, typer.Option(help="MQTT basic user name.")] = None,
    password: Annotated[str | None, typer.Option(help="MQTT basic password.")] = None,
    certificate: Annotated[Path | None, typer.Option(help="X.509 certificate PEM file.", exists=True,
                                                     dir_okay=False)] = None,
) -> None:
    """Create a pre-provisioned device; prints its credentials once."""
    a = api(ctx)
    mqtt = {k: v for k, v in (("clientId", client_id), ("userName", user_name), ("password", password)) if v}
    given = [kind for kind, present in (("token", token), ("mqtt", mqtt), ("certificate", certificate)) if present]
    if len(given) > 1:
        fail("give one kind of credentials: --token, MQTT basic (--client-id/--user-name/--password) or"
             " --certificate", EXIT_USAGE)
    body: dict[str, Any] = {"name": name, "deviceProfileId": find_profile(a, profile)["id"]}
    if device_key:
        body["deviceKey"] = device_key
    if token:
        body["credentials"] = {"credentialsType": "ACCESS_TOKEN", "credentialsValue": token}
    elif mqtt:
        body["credentials"] = {"credentialsType": "MQTT_BASIC", "credentialsValue": mqtt}
    elif certificate:
        body["credentials"] = {"credentialsType": "X509_CERTIFICATE", "credentialsValue": certificate.read_text()}
    device = a.json("POST", "/api/devices", json=body)
    if a.as_json:
        print_json(device)
        return
    show_devices(a, {"data": [device]}, "device created")
    out.print(f"credentials ({device['credentials']['credentialsType']}): "
              f"{json.dumps(device['credentials']['credentialsValue'])}", markup=False)


@devices_app.command("delete")
def devices_delete(ctx: typer.Context, device_id: uuid.UUID) -> None:
    """Delete a device and its credentials."""
    delete(api(ctx), f"/api/devices/{device_id}", str(device_id), f"device {device_id}")


def show_credentials(a: Api, device: dict[str, Any], title: str) -> None:
    """A device and the credentials it was just given: printed this once (the API never shows them again)."""
    if a.as_json:
        print_json(device)
        return
    show_devices(a, {"data": [device]}, title)
    credentials = device["credentials"]
    out.print(f"new credentials ({credentials['credentialsType']}, shown once): "
              f"{json.dumps(credentials['credentialsValue'])}", markup=False)


@devices_app.command("rotate")
def devices_rotate(
    ctx: typer.Context,
    device_id: uuid.UUID,
    certificate: Annotated[Path | None, typer.Option(help="The new X.509 certificate (PEM file); an X.509 device"
                                                          " needs one.", exists=True, dir_okay=False)] = None,
) -> None:
    """New credentials of the same type (a new token; a new MQTT password under the same client id and user
    name; the given certificate), printed once; the old ones are refused from now on and live sessions end."""
    a = api(ctx)
    body = None
    if certificate is not None:
        body = {"credentialsType": "X509_CERTIFICATE", "credentialsValue": certificate.read_text()}
    device = a.json("POST", f"/api/devices/{device_id}/credentials/rotate", json=body)
    show_credentials(a, device, "credentials rotated")


@devices_app.command("revoke")
def devices_revoke(ctx: typer.Context, device_id: uuid.UUID) -> None:
    """Take the device's credentials away (it can no longer log in; `devices rotate` gives it new ones)."""
    a = api(ctx)
    device = a.json("POST", f"/api/devices/{device_id}/credentials/revoke")
    if a.as_json:
        print_json(device)
    else:
        out.print(f"revoked the credentials of device {device['name']} ({device_id})", markup=False)


def _content_type(path: Path) -> str:
    return "application/x-ndjson" if path.suffix.lower() in (".ndjson", ".jsonl", ".json") else "text/csv"


@devices_app.command("import")
def devices_import(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="CSV (or .ndjson / .jsonl JSON lines) file.", exists=True,
                                         dir_okay=False, readable=True)],
    profile: Annotated[str, typer.Option(help="Profile name or id.")],
    on_existing: Annotated[OnExisting, typer.Option(help="A device that exists already: skip or update it.")]
    = OnExisting.skip,
    atomic: Annotated[bool, typer.Option(help="All or nothing: one bad row and nothing is written.")] = False,
    delimiter: Annotated[str | None, typer.Option(help="CSV delimiter (default: detected).")] = None,
    columns: Annotated[str | None, typer.Option(help="Field of each column, comma-separated (empty: ignored).")]
    = None,
    header: Annotated[bool, typer.Option(help="The CSV's first row is a header.")] = True,
) -> None:
    """Bulk import pre-provisioned devices; a progress bar, then the rejected rows (exit 6 if any)."""
    a = api(ctx)
    params: dict[str, Any] = {"deviceProfileId": find_profile(a, profile)["id"], "onExisting": on_existing.value,
                              "atomic": str(atomic).lower(), "header": str(header).lower()}
    if delimiter:
        params["delimiter"] = delimiter
    if columns is not None:
        params["columns"] = columns
    with a.client(timeout=300) as client, file.open("rb") as body:
        started = a.send(client, "POST", "/api/devices/import", params=params, content=body,
                         headers={"Content-Type": _content_type(file)}).json()
        job = follow(a, client, started["id"])
    report(a, job)
    if job["status"] != "done" or job["rejected"]:
        raise typer.Exit(EXIT_REJECTED)


def follow(a: Api, client: httpx.Client, job_id: str) -> dict[str, Any]:
    """Poll the job until it ends, with a progress bar on stderr (none with --json or when not a terminal)."""
    path = f"/api/devices/import/{job_id}"
    with Progress(TextColumn("importing"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[counts]}"),
                  TimeElapsedColumn(), console=err, disable=a.as_json or not err.is_terminal, transient=False) as bar:
        task = bar.add_task("import", total=None, counts="")
        while True:
            job: dict[str, Any] = a.send(client, "GET", path).json()
            bar.update(task, total=job["total"], completed=job["processed"],
                       counts=f"created {job['created']} updated {job['updated']} skipped {job['skipped']}"
                              f" rejected {job['rejected']}")
            if job["status"] != "running":
                return job
            time.sleep(0.25)


def report(a: Api, job: dict[str, Any]) -> None:
    if a.as_json:
        print_json(job)
        return
    if job["errors"]:
        table(f"{job['rejected']} rejected rows" + (" (first ones)" if job["errorsTruncated"] else ""),
              ["line", "field", "reason"], [[e["line"], e["field"], e["reason"]] for e in job["errors"]])
    out.print(f"import {job['id']}: {job['status']}; {job['processed']} of {job['total']} rows: created"
              f" {job['created']}, updated {job['updated']}, skipped {job['skipped']}, rejected {job['rejected']}",
              markup=False)
    if job.get("message"):
        out.print(job["message"], markup=False)


@devices_app.command("export")
def devices_export(
    ctx: typer.Context,
    profile: Annotated[str, typer.Option(help="Profile name or id.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File to write (default: stdout).")] = None,
) -> None:
    """The profile's devices as CSV (name, device key, provision state, credentials type, times; no secret)."""
    a = api(ctx)
    params = {"deviceProfileId": find_profile(a, profile)["id"]}
    with a.client(timeout=300) as client:
        try:
            with client.stream("GET", "/api/devices/export", params=params) as response:
                if response.status_code >= 400:
                    response.read()
                checked(response, a.url)
                sink = output.open("wb") if output else sys.stdout.buffer
                try:
                    for chunk in response.iter_bytes():
                        sink.write(chunk)
                finally:
                    if output:
                        sink.close()
        except httpx.TransportError as exc:
            fail(f"cannot reach the admin API at {a.url} ({type(exc).__name__}: {exc})", EXIT_UNREACHABLE)


# --- operators and tokens ---------------------------------------------------------------------------


def read_password(confirm: bool = True) -> str:
    """The new password: a hidden prompt (typed twice) on a terminal, else the first line of stdin
    (``printf '%s\\n' "$PW" | provisioning operators create ...``). Never a command-line argument."""
    if sys.stdin.isatty():
        password: str = typer.prompt("Password", hide_input=True, confirmation_prompt=confirm, err=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        fail("no password given (a hidden prompt on a terminal, else one line on stdin)", EXIT_USAGE)
    return password


def find_operator(a: Api, name_or_id: str) -> dict[str, Any]:
    """An operator by id or by user name."""
    operators: list[dict[str, Any]] = a.json("GET", "/api/operators")
    for operator in operators:
        if name_or_id in (operator["id"], operator["username"]):
            return operator
    fail(f"no operator named {name_or_id!r}", EXIT_REFUSED)


def show_operators(a: Api, operators: list[dict[str, Any]], title: str, *, one: bool = True) -> None:
    """A table of ``operators`` (``--json``: the API's answer, one object unless ``one`` is False)."""
    if a.as_json:
        print_json(operators[0] if one else operators)
        return
    table(title, ["user name", "id", "role", "state", "created"],
          [[o["username"], o["id"], o["role"], "disabled" if o["disabled"] else "enabled", _when(o["createdTime"])]
           for o in operators])


@operators_app.command("list")
def operators_list(ctx: typer.Context) -> None:
    """Every operator account."""
    a = api(ctx)
    found = a.json("GET", "/api/operators")
    show_operators(a, found, f"{len(found)} operators", one=False)


@operators_app.command("create")
def operators_create(
    ctx: typer.Context,
    username: str,
    role: Annotated[Role, typer.Option(help="viewer: reads; operator: also devices and imports; admin: all.")]
    = Role.viewer,
    no_password: Annotated[bool, typer.Option("--no-password", help="No console log-in: API tokens only.")]
    = False,
) -> None:
    """Create an account; its console password is asked for (hidden, twice) or read from stdin."""
    a = api(ctx)
    body: dict[str, Any] = {"username": username, "role": role.value}
    if not no_password:
        body["password"] = read_password()
    show_operators(a, [a.json("POST", "/api/operators", json=body)], "operator created")


def _update_operator(ctx: typer.Context, who: str, change: dict[str, Any], title: str) -> None:
    a = api(ctx)
    operator = find_operator(a, who)
    show_operators(a, [a.json("PUT", f"/api/operators/{operator['id']}", json=change)], title)


@operators_app.command("disable")
def operators_disable(ctx: typer.Context, operator: Annotated[str, typer.Argument(help="User name or id.")]) -> None:
    """Disable an account: its console sessions and API tokens stop working at once (enable undoes it)."""
    _update_operator(ctx, operator, {"disabled": True}, "operator disabled")


@operators_app.command("enable")
def operators_enable(ctx: typer.Context, operator: Annotated[str, typer.Argument(help="User name or id.")]) -> None:
    """Enable a disabled account again."""
    _update_operator(ctx, operator, {"disabled": False}, "operator enabled")


@operators_app.command("role")
def operators_role(ctx: typer.Context, operator: Annotated[str, typer.Argument(help="User name or id.")],
                   role: Role) -> None:
    """Change an account's role."""
    _update_operator(ctx, operator, {"role": role.value}, "role changed")


@operators_app.command("password")
def operators_password(ctx: typer.Context,
                       operator: Annotated[str, typer.Argument(help="User name or id.")]) -> None:
    """Set an account's console password (asked for, hidden, or read from stdin)."""
    _update_operator(ctx, operator, {"password": read_password()}, "password set")


@operators_app.command("delete")
def operators_delete(ctx: typer.Context, operator: Annotated[str, typer.Argument(help="User name or id.")]) -> None:
    """Delete an account and its tokens (the audit log keeps its name)."""
    a = api(ctx)
    found = find_operator(a, operator)
    delete(a, f"/api/operators/{found['id']}", found["id"], f"operator {found['username']} ({found['id']})")


OperatorOption = Annotated[str, typer.Option("--operator", help="Whose tokens (user name or id; admins only);"
                                                                " default: your own.")]


def _tokens_path(a: Api, operator: str) -> str:
    return "/api/operators/me/tokens" if operator == "me" else \
        f"/api/operators/{find_operator(a, operator)['id']}/tokens"


@tokens_app.command("create")
def tokens_create(ctx: typer.Context, name: Annotated[str, typer.Argument(help="What the token is for.")],
                  operator: OperatorOption = "me") -> None:
    """A new personal API token, printed once (only its hash is kept): store it now."""
    a = api(ctx)
    created = a.json("POST", _tokens_path(a, operator), json={"name": name})
    if a.as_json:
        print_json(created)
        return
    err.print(f"token {created['name']!r} ({created['id']}), shown once; store it now:", markup=False)
    out.print(created["token"], markup=False)


@tokens_app.command("list")
def tokens_list(ctx: typer.Context, operator: OperatorOption = "me") -> None:
    """Tokens (never their value): name, id, created, last used, revoked."""
    a = api(ctx)
    found = a.json("GET", _tokens_path(a, operator))
    if a.as_json:
        print_json(found)
        return
    table(f"{len(found)} tokens", ["name", "id", "created", "last used", "revoked"],
          [[t["name"], t["id"], _when(t["createdTime"]), _when(t["lastUsedTime"]), _when(t["revokedTime"])]
           for t in found])


@tokens_app.command("revoke")
def tokens_revoke(ctx: typer.Context, token: Annotated[str, typer.Argument(help="The token's id, or its name.")],
                  operator: OperatorOption = "me") -> None:
    """Revoke a token: refused from its next request on."""
    a = api(ctx)
    path = _tokens_path(a, operator)
    live = [t for t in a.json("GET", path) if t["revokedTime"] is None]
    matches = [t for t in live if t["id"] == token] or [t for t in live if t["name"] == token]
    if not matches:
        fail(f"no live token with the id or name {token!r}", EXIT_REFUSED)
    if len(matches) > 1:
        fail(f"{len(matches)} live tokens are named {token!r}: give its id (`provisioning tokens list`)", EXIT_USAGE)
    a.request("DELETE", f"{path}/{matches[0]['id']}")
    if a.as_json:
        print_json({"revoked": matches[0]["id"]})
    else:
        out.print(f"revoked token {matches[0]['name']} ({matches[0]['id']})", markup=False)


def main() -> None:
    """The console script: typer's own exit codes (2 for usage), 1 for anything unexpected, in one line."""
    args = sys.argv[1:]
    if "--json" in args:  # accepted after the command too (`provisioning profiles list --json`)
        args = ["--json", *(arg for arg in args if arg != "--json")]
    try:
        app(args=args, prog_name="provisioning", standalone_mode=True)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        err.print("error: interrupted", markup=False)
        sys.exit(EXIT_ERROR)
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, for an operator's terminal
        err.print(f"error: {type(exc).__name__}: {exc}", markup=False)
        sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    main()
