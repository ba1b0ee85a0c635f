"""Wrong secrets are rate-limited per source address and provision key (our deviation from ThingsBoard); the
source's right secret is then refused too, so a guesser cannot tell. tests/e2e/test_abuse_limits.py: other sources."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Infra

from .conftest import Admin, Env, module_env, tb_request

LIMIT = 3


@pytest.fixture(scope="module")
def env(infra: Infra, tls_files: tuple[Path, Path, Path]) -> Iterator[Env]:
    """This module's stack allows only LIMIT failures per minute."""
    with module_env(infra, tls_files, PROVISION_FAILURES_PER_MINUTE=str(LIMIT)) as environment:
        yield environment


def test_wrong_secrets_lock_the_source_out_of_the_key_then_its_right_secret_is_refused_too(
    http: httpx.Client, admin: Admin
) -> None:
    profile = admin.create_profile()
    for _ in range(LIMIT):
        wrong = http.post("/api/v1/provision", json=tb_request(profile, provisionDeviceSecret="guess"))
        assert wrong.json()["status"] == "NOT_FOUND"
    locked = http.post("/api/v1/provision", json=tb_request(profile, deviceName="legit"))
    assert locked.status_code == 429 and int(locked.headers["retry-after"]) >= 1
    assert locked.json() == {"errorMsg": "Too many failed provisioning attempts; retry later", "status": "FAILURE"}
    # Nothing was created for the refused request.
    assert admin.http.get("/api/devices", params={"deviceProfileId": profile["id"]}).json()["totalElements"] == 0
