//! Statements of the operator's job commands (`steward jobs`, `steward queues`).

/// Columns of a job row, as [`crate::Job::from_row`] reads them.
macro_rules! job_columns {
    () => {
        "id, queue, kind, args, state::text AS state, priority, original_priority, attempt,
       max_attempts, run_lease, run_at, created_at, attempted_at, heartbeat_at, deadline_at,
       callback_id, callback_timeout_at, finalized_at, unique_key, errors"
    };
}

/// Jobs matching the optional filters (queue $1, states $2, kind $3), newest first, below id $4
/// for the next page. Walks the primary key backwards.
pub const LIST: &str = concat!(
    "
SELECT ",
    job_columns!(),
    "
FROM jobs
WHERE ($1::text IS NULL OR queue = $1)
  AND ($2::text[] IS NULL OR state = ANY ($2::text[]::job_state[]))
  AND ($3::text IS NULL OR kind = $3)
  AND ($4::bigint IS NULL OR id < $4)
ORDER BY id DESC
LIMIT $5"
);

/// An archived job by id (archived jobs keep no lease, heartbeat, deadline or callback).
/// The archive has no index on id: this reads every partition.
pub const GET_ARCHIVED: &str = "
SELECT id, queue, kind, args, state::text AS state, priority, priority AS original_priority,
       attempt, max_attempts, 0::bigint AS run_lease, run_at, created_at, attempted_at,
       NULL::timestamptz AS heartbeat_at, NULL::timestamptz AS deadline_at,
       NULL::uuid AS callback_id, NULL::timestamptz AS callback_timeout_at, finalized_at,
       unique_key, errors, archived_at
FROM job_archive WHERE id = $1";

/// Makes jobs $1 available now: finished, scheduled or retryable ones, and only when no other
/// unfinished job holds their unique key. A job whose attempts are used up gets one more.
/// Running and waiting jobs are left to their worker (cancel them first). Returns, per id
/// found, its state before and whether it was retried; wakes the queues' workers.
pub const RETRY: &str = "
WITH target AS (
    SELECT j.id, j.state, j.queue,
           j.state IN ('scheduled', 'retryable', 'completed', 'failed', 'cancelled')
           AND NOT (j.state IN ('failed', 'cancelled') AND j.unique_key IS NOT NULL AND EXISTS (
               SELECT 1 FROM jobs o WHERE o.unique_key = j.unique_key AND o.id <> j.id
                 AND o.state NOT IN ('failed', 'cancelled'))) AS retryable
    FROM jobs j WHERE j.id = ANY ($1::bigint[])
    ORDER BY j.id
    FOR UPDATE OF j
), retried AS (
    UPDATE jobs j
    SET state = 'available', run_at = now(), finalized_at = NULL, callback_timeout_at = NULL,
        max_attempts = GREATEST(j.max_attempts, j.attempt + 1), priority = j.original_priority
    FROM target t
    WHERE j.id = t.id AND t.retryable
    RETURNING j.id, j.queue
), woken AS (
    SELECT wake_workers(array_agg(DISTINCT queue)) FROM retried
)
SELECT t.id, t.state::text, r.id IS NOT NULL
FROM target t LEFT JOIN retried r ON r.id = t.id
CROSS JOIN woken";

/// Cancels jobs $1 that have not finished; returns, per id found, its state before and
/// whether it was cancelled. A running job's worker loses its lease at its next heartbeat.
pub const CANCEL: &str = "
WITH target AS (
    SELECT id, state FROM jobs WHERE id = ANY ($1::bigint[]) ORDER BY id FOR UPDATE
), cancelled AS (
    UPDATE jobs j SET state = 'cancelled', finalized_at = now(), callback_timeout_at = NULL
    FROM target t
    WHERE j.id = t.id AND t.state NOT IN ('completed', 'failed', 'cancelled')
    RETURNING j.id
)
SELECT t.id, t.state::text, c.id IS NOT NULL
FROM target t LEFT JOIN cancelled c ON c.id = t.id";

/// The next batch of at most $5 ids above $4 matching the filters (queue $1, states $2, kind
/// $3), in id order.
pub const MATCHING_IDS: &str = "
SELECT id FROM jobs
WHERE ($1::text IS NULL OR queue = $1)
  AND state = ANY ($2::text[]::job_state[])
  AND ($3::text IS NULL OR kind = $3)
  AND id > $4
ORDER BY id
LIMIT $5";

/// How many jobs match the filters (queue $1, states $2, kind $3).
pub const COUNT_MATCHING: &str = "
SELECT count(*) FROM jobs
WHERE ($1::text IS NULL OR queue = $1)
  AND state = ANY ($2::text[]::job_state[])
  AND ($3::text IS NULL OR kind = $3)";

/// Jobs per queue and state as admin_metadata last counted them, with when.
pub const COUNTED_DEPTHS: &str = "
SELECT queue, state::text, count, updated_at FROM queue_counts WHERE count > 0";

/// Jobs per queue and state, counted now (reads the whole table).
pub const LIVE_DEPTHS: &str = "
SELECT queue, state::text, count(*), now() FROM jobs GROUP BY queue, state";

/// Per queue $1, when its oldest available job became due: the head of each priority's run of
/// jobs_claim_idx.
pub const OLDEST_AVAILABLE: &str = "
SELECT q.queue, min(head.run_at)
FROM unnest($1::text[]) AS q(queue)
CROSS JOIN generate_series(1, 4) AS p(priority)
CROSS JOIN LATERAL (
    SELECT run_at FROM jobs
    WHERE state = 'available' AND queue = q.queue AND priority = p.priority
    ORDER BY run_at LIMIT 1
) head
GROUP BY q.queue";
