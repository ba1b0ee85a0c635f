"""Device profiles by provision key, cached for a short time.

Thousands of devices of one profile provision within seconds of each other; reading the same
profile row for each costs a round trip. An admin change (new secret, strategy, deletion) is
seen by every core instance within ``ttl_s``. Unknown keys are cached too, which also blunts
brute-force probing of keys.

Provision secrets are stored encrypted (migration 0008): a row is decrypted once when it enters the
cache, so the hot path compares against the clear secret held in memory (rules.secret_matches,
constant time) and pays no decryption per request.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import asyncpg
from provisioning_common.db import repository
from provisioning_common.secretbox import InvalidToken, SecretBox

log = logging.getLogger(__name__)


class ProfileCache:
    def __init__(self, pool: asyncpg.Pool, ttl_s: float, *, box: SecretBox | None = None,
                 max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._pool = pool
        self._ttl = ttl_s
        self._box = box
        self._max = max_entries
        self._clock = clock
        self._entries: dict[str, tuple[float, repository.ProfileRow | None]] = {}

    async def get(self, key: str) -> repository.ProfileRow | None:
        now = self._clock()
        hit = self._entries.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        profile = await repository.profile_by_key(self._pool, key)
        if profile is not None:
            profile = self.open_secret(profile)
        if self._ttl > 0:
            if len(self._entries) >= self._max:
                self._entries.clear()
            self._entries[key] = (now + self._ttl, profile)
        return profile

    def open_secret(self, profile: repository.ProfileRow) -> repository.ProfileRow:
        """``profile`` with its provision secret decrypted into ``provision_secret``; a secret that cannot be
        decrypted (DATA_ENCRYPTION_KEY not the admin API's) leaves none, so every request is NOT_FOUND."""
        if profile.provision_secret_enc is None:
            return profile  # no secret, or a row from before migration 0008 not sealed yet (clear)
        secret: str | None = None
        if self._box is not None:
            try:
                secret = str(self._box.decrypt_json(profile.provision_secret_enc))
            except (InvalidToken, ValueError):
                log.error("cannot decrypt the provision secret of profile %s; is DATA_ENCRYPTION_KEY shared"
                          " with the admin API?", profile.id)
        return dataclasses.replace(profile, provision_secret=secret)
