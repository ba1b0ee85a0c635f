-- The pre-provisioning hook may set the device's label and server attributes (issue 19), besides its name.
--
-- The hook's decision is stored in hook_decisions (keyed by the request's replay key) before the device is
-- written. Every path that then writes a device for that request - create (create_device_with_credentials),
-- pre-provisioned claim, re-provisioning - records the request in provision_requests with the device's id, in
-- the device's own transaction (the claim and re-provisioning run in one explicit transaction each). A constraint trigger deferred to that transaction's commit applies the stored
-- label and attributes there: the device is written with them or not at all, whatever path wrote it, with no
-- change to those paths' functions.

-- ThingsBoard's Device.label (varchar(255)).
ALTER TABLE devices ADD COLUMN label text CHECK (char_length(label) <= 255);

ALTER TABLE hook_decisions
    ADD COLUMN label      text CHECK (char_length(label) <= 255),
    -- Server-scope attributes, {"key": any JSON value}.
    ADD COLUMN attributes jsonb CHECK (attributes IS NULL OR jsonb_typeof(attributes) = 'object');

CREATE FUNCTION apply_hook_decision() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    d record;
BEGIN
    SELECT label, attributes INTO d FROM hook_decisions
    WHERE request_id = NEW.request_id AND allow AND (label IS NOT NULL OR attributes IS NOT NULL);
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF d.label IS NOT NULL THEN
        UPDATE devices SET label = d.label WHERE id = NEW.device_id;
    END IF;
    IF d.attributes IS NOT NULL THEN
        INSERT INTO device_attributes (device_id, scope, key, value, last_update_ts)
        SELECT NEW.device_id, 'server', a.key, a.value, (extract(epoch FROM clock_timestamp()) * 1000)::bigint
        FROM jsonb_each(d.attributes) AS a
        WHERE EXISTS (SELECT 1 FROM devices WHERE id = NEW.device_id)
        ON CONFLICT (device_id, scope, key)
        DO UPDATE SET value = EXCLUDED.value, last_update_ts = EXCLUDED.last_update_ts;
    END IF;
    RETURN NULL;
END;
$$;

-- The create and re-provisioning paths insert the request's row with the device id; the claim inserts it
-- first and sets the device id once it has locked the device (record_answer).
CREATE CONSTRAINT TRIGGER provision_requests_apply_hook_decision
    AFTER INSERT OR UPDATE OF device_id ON provision_requests
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW.device_id IS NOT NULL)
    EXECUTE FUNCTION apply_hook_decision();
