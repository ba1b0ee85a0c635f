-- Deadlines and retry replay (README, Guarantees).
-- A claim row now says what its request did ('created' a device or 'claimed' a pre-provisioned one)
-- and whether its answer was ever replayed to a retry: work whose answer reached nobody is undone
-- only while no retry has been handed that answer.
ALTER TABLE provision_requests
    ADD COLUMN kind     text,
    ADD COLUMN replayed boolean NOT NULL DEFAULT false;

DROP FUNCTION create_device_with_credentials(text, bytea, uuid, text, uuid, text, boolean, text, text, text, text, jsonb, bytea);

-- As in 0002, plus:
--  * p_deadline: the request's deadline. Past it nothing is written ('expired' before any write;
--    an exception, rolling everything back, when the writes themselves ran past it).
--  * p_replay_window: a claim older than this is forgotten first, so a repeated request is only
--    answered from its first attempt within the window (NULL: claims never expire here).
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
    p_value_enc       bytea,
    p_deadline        timestamptz,
    p_replay_window   interval
) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    IF p_deadline IS NOT NULL AND clock_timestamp() > p_deadline THEN
        RETURN 'expired';
    END IF;
    IF p_request_id IS NOT NULL THEN
        IF p_replay_window IS NOT NULL THEN
            DELETE FROM provision_requests
            WHERE request_id = p_request_id AND created_at < clock_timestamp() - p_replay_window;
        END IF;
        INSERT INTO provision_requests (request_id, device_id, answer_enc, kind)
        VALUES (p_request_id, p_device_id, p_answer_enc, 'created')
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
    IF p_deadline IS NOT NULL AND clock_timestamp() > p_deadline THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'expired';
    END IF;
    RETURN 'created';
END;
$$;
