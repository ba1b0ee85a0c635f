"""The operator console in headless Chromium (issue 17): log-in, the profile wizard and its key and secret, a
device provisioning over HTTP seen live and in the device list, a CSV import's report, a viewer's read-only
pages, CSRF, logout. Screenshots of the main pages go to docs/screenshots (the README shows them)."""

from __future__ import annotations

import os
import re
import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Admin, Env, tb_request
from tests.pki import issue

from .conftest import CHROMIUM, CHROMIUM_ARGS, SCREENSHOTS

TIMEOUT_MS = 15_000

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="/usr/bin/chromium is absent: apt-get install chromium (Debian's package; .ci/run installs it)",
)


class Accounts:
    """The module's operator accounts (created with the bootstrap token): user name -> password."""

    def __init__(self, admin: Admin) -> None:
        self.passwords: dict[str, str] = {}
        for username, role in (("alice", "admin"), ("oscar", "operator"), ("victor", "viewer")):
            password = secrets.token_urlsafe(16)
            response = admin.http.post("/api/operators", json={"username": username, "password": password,
                                                               "role": role})
            assert response.status_code == 201, response.text
            self.passwords[username] = password


@pytest.fixture(scope="module")
def accounts(admin: Admin) -> Accounts:
    return Accounts(admin)


