"""stderr for log records, written in batches: one ``write`` per turn of the event loop instead of one per line.

A gateway logs one line per provision answer (README "Metrics and logs"). Written line by line, each line
is a ``write`` system call that also wakes whatever reads the pipe (a container runtime, devstack): at
hundreds of provisions per second that costs more than formatting the line. Here a record logged on an
event loop's thread is kept until the callbacks that are ready on that loop have run (``call_soon``), and
the lines of that turn leave together, before the loop waits for I/O again: no line waits for a timer, none
is left behind when the process stops, and a record logged where no loop runs (start-up, another thread)
is written at once. A WARNING or worse, and every lifecycle line, is written at once anyway.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from typing import TextIO


class BatchedStderr:
    """A text stream over ``sys.stderr`` (looked up when written: pytest's capture replaces it) that keeps what
    an event loop's callbacks write until the end of that loop's turn. Thread-safe; text is written in order."""

    def __init__(self, target: TextIO | None = None) -> None:
        #: Where batches go; None: ``sys.stderr`` as it is when written.
        self._target = target
        self._parts: list[str] = []
        self._lock = threading.Lock()
        #: The loop a flush is scheduled on, if any.
        self._scheduled: asyncio.AbstractEventLoop | None = None

    def write(self, text: str) -> int:
        loop = asyncio.events._get_running_loop()
        with self._lock:
            self._parts.append(text)
            if loop is None:
                self._write_out()
                return len(text)
            if self._scheduled is loop:
                return len(text)
            self._scheduled = loop
        loop.call_soon(self.flush)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            self._scheduled = None
            self._write_out()

    def _write_out(self) -> None:
        if not self._parts:
            return
        text = "".join(self._parts)
        self._parts.clear()
        stream = self._target or sys.stderr
        if stream is not None:
            stream.write(text)
            stream.flush()


class BatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that flushes only records at ``immediate_level`` or above (and on :meth:`flush`):
    over a :class:`BatchedStderr`, the others leave in the next batch."""

    def __init__(self, stream: BatchedStderr, immediate_level: int = logging.WARNING) -> None:
        super().__init__(stream)
        self.immediate_level = immediate_level

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
            if record.levelno >= self.immediate_level:
                self.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's own contract: report through handleError, never raise
            self.handleError(record)


_STDERR: BatchedStderr | None = None


def batched_stderr() -> BatchedStderr:
    """This process's one batched stderr (every handler writing there shares it, so lines keep their order)."""
    global _STDERR
    if _STDERR is None:
        _STDERR = BatchedStderr()
    return _STDERR
