"""MQTT topic names and topic-level rules shared by the services that speak MQTT or judge who may.

Two families:

* ThingsBoard's device API, served by our MQTT gateway (spec §3.2): ``/provision/request`` (leading
  slash), ``/provision/response`` and ``v1/devices/me/telemetry``.
* Bridge mode, on the operator's broker: ``provision/request/<client id>`` (the broker's ACL lets a
  client write only its own), answered on ``provision/response/<client id>`` and nowhere else (an MQTT 5
  Response Topic naming another client is refused; the bare ``provision/request`` names no client and is
  ignored). The bridge (``mqtt_bridge``) routes by them and ``broker_auth`` holds provisioning clients to
  them, so both take them from here.
"""

from __future__ import annotations

# --- ThingsBoard's topics (our MQTT gateway) ---------------------------------------------------------

#: Where a provisioning session publishes its request.
GATEWAY_REQUEST_TOPIC = "/provision/request"
#: Where a provisioning session gets its answer.
GATEWAY_RESPONSE_TOPIC = "/provision/response"
#: The one topic an authenticated device may publish to (JSON object or array).
TELEMETRY_TOPIC = "v1/devices/me/telemetry"

# --- bridge mode (the operator's broker) -------------------------------------------------------------

#: The prefix of ``provision/request/<client id>`` (alone it names no client: ignored).
REQUEST_TOPIC = "provision/request"
#: Answers go to this prefix followed by one topic level (the client id).
RESPONSE_PREFIX = "provision/response/"
#: What the bridge subscribes to (the shared-subscription prefix is added in front).
REQUEST_FILTER = "provision/request/#"

#: Characters never allowed in a topic level that names a client: separators, wildcards, NUL.
_FORBIDDEN = frozenset("/+#\x00")


def is_single_level(value: str) -> bool:
    """A non-empty topic level without separators or wildcards (what ``%c`` in an ACL may safely become)."""
    return bool(value) and not _FORBIDDEN.intersection(value)
