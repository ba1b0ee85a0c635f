"""One WARNING per outage, and telemetry documents that cannot break the parser."""

from __future__ import annotations

import logging

import pytest
from provisioning_common.outage import OutageLog
from provisioning_common.transport_api import is_json_document


def test_an_outage_is_logged_once_with_its_count_when_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    outage = OutageLog(logging.getLogger("test.outage"), "Postgres")
    with caplog.at_level(logging.INFO, logger="test.outage"):
        for _ in range(500):
            outage.failed("ConnectionRefusedError")
        assert outage.down
        outage.recovered()
        outage.recovered()  # nothing more to say
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("Postgres unavailable: ConnectionRefusedError")
    assert "Postgres available again" in lines[1] and "500 failures" in lines[1]
    assert not outage.down


@pytest.mark.parametrize(
    ("payload", "ok"),
    [
        (b'{"t": 1}', True),
        (b"[1, 2]", True),
        (b"1", False),
        (b'"s"', False),
        (b"\xff\xfe", False),
        (b"[" * 100_000 + b"]" * 100_000, False),  # RecursionError in the parser: refused, not raised
    ],
)
def test_telemetry_must_be_a_json_object_or_array(payload: bytes, ok: bool) -> None:
    assert is_json_document(payload) is ok
