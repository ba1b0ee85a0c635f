"""A console session that ends while the live activity page watches (issue 17): the page says so, instead of
going quiet. Its own stack, with the shortest idle expiry the settings allow (CONSOLE_SESSION_IDLE_S=60), so
the test waits about a minute; the open event stream is not a request, and neither is the page's watch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Infra
from tests.e2e.conftest import Env, module_env

from .conftest import CHROMIUM
from .test_console import TIMEOUT_MS, Accounts, accounts, browser, log_in  # noqa: F401  (fixtures)

IDLE_S = 60

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="/usr/bin/chromium is absent: apt-get install chromium (Debian's package; .ci/run installs it)",
)


@pytest.fixture(scope="module")
def env(infra: Infra, tls_files: tuple[Path, Path, Path]) -> Iterator[Env]:
    with module_env(infra, tls_files, CONSOLE_SESSION_IDLE_S=str(IDLE_S)) as environment:
        yield environment


def test_live_activity_says_when_the_session_expires(browser: Any, env: Env, accounts: Accounts) -> None:  # noqa: F811
    context, page = log_in(browser, env, accounts, "victor")
    cookie = next(c["value"] for c in context.cookies() if c["name"] == "console_session")
    page.goto("/console/#/activity")
    page.wait_for_selector("#live-status:has-text('live')")
    left = httpx.get(f"{env.admin_url}/console/session/left", cookies={"console_session": cookie}, timeout=10)
    assert left.status_code == 200 and 0 < left.json()["secondsLeft"] <= IDLE_S
    # No request for IDLE_S seconds (asking how long is left is none either): the session ends, the page says so.
    page.wait_for_selector("#session-expired", timeout=(IDLE_S * 2) * 1000)
    assert page.inner_text("#session-expired") == "Session expired — log in again"
    assert page.inner_text("#live-status") == "session expired"
    assert page.url.endswith("#/activity")  # still there: what was on screen stays readable
    assert httpx.get(f"{env.admin_url}/api/devices", cookies={"console_session": cookie}).status_code == 401
    assert httpx.get(f"{env.admin_url}/console/session/left", cookies={"console_session": cookie}).status_code == 401
    page.set_default_timeout(TIMEOUT_MS)
    page.click("#session-expired a")
    page.wait_for_url("**/console/login")
    context.close()
