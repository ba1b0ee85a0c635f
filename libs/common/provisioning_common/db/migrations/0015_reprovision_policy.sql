-- Re-provisioning after a factory reset (issue 19): what a profile does with a provision request for a
-- device of its own that exists and has provisioned before (ThingsBoard: refused, "Failed to provision
-- device!", which leaves a device that lost its token stuck until an operator deletes it).
--   NEVER                  ThingsBoard's behaviour (the default).
--   ROTATE                 new credentials for the device, the old ones revoked at once: anyone with the
--                          profile's key and secret and the device's name can take the device over.
--   ROTATE_WITH_DEVICE_KEY the same, only when the request also carries the device's own device key (Innoway's
--                          device_key / ThingsBoard's deviceKey field, stored at its first provisioning or by
--                          the operator): as strong as that key is secret.
ALTER TABLE device_profiles ADD COLUMN reprovision_policy text NOT NULL DEFAULT 'NEVER'
    CHECK (reprovision_policy IN ('NEVER', 'ROTATE', 'ROTATE_WITH_DEVICE_KEY'));
