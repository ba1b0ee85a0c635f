"""stderr in batches (provisioning_common.logs): the lines of one event-loop turn leave in one write, in order,
before the loop waits again; a WARNING, a lifecycle line and anything logged outside a loop leave at once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
from provisioning_common import runtime
from provisioning_common.logs import BatchedStderr, BatchedStreamHandler
from provisioning_common.settings import Settings


class Recorder:
    """Stands in for sys.stderr: each write kept apart."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    @property
    def lines(self) -> list[str]:
        return "".join(self.writes).splitlines()


@pytest.fixture
def stderr() -> Iterator[tuple[Recorder, logging.Logger, logging.Logger]]:
    """A logger and a lifecycle-like logger writing through one BatchedStderr into a Recorder."""
    recorder = Recorder()
    stream = BatchedStderr(recorder)  # type: ignore[arg-type]
    plain, lifecycle = logging.getLogger("unit.batched"), logging.getLogger("unit.batched.lifecycle")
    plain.propagate = lifecycle.propagate = False
    plain.setLevel(logging.INFO)
    lifecycle.setLevel(logging.INFO)
    plain.addHandler(BatchedStreamHandler(stream))
    lifecycle.addHandler(BatchedStreamHandler(stream, immediate_level=logging.DEBUG))
    yield recorder, plain, lifecycle
    for logger in (plain, lifecycle):
        logger.handlers.clear()
        logger.propagate = True


async def test_the_lines_of_one_loop_turn_leave_together_before_the_loop_waits(
    stderr: tuple[Recorder, logging.Logger, logging.Logger],
) -> None:
    recorder, log, _ = stderr
    for i in range(5):
        log.info("line %d", i)
    assert recorder.writes == []  # still this turn: nothing written yet
    await asyncio.sleep(0)  # the loop turns once: the batch leaves
    assert len(recorder.writes) == 1 and recorder.lines == [f"line {i}" for i in range(5)]
    log.info("next turn")
    await asyncio.sleep(0)
    assert recorder.writes[1:] == ["next turn\n"]


async def test_a_warning_or_a_lifecycle_line_leaves_at_once_after_what_came_before(
    stderr: tuple[Recorder, logging.Logger, logging.Logger],
) -> None:
    recorder, log, lifecycle = stderr
    log.info("first")
    log.warning("trouble")
    assert recorder.lines == ["first", "trouble"]
    log.info("second")
    lifecycle.info("service ready")
    assert recorder.lines == ["first", "trouble", "second", "service ready"]
    await asyncio.sleep(0)  # the flush scheduled for "second" finds nothing left
    assert recorder.lines == ["first", "trouble", "second", "service ready"]


def test_outside_an_event_loop_every_line_leaves_at_once(
    stderr: tuple[Recorder, logging.Logger, logging.Logger],
) -> None:
    recorder, log, _ = stderr
    log.info("start-up line")
    assert recorder.writes == ["start-up line\n"]


async def test_handler_flush_writes_what_waits(stderr: tuple[Recorder, logging.Logger, logging.Logger]) -> None:
    """What logging.shutdown() does at exit: nothing waiting is lost."""
    recorder, log, _ = stderr
    log.info("last words")
    for handler in log.handlers:
        handler.flush()
    assert recorder.lines == ["last words"]


def test_setup_logging_batches_stderr() -> None:
    root, lifecycle = logging.getLogger(), logging.getLogger(runtime.LIFECYCLE_LOGGER)
    saved = (root.level, list(root.handlers), list(lifecycle.handlers))
    try:
        root.handlers.clear()
        lifecycle.handlers.clear()
        runtime.setup_logging(Settings(log_level="INFO"), "unit_service")
        assert [type(h) for h in root.handlers] == [BatchedStreamHandler]
        assert [type(h) for h in lifecycle.handlers] == [BatchedStreamHandler]
        assert root.handlers[0].stream is lifecycle.handlers[0].stream  # one stream: lines keep their order
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        lifecycle.handlers[:] = saved[2]
        for name in ("aiormq", "aio_pika"):
            logging.getLogger(name).setLevel(logging.NOTSET)
