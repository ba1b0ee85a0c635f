-- Creating a device is one statement: the request claim, the device, its credentials and the
-- replayable answer are written together or not at all, in a single round trip.
-- Conflicts raise P0001 with MESSAGE 'conflict:<what>' so the statement (and its claim) rolls back.
CREATE FUNCTION create_device_with_credentials(
    p_request_id      text,
    p_answer_enc      bytea,
    p_device_id       uuid,
    p_name            text,
    p_profile_id      uuid,
    p_device_key      text,
    p_gateway         boolean,
    p_provision_state text,
    p_ctype           text,
    p_credentials_id  text,
    p_secret_hash     text,
    p_public_value    jsonb,
    p_value_enc       bytea
) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    IF p_request_id IS NOT NULL THEN
        INSERT INTO provision_requests (request_id, device_id, answer_enc)
        VALUES (p_request_id, p_device_id, p_answer_enc)
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            RETURN 'duplicate_request';
        END IF;
    END IF;
    INSERT INTO devices (id, name, profile_id, device_key, gateway, provision_state)
    VALUES (p_device_id, p_name, p_profile_id, p_device_key, p_gateway, p_provision_state)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        IF EXISTS (SELECT 1 FROM devices WHERE name = p_name) THEN
            RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'conflict:name';
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'conflict:device_key';
    END IF;
    INSERT INTO device_credentials (device_id, credentials_type, credentials_id, secret_hash, public_value, value_enc)
    VALUES (p_device_id, p_ctype, p_credentials_id, p_secret_hash, p_public_value, p_value_enc)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'conflict:credentials';
    END IF;
    RETURN 'created';
END;
$$;
