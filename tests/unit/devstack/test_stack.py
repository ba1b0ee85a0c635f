"""devstack's child processes: what ``make up`` keeps of their output."""

from __future__ import annotations

import io
import subprocess
from typing import cast

from devstack.stack import ECHOED_LINES_KEPT, ServiceProcess


class _Finished:
    def __init__(self, text: str) -> None:
        self.stdout = io.StringIO(text)


def _pump(process: ServiceProcess, count: int) -> None:
    process.proc = cast("subprocess.Popen[str]", _Finished("".join(f"line {i}\n" for i in range(count))))
    process._pump()


def test_an_echoed_process_keeps_only_its_last_lines() -> None:
    count = 5 * ECHOED_LINES_KEPT + 7
    process = ServiceProcess("http_gateway", {}, echo=True)
    _pump(process, count)
    assert ECHOED_LINES_KEPT <= len(process.lines) < 2 * ECHOED_LINES_KEPT
    assert process.lines[-1] == f"line {count - 1}"
    assert process.lines == [f"line {i}" for i in range(count - len(process.lines), count)]


def test_a_process_that_is_not_echoed_keeps_every_line() -> None:
    count = 3 * ECHOED_LINES_KEPT
    process = ServiceProcess("http_gateway", {})
    _pump(process, count)
    assert process.lines == [f"line {i}" for i in range(count)]
