-- Device profiles, devices, their credentials and replayable provision answers.
CREATE TABLE device_profiles (
    id                 uuid PRIMARY KEY,
    name               text NOT NULL UNIQUE,
    provision_strategy text NOT NULL
        CHECK (provision_strategy IN ('ALLOW_CREATE_NEW_DEVICES', 'CHECK_PRE_PROVISIONED_DEVICES', 'DISABLED')),
    provision_key      text UNIQUE,
    provision_secret   text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE devices (
    id              uuid PRIMARY KEY,
    name            text NOT NULL UNIQUE,
    profile_id      uuid NOT NULL REFERENCES device_profiles (id) ON DELETE RESTRICT,
    -- Innoway's device "key" (IMEI, serial...): unique inside its profile; the device id when not given.
    device_key      text NOT NULL,
    gateway         boolean NOT NULL DEFAULT false,
    -- 'provisioned' once a device has provisioned itself; NULL before.
    provision_state text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (profile_id, device_key)
);
CREATE INDEX devices_profile_name_idx ON devices (profile_id, name);

CREATE TABLE device_credentials (
    device_id        uuid PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
    credentials_type text NOT NULL,
    -- Lookup key: SHA-256 of a token, SHA3-256 of a certificate, the MQTT_BASIC id (spec §5).
    credentials_id   text NOT NULL UNIQUE,
    -- Password hash (MQTT_BASIC) and the stored MQTT_BASIC parts without the password.
    secret_hash      text,
    public_value     jsonb,
    -- Encrypted value a pre-provisioned device will be handed; cleared once it is handed out.
    value_enc        bytea,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE provision_requests (
    request_id text PRIMARY KEY,
    device_id  uuid,
    -- Encrypted answer, replayed when the broker redelivers the same request.
    answer_enc bytea,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX provision_requests_created_idx ON provision_requests (created_at);
