-- The pre-provisioning hook (issue 19): a profile may name an HTTPS endpoint of the operator's that is asked
-- about each request that passed the key/secret check (services/provisioning_core/hook.py). Its secret
-- (the HMAC key of the signature) is encrypted with DATA_ENCRYPTION_KEY, like the provision secret.
ALTER TABLE device_profiles
    ADD COLUMN hook_url        text,
    ADD COLUMN hook_secret_enc bytea,
    ADD COLUMN hook_timeout_ms integer NOT NULL DEFAULT 2000 CHECK (hook_timeout_ms BETWEEN 100 AND 10000),
    ADD COLUMN hook_fail_open  boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT hook_has_secret CHECK (hook_url IS NULL OR hook_secret_enc IS NOT NULL);

-- The first decision of the hook for a request, replayed for its repeats and redeliveries (keyed like the
-- replayable answers: provision_requests.request_id), so a request is never decided twice differently.
CREATE TABLE hook_decisions (
    request_id  text PRIMARY KEY,
    allow       boolean NOT NULL,
    reason      text,
    device_name text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX hook_decisions_created_idx ON hook_decisions (created_at);
