"""Concurrent callers' work done together: the one batching pattern of the services (issue 18).

A caller :meth:`Batcher.submit`\\ s one item and awaits its own result. When nothing is in flight the item
goes out at once, alone, so batching adds no latency at low load; while a batch is in flight, the items
that arrive wait and go together in the next one (at most ``max_batch``). Under load the batch size thus
follows the load by itself, with one round trip (and one commit) per batch instead of per item.

``run`` answers a whole batch: per item, in order, its result or the exception that item's caller gets
(one item's conflict never fails its neighbours). When ``run`` itself raises (the database went away), every
caller of that batch gets that exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from . import metrics

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["Batcher"]


class Batcher(Generic[T, R]):
    def __init__(
        self, run: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]], *, max_batch: int, name: str
    ) -> None:
        self._run = run
        self._max_batch = max_batch
        self._sizes = metrics.series(metrics.BATCH_SIZE, name)
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """``item``'s result, raised when it is an exception. With ``max_batch`` 1 nothing is batched: each item
        runs at once, concurrently with the others (one round trip each)."""
        if self._max_batch == 1:
            self._sizes.observe(1)
            [result] = await self._run([item])
            if isinstance(result, BaseException):
                raise result
            return result
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch:]
                self._sizes.observe(len(batch))
                try:
                    results = await self._run([item for item, _ in batch])
                except Exception as exc:  # every waiter gets the failure (the core's DatabaseGuard answers it)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():  # its caller was cancelled
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._flushing = None
