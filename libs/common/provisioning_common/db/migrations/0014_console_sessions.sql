-- Operator console log-in sessions (issue 17; services/admin_api/console). The browser holds a 256-bit random
-- session id in an HttpOnly cookie; only its SHA-256 is kept here, so a database dump opens no session.
-- A session ends at logout, when idle for CONSOLE_SESSION_IDLE_S, at expires_at (CONSOLE_SESSION_MAX_S after
-- log-in), or with its operator (deleted; a disabled operator's sessions are refused at each use).
CREATE TABLE console_sessions (
    id_hash      text PRIMARY KEY,
    operator_id  uuid NOT NULL REFERENCES operators (id) ON DELETE CASCADE,
    -- Double-submit CSRF token the console's pages send back in X-CSRF-Token (not a secret at rest: it only
    -- matters together with the session cookie).
    csrf_token   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
CREATE INDEX console_sessions_operator_idx ON console_sessions (operator_id);
CREATE INDEX console_sessions_expires_idx ON console_sessions (expires_at);
