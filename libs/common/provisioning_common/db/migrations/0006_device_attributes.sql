-- Device attributes (ThingsBoard's attribute_kv): per device and scope, one JSON value per key.
--  * client: written by the device (v1/devices/me/attributes, POST /api/v1/{token}/attributes);
--  * shared: written by operators (admin API), read by the device and pushed to its session;
--  * server: written by operators and by us (provisionState), never shown to the device.
-- last_update_ts is milliseconds since the epoch, as ThingsBoard's lastUpdateTs.
CREATE TABLE device_attributes (
    device_id      uuid   NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    scope          text   NOT NULL CHECK (scope IN ('client', 'shared', 'server')),
    key            text   NOT NULL CHECK (char_length(key) BETWEEN 1 AND 255),
    value          jsonb  NOT NULL,
    last_update_ts bigint NOT NULL,
    PRIMARY KEY (device_id, scope, key)
);

-- ThingsBoard sets the server attribute provisionState = "provisioned" when a device provisions itself.
-- devices.provision_state is written by the create path (create_device_with_credentials), by the
-- pre-provisioned claim (UPDATE ... SET provision_state) and cleared when an unanswered claim is undone
-- (undo_unanswered): the attribute follows the column, in the same transaction, whichever path wrote it.
CREATE FUNCTION device_provision_state_attribute() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF (TG_OP = 'INSERT' AND NEW.provision_state IS NULL)
       OR (TG_OP = 'UPDATE' AND OLD.provision_state IS NOT DISTINCT FROM NEW.provision_state) THEN
        RETURN NULL;
    END IF;
    IF NEW.provision_state IS NULL THEN
        DELETE FROM device_attributes WHERE device_id = NEW.id AND scope = 'server' AND key = 'provisionState';
    ELSE
        INSERT INTO device_attributes (device_id, scope, key, value, last_update_ts)
        VALUES (NEW.id, 'server', 'provisionState', to_jsonb(NEW.provision_state),
                (extract(epoch FROM clock_timestamp()) * 1000)::bigint)
        ON CONFLICT (device_id, scope, key)
        DO UPDATE SET value = EXCLUDED.value, last_update_ts = EXCLUDED.last_update_ts;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER devices_provision_state_attribute
    AFTER INSERT OR UPDATE OF provision_state ON devices
    FOR EACH ROW EXECUTE FUNCTION device_provision_state_attribute();

-- Devices that provisioned themselves before this migration.
INSERT INTO device_attributes (device_id, scope, key, value, last_update_ts)
SELECT id, 'server', 'provisionState', to_jsonb(provision_state), (extract(epoch FROM created_at) * 1000)::bigint
FROM devices
WHERE provision_state IS NOT NULL
ON CONFLICT DO NOTHING;
