"""``python -m http_gateway``: serve HTTP_PORT with uvicorn (uvloop + httptools)."""

from __future__ import annotations

import signal
import sys

import uvicorn

from provisioning_common.runtime import setup_logging
from provisioning_common.settings import get_settings

from .app import create_app


def main() -> None:
    settings = get_settings()
    setup_logging(settings, "http_gateway")
    # uvicorn re-raises SIGTERM after its graceful shutdown, which would end the process with
    # 143; a finished shutdown exits 0 (compose and Kubernetes read it as a clean stop).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(
        create_app(settings),
        host=settings.bind_host,
        port=settings.http_port,
        loop="uvloop",
        http="httptools",
        # The access log would print telemetry URLs, which carry device tokens.
        access_log=False,
        log_config=None,
        # On SIGTERM, requests in flight wait for the core at most PROVISION_TIMEOUT_S: let them finish.
        timeout_graceful_shutdown=int(settings.provision_timeout_s) + 5,
    )


if __name__ == "__main__":
    main()
