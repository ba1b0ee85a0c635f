-- Credential revocation and rotation (issue 19, admin API /api/devices/{id}/credentials/revoke|rotate).
-- A device's revoked or replaced credentials are kept here by their lookup key (device_credentials.
-- credentials_id: a token's SHA-256, a certificate's SHA3-256, the MQTT_BASIC id), never by their value,
-- so that no device, the same or another, can be given them again: a leaked token stays dead. The device
-- id is informative (no foreign key: the row outlives the device).
CREATE TABLE revoked_credentials (
    credentials_id   text PRIMARY KEY,
    credentials_type text NOT NULL,
    device_id        uuid NOT NULL,
    revoked_at       timestamptz NOT NULL DEFAULT now()
);

-- Every path that writes credentials (provisioning, claims, the admin API, bulk import, X.509 rotation)
-- meets the same refusal as a key another device holds: a unique violation on device_credentials'
-- credentials_id, which each path already answers as "credentials already in use".
CREATE FUNCTION refuse_revoked_credentials() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM revoked_credentials WHERE credentials_id = NEW.credentials_id) THEN
        RAISE EXCEPTION USING ERRCODE = 'unique_violation', CONSTRAINT = 'device_credentials_credentials_id_key',
            MESSAGE = 'these credentials were revoked';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER device_credentials_not_revoked
    BEFORE INSERT OR UPDATE OF credentials_id ON device_credentials
    FOR EACH ROW EXECUTE FUNCTION refuse_revoked_credentials();
