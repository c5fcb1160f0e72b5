//! Every statement the queue client runs, one per purpose, with the index it relies on.
//! State literals are inlined (not parameters) so the planner can match the partial indexes.

/// Single enqueue. Conflicts only on `jobs_unique_key_idx`. A new scheduled job wakes the
/// promoter when it is due before the promoter's own next wake-up (`wake_promoter`, migration
/// V8); a job available at once wakes its queue's workers (`wake_workers`, V9). The second
/// column is 1 when the promoter was notified, else 0; the third, when the workers were.
pub const ENQUEUE: &str = "
WITH ins AS (
    INSERT INTO jobs (queue, kind, args, state, priority, original_priority, max_attempts,
                      run_at, run_timeout, unique_key)
    VALUES ($1, $2, $3,
            CASE WHEN $6::timestamptz > now() THEN 'scheduled'::job_state ELSE 'available'::job_state END,
            $4, $4, $5, $6, $7::int8 * interval '1 millisecond', $8)
    ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND state NOT IN ('failed', 'cancelled')
    DO NOTHING
    RETURNING id, queue, state, run_at
), wake AS (
    SELECT wake_promoter(run_at) AS sent FROM ins WHERE state = 'scheduled'
), woken AS (
    SELECT wake_workers(array_agg(queue)) AS queues FROM ins WHERE state = 'available'
)
SELECT id, (SELECT count(*) FROM wake WHERE sent), (SELECT queues FROM woken) FROM ins";

/// The job holding a unique key (after ENQUEUE hit a conflict). Index: jobs_unique_key_idx.
pub const FIND_UNIQUE: &str = "
SELECT id FROM jobs
WHERE unique_key = $1 AND state NOT IN ('failed', 'cancelled')";

/// Batch enqueue from parallel arrays in one statement (UNNEST). Duplicate unique keys are
/// skipped. Same wake-up rules as ENQUEUE, applied once per batch: the promoter for the earliest
/// new scheduled job (`wake_promoter` of NULL, when there is none, sends nothing), the workers of
/// each queue that got an available job. Each row's second column is 1 when the promoter was
/// notified, else 0.
pub const ENQUEUE_BATCH: &str = "
WITH ins AS (
    INSERT INTO jobs (queue, kind, args, state, priority, original_priority, max_attempts,
                      run_at, run_timeout, unique_key)
    SELECT q, k, a,
           CASE WHEN r > now() THEN 'scheduled'::job_state ELSE 'available'::job_state END,
           p, p, m, r, t * interval '1 millisecond', u
    FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::int2[], $5::int4[], $6::timestamptz[],
                $7::int8[], $8::text[]) WITH ORDINALITY AS n(q, k, a, p, m, r, t, u, ord)
    ORDER BY ord
    ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND state NOT IN ('failed', 'cancelled')
    DO NOTHING
    RETURNING id, queue, state, run_at
), wake AS (
    SELECT wake_promoter(min(run_at)) AS sent FROM ins WHERE state = 'scheduled'
), woken AS (
    SELECT wake_workers(array_agg(queue)) AS queues FROM ins WHERE state = 'available'
)
SELECT id, (SELECT count(*) FROM wake WHERE sent) FROM ins, woken ORDER BY id";

