"""Access tokens minted by the credentials service ahead of need, in batches.

Most devices let the server generate their token; asking the credentials service once per
device would cost two bus messages per provision. The core instead keeps a small buffer per
token length, refilled by one ``mint_tokens`` call per batch. Tokens exist only in this
process's memory until handed out, and a token is never handed out twice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars

from provisioning_common.bus import Bus
from provisioning_common.contract import MINT_TOKENS
from provisioning_common.models import MintTokensRequest, PreparedCredentials


class TokenPool:
    def __init__(self, bus: Bus, batch_size: int = 256) -> None:
        self._bus = bus
        self._batch = batch_size
        self._tokens: dict[int, collections.deque[PreparedCredentials]] = collections.defaultdict(collections.deque)
        self._locks: dict[int, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._background: set[asyncio.Task[None]] = set()

    async def take(self, length: int) -> PreparedCredentials:
        """A fresh token of ``length`` characters; raises ``RpcError`` if credentials is unreachable."""
        tokens = self._tokens[length]
        while not tokens:
            await self._refill(length)
        token = tokens.popleft()
        if len(tokens) < self._batch // 4 and not self._locks[length].locked():
            # A fresh context: the refill must not inherit (and die with) this request's deadline.
            task = asyncio.create_task(self._refill_quietly(length), context=contextvars.Context())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return token

    async def _refill(self, length: int) -> None:
        async with self._locks[length]:
            if len(self._tokens[length]) >= self._batch // 4:
                return  # someone else refilled while we waited
            result = await self._bus.call(MINT_TOKENS, MintTokensRequest(count=self._batch, token_length=length))
            self._tokens[length].extend(result.tokens)

    async def _refill_quietly(self, length: int) -> None:
        with contextlib.suppress(Exception):  # the next take() retries and reports
            await self._refill(length)
