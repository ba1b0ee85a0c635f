"""``python -m mqtt_gateway.devcert DIR``: the MQTT TLS certificate for a deployment, made on first start.

Used by docker-compose's one-shot ``mqtt-tls`` service before the MQTT gateway starts. When ``DIR``
already holds a certificate and key that this tool did not make (``server.pem`` and ``server.key``
without our ``ca.key`` beside them), they are the operator's and are left alone. Otherwise a
development CA and a server certificate are made once and reused (renewed when about to expire);
devices trust ``DIR/mqttserver.pub.pem``. Extra subject names: ``MQTT_TLS_HOSTNAMES`` (comma-separated)
or ``--hostname``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from provisioning_common.devcerts import generate_dev_certificate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mqtt_gateway.devcert")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--hostname", action="append", default=[], help="extra DNS name or IP (repeatable)")
    args = parser.parse_args(argv)
    directory: Path = args.directory
    if (directory / "server.pem").is_file() and (directory / "server.key").is_file() \
            and not (directory / "ca.key").exists():
        print(f"devcert: using the certificate given in {directory}", flush=True)
        return 0
    hostnames = [h.strip() for h in os.environ.get("MQTT_TLS_HOSTNAMES", "").split(",") if h.strip()]
    cert, _key, public = generate_dev_certificate(directory, [*hostnames, *args.hostname])
    print(f"devcert: development certificate {cert}; devices trust {public}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
