-- Secrets at rest (issue 13): a profile's provision secret is kept encrypted with DATA_ENCRYPTION_KEY
-- (Fernet), never in clear. SQL cannot encrypt with the application's key, so the clear column stays
-- for one step: provisioning-core and the admin API seal it at start-up (repository.seal_profile_secrets:
-- each clear secret is encrypted into provision_secret_enc and the clear value set to NULL, in one
-- transaction); until then readers fall back to it. The CHECK below keeps new rows from ever holding both.
ALTER TABLE device_profiles
    ADD COLUMN provision_secret_enc bytea,
    -- Whether devices of this profile may choose access tokens below the documented minimum
    -- (credentials.hashing.MIN_DEVICE_TOKEN_LENGTH characters of [A-Za-z0-9._~-]).
    ADD COLUMN allow_weak_tokens    boolean NOT NULL DEFAULT false;
ALTER TABLE device_profiles
    ADD CONSTRAINT device_profiles_one_secret_form CHECK (provision_secret IS NULL OR provision_secret_enc IS NULL);
