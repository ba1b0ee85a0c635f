"""``python -m admin_api``: serve the admin API on ADMIN_PORT."""

from __future__ import annotations

import signal
import sys

import uvicorn

from provisioning_common.runtime import setup_logging
from provisioning_common.settings import get_settings

from .app import create_app


def main() -> None:
    settings = get_settings()
    setup_logging(settings, "admin_api")
    # uvicorn re-raises SIGTERM after its graceful shutdown, which would end the process with
    # 143; a finished shutdown exits 0 (compose and Kubernetes read it as a clean stop).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(create_app(settings), host=settings.bind_host, port=settings.admin_port, loop="uvloop",
                http="httptools", log_config=None, timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
