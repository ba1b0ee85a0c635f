"""``python -m http_gateway``: serve HTTP_PORT with uvicorn (uvloop + httptools)."""

from __future__ import annotations

from provisioning_common.runtime import serve_http, setup_logging
from provisioning_common.settings import get_settings

from .app import create_app


def main() -> None:
    settings = get_settings()
    setup_logging(settings, "http_gateway")
    # No access log: telemetry URLs carry device tokens.
    serve_http(create_app(settings, exit_signals=True), settings.http_port, settings)


if __name__ == "__main__":
    main()
