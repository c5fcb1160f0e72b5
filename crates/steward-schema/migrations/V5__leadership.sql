-- The current leadership term, one row. A new leader increments epoch; branches of a term
-- check their epoch against this row inside their own transaction (FOR SHARE), so a branch of
-- a stale term cannot commit once the newer term's increment has committed.
CREATE TABLE leader (
    id               smallint    PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    epoch            bigint      NOT NULL DEFAULT 0,
    instance         text,
    host             text,
    pid              integer,
    backend_pid      integer,
    since            timestamptz,
    -- Advanced by the leader's loops; standbys read it to detect a wedged leader.
    last_progress_at timestamptz,
    resigned_at      timestamptz,
    -- When the promoter next wakes on its own; producers NOTIFY only for jobs due before it.
    promote_wakeup_at timestamptz
);
INSERT INTO leader (id) VALUES (1);

-- Every term ever started, for `steward status` and post-mortems.
CREATE TABLE leader_terms (
    epoch       bigint      PRIMARY KEY,
    instance    text        NOT NULL,
    host        text        NOT NULL,
    pid         integer     NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    ended_at    timestamptz,
    end_reason  text
);

-- Per-branch health as last reported by the leader, readable from any instance.
CREATE TABLE branch_health (
    branch            text        PRIMARY KEY,
    loop_name         text        NOT NULL,
    epoch             bigint      NOT NULL,
    last_run_at       timestamptz,
    last_duration_ms  double precision,
    last_start_delay_ms double precision,
    last_rows         bigint,
    last_success_at   timestamptz,
    last_error        text,
    last_error_at     timestamptz,
    overrun_state     text        NOT NULL DEFAULT 'on_time' CHECK (overrun_state IN ('on_time', 'delayed')),
    overrun_episodes  bigint      NOT NULL DEFAULT 0,
    runs              bigint      NOT NULL DEFAULT 0,
    errors            bigint      NOT NULL DEFAULT 0,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
