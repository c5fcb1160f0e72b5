//! `promote_scheduled`: scheduled and retryable jobs whose time has come become available.
//!
//! Runs in batches, each its own short fenced transaction, and reports each job's promotion lag
//! (now − run_at). A batch is one round trip ([`crate::OneTrip`]): BEGIN, the fence, the
//! promotion, the plan for the next wake-up and COMMIT go out together. Commits do not wait for their WAL flush
//! ([`Durability::Relaxed`]): a promotion lost in a server crash leaves the job scheduled and
//! due, so the next pass promotes it again, and a worker's claim of a promoted job flushes the
//! promotion with it. Between runs it sleeps until the earliest due job (never longer than the
//! interval, never shorter than `min_wake_gap`), and it publishes that wake-up time in
//! `leader.promote_wakeup_at` so that producers NOTIFY only for jobs due before it (the rule is
//! the schema's `wake_promoter` function).
//!
//! The statements, as they run, are in `tests/sql/promote_scheduled__promote.snap` and
//! `tests/sql/promote_scheduled__plan_wakeup.snap`.

use crate::config::branch_settings;
use crate::in_one_round_trip;
use crate::{
    Backlog, BacklogKind, Branch, BranchContext, BranchError, Class, Durability, InvalidConfig,
    Observation, Outcome,
};
use async_trait::async_trait;
use std::time::Duration;
use steward_connection::SchemaName;
use tokio_postgres::types::Type;
use tokio_postgres::Client;

/// Due scheduled/retryable jobs become available, earliest first; rows other promoters hold
/// are skipped. The locked row versions are updated by `ctid` (a TID scan; see
/// `rescue_statement!` for why not by id). Index: jobs_due_idx. Wakes the workers of the queues
/// that got jobs (`wake_workers`, delivered at commit). Returns each job's lag in seconds.
pub const PROMOTE: &str = "
WITH promoted AS (
    UPDATE jobs j SET state = 'available'
    WHERE j.ctid = ANY(ARRAY(
        SELECT ctid FROM jobs
        WHERE state IN ('scheduled', 'retryable') AND run_at <= now()
        ORDER BY run_at, id
        LIMIT $1
        FOR UPDATE SKIP LOCKED))
    RETURNING j.queue, extract(epoch FROM clock_timestamp() - j.run_at)::float8 AS lag
)
SELECT lag FROM promoted, (SELECT wake_workers(array_agg(queue)) FROM promoted) woken";

/// Seconds until the earliest scheduled or retryable job is due: negative when one is due and
/// not yet promoted, NULL when there is none. The head of jobs_due_idx.
pub const NEXT_DUE: &str = "
SELECT extract(epoch FROM min(run_at) - now())::float8
FROM jobs WHERE state IN ('scheduled', 'retryable')";

/// Plans the promoter's next wake-up: at the earliest scheduled/retryable job, but never
/// sooner than $1 nor later than $2 seconds from now. Publishes it in
/// `leader.promote_wakeup_at` when it is at least $3 seconds away, so that producers NOTIFY only
/// for jobs due before it, and otherwise withdraws a published one (writing only then). Returns
/// the sleep in seconds. Index: jobs_due_idx (first entry); primary key of the one-row `leader`.
pub const PLAN_WAKEUP: &str = "
WITH next AS (
    SELECT least($2::float8, greatest($1::float8,
               coalesce(extract(epoch FROM min(run_at) - clock_timestamp())::float8, $2::float8))) AS sleep
    FROM jobs WHERE state IN ('scheduled', 'retryable')
), published AS (
    UPDATE leader SET promote_wakeup_at = CASE WHEN next.sleep >= $3::float8
                                               THEN clock_timestamp() + next.sleep * interval '1 second' END
    FROM next
    WHERE leader.id = 1 AND (next.sleep >= $3::float8 OR leader.promote_wakeup_at IS NOT NULL)
)
SELECT sleep FROM next";

