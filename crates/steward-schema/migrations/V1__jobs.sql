-- The canonical job table. One table for hot and deferred rows (see adr/0000-job-schema.md):
-- every sweep has its own partial index, so deferred rows cost the hot paths nothing but
-- index size, and a single table keeps every transition a one-row UPDATE.
CREATE TYPE job_state AS ENUM (
    'scheduled', 'available', 'running', 'waiting_external',
    'retryable', 'completed', 'failed', 'cancelled'
);

CREATE TABLE jobs (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue               text        NOT NULL,
    kind                text        NOT NULL,
    state               job_state   NOT NULL,
    priority            smallint    NOT NULL CHECK (priority BETWEEN 1 AND 4),
    original_priority   smallint    NOT NULL CHECK (original_priority BETWEEN 1 AND 4),
    attempt             integer     NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts        integer     NOT NULL CHECK (max_attempts >= 1),
    run_lease           bigint      NOT NULL DEFAULT 0,
    run_at              timestamptz NOT NULL DEFAULT now(),
    created_at          timestamptz NOT NULL DEFAULT now(),
    attempted_at        timestamptz,
    heartbeat_at        timestamptz,
    -- Per-run time limit; deadline_at is set from it at claim time.
    run_timeout         interval,
    deadline_at         timestamptz,
    callback_id         uuid,
    callback_timeout_at timestamptz,
    finalized_at        timestamptz,
    unique_key          text,
    args                jsonb       NOT NULL DEFAULT '{}',
    errors              jsonb       NOT NULL DEFAULT '[]',
    CONSTRAINT jobs_finalized_iff_terminal CHECK (
        (state IN ('completed', 'failed', 'cancelled')) = (finalized_at IS NOT NULL)),
    CONSTRAINT jobs_callback_iff_waiting CHECK (
        (state = 'waiting_external') = (callback_timeout_at IS NOT NULL))
) WITH (fillfactor = 85); -- room for HOT updates: heartbeats and transitions rewrite rows in place

-- Claiming: the next available jobs of a queue in priority order.
CREATE INDEX jobs_claim_idx ON jobs (queue, priority, run_at, id) WHERE state = 'available';
-- promote_scheduled: scheduled and retryable jobs by due time.
CREATE INDEX jobs_due_idx ON jobs (run_at, id) WHERE state IN ('scheduled', 'retryable');
-- rescue_stale_heartbeats.
CREATE INDEX jobs_running_heartbeat_idx ON jobs (heartbeat_at, id) WHERE state = 'running';
-- rescue_expired_deadlines.
CREATE INDEX jobs_running_deadline_idx ON jobs (deadline_at, id)
    WHERE state = 'running' AND deadline_at IS NOT NULL;
-- rescue_expired_callbacks.
CREATE INDEX jobs_callback_timeout_idx ON jobs (callback_timeout_at, id) WHERE state = 'waiting_external';
-- Resolving a callback by its id.
CREATE UNIQUE INDEX jobs_callback_id_idx ON jobs (callback_id) WHERE callback_id IS NOT NULL;
-- cleanup: one index per terminal state, since retention differs by state.
CREATE INDEX jobs_completed_idx ON jobs (finalized_at, id) WHERE state = 'completed';
CREATE INDEX jobs_failed_idx    ON jobs (finalized_at, id) WHERE state = 'failed';
CREATE INDEX jobs_cancelled_idx ON jobs (finalized_at, id) WHERE state = 'cancelled';
-- priority_aging: available jobs that can still be raised.
CREATE INDEX jobs_aging_idx ON jobs (run_at, id) WHERE state = 'available' AND priority > 1;
-- Unique jobs: a key is taken while a job holding it is pending, running or completed
-- (and until cleanup removes it); failed and cancelled jobs release it.
CREATE UNIQUE INDEX jobs_unique_key_idx ON jobs (unique_key)
    WHERE unique_key IS NOT NULL AND state NOT IN ('failed', 'cancelled');

-- Retry backoff, one definition for the client's fail() and the rescue branches:
-- base * 2^(attempt-1), capped, with +/- jitter (a fraction of the delay).
CREATE FUNCTION retry_backoff(attempt integer, base_ms double precision,
                              max_ms double precision, jitter double precision)
RETURNS interval
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    -- The exponent is capped so that huge attempt counts stay at max_ms instead of overflowing.
    SELECT make_interval(secs => least(max_ms, base_ms * power(2.0::float8, least(greatest(attempt, 1) - 1, 62)))
                                 * (1.0 + jitter * (2.0 * random() - 1.0)) / 1000.0)
$$;