/// Claim: the next available jobs of one queue, by priority then due time, skipping rows other
/// claimers hold; with $3 not NULL, only jobs of those kinds (a filter on the index scan).
/// Index: jobs_claim_idx.
pub const CLAIM: &str = "
WITH picked AS (
    SELECT id FROM jobs
    WHERE state = 'available' AND queue = $1 AND ($3::text[] IS NULL OR kind = ANY($3::text[]))
    ORDER BY priority, run_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE jobs j
SET state = 'running', attempt = j.attempt + 1, run_lease = j.run_lease + 1,
    attempted_at = now(), heartbeat_at = now(),
    deadline_at = now() + j.run_timeout
FROM picked
WHERE j.id = picked.id
RETURNING j.id, j.queue, j.kind, j.args, j.priority, j.attempt, j.max_attempts, j.run_lease,
          j.run_at, j.created_at, j.deadline_at, j.errors";

/// Heartbeat of one run. Primary key lookup; the run_lease guard rejects a stale worker.
pub const HEARTBEAT: &str = "
UPDATE jobs SET heartbeat_at = now()
WHERE id = $1 AND run_lease = $2 AND state = 'running'";

/// Heartbeat of many runs at once, never waiting for a row lock: a run whose row another
/// transaction holds (its own completion, a rescuer deciding) is skipped this time. One row per
/// lease: renewed, and the state the job has under that lease as of the statement's snapshot
/// (NULL when it has another lease or none). Primary key.
pub const HEARTBEAT_MANY: &str = "
WITH l AS (
    SELECT * FROM unnest($1::int8[], $2::int8[]) AS l(id, lease)
), locked AS (
    SELECT j.ctid FROM jobs j JOIN l ON j.id = l.id
    WHERE j.run_lease = l.lease AND j.state = 'running'
    FOR NO KEY UPDATE OF j SKIP LOCKED
), renewed AS (
    UPDATE jobs j SET heartbeat_at = now()
    WHERE j.ctid = ANY(ARRAY(SELECT ctid FROM locked))
    RETURNING j.id, j.run_lease
)
SELECT l.id, l.lease,
       EXISTS (SELECT FROM renewed r WHERE r.id = l.id AND r.run_lease = l.lease),
       (SELECT j.state::text FROM jobs j WHERE j.id = l.id AND j.run_lease = l.lease)
FROM l";

/// Complete many runs in one statement, each guarded by its lease; returns the runs completed
/// (a run missing from the result had lost its lease). Primary key.
pub const COMPLETE_MANY: &str = "
UPDATE jobs j SET state = 'completed', finalized_at = now()
FROM unnest($1::int8[], $2::int8[]) AS l(id, lease)
WHERE j.id = l.id AND j.run_lease = l.lease AND j.state = 'running'
RETURNING j.id, j.run_lease";

/// Fail many runs in one statement, each guarded by its lease, by the rule of FAIL: $3 the
/// errors, $4 their reasons (`error`, `panic`, `timeout`), $5 whether each is permanent, $6..$8
/// the retry_backoff parameters. Returns each failed run's new state and due time, and wakes the
/// promoter for the earliest retry when it is due before the promoter's own next wake-up
/// (`wake_promoter`). Primary key.
pub const FAIL_MANY: &str = "
WITH failed AS (
UPDATE jobs j SET
    state = CASE WHEN l.permanent OR j.attempt >= j.max_attempts THEN 'failed'::job_state
                 ELSE 'retryable'::job_state END,
    run_at = CASE WHEN l.permanent OR j.attempt >= j.max_attempts THEN j.run_at
                  ELSE now() + retry_backoff(j.attempt, $6, $7, $8) END,
    finalized_at = CASE WHEN l.permanent OR j.attempt >= j.max_attempts THEN now() END,
    errors = j.errors || jsonb_build_array(jsonb_build_object(
        'attempt', j.attempt, 'at', now(), 'reason', l.reason, 'error', l.error))
FROM unnest($1::int8[], $2::int8[], $3::text[], $4::text[], $5::bool[])
     AS l(id, lease, error, reason, permanent)
WHERE j.id = l.id AND j.run_lease = l.lease AND j.state = 'running'
RETURNING j.id, j.run_lease, j.state, j.run_at
)
SELECT id, run_lease, state::text, run_at FROM failed,
    (SELECT wake_promoter(min(run_at) FILTER (WHERE state = 'retryable')) FROM failed) woken";

/// Hand runs back without using up an attempt (a worker shutting down): available again at
/// once, with a `released` entry in `errors`, and their queues' workers woken. Each guarded by
/// its lease; returns the runs released. Primary key.
pub const RELEASE_MANY: &str = "
WITH released AS (
    UPDATE jobs j SET state = 'available', attempt = j.attempt - 1, run_at = now(),
        deadline_at = NULL,
        errors = j.errors || jsonb_build_array(jsonb_build_object(
            'attempt', j.attempt, 'at', now(), 'reason', 'released', 'error', $3::text))
    FROM unnest($1::int8[], $2::int8[]) AS l(id, lease)
    WHERE j.id = l.id AND j.run_lease = l.lease AND j.state = 'running'
    RETURNING j.id, j.run_lease, j.queue
)
SELECT id, run_lease FROM released, (SELECT wake_workers(array_agg(queue)) FROM released) woken";

/// The staleness the leader rescues stale heartbeats at, as published when its term started
/// (NULL: no term yet, or that rescue is disabled). Primary key.
pub const PUBLISHED_STALENESS: &str = "
SELECT extract(epoch FROM heartbeat_staleness)::float8 FROM leader WHERE id = 1";

/// Complete a run. Primary key; run_lease guard.
pub const COMPLETE: &str = "
UPDATE jobs SET state = 'completed', finalized_at = now()
WHERE id = $1 AND run_lease = $2 AND state = 'running'";

/// Fail a run: retryable with backoff while attempts remain, failed otherwise (or at once when
/// $7 says the error is permanent). The error is appended to `errors`; a retry wakes the promoter
/// as FAIL_MANY's do. Primary key; run_lease guard.
pub const FAIL: &str = "
WITH failed AS (
UPDATE jobs SET
    state = CASE WHEN $7 OR attempt >= max_attempts THEN 'failed'::job_state ELSE 'retryable'::job_state END,
    run_at = CASE WHEN $7 OR attempt >= max_attempts THEN run_at
                  ELSE now() + retry_backoff(attempt, $3, $4, $5) END,
    finalized_at = CASE WHEN $7 OR attempt >= max_attempts THEN now() END,
    errors = errors || jsonb_build_array(jsonb_build_object(
        'attempt', attempt, 'at', now(), 'reason', 'error', 'error', $6::text))
WHERE id = $1 AND run_lease = $2 AND state = 'running'
RETURNING state, run_at
)
SELECT state::text, run_at FROM failed,
    (SELECT wake_promoter(min(run_at) FILTER (WHERE state = 'retryable')) FROM failed) woken";

/// Snooze a run: back to scheduled after a delay without using up an attempt; wakes the promoter
/// when due before its own next wake-up (`wake_promoter`).
pub const SNOOZE: &str = "
WITH snoozed AS (
UPDATE jobs SET state = 'scheduled', attempt = attempt - 1,
    run_at = now() + make_interval(secs => $3::float8 / 1000.0)
WHERE id = $1 AND run_lease = $2 AND state = 'running'
RETURNING run_at
)
SELECT run_at FROM snoozed, (SELECT wake_promoter(min(run_at)) FROM snoozed) woken";

/// Park a run until an external callback arrives or times out. Primary key; run_lease guard.
pub const WAIT_FOR_CALLBACK: &str = "
UPDATE jobs SET state = 'waiting_external', callback_id = gen_random_uuid(),
    callback_timeout_at = now() + make_interval(secs => $3::float8 / 1000.0)
WHERE id = $1 AND run_lease = $2 AND state = 'running'
RETURNING callback_id";

/// Resolve a callback as completed. Index: jobs_callback_id_idx. The state condition is
/// re-checked under the row lock, so exactly one of resolve and the timeout rescue wins.
pub const RESOLVE_CALLBACK_COMPLETE: &str = "
UPDATE jobs SET state = 'completed', finalized_at = now(), callback_timeout_at = NULL
WHERE callback_id = $1 AND state = 'waiting_external'
RETURNING id";

/// Resolve a callback as failed: same retry rule (and wake-up) as FAIL. Index:
/// jobs_callback_id_idx.
pub const RESOLVE_CALLBACK_FAIL: &str = "
WITH failed AS (
UPDATE jobs SET
    state = CASE WHEN attempt >= max_attempts THEN 'failed'::job_state ELSE 'retryable'::job_state END,
    run_at = CASE WHEN attempt >= max_attempts THEN run_at
                  ELSE now() + retry_backoff(attempt, $2, $3, $4) END,
    finalized_at = CASE WHEN attempt >= max_attempts THEN now() END,
    callback_timeout_at = NULL,
    errors = errors || jsonb_build_array(jsonb_build_object(
        'attempt', attempt, 'at', now(), 'reason', 'callback_failed', 'error', $5::text))
WHERE callback_id = $1 AND state = 'waiting_external'
RETURNING id, state, run_at
)
SELECT id, state::text FROM failed,
    (SELECT wake_promoter(min(run_at) FILTER (WHERE state = 'retryable')) FROM failed) woken";

/// Cancel a job that has not finished. Primary key.
pub const CANCEL: &str = "
UPDATE jobs SET state = 'cancelled', finalized_at = now(), callback_timeout_at = NULL
WHERE id = $1 AND state NOT IN ('completed', 'failed', 'cancelled')";

/// One job by id. Primary key.
pub const GET: &str = "
SELECT id, queue, kind, args, state::text, priority, original_priority, attempt, max_attempts,
       run_lease, run_at, created_at, attempted_at, heartbeat_at, deadline_at, callback_id,
       callback_timeout_at, finalized_at, unique_key, errors
FROM jobs WHERE id = $1";
