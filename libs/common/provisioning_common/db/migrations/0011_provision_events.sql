-- Provisioning events (README "Provisioning events"; provisioning_common.events): one row per decision,
-- written by provisioning-core in batches (COPY) and purged after PROVISION_EVENTS_RETENTION_DAYS.
-- No foreign keys: an event outlives the profile and the device it names. Never a secret in here.
CREATE TABLE provision_events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time timestamptz NOT NULL,
    outcome text NOT NULL,
    reason text NOT NULL,
    transport text NOT NULL,
    dialect text,
    source_address text NOT NULL DEFAULT '',
    profile_id uuid,
    device_id uuid,
    device_name text,
    request_id text NOT NULL DEFAULT '',
    latency_ms double precision NOT NULL DEFAULT 0
);

-- Newest first (the admin API's order and the retention purge), and the two look-ups an operator makes
-- most: a profile's events, a device's events.
CREATE INDEX provision_events_time ON provision_events (time DESC, id DESC);
CREATE INDEX provision_events_profile ON provision_events (profile_id, time DESC) WHERE profile_id IS NOT NULL;
CREATE INDEX provision_events_device_name ON provision_events (device_name, time DESC) WHERE device_name IS NOT NULL;
