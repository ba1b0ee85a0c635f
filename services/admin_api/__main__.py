"""``python -m admin_api``: serve the admin API on ADMIN_PORT."""

from __future__ import annotations

from provisioning_common.runtime import serve_http, setup_logging
from provisioning_common.settings import get_settings

from .app import create_app


def main() -> None:
    settings = get_settings()
    setup_logging(settings, "admin_api")
    # Admin URLs carry ids, never secrets: the access log stays on.
    serve_http(create_app(settings), settings.admin_port, settings, access_log=True)


if __name__ == "__main__":
    main()
