"""MQTT user/password logins against a running stack: time to CONNACK for a known user (right and wrong
password) and for an unknown user (issue 13, uniform-time password checks).

Before issue 13 a known user took ~31 ms and an unknown one ~2 ms: login time said which users exist, and
only known users cost the server a password hash. Now every login that presents a password costs one scrypt
check (an unknown user's against a dummy hash), so the three medians should be about the same.

    make up                                              # terminal 1 (MQTT on 1883, admin API on 8081)
    .venv/bin/python bench/mqtt_password_timing.py       # terminal 2: 30 logins of each kind
    .venv/bin/python bench/mqtt_password_timing.py -n 100 --mqtt-port 1883 --admin-url http://127.0.0.1:8081

It creates a profile and one pre-provisioned MQTT_BASIC device through the admin API (token: --admin-token,
$ADMIN_API_TOKEN or .local/stack.env). Wrong logins count against AUTH_FAILURES_PER_MINUTE per source
address: on a loopback host each login comes from its own 127.0.0.x address, so the limit never interferes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import urllib.error
import urllib.request
import uuid

from _common import NO_TOKEN_MESSAGE, SetupError, create_profile, find_admin_token  # bench/_common.py
from provisioning_common import mqtt_client_packets as client_codec


def create_basic_device(admin_url: str, token: str, profile_id: str, user: str, password: str) -> None:
    body = json.dumps({"name": f"timing-{user}", "deviceProfileId": profile_id, "credentials": {
        "credentialsType": "MQTT_BASIC", "credentialsValue": {"clientId": "", "userName": user, "password": password}}})
    request = urllib.request.Request(admin_url.rstrip("/") + "/api/devices", data=body.encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            if response.status != 201:
                raise SetupError(f"creating the device: HTTP {response.status}")
    except urllib.error.HTTPError as exc:
        raise SetupError(f"creating the device failed: HTTP {exc.code}: {exc.read()[:300]!r}") from None


async def login_ms(host: str, port: int, user: str, password: str, source: str | None) -> tuple[float, int]:
    """(milliseconds from CONNECT to CONNACK, its return code) for one MQTT 3.1.1 login."""
    local = (source, 0) if source else None
    reader, writer = await asyncio.open_connection(host, port, local_addr=local)
    try:
        connect = client_codec.encode_connect(f"t-{uuid.uuid4().hex[:8]}", username=user, password=password)
        start = time.perf_counter()
        writer.write(connect)
        connack = await asyncio.wait_for(reader.readexactly(4), 30)
        elapsed = (time.perf_counter() - start) * 1000
    finally:
        writer.close()
    return elapsed, connack[3]


async def main(args: argparse.Namespace) -> None:
    token = find_admin_token(args.admin_token)
    if token is None:
        raise SetupError(NO_TOKEN_MESSAGE)
    run = uuid.uuid4().hex[:8]
    profile_id, _, _ = create_profile(args.admin_url, token, f"timing-{run}")
    user, password = f"timing-user-{run}", f"timing-password-{run}"
    create_basic_device(args.admin_url, token, profile_id, user, password)
    kinds = {"known user, right password": (user, password), "known user, wrong password": (user, "wrong-password"),
             "unknown user": (f"nobody-{run}", "any-password")}
    loopback = args.host.startswith("127.")
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    codes: dict[str, set[int]] = {kind: set() for kind in kinds}
    for i in range(args.n):  # interleaved, so that load on the machine hits every kind alike
        for j, (kind, (name, secret)) in enumerate(kinds.items()):
            source = f"127.0.{1 + (i * 3 + j) // 250 % 250}.{2 + (i * 3 + j) % 250}" if loopback else None
            elapsed, code = await login_ms(args.host, args.mqtt_port, name, secret, source)
            times[kind].append(elapsed)
            codes[kind].add(code)
    for kind, values in times.items():
        print(f"{kind:28s} median {statistics.median(values):6.1f} ms  p10 {sorted(values)[len(values) // 10]:6.1f}"
              f"  max {max(values):6.1f}  CONNACK {sorted(codes[kind])}  (n={args.n})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=30, help="logins of each kind (default 30)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--mqtt-port", type=int, default=1883)
    parser.add_argument("--admin-url", default="http://127.0.0.1:8081")
    parser.add_argument("--admin-token")
    try:
        asyncio.run(main(parser.parse_args()))
    except SetupError as exc:
        sys.exit(f"mqtt_password_timing: {exc}")
