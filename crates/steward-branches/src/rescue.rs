//! Shared by the three rescue branches: the retry settings, the SET clause every rescue applies
//! (one macro, so the three statements cannot drift apart), and the batch loop.
//!
//! A rescue treats the expiry like a failed attempt, the way the client's `FAIL` does: the job
//! becomes `retryable` after `retry_backoff`, or `failed` once its attempts are used up, and an
//! entry `{attempt, at, reason, error}` is appended to `errors`.
//!
//! Batch commits do not wait for their WAL flush ([`Durability::Relaxed`]). A rescue lost in a
//! server crash leaves the job as it was and still expired, so the next pass (after the quiet
//! period that a lost database starts) rescues it again; a later commit that builds on it, such
//! as a worker's claim of the retried job, flushes it first, since WAL is flushed in order.
//! Waiting for the flush bought nothing and cost the most when the disk was busiest: every pass
//! writes (the fence's row lock), so even an empty pass waited for an fsync behind a cleanup
//! batch's WAL and held back its loop's siblings.
//!
//! The three rescue statements, as they run, are in `tests/sql/rescue_*__rescue.snap`.

use crate::config::branch_settings;
use crate::in_one_round_trip;
use crate::{
    Backlog, BacklogKind, Batching, BranchContext, BranchError, Durability, InvalidConfig,
    Observation, Outcome, RescueReason,
};
use serde::Deserialize;
use std::time::Duration;
use steward_queue::RetryPolicy;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

/// Builds a rescue statement: `$1` is the batch size and `$2..$4` the `retry_backoff`
/// parameters (base ms, max ms, jitter); further parameters belong to `$pick`.
///
/// `$pick` is the rest of the picking query after `SELECT id FROM jobs WHERE`: the state
/// literal, the expiry predicate and the ORDER BY of the branch's partial index. `$error` is
/// an SQL text expression over the old row (`j`). `$set` adds assignments (with a leading
/// comma) for columns the state change must also clear.
///
/// The row lock taken in the picking query re-checks the state and the predicate against the
/// newest row version, so a row that a worker, a callback resolver or another rescuer changed
/// meanwhile drops out, and rows others hold are skipped rather than waited for. The update
/// then reaches exactly the locked row versions by `ctid` (a TID scan): a join on the primary
/// key made the planner merge-join against the whole `jobs_pkey` index, the largest cost of a
/// batch. The lock keeps those versions current until the update, so the update changes only
/// row versions this statement locked after re-checking them; a locked version the statement's
/// snapshot cannot see is left for the next pass. The earliest retry wakes the promoter when it
/// is due before the promoter's own next wake-up (`wake_promoter`), so that a promoter sleeping
/// a long interval on an idle queue still promotes it on time.
///
/// The statements it builds are checked in as `tests/sql/<branch>__rescue.snap`.
macro_rules! rescue_statement {
    (pick: $pick:literal, reason: $reason:literal, error: $error:literal, set: $set:literal $(,)?) => {
        concat!(
            "
WITH rescued AS (
UPDATE jobs j SET
    state = CASE WHEN j.attempt >= j.max_attempts THEN 'failed'::job_state ELSE 'retryable'::job_state END,
    run_at = CASE WHEN j.attempt >= j.max_attempts THEN j.run_at
                  ELSE now() + retry_backoff(j.attempt, $2, $3, $4) END,
    finalized_at = CASE WHEN j.attempt >= j.max_attempts THEN now() END,
    errors = j.errors || jsonb_build_array(jsonb_build_object(
        'attempt', j.attempt, 'at', now(), 'reason', '",
            $reason,
            "', 'error', ",
            $error,
            "))",
            $set,
            "
WHERE j.ctid = ANY(ARRAY(
    SELECT ctid FROM jobs
    WHERE ",
            $pick,
            "
    LIMIT $1
    FOR UPDATE SKIP LOCKED))
RETURNING j.id, j.state, j.kind, j.queue, j.attempt, j.run_at
)
SELECT id, state::text, kind, queue, attempt, run_at FROM rescued,
    (SELECT wake_promoter(min(run_at) FILTER (WHERE state = 'retryable')) FROM rescued) woken"
        )
    };
}
pub(crate) use rescue_statement;

/// Retry backoff applied to rescued jobs, as `retry_backoff` takes it. Defaults to the
/// client's [`RetryPolicy::default`], so a rescued attempt backs off like a failed one.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Delay after the first attempt; doubles with each further attempt.
    #[serde(with = "humantime_serde")]
    pub base: Duration,
    /// The delay never exceeds this (before jitter).
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// +/- this fraction of the delay, so that jobs rescued together do not return together.
    pub jitter: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        let policy = RetryPolicy::default();
        Self {
            base: policy.base,
            max: policy.max,
            jitter: policy.jitter,
        }
    }
}

