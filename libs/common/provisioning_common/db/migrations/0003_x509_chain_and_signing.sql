-- X.509 certificate-chain profiles (ThingsBoard's X509_CERTIFICATE_CHAIN) and profiles that issue
-- device certificates from CSRs (ours).
ALTER TABLE device_profiles DROP CONSTRAINT device_profiles_provision_strategy_check;
ALTER TABLE device_profiles ADD CONSTRAINT device_profiles_provision_strategy_check
    CHECK (provision_strategy IN ('ALLOW_CREATE_NEW_DEVICES', 'CHECK_PRE_PROVISIONED_DEVICES', 'DISABLED',
                                  'X509_CERTIFICATE_CHAIN'));

ALTER TABLE device_profiles
    -- The CA a device chain must reach (PEM), the regex extracting the device name from the leaf CN,
    -- and whether unknown names create devices.
    ADD COLUMN certificate_pem           text,
    ADD COLUMN certificate_regex         text,
    ADD COLUMN allow_create_by_x509      boolean NOT NULL DEFAULT true,
    -- SHA-256 (hex) of the CA's subject DN: a leaf or intermediate names its issuer, so the profile
    -- is found by one indexed lookup instead of trying every CA.
    ADD COLUMN ca_subject_hash           text,
    -- Signing CA for CSRs: certificate (PEM chain) and its private key, encrypted (Fernet).
    ADD COLUMN signing_certificate_pem   text,
    ADD COLUMN signing_key_enc           text,
    ADD COLUMN issued_validity_days      integer NOT NULL DEFAULT 365;

CREATE INDEX device_profiles_ca_subject_idx ON device_profiles (ca_subject_hash) WHERE ca_subject_hash IS NOT NULL;
