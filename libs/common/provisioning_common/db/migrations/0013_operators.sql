-- Operators of the admin API and console (issue 17): accounts with a role, personal API tokens, and an
-- audit log of every state-changing admin call.
--
-- Roles: admin (everything, operators and the audit log included), operator (devices, imports,
-- attributes, RPC, credentials; reads everything but the operators), viewer (reads devices, profiles
-- without their secret, events). The policy itself is in services/admin_api/auth.py.
CREATE TABLE operators (
    id            uuid PRIMARY KEY,
    username      text NOT NULL UNIQUE,
    -- scrypt (provisioning_common.passwords); NULL: the account logs in with tokens only.
    password_hash text,
    role          text NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    disabled      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Personal API tokens: 256 random bits, shown once; only their SHA-256 is kept (a token is not a
-- password: nothing to guess, so no slow hash is needed to make a dump useless).
CREATE TABLE operator_tokens (
    id           uuid PRIMARY KEY,
    operator_id  uuid NOT NULL REFERENCES operators (id) ON DELETE CASCADE,
    name         text NOT NULL,
    token_hash   text NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX operator_tokens_operator_idx ON operator_tokens (operator_id);

-- Who changed what: one row per state-changing call (POST/PUT/PATCH/DELETE under /api), whatever its
-- outcome. `changes` names the fields the call sent, with values only for fields that are never secret.
CREATE TABLE admin_audit (
    id          bigserial PRIMARY KEY,
    time        timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    operator_id uuid,
    method      text NOT NULL,
    path        text NOT NULL,
    status      integer NOT NULL,
    object_id   text,
    changes     jsonb
);
CREATE INDEX admin_audit_time_idx ON admin_audit (time DESC);