impl RetryConfig {
    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            base: self.base,
            max: self.max,
            jitter: self.jitter,
        }
    }

    /// Problems keyed `retry.*`.
    pub fn validate(&self) -> Vec<InvalidConfig> {
        // Past this, make_interval's seconds get silly and a "retry" is really a park.
        const LONGEST: Duration = Duration::from_secs(30 * 86_400);
        let mut problems = Vec::new();
        if self.base.is_zero() || self.base > LONGEST {
            problems.push(InvalidConfig::new(
                "retry.base",
                self.base,
                "must be between 1ms and 30 days",
            ));
        }
        if self.max < self.base || self.max > LONGEST {
            problems.push(InvalidConfig::new(
                "retry.max",
                self.max,
                "must be at least retry.base and at most 30 days",
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            problems.push(InvalidConfig::new(
                "retry.jitter",
                self.jitter,
                "must be between 0 and 1",
            ));
        }
        problems
    }
}

/// Checks the settings every rescue has besides interval and batching.
pub fn check_quiet_period_and_retry(
    quiet_period: Duration,
    retry: &RetryConfig,
) -> Vec<InvalidConfig> {
    let mut problems = Vec::new();
    if quiet_period > Duration::from_secs(86_400) {
        problems.push(InvalidConfig::new(
            "quiet_period",
            quiet_period,
            "must be at most 24h",
        ));
    }
    problems.extend(retry.validate());
    problems
}

/// What one rescue sweeps: its statement (built by [`rescue_statement!`]), the statement that
/// says when its next run expires, and the parameters both take after their own.
pub struct Sweep<'a> {
    pub rescue: &'static str,
    /// Seconds until the earliest run the rescue would take expires (negative when one is
    /// overdue; NULL when there is none): the head of the rescue's partial index. Its
    /// parameters are `extra`, from $1.
    pub next_expiry: &'static str,
    pub reason: RescueReason,
    /// The rescue statement's parameters from $5 on, and the next-expiry statement's from $1.
    pub extra: &'a [(&'a (dyn ToSql + Sync), Type)],
}

/// The head of a rescue's backlog: its next-expiry statement.
pub async fn backlog(client: &Client, sweep: &Sweep<'_>) -> Result<Option<Backlog>, BranchError> {
    let head_in: Option<f64> = client
        .query_typed_one(sweep.next_expiry, sweep.extra)
        .await?
        .get(0);
    Ok(Some(Backlog {
        kind: BacklogKind::Rescue(sweep.reason),
        head_in,
    }))
}

/// A rescue never runs again sooner than this after its pass, however soon the next run
/// expires: runs that expire within it are taken together.
pub const MIN_EXPIRY_GAP: Duration = Duration::from_millis(20);

