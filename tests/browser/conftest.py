"""Browser tests of the operator console: Debian's headless chromium (/usr/bin/chromium) driven by Playwright.

The e2e fixtures (a private database, bus namespace and the whole service stack per module) are reused by
importing them here. Playwright's own browser downloads are never used (no ``playwright install``): the
module is skipped, saying why, when /usr/bin/chromium is absent (``apt-get install chromium``; .ci/run does).
"""

from __future__ import annotations

from pathlib import Path

from tests.e2e.conftest import admin, env, http, stack, tls_files  # noqa: F401  (fixtures)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
#: Where the README's screenshots are written (committed) when CONSOLE_SCREENSHOTS=1; otherwise they are taken
#: into a temporary directory, so that a test run leaves the working tree as it was.
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
