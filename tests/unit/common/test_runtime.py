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


def test_library_records_keep_bodies_and_tracebacks_out_of_the_log(capsys: pytest.CaptureFixture[str]) -> None:
    """aiormq logs returned messages (bodies with tokens) at error level; asyncpg logs each failed
    pool reconnect with a traceback. Neither reaches the log as such."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))

    class Returned:
        body = b'{"credentials_value":"SECRET-TOKEN-123"}'
        header = None

    try:
        root.handlers.clear()
        runtime.setup_logging(Settings(log_level="INFO"), "unit_service")
        logging.getLogger("aiormq.channel").error("Unhandled message %r returning", Returned())
        logging.getLogger("aiormq.channel").error("plain aiormq error")
        try:
            raise ConnectionRefusedError("refused")
        except ConnectionRefusedError:
            logging.getLogger("asyncpg.pool").warning("Failed to restore the pool connection floor", exc_info=True)
        err = capsys.readouterr().err
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        for name in ("aiormq", "aio_pika"):
            logging.getLogger(name).setLevel(logging.NOTSET)
    assert "SECRET-TOKEN-123" not in err and "returning" not in err
    assert "plain aiormq error" in err  # the library's own errors still pass
    assert "Failed to restore the pool connection floor (ConnectionRefusedError)" in err
    assert "Traceback" not in err
