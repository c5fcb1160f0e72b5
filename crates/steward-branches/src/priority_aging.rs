//! `priority_aging`: available jobs that have waited gain priority, one level per `age_step`
//! of waiting (since `run_at`), down to 1: priority = max(1, original_priority − ⌊wait /
//! age_step⌋). Only rows above that target change, so a pass repeated at once changes nothing.
//! Batches of `batch_size`, oldest first, each one short fenced transaction.

use crate::config::branch_settings;
use crate::{Branch, BranchContext, BranchError, Class, InvalidConfig, Outcome};
use async_trait::async_trait;
use std::time::Duration;

/// Raises up to $2 available jobs whose priority is above their target for an age step of $1
/// seconds, oldest first, skipping rows other agers or claimers hold (a claimed row is re-checked
/// and dropped once it is no longer available). A job ages at the earliest one step after
/// run_at, so `run_at <= now() − step` bounds the index range; rows in it already at their
/// target are filtered. The locked row versions are updated by `ctid`, as the rescues do
/// (`rescue_statement!` says why). Index: jobs_aging_idx.
pub const AGE: &str = "
UPDATE jobs j
SET priority = greatest(
    1, j.original_priority - floor(extract(epoch FROM now() - j.run_at)::float8 / $1::float8)
)::smallint
WHERE j.ctid = ANY(ARRAY(
    SELECT ctid FROM jobs
    WHERE state = 'available' AND priority > 1
      AND run_at <= now() - $1::float8 * interval '1 second'
      AND priority > original_priority
                     - floor(extract(epoch FROM now() - run_at)::float8 / $1::float8)
    ORDER BY run_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED))";

branch_settings! {
    /// Settings of `priority_aging`.
    pub struct Config {
        interval: Duration::from_secs(60),
        batches: 1000, per_pass: 10,
        checks: Config::own_problems,
        /// Waiting this long raises a job's priority by one level.
        #[serde(with = "humantime_serde")]
        pub age_step: Duration = Duration::from_secs(300),
    }
}

impl Config {
    fn own_problems(&self) -> Vec<InvalidConfig> {
        // Below a second, priorities would collapse to 1 almost at once: aging would be moot.
        if self.age_step < Duration::from_secs(1) || self.age_step > Duration::from_secs(7 * 86_400)
        {
            return vec![InvalidConfig::new(
                "age_step",
                self.age_step,
                "must be between 1s and 7 days",
            )];
        }
        Vec::new()
    }
}

pub struct PriorityAging {
    config: Config,
}

impl PriorityAging {
    pub fn new(config: Config) -> Self {
        Self { config }
    }
}

#[async_trait]
impl Branch for PriorityAging {
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
        let step_secs = self.config.age_step.as_secs_f64();
        let mut rows = 0;
        let mut more_left = false;
        for batch in 0..self.config.max_batches_per_run {
            let tx = ctx.fenced().await?;
            let aged = tx
                .execute(AGE, &[&step_secs, &self.config.batch_size])
                .await?;
            tx.commit().await?;
            rows += aged;
            if (aged as i64) < self.config.batch_size {
                break;
            }
            more_left = batch + 1 == self.config.max_batches_per_run;
        }
        Ok(Outcome {
            rows,
            run_again_in: more_left.then_some(Duration::ZERO),
            observations: Vec::new(),
        })
    }
}
