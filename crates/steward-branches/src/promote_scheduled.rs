//! `promote_scheduled`: scheduled and retryable jobs whose time has come become available.
//!
//! Runs in batches, each its own short fenced transaction, and reports each job's promotion lag
//! (now − run_at). Commits do not wait for their WAL flush ([`Durability::Relaxed`]): a
//! promotion lost in a server crash leaves the job scheduled and due, so the next pass
//! promotes it again, and a worker's claim of a promoted job flushes the promotion with it. Between runs it sleeps until the earliest due job (never longer than the
//! interval, never shorter than `min_wake_gap`), and it publishes that wake-up time in
//! `leader.promote_wakeup_at` so that producers NOTIFY only for jobs due before it.

use crate::{
    check_batch, check_interval, Branch, BranchContext, BranchError, Durability, InvalidConfig,
    LoopKind, Observation, Outcome,
};
use async_trait::async_trait;
use serde::Deserialize;
use std::time::Duration;
use steward_schema::SchemaName;
use tokio_postgres::types::Type;
use tokio_postgres::Transaction;

/// Due scheduled/retryable jobs become available, earliest first; rows other promoters hold
/// are skipped. The locked row versions are updated by `ctid` (a TID scan; see
/// `rescue_statement!` for why not by id). Index: jobs_due_idx. Returns each job's lag in
/// seconds.
pub const PROMOTE: &str = "
UPDATE jobs j SET state = 'available'
WHERE j.ctid = ANY(ARRAY(
    SELECT ctid FROM jobs
    WHERE state IN ('scheduled', 'retryable') AND run_at <= now()
    ORDER BY run_at, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED))
RETURNING extract(epoch FROM clock_timestamp() - j.run_at)::float8";

/// Seconds until the earliest scheduled/retryable job is due (negative when overdue, NULL
/// when none). Index: jobs_due_idx (first entry).
pub const NEXT_DUE: &str = "
SELECT extract(epoch FROM min(run_at) - clock_timestamp())::float8
FROM jobs WHERE state IN ('scheduled', 'retryable')";

/// Publishes when the promoter will next wake on its own (NULL: it wakes so soon that a
/// NOTIFY would not help). Primary key of the one-row `leader` table.
pub const PUBLISH_WAKEUP: &str = "
UPDATE leader SET promote_wakeup_at = clock_timestamp() + $1::float8 * interval '1 second'
WHERE id = 1";

/// Withdraws the published wake-up when the promoter will wake too soon for a NOTIFY to help
/// (writes only when one is published). Primary key of `leader`.
pub const CLEAR_WAKEUP: &str = "
UPDATE leader SET promote_wakeup_at = NULL WHERE id = 1 AND promote_wakeup_at IS NOT NULL";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub enabled: bool,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    pub batch_size: i64,
    /// Batches per run before yielding to the loop (the run then asks to go again at once).
    pub max_batches_per_run: u32,
    /// The earliest-due wake-up never fires sooner than this after a run.
    #[serde(with = "humantime_serde")]
    pub min_wake_gap: Duration,
    /// Sleeps shorter than this are not published for producers (no NOTIFY would help).
    #[serde(with = "humantime_serde")]
    pub publish_threshold: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_millis(250),
            batch_size: 4096,
            max_batches_per_run: 8,
            min_wake_gap: Duration::from_millis(1),
            publish_threshold: Duration::from_millis(10),
        }
    }
}

impl Config {
    pub fn validate(&self) -> Vec<InvalidConfig> {
        let mut problems: Vec<InvalidConfig> = [
            check_interval("interval", self.interval),
            check_batch("batch_size", self.batch_size),
        ]
        .into_iter()
        .filter_map(Result::err)
        .collect();
        if self.max_batches_per_run == 0 {
            problems.push(InvalidConfig::new(
                "max_batches_per_run",
                0,
                "must be at least 1",
            ));
        }
        if self.min_wake_gap > self.interval {
            problems.push(InvalidConfig::new(
                "min_wake_gap",
                self.min_wake_gap,
                "must not exceed the interval",
            ));
        }
        problems
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
        "promote_scheduled"
    }

    fn loop_kind(&self) -> LoopKind {
        LoopKind::Slo
    }

    fn interval(&self) -> Duration {
        self.config.interval
    }

    /// Under load the promoter goes again as soon as a pass ends: in a shared loop, a rescue
    /// that came due would wait out a promote pass, and a long rescue pass would hold back
    /// promotions.
    fn own_loop(&self) -> Option<&'static str> {
        Some("promote")
    }

    fn wake_channel(&self, schema: &SchemaName) -> Option<String> {
        Some(steward_queue::due_channel(schema))
    }

    async fn run(&self, ctx: &mut BranchContext<'_>) -> Result<Outcome, BranchError> {
        let mut lags = Vec::new();
        let mut run_again_in = None;
        for batch in 1..=self.config.max_batches_per_run {
            let tx = ctx.fenced_with(Durability::Relaxed).await?;
            let rows = tx
                .query_typed(PROMOTE, &[(&self.config.batch_size, Type::INT8)])
                .await?;
            lags.extend(rows.iter().map(|r| r.get::<_, f64>(0)));
            let full = rows.len() as i64 == self.config.batch_size;
            if full && batch < self.config.max_batches_per_run {
                tx.commit().await?;
                continue;
            }
            // The last batch of the pass plans the next wake-up in the same transaction: one
            // commit fewer on the path every promotion waits on.
            run_again_in = if full {
                Some(Duration::ZERO)
            } else {
                self.plan_wakeup(&tx).await?
            };
            tx.commit().await?;
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

impl PromoteScheduled {
    /// When to run next: at the earliest due job, within [min_wake_gap, interval]. Publishes
    /// the wake-up for producers when it is far enough away to matter.
    async fn plan_wakeup(&self, tx: &Transaction<'_>) -> Result<Option<Duration>, BranchError> {
        let next_due: Option<f64> = tx.query_typed_one(NEXT_DUE, &[]).await?.get(0);
        let sleep = match next_due {
            Some(secs) if secs < self.config.interval.as_secs_f64() => {
                Duration::from_secs_f64(secs.max(0.0)).max(self.config.min_wake_gap)
            }
            _ => self.config.interval,
        };
        if sleep >= self.config.publish_threshold {
            tx.query_typed(PUBLISH_WAKEUP, &[(&sleep.as_secs_f64(), Type::FLOAT8)])
                .await?;
        } else {
            tx.query_typed(CLEAR_WAKEUP, &[]).await?;
        }
        Ok((sleep < self.config.interval).then_some(sleep))
    }
}
