"""Settings for every service, read once from environment variables.

One class serves all services so that a variable means the same thing everywhere
(a gateway and the core must agree on ``BUS_NAMESPACE`` and ``PROVISION_TIMEOUT_S``).
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    rabbitmq_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/provisioning")

    #: Prefix of every queue and exchange name; lets several stacks (or test runs) share one broker.
    bus_namespace: str = ""
    #: How long a gateway waits for the core; also the TTL of the request message so that
    #: nothing is processed after the caller gave up.
    provision_timeout_s: float = Field(default=10.0, gt=0, le=300)
    #: How much longer than a request's deadline its original caller (a gateway) waits for the answer,
    #: so that the service's own answer ("done" or "too late, nothing written") always arrives first.
    #: Covers reply transit and clock differences between hosts (keep clocks NTP-synced).
    bus_reply_grace_s: float = Field(default=2.0, ge=0.1, le=60)
    #: Pause between attempts to reconnect to RabbitMQ after the connection dropped.
    bus_reconnect_interval_s: float = Field(default=1.0, gt=0, le=60)
    #: A device that repeats the same provision request (same key, secret, name and credentials)
    #: within this window gets the first answer again instead of "name taken": a retry after a
    #: time-out or a lost answer is never stuck. 0 turns this off (README, Guarantees: the trade-off).
    provision_replay_window_s: float = Field(default=600.0, ge=0, le=3600)
    #: Unacknowledged messages a consumer holds at once (per service instance).
    bus_prefetch: int = Field(default=128, ge=1, le=10_000)
    #: Calls of a batched method (contract ``batched=True``: provision, authenticate) made while one of its
    #: messages is being published travel together, at most this many requests in one message; a lone call
    #: goes at once. 1: one message per call.
    bus_call_batch_max: int = Field(default=32, ge=1, le=256)
    #: ``quorum`` (replicated, what a cluster wants) or ``classic`` request queues.
    bus_queue_type: str = Field(default="classic", pattern="^(classic|quorum)$")

    bind_host: str = "0.0.0.0"
    http_port: int = Field(default=8080, ge=0, le=65535)
    admin_port: int = Field(default=8081, ge=0, le=65535)
    #: ``GET /health`` listener of the services without an HTTP port (core, credentials, MQTT/CoAP
    #: gateways, MQTT bridge) for Kubernetes probes and compose health checks; 0 = off. broker_auth
    #: answers ``/health`` on BRIDGE_AUTH_PORT instead and never opens this one.
    health_port: int = Field(default=0, ge=0, le=65535)
    admin_api_token: SecretStr | None = None
    #: Accept ADMIN_API_TOKEN only while no enabled admin operator exists (it then only bootstraps the first
    #: admin account; services/admin_api/auth.py). Off by default: scripts that predate accounts keep working.
    admin_api_token_bootstrap_only: bool = False
    #: Pre-provisioning hooks (profile field provisionHook): http:// URLs allowed too (tests, a hook on the same
    #: host); otherwise only https://. And how many hook calls one core makes at once (more wait).
    provision_hook_allow_http: bool = False
    provision_hook_max_concurrency: int = Field(default=64, ge=1, le=10_000)
    #: provisioning-core writes the devices of concurrent provision requests in batches of at most this many
    #: (one statement and one commit per batch; a lone request goes out alone, at once). 1: no batching (each
    #: device its own statement, concurrently).
    provision_write_batch_max: int = Field(default=64, ge=1, le=64)

    #: MQTT gateway: plain and TLS listeners (0 disables one), server certificate and limits.
    mqtt_port: int = Field(default=1883, ge=0, le=65535)
    mqtts_port: int = Field(default=8883, ge=0, le=65535)
    mqtt_tls_cert_file: str | None = None
    mqtt_tls_key_file: str | None = None
    #: Largest MQTT packet accepted (bytes, header included); larger ones close the connection.
    mqtt_max_packet_bytes: int = Field(default=65536, ge=1024)
    #: Time allowed between TCP accept and CONNECT.
    mqtt_connect_timeout_s: float = Field(default=10.0, gt=0)
    #: A provisioning connection is closed this long after its response (ThingsBoard: 60 s).
    mqtt_provision_close_s: float = Field(default=60.0, ge=0)
    #: A connection with keep-alive 0 is closed after this long without a packet (ThingsBoard's
    #: transport.sessions.inactivity_timeout, 300 s); keep-alive > 0 is enforced at 1.5 x its value.
    mqtt_idle_timeout_s: float = Field(default=300.0, gt=0)
    #: From the first byte of a packet, the rest must arrive within this (half a packet, then silence: closed).
    mqtt_packet_timeout_s: float = Field(default=30.0, gt=0)
    #: Open connections per gateway process, plain and TLS together; beyond it new ones are refused
    #: (CONNACK "server unavailable" / closed at TLS accept). Lowered at start to fit RLIMIT_NOFILE.
    mqtt_max_connections: int = Field(default=10_000, ge=1)

    #: MQTT bridge (bridge mode): the operator's own broker, ``mqtt://user:pass@host:1883`` or ``mqtts://...``
    #: (TLS, verified against MQTT_BROKER_CA_FILE or the system CAs). Unset: the bridge stays idle.
    mqtt_broker_url: SecretStr | None = None
    mqtt_broker_ca_file: str | None = None
    #: Shared-subscription group (``$share/<group>/...``): bridge instances in one group split the requests.
    #: Empty: a plain subscription, for brokers without shared subscriptions (RabbitMQ), one instance only.
    mqtt_bridge_share_group: str = Field(default="provisioning", pattern=r"^[^/+#$]*$")
    #: Bridge instance's MQTT client id prefix; ``-<hostname>`` is appended. It must stay the same across
    #: restarts of an instance (the broker keeps its session, with the requests queued for it, by client id).
    mqtt_bridge_client_id: str = Field(default="provisioning-bridge", min_length=1)
    #: broker_auth: HTTP port of the authentication endpoint EMQX and RabbitMQ call (0 = off).
    bridge_auth_port: int = Field(default=8090, ge=0, le=65535)

    #: CoAP gateway: UDP port of its listener (ThingsBoard's 5683; 0 disables it, never "a random port").
    coap_port: int = Field(default=5683, ge=0, le=65535)
    #: CoAP state per gateway process (README "CoAP", limits), held for anyone before authentication:
    #: requests remembered to recognize retransmissions (RFC 7252's EXCHANGE_LIFETIME, 247 s; when full
    #: the oldest is forgotten, its own oldest first for a source at its cap), and the most requests in
    #: progress at once (beyond: 5.03, or 4.29 for the source, with Max-Age 1).
    coap_max_exchanges: int = Field(default=50_000, ge=1)
    coap_max_exchanges_per_source: int = Field(default=2_000, ge=1)
    #: Block-wise transfers held (reassemblies of Block1 requests and chunked Block2 answers, each);
    #: when full the least recently active is dropped (its next block gets 4.08 and the client restarts).
    coap_max_blockwise_transfers: int = Field(default=1_000, ge=1)
    coap_max_blockwise_transfers_per_source: int = Field(default=100, ge=1)

    #: Fernet key (urlsafe base64, 32 bytes) encrypting what must be readable again later:
    #: credentials of pre-provisioned devices until they are handed out, and replayable answers.
    data_encryption_key: SecretStr | None = None

    #: Largest provision/telemetry body a gateway accepts, in bytes.
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)

    #: HTTP listeners (http_gateway, admin_api, broker_auth; provisioning_common.http_limits), per process.
    #: Largest request head (request line and headers) in bytes; a larger one gets 431 and the
    #: connection is closed (ThingsBoard's Tomcat allows 8 KB).
    http_max_header_bytes: int = Field(default=8192, ge=1024, le=1024 * 1024)
    #: The request head must be complete this long after the connection is accepted (on a kept-alive
    #: connection: after the next request's first byte); else the connection is closed (slowloris).
    http_header_timeout_s: float = Field(default=10.0, gt=0, le=300)
    #: The body must be complete this long after its head, and an answer the client leaves unread may
    #: wait this long; else the connection is closed.
    http_body_timeout_s: float = Field(default=10.0, gt=0, le=300)
    #: A kept-alive connection with no new request is closed this long after its last response.
    http_keep_alive_timeout_s: float = Field(default=15.0, gt=0, le=300)
    #: Open connections per process; one more gets 503 with Retry-After and is closed (one WARNING per
    #: episode). Lowered at start-up, with a WARNING, when it does not fit below the descriptor limit
    #: (RLIMIT_NOFILE, whose soft value is raised to the hard one).
    http_max_connections: int = Field(default=4096, ge=1)

    #: The device API after provisioning (attributes, RPC; README "Device API"), on every gateway.
    #: Messages one device session may send (publishes / requests), in ThingsBoard's notation
    #: ``capacity:seconds[,capacity:seconds...]``; what ``getSessionLimits`` reports. "" = unlimited.
    device_messages_rate_limit: str = Field(default="100:1,3000:60", pattern=r"^(\s*\d+:\d+\s*(,\s*\d+:\d+\s*)*)?$")
    #: Server-side RPCs a session holds unanswered at once, and requests a device may have in flight
    #: (ThingsBoard's maxInflightMessages). An RPC beyond it is not delivered: its caller times out (504).
    device_max_inflight: int = Field(default=100, ge=1, le=10_000)
    #: A device's client-side RPC waits this long for the backend's answer (ThingsBoard: 60 s).
    device_client_rpc_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    #: Server-side RPC: the time a device has to answer when the caller names none (ThingsBoard: 10 s),
    #: and the most a caller may give.
    device_rpc_default_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    device_rpc_max_timeout_s: float = Field(default=300.0, gt=0, le=3600)
    #: The least time a server-side RPC gets, whatever the caller names (ThingsBoard's
    #: server.rest.server_side_rpc.min_timeout, 5 s); DEVICE_RPC_MAX_TIMEOUT_S still caps it.
    device_rpc_min_timeout_s: float = Field(default=5.0, gt=0, le=3600)
    #: HTTP long polls (``attributes/updates``, ``rpc``): the wait when the device names no ``timeout``
    #: (ThingsBoard's transport.http.request_timeout, 60 s) and the longest it may name (300 s).
    http_long_poll_default_s: float = Field(default=60.0, gt=0, le=3600)
    http_long_poll_max_s: float = Field(default=300.0, gt=0, le=3600)

    db_pool_min: int = Field(default=2, ge=1)
    db_pool_max: int = Field(default=16, ge=1)

    #: Rate limits (README "Rate limits"), shared by every core instance through Postgres, as token
    #: buckets. Wrong keys/secrets per source address and provision key, per minute (the gateways also
    #: allow this many malformed requests per source address per minute, per process).
    provision_failures_per_minute: int = Field(default=60, ge=1)
    #: Wrong device credentials (unknown tokens on the HTTP/CoAP device API, MQTT logins naming no device)
    #: per source address per minute, per gateway process (so per transport): beyond, that address is refused
    #: without a look-up until its minute ends (README "Secrets at rest"); 0 turns it off.
    auth_failures_per_minute: int = Field(default=120, ge=0)
    #: Wrong keys/secrets per source address over all keys, per minute.
    provision_source_failures_per_minute: int = Field(default=300, ge=1)
    #: Provisions (right secret) per device profile and per source address, in ThingsBoard's notation
    #: ``capacity:seconds[,capacity:seconds...]``; "" = unlimited. Refusals carry Retry-After.
    provision_rate_limit_per_profile: str = Field(default="6000:60,100000:3600",
                                                  pattern=r"^(\s*\d+:\d+\s*(,\s*\d+:\d+\s*)*)?$")
    provision_rate_limit_per_source: str = Field(default="100:60,1000:3600",
                                                 pattern=r"^(\s*\d+:\d+\s*(,\s*\d+:\d+\s*)*)?$")
    #: HTTP listeners: addresses (IPs or CIDRs, comma-separated; "*" = any) of proxies whose
    #: X-Forwarded-For names the client. Default: nobody, the peer address is the client.
    forwarded_allow_ips: str = ""
    #: MQTT listeners: every connection starts with a PROXY protocol v1/v2 header (from a load
    #: balancer that sends one) whose source address is the client's; a connection without one is closed.
    mqtt_proxy_protocol: bool = False

    #: How long provisioning-core trusts a cached device profile (admin changes apply after this).
    profile_cache_ttl_s: float = Field(default=1.0, ge=0, le=60)

    log_level: str = "INFO"
    #: ``text`` (one readable line per record; ``make up``'s default) or ``json`` (one JSON object per line:
    #: time, level, service, logger, message and the request id; for a log collector).
    log_format: str = Field(default="text", pattern="^(text|json)$")

    #: Bridge mode (issue 14). The MQTT version mqtt_bridge speaks to the operator's broker: "5" (Mosquitto,
    #: EMQX, RabbitMQ 3.13+) or "3.1.1" (RabbitMQ before 3.13, whose MQTT plugin has no MQTT 5).
    mqtt_bridge_protocol: str = Field(default="5", pattern=r"^(5|3\.1\.1)$")
    #: broker_auth answers only requests that carry this secret (``Authorization: Bearer <secret>``, or HTTP
    #: Basic with it as the password, e.g. RabbitMQ's ``http://broker:<secret>@broker-auth:8090/auth/user``);
    #: unset: anyone who can reach BRIDGE_AUTH_PORT may ask (a WARNING at start-up says so).
    broker_auth_secret: SecretStr | None = None

    #: Provisioning events (README "Provisioning events"): one record per decision, stored in Postgres in
    #: batches, published to ``provisioning.events``, served by the admin API. false: none are recorded.
    provision_events_enabled: bool = True
    #: Events older than this many days are deleted by provisioning-core (checked every few minutes).
    provision_events_retention_days: float = Field(default=30.0, gt=0, le=3650)
    #: How often provisioning-core deletes what expired: events past their retention, replayable answers,
    #: full rate-limit buckets.
    provision_events_purge_interval_s: float = Field(default=300.0, ge=1, le=86400)

    #: Operator console (admin API, /console/; README "Web console"): a log-in session ends after this many
    #: seconds without a request, and in any case CONSOLE_SESSION_MAX_S after log-in.
    console_session_idle_s: int = Field(default=1800, ge=60, le=86400)
    console_session_max_s: int = Field(default=43200, ge=60, le=30 * 86400)
    #: Failed console log-ins allowed per source address and per user name per minute, in token buckets shared
    #: by every admin API process through Postgres (rate_limit_buckets); then 429 with Retry-After.
    console_login_failures_per_minute: int = Field(default=10, ge=1)

    def queue(self, name: str) -> str:
        """Name of a bus queue or exchange inside this deployment's namespace."""
        return f"{self.bus_namespace}{name}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