/// One rescue pass: the sweep's statement in batches, each its own fenced transaction, until a
/// batch comes back short or `max_per_pass` have run. Each batch also reads when the next run
/// expires; after a short batch the rescue sleeps until then (never longer than its interval,
/// never shorter than [`MIN_EXPIRY_GAP`]), so a run is rescued as it expires rather than at the
/// next sweep. A run already overdue that the batch could not take (a row another transaction
/// held) waits for the interval, so that it cannot make the rescue spin.
pub async fn run_batches(
    ctx: &mut BranchContext<'_>,
    sweep: &Sweep<'_>,
    batching: Batching,
    interval: Duration,
    retry: &RetryConfig,
) -> Result<Outcome, BranchError> {
    let (base_ms, max_ms, jitter) = retry.policy().sql_params();
    // Typed parameters: parse, bind and execute in one round trip instead of two.
    let mut params: Vec<(&(dyn ToSql + Sync), Type)> = vec![
        (&batching.size, Type::INT8),
        (&base_ms, Type::FLOAT8),
        (&max_ms, Type::FLOAT8),
        (&jitter, Type::FLOAT8),
    ];
    params.extend_from_slice(sweep.extra);

    let (mut retried, mut failed) = (0u64, 0u64);
    let mut run_again_in = None;
    for batch in 0..batching.max_per_pass {
        let trip = ctx.one_trip(Durability::Relaxed);
        let (rows, next) = in_one_round_trip!(
            trip,
            async { Ok::<_, BranchError>(trip.client().query_typed(sweep.rescue, &params).await?) },
            async {
                let next = trip
                    .client()
                    .query_typed_one(sweep.next_expiry, sweep.extra)
                    .await?;
                Ok::<_, BranchError>(next.get::<_, Option<f64>>(0))
            },
        )?;
        for row in &rows {
            // One line per rescued job, for an operator following what happened to it.
            let (job_id, kind, queue, attempt): (i64, &str, &str, i32) =
                (row.get(0), row.get(2), row.get(3), row.get(4));
            let reason = sweep.reason.as_str();
            if row.get::<_, &str>(1) == "failed" {
                failed += 1;
                tracing::info!(
                    job_id,
                    kind,
                    queue,
                    reason,
                    attempt,
                    next = "failed: no attempt left",
                    "rescued a job"
                );
            } else {
                retried += 1;
                let retry_at: chrono::DateTime<chrono::Utc> = row.get(5);
                tracing::info!(job_id, kind, queue, reason, attempt, next = "retry", %retry_at, "rescued a job");
            }
        }
        if (rows.len() as i64) < batching.size {
            run_again_in = next
                .filter(|secs| *secs > 0.0)
                .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
                .filter(|next| *next < interval)
                .map(|next| next.max(MIN_EXPIRY_GAP));
            break;
        }
        if batch + 1 == batching.max_per_pass {
            run_again_in = Some(Duration::ZERO);
        }
    }

    let rows = retried + failed;
    let observations = if rows == 0 {
        Vec::new()
    } else {
        vec![Observation::Rescued {
            reason: sweep.reason,
            retried,
            failed,
        }]
    };
    Ok(Outcome {
        rows,
        run_again_in,
        observations,
    })
}

branch_settings! {
    /// Settings of the rescues that act on an expired time (deadlines, callback timeouts).
    pub struct ExpiryRescueConfig {
        interval: Duration::from_secs(1),
        batches: 1000, per_pass: 10,
        checks: ExpiryRescueConfig::own_problems,
        /// How long the leader holds this branch back after a term starts or the database
        /// comes back, so that workers and callers who could not reach it during an outage get
        /// a chance to.
        #[serde(with = "humantime_serde")]
        pub quiet_period: Duration = Duration::from_secs(30),
        pub retry: RetryConfig = RetryConfig::default(),
    }
}

impl ExpiryRescueConfig {
    fn own_problems(&self) -> Vec<InvalidConfig> {
        check_quiet_period_and_retry(self.quiet_period, &self.retry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = rescue_statement!(
        pick: "state = 'running' AND x ORDER BY y, id",
        reason: "sample",
        error: "'boom'",
        set: ",\n    extra = NULL",
    );

    #[test]
    fn the_statement_keeps_the_shape_the_partial_indexes_need() {
        assert!(SAMPLE.contains("WHERE state = 'running' AND x ORDER BY y, id\n    LIMIT $1"));
        assert!(SAMPLE.contains("'reason', 'sample', 'error', 'boom'))"));
        assert!(SAMPLE.contains("'boom')),\n    extra = NULL\nWHERE j.ctid = ANY(ARRAY("));
        assert!(SAMPLE.contains("LIMIT $1\n    FOR UPDATE SKIP LOCKED))\nRETURNING"));
        assert!(SAMPLE.contains("RETURNING j.id, j.state, j.kind, j.queue, j.attempt, j.run_at\n)"));
        assert!(SAMPLE.ends_with(
            "SELECT id, state::text, kind, queue, attempt, run_at FROM rescued,
    (SELECT wake_promoter(min(run_at) FILTER (WHERE state = 'retryable')) FROM rescued) woken"
        ));
    }

    #[test]
    fn retry_defaults_follow_the_client_and_problems_are_keyed() {
        assert_eq!(RetryConfig::default().policy(), RetryPolicy::default());
        assert_eq!(RetryConfig::default().validate(), vec![]);
        let bad = RetryConfig {
            base: Duration::ZERO,
            max: Duration::from_secs(86_400 * 365),
            jitter: 1.5,
        };
        let keys: Vec<String> = bad.validate().into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["retry.base", "retry.max", "retry.jitter"]);
        let problems =
            check_quiet_period_and_retry(Duration::from_secs(100_000), &RetryConfig::default());
        let keys: Vec<String> = problems.into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["quiet_period"]);
    }
}