@pytest.fixture(scope="module")
def browser(stack: Any, accounts: Accounts) -> Iterator[Any]:
    """Chromium, started after the stack and the accounts: Playwright's sync API runs an event loop in this
    thread while the browser lives, where the e2e fixtures' asyncio.run() would fail."""
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make install)")
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Screenshots of the main pages: docs/screenshots with CONSOLE_SCREENSHOTS=1 (the README's), else a
    temporary directory."""
    directory = SCREENSHOTS if os.environ.get("CONSOLE_SCREENSHOTS") == "1" else tmp_path_factory.mktemp("shots")
    directory.mkdir(parents=True, exist_ok=True)

    def shot(page: Any, name: str) -> None:
        page.screenshot(path=str(directory / f"{name}.png"), full_page=True)

    return shot


def log_in(browser: Any, env: Env, accounts: Accounts, username: str) -> tuple[Any, Any]:
    """A fresh browser context logged in as ``username``, and its page on the console."""
    context = browser.new_context(base_url=env.admin_url, viewport={"width": 1280, "height": 800})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=env.admin_url)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto("/console/")
    page.wait_for_url("**/console/login")
    page.fill("#username", username)
    page.fill("#password", accounts.passwords[username])
    page.click("#login-button")
    page.wait_for_url("**/console/")
    page.wait_for_selector("#profiles")
    page.on("dialog", lambda dialog: dialog.accept())  # "Delete ...?" and the like: yes
    return context, page


@pytest.fixture(scope="module")
def admin_page(browser: Any, env: Env, accounts: Accounts) -> Iterator[Any]:
    context, page = log_in(browser, env, accounts, "alice")
    yield page
    context.close()


def fetch(page: Any, method: str, path: str, body: Any, csrf: bool) -> dict[str, Any]:
    """A fetch from the logged-in page (its cookie), with or without the session's CSRF token."""
    result: dict[str, Any] = page.evaluate(
        """async ([method, path, body, csrf]) => {
            const session = await (await fetch("/console/session")).json();
            const headers = {"Content-Type": "application/json"};
            if (csrf) headers["X-CSRF-Token"] = session.csrfToken;
            const r = await fetch(path, {method, headers, body: JSON.stringify(body)});
            return {status: r.status, body: await r.json().catch(() => null)};
        }""",
        [method, path, body, csrf],
    )
    return result


def test_log_in_refuses_a_wrong_password_with_a_generic_message(browser: Any, env: Env, accounts: Accounts,
                                                                shots: Any) -> None:
    context = browser.new_context(base_url=env.admin_url, viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto("/console/")
    page.wait_for_url("**/console/login")
    for username in ("alice", "nobody-here"):
        page.fill("#username", username)
        page.fill("#password", "not-the-password")
        page.click("#login-button")
        page.wait_for_selector("#login-error:not([hidden])")
        assert page.inner_text("#login-error") == "Wrong user name or password"
    assert context.cookies() == []
    page.fill("#username", "")
    page.fill("#password", "")
    page.evaluate("document.getElementById('login-error').hidden = true")
    shots(page, "login")
    context.close()


def test_session_cookie_is_httponly_and_samesite_strict(admin_page: Any) -> None:
    cookie, = [c for c in admin_page.context.cookies() if c["name"] == "console_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    assert not cookie["secure"]  # plain http to 127.0.0.1 (README "Web console"); Secure anywhere else
    assert admin_page.evaluate("document.cookie") == ""  # not readable by scripts


def test_session_cookie_is_secure_unless_asked_for_over_http_on_loopback(env: Env, accounts: Accounts) -> None:
    body = {"username": "victor", "password": accounts.passwords["victor"]}
    for host, secure in (("127.0.0.1", False), ("localhost", False), ("console.example.com", True),
                         ("192.0.2.10", True)):
        response = httpx.post(f"{env.admin_url}/console/login", json=body, headers={"Host": host}, timeout=10)
        assert response.status_code == 200, response.text
        attributes = [a.strip().lower() for a in response.headers["set-cookie"].split(";")]
        assert ("secure" in attributes) is secure, (host, attributes)
        assert {"httponly", "samesite=strict", "path=/"} <= set(attributes)


def test_wizard_creates_a_profile_whose_key_and_secret_provision_a_device_seen_live(
    browser: Any, admin_page: Any, env: Env, shots: Any
) -> None:
    page = admin_page
    name = f"line-{uuid.uuid4().hex[:6]}"
    page.click("#add-profile")
    page.fill("#name", name)
    page.select_option("#strategy", "ALLOW_CREATE_NEW_DEVICES")
    shots(page, "profile-wizard")
    page.click("#wizard-next")
    page.click("#wizard-create")
    page.wait_for_selector("#wizard-3")
    key, secret = page.inner_text("#provision-key"), page.inner_text("#provision-secret")
    assert key and secret
    page.click("[data-copy=provision-secret]")
    page.wait_for_selector("[data-copy=provision-secret]:has-text('Copied')")
    assert page.evaluate("navigator.clipboard.readText()") == secret
    page.click("[data-copy=provision-key]")
    page.wait_for_selector("[data-copy=provision-key]:has-text('Copied')")
    assert page.evaluate("navigator.clipboard.readText()") == key
    shots(page, "profile-created")

    # The activity view, open and live before the device provisions.
    activity = page.context.new_page()
    activity.goto("/console/#/activity")
    activity.wait_for_selector("#live-status:has-text('live')")
    device = f"sensor-{uuid.uuid4().hex[:6]}"
    response = httpx.post(f"{env.http_url}/api/v1/provision", timeout=15,
                          json=tb_request({"provisionDeviceKey": key, "provisionDeviceSecret": secret},
                                          deviceName=device))
    assert response.status_code == 200 and response.json()["status"] == "SUCCESS", response.text
    row = activity.wait_for_selector(f"#activity tr[data-device='{device}']")
    assert "SUCCESS" in row.inner_text() and name in row.inner_text()
    shots(activity, "activity")
    activity.close()

    page.goto(f"/console/#/devices?q={device}")
    row = page.wait_for_selector(f"#devices tr[data-name='{device}']")
    assert "provisioned" in row.inner_text() and "ACCESS_TOKEN" in row.inner_text()
    page.select_option("#filter-state", "pending")
    page.wait_for_selector("#page-info:has-text('0 in all')")
    page.goto("/console/#/devices")
    page.wait_for_selector(f"#devices tr[data-name='{device}']")
    shots(page, "devices")
    page.click(f"#devices tr[data-name='{device}'] a")
    page.wait_for_selector("#device-detail")
    detail = page.inner_text("#device-detail")
    assert "provisioned" in detail and "HTTP" in detail and "ACCESS_TOKEN" in detail
    shots(page, "device")
    page.goto("/console/#/profiles")
    page.wait_for_selector(f"#profiles tr[data-name='{name}']")
    shots(page, "profiles")


def test_rotate_shows_new_credentials_once_and_a_used_profile_cannot_be_deleted(admin_page: Any, admin: Any) -> None:
    page = admin_page
    profile = admin.create_profile()
    device = admin.create_device(profile["id"])
    page.goto(f"/console/#/devices/{device['id']}")
    page.click("#rotate")
    new_token = page.wait_for_selector("#new-credentials").inner_text()
    assert new_token and new_token != device["credentials"]["credentialsValue"]
    page.goto("/console/#/profiles")
    page.click(f"#profiles tr[data-name='{profile['name']}'] button.delete")
    page.wait_for_selector("#flash.error")
    assert page.inner_text("#flash") == "The device profile is referenced by devices; delete them first"
    assert admin.http.get(f"/api/device-profiles/{profile['id']}").status_code == 200


def test_edit_and_regenerate_the_secret(admin_page: Any, admin: Any) -> None:
    page = admin_page
    profile = admin.create_profile()
    page.goto(f"/console/#/profiles/{profile['id']}/edit")
    page.fill("#name", profile["name"] + "-b")
    page.click("#save-profile")
    page.wait_for_selector(f"h1:has-text('Edit {profile['name']}-b')")
    saved = admin.http.get(f"/api/device-profiles/{profile['id']}").json()
    assert saved["provisionDeviceSecret"] == profile["provisionDeviceSecret"]  # an edit keeps the secret
    page.click("#regenerate-secret")
    page.wait_for_selector("#flash:has-text('New provision secret')")
    regenerated = admin.http.get(f"/api/device-profiles/{profile['id']}").json()
    assert regenerated["provisionDeviceSecret"] not in (None, profile["provisionDeviceSecret"])
    assert regenerated["provisionDeviceKey"] == profile["provisionDeviceKey"]
    page.wait_for_selector(f"#provision-secret:has-text('{regenerated['provisionDeviceSecret']}')")


def test_wizard_x509_chain_profile(admin_page: Any, admin: Any, shots: Any) -> None:
    page = admin_page
    ca = issue(f"Factory CA {uuid.uuid4().hex[:6]}", ca=True)
    name = f"x509-{uuid.uuid4().hex[:6]}"
    page.goto("/console/#/profiles/new")
    page.fill("#name", name)
    page.select_option("#strategy", "X509_CERTIFICATE_CHAIN")
    page.click("#wizard-next")
    page.fill("#certificatePem", ca.pem)
    page.fill("#certificateRegExPattern", "^(SN-[0-9]+)$")
    shots(page, "profile-wizard-x509")
    page.click("#wizard-create")
    page.wait_for_selector("#wizard-3")
    assert page.query_selector("#provision-secret") is None  # a chain profile has no secret
    created = next(p for p in admin.http.get("/api/device-profiles").json()["data"] if p["name"] == name)
    assert created["provisionStrategy"] == "X509_CERTIFICATE_CHAIN"
    assert created["certificateRegExPattern"] == "^(SN-[0-9]+)$"
    assert page.inner_text("#provision-key") == created["provisionDeviceKey"]


def test_activity_filtered_by_profile(admin_page: Any, admin: Any, env: Env) -> None:
    watched, other = admin.create_profile(), admin.create_profile()
    page = admin_page.context.new_page()
    page.goto(f"/console/#/activity?profile={watched['id']}")
    page.wait_for_selector("#live-status:has-text('live')")
    names = {}
    for profile in (other, watched):  # the other profile's device first
        names[profile["id"]] = f"filtered-{uuid.uuid4().hex[:6]}"
        response = httpx.post(f"{env.http_url}/api/v1/provision", timeout=15,
                              json=tb_request(profile, deviceName=names[profile["id"]]))
        assert response.json()["status"] == "SUCCESS", response.text
    page.wait_for_selector(f"#activity tr[data-device='{names[watched['id']]}']")
    assert page.query_selector(f"#activity tr[data-device='{names[other['id']]}']") is None
    page.close()


def test_a_disabled_operator_loses_their_session(browser: Any, env: Env, admin: Any) -> None:
    password = secrets.token_urlsafe(16)
    created = admin.http.post("/api/operators", json={"username": "dora", "password": password, "role": "operator"})
    assert created.status_code == 201
    login = httpx.post(f"{env.admin_url}/console/login", json={"username": "dora", "password": password}, timeout=10)
    cookies = {"console_session": login.cookies["console_session"]}
    assert httpx.get(f"{env.admin_url}/api/devices", cookies=cookies).status_code == 200
    assert admin.http.put(f"/api/operators/{created.json()['id']}", json={"disabled": True}).status_code == 200
    assert httpx.get(f"{env.admin_url}/api/devices", cookies=cookies).status_code == 401


def test_import_reports_the_bad_row(admin_page: Any, admin: Any, shots: Any) -> None:
    page = admin_page
    profile = admin.create_profile("CHECK_PRE_PROVISIONED_DEVICES")
    tag = uuid.uuid4().hex[:6]
    csv = f"name,deviceKey\nunit-{tag}-1,SN-1\nunit-{tag}-2,SN-2\nunit-{tag}-1,SN-3\n"
    page.goto("/console/#/import")
    page.wait_for_selector("#import-profile")
    page.select_option("#import-profile", profile["id"])
    page.set_input_files("#import-file", files=[{"name": "production.csv", "mimeType": "text/csv",
                                                 "buffer": csv.encode()}])
    page.click("#import-start")
    page.wait_for_selector("#import-counts")
    assert page.inner_text("#import-counts") == "created 2 · updated 0 · skipped 0 · rejected 1"
    assert page.get_attribute("#import-progress", "value") == "3"
    line, field, reason = (c.inner_text() for c in page.query_selector_all("#import-errors tbody td"))
    assert (line, field) == ("4", "name") and "duplicate name in the file (line 2)" in reason
    shots(page, "import")


def _choose_csv(page: Any, profile: dict[str, Any], csv: bytes) -> None:
    page.goto("/console/#/import")
    page.reload()  # the page may be on #/import already (no hashchange): fresh, with the new profile
    page.wait_for_selector("#import-profile")
    page.select_option("#import-profile", profile["id"])
    page.set_input_files("#import-file", files=[{"name": "line-7.csv", "mimeType": "text/csv", "buffer": csv}])
    page.wait_for_selector("#import-columns")


def test_import_maps_non_standard_headers(admin_page: Any, admin: Any, env: Env, shots: Any) -> None:
    """A spreadsheet's own headers (with a BOM, ';'-separated, a quoted header holding a ';'): the page reads the
    first line, shows each column with the field the API would give it, and the operator maps the rest."""
    page = admin_page
    profile = admin.create_profile("CHECK_PRE_PROVISIONED_DEVICES")
    tag = uuid.uuid4().hex[:6]
    tokens = [f"tok-{tag}-{n}-{secrets.token_hex(8)}" for n in (1, 2)]
    csv = (f'Serial;Token;"Notes; free text";Label\r\nSN-{tag}-1;{tokens[0]};first;a\r\n'
           f'SN-{tag}-2;{tokens[1]};"second; with a ;";b\r\n')
    _choose_csv(page, profile, b"\xef\xbb\xbf" + csv.encode())
    assert page.input_value("#import-delimiter") == ";"
    headers = [c.inner_text() for c in page.query_selector_all("#import-columns tbody td:nth-child(2)")]
    assert headers == ["Serial", "Token", "Notes; free text", "Label"]  # BOM dropped, quoting respected
    # Pre-selected as the API maps headers by itself: Token is an alias of accessToken; Serial is unknown.
    assert [page.input_value(f"#import-map-{n}") for n in (1, 2, 3, 4)] == ["", "accessToken", "", ""]
    assert "not a known field" in page.inner_text("#import-columns tr[data-column='1']")
    options = page.eval_on_selector_all("#import-map-1 option", "os => os.map(o => o.value)")
    assert options == ["", "name", "deviceKey", "accessToken", "mqttClientId", "mqttUserName", "mqttPassword", "x509"]
    page.select_option("#import-map-1", "name")
    shots(page, "import-mapper")
    page.click("#import-start")
    page.wait_for_selector("#import-counts")
    assert page.inner_text("#import-counts") == "created 2 · updated 0 · skipped 0 · rejected 0"
    devices = admin.http.get("/api/devices", params={"deviceProfileId": profile["id"]}).json()["data"]
    assert sorted(d["name"] for d in devices) == [f"SN-{tag}-1", f"SN-{tag}-2"]
    for token in tokens:  # each device holds the access token from its row
        response = httpx.post(f"{env.http_url}/api/v1/{token}/telemetry", json={"t": 1}, timeout=10)
        assert response.status_code == 200, response.text


def test_import_without_a_header_line_maps_columns_by_position(admin_page: Any, admin: Any) -> None:
    page = admin_page
    profile = admin.create_profile("CHECK_PRE_PROVISIONED_DEVICES")
    tag = uuid.uuid4().hex[:6]
    _choose_csv(page, profile, f"K-{tag}-1\tunit-{tag}-1\nK-{tag}-2\tunit-{tag}-2\n".encode())
    assert page.input_value("#import-delimiter") == "\t"
    page.uncheck("#import-header")
    labels = [c.inner_text() for c in page.query_selector_all("#import-columns tbody td:nth-child(2)")]
    assert labels == ["column 1", "column 2"]
    # Mapped twice to name: refused in the page, nothing sent.
    page.select_option("#import-map-2", "name")
    page.click("#import-start")
    page.wait_for_selector("#flash:has-text('More than one column is mapped to name')")
    page.select_option("#import-map-1", "deviceKey")
    page.click("#import-start")
    page.wait_for_selector("#import-counts:has-text('created 2')")
    devices = admin.http.get("/api/devices", params={"deviceProfileId": profile["id"]}).json()["data"]
    assert sorted((d["name"], d["deviceKey"]) for d in devices) == [(f"unit-{tag}-1", f"K-{tag}-1"),
                                                                    (f"unit-{tag}-2", f"K-{tag}-2")]


def test_admin_pages(admin_page: Any, shots: Any) -> None:
    page = admin_page
    page.goto("/console/#/operators")
    page.wait_for_selector("#operators tr[data-name='victor']")
    shots(page, "operators")
    page.goto("/console/#/audit")
    row = page.wait_for_selector("#audit tbody tr")
    assert "alice" in row.inner_text()  # the console's changes are audited as its operator
    shots(page, "audit")


def test_personal_api_token_is_shown_once_works_and_is_revoked(admin_page: Any, env: Env) -> None:
    page = admin_page
    page.goto("/console/#/tokens")
    page.fill("#token-name", "ci script")
    page.click("#token-create")
    token = page.wait_for_selector("#new-token").inner_text()
    bearer = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{env.admin_url}/api/operators/me/tokens", headers=bearer).status_code == 200
    assert token not in page.inner_text("#tokens")  # the list never shows it
    page.click("#tokens tr:has-text('ci script') button")
    page.wait_for_selector("#flash:has-text('Revoked ci script')")
    assert httpx.get(f"{env.admin_url}/api/operators/me/tokens", headers=bearer).status_code == 401


def test_csrf_less_post_is_refused(admin_page: Any, admin: Any) -> None:
    name = f"csrf-{uuid.uuid4().hex[:6]}"
    body = {"name": name, "provisionStrategy": "ALLOW_CREATE_NEW_DEVICES"}
    refused = fetch(admin_page, "POST", "/api/device-profiles", body, csrf=False)
    assert refused["status"] == 403 and "CSRF" in refused["body"]["message"]
    # The cookie alone from outside the browser (what a forged cross-site request carries at best): refused too.
    cookie = next(c["value"] for c in admin_page.context.cookies() if c["name"] == "console_session")
    outside = httpx.post(f"{admin.env.admin_url}/api/device-profiles", json=body, timeout=10,
                         cookies={"console_session": cookie}, headers={"X-CSRF-Token": "guessed"})
    assert outside.status_code == 403
    accepted = fetch(admin_page, "POST", "/api/device-profiles", body, csrf=True)  # the same call, with it
    assert accepted["status"] == 201
    names = [p["name"] for p in admin.http.get("/api/device-profiles").json()["data"]]
    assert names.count(name) == 1
    audit = admin.http.get("/api/audit", params={"actor": "alice"}).json()["data"]
    assert {(a["status"], a["path"]) for a in audit} >= {(403, "/api/device-profiles"), (201, "/api/device-profiles")}


def test_viewer_sees_no_change_buttons_and_the_api_refuses(browser: Any, env: Env, accounts: Accounts,
                                                           admin: Any) -> None:
    profile = admin.create_profile()
    device = admin.create_device(profile["id"])
    context, page = log_in(browser, env, accounts, "victor")
    page.wait_for_selector(f"#profiles tr[data-name='{profile['name']}']")
    assert page.query_selector("#add-profile") is None
    assert page.query_selector_all("#profiles button") == []
    assert not page.is_visible("#nav a[data-page=import]") and not page.is_visible("#nav a[data-page=operators]")
    page.goto(f"/console/#/devices/{device['id']}")
    page.wait_for_selector("#device-detail")
    assert page.query_selector_all("#main button") == []
    assert "null" not in page.inner_text("#main")
    refused = fetch(page, "DELETE", f"/api/devices/{device['id']}", None, csrf=True)
    assert refused["status"] == 403 and "viewer" in refused["body"]["message"]
    assert fetch(page, "POST", "/api/device-profiles", {"name": "v", "provisionStrategy": "DISABLED"},
                 csrf=True)["status"] == 403
    assert admin.http.get(f"/api/devices/{device['id']}").status_code == 200
    context.close()


def test_logout_ends_the_session(browser: Any, env: Env, accounts: Accounts) -> None:
    context, page = log_in(browser, env, accounts, "oscar")
    cookie = next(c["value"] for c in context.cookies() if c["name"] == "console_session")
    assert httpx.get(f"{env.admin_url}/api/devices", cookies={"console_session": cookie}).status_code == 200
    page.click("#logout")
    page.wait_for_url("**/console/login")
    assert [c for c in context.cookies() if c["name"] == "console_session"] == []
    assert httpx.get(f"{env.admin_url}/api/devices", cookies={"console_session": cookie}).status_code == 401
    page.goto("/console/")
    page.wait_for_url("**/console/login")
    context.close()


def _sql(env: Env, query: str) -> None:
    """Run one statement on the module's database, in a thread of its own (Playwright's loop runs in this one)."""
    import asyncio
    import threading

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(env.database_url)
        try:
            await conn.execute(query)
        finally:
            await conn.close()

    thread = threading.Thread(target=asyncio.run, args=(run(),))
    thread.start()
    thread.join(10)


def test_an_idle_session_expires(browser: Any, env: Env, accounts: Accounts) -> None:
    context, page = log_in(browser, env, accounts, "oscar")
    cookie = next(c["value"] for c in context.cookies() if c["name"] == "console_session")
    assert httpx.get(f"{env.admin_url}/api/devices", cookies={"console_session": cookie}).status_code == 200
    # As if CONSOLE_SESSION_IDLE_S (1800 s) had passed since its last request.
    _sql(env, "UPDATE console_sessions SET last_seen_at = now() - interval '1801 seconds'")
    assert httpx.get(f"{env.admin_url}/api/devices", cookies={"console_session": cookie}).status_code == 401
    page.goto("/console/#/devices")
    page.wait_for_url("**/console/login")
    context.close()


def test_failed_log_ins_are_rate_limited(browser: Any, env: Env, accounts: Accounts) -> None:
    """Last in the module: it uses up the failures budget of the tests' source address (shared by every admin
    API process through Postgres; tests/e2e/test_operators.py shows two processes sharing it)."""
    with httpx.Client(base_url=env.admin_url, timeout=30) as client:
        # 10 at once per source, a token back every 6 s (the module's earlier wrong log-ins may still count).
        statuses: list[int] = []
        while len(statuses) < 14 and 429 not in statuses:
            statuses.append(client.post("/console/login", json={"username": "victor",
                                                                "password": "wrong"}).status_code)
        assert statuses[-1] == 429 and set(statuses[:-1]) == {401} and len(statuses) >= 9
        refused = client.post("/console/login", json={"username": "victor", "password": accounts.passwords["victor"]})
        assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 7
        assert "console_session" not in refused.cookies
    context = browser.new_context(base_url=env.admin_url)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto("/console/login")
    page.fill("#username", "victor")
    page.fill("#password", accounts.passwords["victor"])
    page.click("#login-button")
    page.wait_for_selector("#login-error:not([hidden])")
    assert re.fullmatch(r"Too many login attempts, try again in [1-7] s", page.inner_text("#login-error"))
    assert context.cookies() == []
    context.close()
