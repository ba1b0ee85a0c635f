"""Fixtures of the common library's unit tests."""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Iterator

import pytest

#: ``fake_rlimit(soft, hard)`` makes RLIMIT_NOFILE read (soft, hard); returns the list of setrlimit calls.
FakeRlimit = Callable[[int, int], list[tuple[int, int]]]


@pytest.fixture
def fake_rlimit(monkeypatch: pytest.MonkeyPatch) -> FakeRlimit:
    """A descriptor limit chosen by the test, so that raising and fitting can be tested without privileges."""

    def fake(soft: int, hard: int) -> list[tuple[int, int]]:
        calls: list[tuple[int, int]] = []
        current = [soft, hard]

        def setrlimit(which: int, limits: tuple[int, int]) -> None:
            calls.append(limits)
            current[0] = limits[0]

        monkeypatch.setattr(resource, "getrlimit", lambda which: tuple(current))
        monkeypatch.setattr(resource, "setrlimit", setrlimit)
        return calls

    return fake


@pytest.fixture
def out_of_descriptors() -> Iterator[list[int]]:
    """This process without a free descriptor: RLIMIT_NOFILE lowered to just above what is open, the rest
    opened. Yields the descriptors it opened (close one to free one); closes them and restores the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    opened: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
        while True:
            try:
                opened.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        yield opened
    finally:
        for fd in opened:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
