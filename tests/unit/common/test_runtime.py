"""The ready line is logged whatever LOG_LEVEL says: devstack and operators wait for it."""

from __future__ import annotations

import logging

import pytest

from provisioning_common import runtime
from provisioning_common.settings import Settings


def test_ready_line_survives_a_quiet_log_level(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    lifecycle = logging.getLogger(runtime.LIFECYCLE_LOGGER)
    saved_lifecycle = list(lifecycle.handlers)
    try:
        root.handlers.clear()
        lifecycle.handlers.clear()
        runtime.setup_logging(Settings(log_level="WARNING"), "unit_service")
        logging.getLogger("some.module").info("ordinary info line")
        runtime.announce_ready("unit_service", "on queue q")
        err = capsys.readouterr().err
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        lifecycle.handlers[:] = saved_lifecycle
    assert "unit_service ready on queue q" in err
    assert "ordinary info line" not in err
