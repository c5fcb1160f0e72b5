//! `queue_stats`: a depth snapshot per queue and pending state, and the age of each queue's
//! oldest available job, written to `queue_stats` and reported as observations.
//!
//! Only states with a partial index are counted (finished jobs can be many and nobody waits on
//! them), so the cost follows the pending backlog, not the table. Rows whose (queue, state)
//! emptied are deleted and reported once more with depth 0 (and age 0 for `available`), so
//! gauges fed by the observations drop to zero instead of keeping their last value.
//! `rows` counts snapshot rows whose depth changed (inserted, updated or deleted).

use crate::config::branch_settings;
use crate::{Branch, BranchContext, BranchError, Class, Observation, Outcome};
use async_trait::async_trait;
use std::time::Duration;
use steward_queue::JobState;

/// Serializes snapshot writers (two instances at the same instant) so that their upserts and
/// deletes, which lock rows in no particular order, cannot deadlock. SHARE ROW EXCLUSIVE
/// conflicts with writers only: readers of `queue_stats` never wait.
pub const LOCK_STATS: &str = "LOCK TABLE queue_stats IN SHARE ROW EXCLUSIVE MODE";

/// Counts pending jobs per queue and state, replaces the snapshot with it, and returns every
/// (queue, state) of the new snapshot plus those that emptied (depth 0), with whether its depth
/// changed. One partial index per state, so finished jobs are never read: jobs_claim_idx
/// (available: depth and oldest run_at in one pass; it holds both columns, so the pass can be
/// index-only), jobs_due_idx (scheduled, retryable), jobs_running_heartbeat_idx (running),
/// jobs_callback_timeout_idx (waiting_external); queue_stats_pkey for the writes. The outer
/// query reads queue_stats as it was before this statement's writes.
pub const SNAPSHOT: &str = "
WITH depth AS MATERIALIZED (
    SELECT queue, 'available'::job_state AS state, count(*) AS depth,
           greatest(0, extract(epoch FROM now() - min(run_at)))::float8 AS oldest
    FROM jobs WHERE state = 'available' GROUP BY queue
    UNION ALL
    SELECT queue, state, count(*), NULL FROM jobs WHERE state IN ('scheduled', 'retryable')
    GROUP BY queue, state
    UNION ALL
    SELECT queue, 'running', count(*), NULL FROM jobs WHERE state = 'running' GROUP BY queue
    UNION ALL
    SELECT queue, 'waiting_external', count(*), NULL FROM jobs WHERE state = 'waiting_external'
    GROUP BY queue
),
removed AS (
    DELETE FROM queue_stats s
    WHERE NOT EXISTS (SELECT 1 FROM depth d WHERE d.queue = s.queue AND d.state = s.state)
    RETURNING s.queue, s.state
),
written AS (
    INSERT INTO queue_stats (queue, state, depth, oldest_available_age_secs, sampled_at)
    SELECT queue, state, depth, oldest, now() FROM depth
    ON CONFLICT (queue, state) DO UPDATE
        SET depth = EXCLUDED.depth,
            oldest_available_age_secs = EXCLUDED.oldest_available_age_secs,
            sampled_at = EXCLUDED.sampled_at
)
SELECT d.queue, d.state::text, d.depth, d.oldest, p.depth IS DISTINCT FROM d.depth AS changed
FROM depth d LEFT JOIN queue_stats p ON p.queue = d.queue AND p.state = d.state
UNION ALL
SELECT queue, state::text, 0, CASE WHEN state = 'available' THEN 0::float8 END, true FROM removed";

branch_settings! {
    /// Settings of `queue_stats`.
    pub struct Config {
        interval: Duration::from_secs(10),
    }
}

pub struct QueueStats {
    config: Config,
}

impl QueueStats {
    pub fn new(config: Config) -> Self {
        Self { config }
    }
}

#[async_trait]
impl Branch for QueueStats {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn class(&self) -> Class {
        Class::Hygiene
    }

    fn interval(&self) -> Duration {
        self.config.interval
    }

    async fn run(&self, ctx: &mut BranchContext<'_>) -> Result<Outcome, BranchError> {
        let tx = ctx.fenced().await?;
        tx.execute(LOCK_STATS, &[]).await?;
        let snapshot = tx.query(SNAPSHOT, &[]).await?;
        tx.commit().await?;

        let mut rows = 0;
        let mut observations = Vec::with_capacity(snapshot.len());
        for row in &snapshot {
            let queue: String = row.get(0);
            let state: String = row.get(1);
            let depth: i64 = row.get(2);
            let oldest: Option<f64> = row.get(3);
            if row.get::<_, bool>(4) {
                rows += 1;
            }
            let state = match state.parse::<JobState>() {
                Ok(state) => state,
                // Only reachable if the enum gains a state this build does not know.
                Err(e) => {
                    observations.push(Observation::Skipped {
                        what: format!("queue {queue}"),
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            if let Some(seconds) = oldest {
                observations.push(Observation::OldestAvailableAge {
                    queue: queue.clone(),
                    seconds,
                });
            }
            observations.push(Observation::QueueDepth {
                queue,
                state,
                depth,
            });
        }
        Ok(Outcome {
            rows,
            run_again_in: None,
            observations,
        })
    }
}
