"""What a string on the wire may hold: the one table of field limits, and a counter of malformed requests.

Every provision request, whatever its dialect, is checked against :data:`FIELD_LIMITS` once, by
:func:`check_request` in ``parse_provision_request``, before anything reaches the bus: Postgres cannot
store NUL in ``text`` and its btree indexes refuse rows over ~2.7 kB, so a string that breaks either
would otherwise fail deep in the core (a 503 and a traceback) instead of being a clear 400 here.
The admin API checks the same fields against the same table.

ThingsBoard's numbers (``thingsboard/thingsboard`` at the spec's snapshot):

* device name: ``@Length`` (default max 255) on ``Device.name``, column ``varchar(255)``;
  ``DataValidator.validateString`` refuses 0x00 after ``trim()``; other control characters pass.
* access token, MQTT client id / user name / password: ``DeviceCredentialsDataValidator`` refuses
  ``[\\x00-\\x1F\\x7F]`` (``StringUtils.CONTROL_CHARS``). No server-side length limit
  (``credentials_id varchar`` with a UNIQUE index: Postgres's btree limit is the real one); the UI allows
  tokens of 1-32 characters. ThingsBoard's own MQTT client uses 256 for MQTT 5 client ids.
* provision key: ``varchar`` UNIQUE, no length or character rule (``@NoXss`` only).
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..models import ProvisionRequest, ProvisionResult
from ..rate_limit import WindowCounter
from ._json import DialectError

#: The core's answer to a source over its wrong-secret limit (provisioning_core.rate_limit).
MSG_TOO_MANY_FAILURES = "Too many failed provisioning attempts; retry later"


class Controls(enum.Enum):
    """Which control characters a field refuses."""

    #: Only NUL (Postgres cannot store it): ThingsBoard's rule for device names.
    NUL = re.compile("\x00")
    #: C0 controls and DEL, ``[\\x00-\\x1F\\x7F]``: ThingsBoard's rule for credentials.
    ALL = re.compile("[\x00-\x1f\x7f]")
    #: C0 controls and DEL except TAB, LF and CR, which PEM text may contain.
    PEM = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class FieldLimit:
    """Longest value (in characters, i.e. code points) and the control characters refused."""

    max_chars: int
    controls: Controls
    #: Measure and check the value as the core stores it: Java's ``trim()`` first (device names).
    trimmed: bool = False


#: Every string field of :class:`ProvisionRequest` (credentials by their SuppliedCredentials name).
#: 255 characters is at most 1,020 bytes of UTF-8, well inside a btree index row.
FIELD_LIMITS: Mapping[str, FieldLimit] = {
    # The admin API never stores a key or secret longer than 255 or with control characters, so
    # such a request can never match: say so (400) instead of NOT_FOUND.
    "provision_key": FieldLimit(255, Controls.ALL),
    "provision_secret": FieldLimit(255, Controls.ALL),
    # ThingsBoard: <= 255 after trim(), no NUL; tabs and other controls inside a name are accepted.
    "device_name": FieldLimit(255, Controls.NUL, trimmed=True),
    # Innoway's device key (IMEI, serial): an identifier, UNIQUE per profile like the admin API's deviceKey.
    "device_key": FieldLimit(255, Controls.ALL),
    # ThingsBoard refuses control characters in credentials; 255 is generous next to its UI's 32-character
    # tokens and MQTT 5's 256-byte client ids, and keeps a user name (a credentials id) indexable.
    "token": FieldLimit(255, Controls.ALL),
    "client_id": FieldLimit(255, Controls.ALL),
    "username": FieldLimit(255, Controls.ALL),
    "password": FieldLimit(255, Controls.ALL),
    # PEM (or bare base64) certificate and CSR: newlines allowed; 16 KiB holds any real one.
    "certificate": FieldLimit(16384, Controls.PEM),
    "csr": FieldLimit(16384, Controls.PEM),
}

_JAVA_TRIM = "".join(chr(c) for c in range(0x21))


def field_problem(field: str, value: str) -> str | None:
    """Why ``value`` breaks the limit of ``field`` (a :data:`FIELD_LIMITS` key), or None.

    The reason never contains the value (it may be a secret).
    """
    limit = FIELD_LIMITS[field]
    if limit.trimmed:
        value = value.strip(_JAVA_TRIM)
    if len(value) > limit.max_chars:
        return f"is longer than {limit.max_chars} characters"
    if limit.controls.value.search(value):
        return "contains a NUL character" if limit.controls is Controls.NUL else "contains control characters"
    return None


def check_request(request: ProvisionRequest, wire_names: Mapping[str, str]) -> None:
    """Raise :class:`DialectError` naming the first field (by its name in ``wire_names``) out of limits.

    ``wire_names`` maps a :data:`FIELD_LIMITS` key to the caller's spelling; fields a dialect cannot
    carry are absent from it and empty in the request.
    """
    creds = request.credentials
    values = {
        "provision_key": request.provision_key,
        "provision_secret": request.provision_secret,
        "device_name": request.device_name,
        "device_key": request.device_key,
        "token": creds.token,
        "client_id": creds.client_id,
        "username": creds.username,
        "password": creds.password,
        "certificate": creds.certificate,
        "csr": creds.csr,
    }
    for field, value in values.items():
        if value:
            problem = field_problem(field, value)
            if problem:
                raise DialectError(f"Field {wire_names.get(field, field)} {problem}")


class MalformedRequestLimiter:
    """Malformed provision requests per source address, in fixed one-minute windows.

    Malformed requests never reach the core, so its rate limits (wrong secrets) cannot see them;
    this counts them in each gateway process with the same PROVISION_FAILURES_PER_MINUTE, so a source
    that keeps sending garbage is answered like one that keeps guessing secrets. At most
    ``max_sources`` addresses are tracked per window (memory stays bounded under spoofed floods).
    """

    def __init__(
        self, per_minute: int, *, clock: Callable[[], float] = time.monotonic, max_sources: int = 100_000
    ) -> None:
        self._counter = WindowCounter(per_minute, clock=clock, max_names=max_sources)

    def blocked(self, source: str) -> bool:
        """Whether ``source`` has used up this minute's malformed requests (an unknown source never is)."""
        return self._counter.exhausted(source)

    def record(self, source: str) -> None:
        """Count one malformed request from ``source``."""
        self._counter.record(source)

    @staticmethod
    def too_many() -> ProvisionResult:
        """The answer a blocked source gets: the core's own FAILURE for too many failed attempts."""
        return ProvisionResult.failure(MSG_TOO_MANY_FAILURES)
