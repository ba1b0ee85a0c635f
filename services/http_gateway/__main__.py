"""``python -m http_gateway``: serve HTTP_PORT with uvicorn (uvloop + httptools)."""

from __future__ import annotations

import uvicorn

from provisioning_common.runtime import setup_logging
from provisioning_common.settings import get_settings

from .app import create_app


def main() -> None:
    settings = get_settings()
    setup_logging(settings, "http_gateway")
    uvicorn.run(
        create_app(settings),
        host=settings.bind_host,
        port=settings.http_port,
        loop="uvloop",
        http="httptools",
        # The access log would print telemetry URLs, which carry device tokens.
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
