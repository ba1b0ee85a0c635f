-- Claiming a request id was written twice (inside create_device_with_credentials, and as two
-- statements for the pre-provisioned claim); both now call this one function.
-- A claim older than p_replay_window is forgotten first (content keys expire with the replay
-- window; NULL: never). Returns false when another attempt already holds the id.
CREATE FUNCTION claim_provision_request(
    p_request_id    text,
    p_kind          text,
    p_device_id     uuid,
    p_answer_enc    bytea,
    p_replay_window interval
) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF p_replay_window IS NOT NULL THEN
        DELETE FROM provision_requests
        WHERE request_id = p_request_id AND created_at < clock_timestamp() - p_replay_window;
    END IF;
    INSERT INTO provision_requests (request_id, device_id, answer_enc, kind)
    VALUES (p_request_id, p_device_id, p_answer_enc, p_kind)
    ON CONFLICT DO NOTHING;
    RETURN FOUND;
END;
$$;

CREATE OR REPLACE FUNCTION create_device_with_credentials(
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
    p_value_enc       bytea,
    p_deadline        timestamptz,
    p_replay_window   interval
) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    IF p_deadline IS NOT NULL AND clock_timestamp() > p_deadline THEN
        RETURN 'expired';
    END IF;
    IF p_request_id IS NOT NULL
       AND NOT claim_provision_request(p_request_id, 'created', p_device_id, p_answer_enc, p_replay_window) THEN
        RETURN 'duplicate_request';
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
    IF p_deadline IS NOT NULL AND clock_timestamp() > p_deadline THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'expired';
    END IF;
    RETURN 'created';
END;
$$;
