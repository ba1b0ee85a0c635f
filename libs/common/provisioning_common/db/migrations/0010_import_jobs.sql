-- Bulk import of pre-provisioned devices (issue 16): one row per import job, its progress counters and
-- the rows it rejected. A job is written by the admin API instance that runs it, which holds a session
-- advisory lock on the job while it runs (repository.import_job_lock_key); a job still 'running' whose
-- lock nobody holds lost its runner (the process died) and is marked 'failed' by whoever reads it.
CREATE TABLE import_jobs (
    id          uuid PRIMARY KEY,
    profile_id  uuid NOT NULL REFERENCES device_profiles (id) ON DELETE CASCADE,
    status      text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'done', 'failed')),
    on_existing text NOT NULL CHECK (on_existing IN ('skip', 'update')),
    atomic      boolean NOT NULL,
    -- Why a job failed (no secret: a fixed sentence or an exception's type).
    message     text,
    total       bigint,
    processed   bigint NOT NULL DEFAULT 0,
    created     bigint NOT NULL DEFAULT 0,
    updated     bigint NOT NULL DEFAULT 0,
    skipped     bigint NOT NULL DEFAULT 0,
    rejected    bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX import_jobs_running_idx ON import_jobs (created_at) WHERE status = 'running';

-- The rejected rows of a job (the first few thousand; ``rejected`` counts them all). Never a value.
CREATE TABLE import_job_errors (
    job_id uuid NOT NULL REFERENCES import_jobs (id) ON DELETE CASCADE,
    line   bigint NOT NULL,
    field  text NOT NULL,
    reason text NOT NULL,
    PRIMARY KEY (job_id, line, field)
);
