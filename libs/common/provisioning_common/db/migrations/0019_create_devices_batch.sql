-- Concurrent provisions written in one statement (issue 18): the core's device writes go to Postgres in
-- batches (provisioning_core.device_writer), one round trip and one commit per batch instead of per device.
--
-- Each row is create_device_with_credentials, unchanged, in its own subtransaction (the BEGIN ... EXCEPTION
-- block): a row that fails - a name, device key or credentials taken (also by a row before it in the same
-- batch), its deadline passed, any other error - is rolled back alone, whole, and reported; its neighbours
-- are written. Rows come sorted by name, so two batches of two core instances lock names in one order.
-- Outcomes per row, in order: 'created', 'duplicate_request', 'expired' or 'conflict:<what>' (the function's
-- own), 'unique:<constraint>' (a unique violation, e.g. migration 0012's revoked credentials) or
-- 'error:<SQLSTATE>' (anything else; a cancel is not caught and fails the whole statement).
CREATE FUNCTION create_devices_with_credentials(
    p_request_ids     text[],
    p_answers_enc     bytea[],
    p_device_ids      uuid[],
    p_names           text[],
    p_profile_ids     uuid[],
    p_device_keys     text[],
    p_gateways        boolean[],
    p_states          text[],
    p_ctypes          text[],
    p_credentials_ids text[],
    p_secret_hashes   text[],
    p_public_values   jsonb[],
    p_values_enc      bytea[],
    p_deadlines       timestamptz[],
    p_replay_windows  interval[]
) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    v_outcome    text;
    v_constraint text;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_device_ids, 1), 0) LOOP
        BEGIN
            v_outcome := create_device_with_credentials(
                p_request_ids[i], p_answers_enc[i], p_device_ids[i], p_names[i], p_profile_ids[i],
                p_device_keys[i], p_gateways[i], p_states[i], p_ctypes[i], p_credentials_ids[i],
                p_secret_hashes[i], p_public_values[i], p_values_enc[i], p_deadlines[i], p_replay_windows[i]);
        EXCEPTION
            WHEN raise_exception THEN
                v_outcome := SQLERRM;
            WHEN unique_violation THEN
                GET STACKED DIAGNOSTICS v_constraint = CONSTRAINT_NAME;
                v_outcome := 'unique:' || v_constraint;
            WHEN OTHERS THEN
                v_outcome := 'error:' || SQLSTATE;
        END;
        RETURN NEXT v_outcome;
    END LOOP;
END;
$$;