branch_settings! {
    /// Settings of `promote_scheduled`.
    pub struct Config {
        interval: Duration::from_millis(250),
        batches: 4096, per_pass: 8,
        checks: Config::own_problems,
        /// The earliest-due wake-up never fires sooner than this after a run.
        #[serde(with = "humantime_serde")]
        pub min_wake_gap: Duration = Duration::from_millis(1),
        /// Sleeps shorter than this are not published for producers (no NOTIFY would help).
        #[serde(with = "humantime_serde")]
        pub publish_threshold: Duration = Duration::from_millis(10),
    }
}

impl Config {
    fn own_problems(&self) -> Vec<InvalidConfig> {
        // Checked against a valid interval only: an invalid one is reported as such, not as a
        // problem of a setting the user did not touch.
        if !self.interval.is_zero() && self.min_wake_gap > self.interval {
            return vec![InvalidConfig::new(
                "min_wake_gap",
                self.min_wake_gap,
                "must not exceed the interval",
            )];
        }
        Vec::new()
    }
}

pub struct PromoteScheduled {
    config: Config,
}

impl PromoteScheduled {
    pub fn new(config: Config) -> Self {
        Self { config }
    }
}

#[async_trait]
impl Branch for PromoteScheduled {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn class(&self) -> Class {
        Class::Slo
    }

    fn interval(&self) -> Duration {
        self.config.interval
    }

    /// Under load the promoter goes again as soon as a pass ends: in a shared loop, a rescue
    /// that came due would wait out a promote pass, and a long rescue pass would hold back
    /// promotions.
    fn needs_own_loop(&self) -> bool {
        true
    }

    fn wake_channel(&self, schema: &SchemaName) -> Option<String> {
        Some(steward_queue::due_channel(schema))
    }

    async fn backlog(&self, client: &Client) -> Result<Option<Backlog>, BranchError> {
        let head_in: Option<f64> = client.query_typed_one(NEXT_DUE, &[]).await?.get(0);
        Ok(Some(Backlog {
            kind: BacklogKind::Promotion,
            head_in,
        }))
    }

    async fn run(&self, ctx: &mut BranchContext<'_>) -> Result<Outcome, BranchError> {
        let (min_gap, interval, threshold) = (
            self.config.min_wake_gap.as_secs_f64(),
            self.config.interval.as_secs_f64(),
            self.config.publish_threshold.as_secs_f64(),
        );
        let mut lags = Vec::new();
        let mut run_again_in = None;
        for batch in 1..=self.config.max_batches_per_run {
            // The whole batch in one round trip, the path every promotion waits on: BEGIN, the
            // fence, the batch, the plan for the next wake-up, COMMIT. The plan is only used
            // after a short batch; after a full one it finds due jobs left and withdraws any
            // published wake-up, which is right, since the promoter goes again at once.
            let trip = ctx.one_trip(Durability::Relaxed);
            let (rows, plan) = in_one_round_trip!(
                trip,
                async {
                    let rows = trip
                        .client()
                        .query_typed(PROMOTE, &[(&self.config.batch_size, Type::INT8)])
                        .await?;
                    Ok::<_, BranchError>(rows)
                },
                async {
                    let plan = trip
                        .client()
                        .query_typed_one(
                            PLAN_WAKEUP,
                            &[
                                (&min_gap, Type::FLOAT8),
                                (&interval, Type::FLOAT8),
                                (&threshold, Type::FLOAT8),
                            ],
                        )
                        .await?;
                    Ok::<_, BranchError>(plan)
                },
            )?;
            lags.extend(rows.iter().map(|r| r.get::<_, f64>(0)));
            let full = rows.len() as i64 == self.config.batch_size;
            if full && batch < self.config.max_batches_per_run {
                continue;
            }
            run_again_in = if full {
                Some(Duration::ZERO)
            } else {
                let sleep =
                    Duration::try_from_secs_f64(plan.get(0)).unwrap_or(self.config.interval);
                (sleep < self.config.interval).then_some(sleep)
            };
            break;
        }
        let rows = lags.len() as u64;
        let observations = if lags.is_empty() {
            Vec::new()
        } else {
            vec![Observation::PromotionLags(lags)]
        };
        Ok(Outcome {
            rows,
            run_again_in,
            observations,
        })
    }
}
