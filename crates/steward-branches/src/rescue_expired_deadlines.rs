//! `rescue_expired_deadlines`: running jobs past their deadline (claim time + `run_timeout`).
//!
//! Such a job becomes `retryable` with the usual backoff, or `failed` once its attempts are used
//! up, with a `deadline_expired` entry in its errors. Its worker, if still running it, loses its
//! lease: the run is no longer `running`, and a new claim changes `run_lease`.
//!
//! The statement, as it runs, is in `tests/sql/rescue_expired_deadlines__rescue.snap`.

use crate::rescue::{self, rescue_statement};
use crate::{Backlog, Branch, BranchContext, BranchError, Class, Outcome, RescueReason};
use async_trait::async_trait;
use std::time::Duration;
use tokio_postgres::Client;

pub use crate::rescue::RetryConfig;

/// Running jobs whose deadline has passed, earliest first. Index: jobs_running_deadline_idx
/// (`deadline_at <= now()` implies its `deadline_at IS NOT NULL`). $1 batch size; $2, $3, $4
/// the retry_backoff base (ms), max (ms) and jitter.
pub const RESCUE: &str = rescue_statement!(
    pick: "state = 'running' AND deadline_at <= now()
    ORDER BY deadline_at, id",
    reason: "deadline_expired",
    error: "format('the run did not finish by its deadline (%s)', j.deadline_at)",
    set: "",
);

/// Seconds until the earliest deadline of a running job: negative when one has passed, NULL
/// when no running job has one. The head of jobs_running_deadline_idx.
pub const NEXT_EXPIRY: &str = "
SELECT extract(epoch FROM min(deadline_at) - now())::float8
FROM jobs WHERE state = 'running' AND deadline_at IS NOT NULL";

const SWEEP: rescue::Sweep<'static> = rescue::Sweep {
    rescue: RESCUE,
    next_expiry: NEXT_EXPIRY,
    reason: RescueReason::Deadline,
    extra: &[],
};

/// See [`crate::ExpiryRescueConfig`].
pub type Config = crate::rescue::ExpiryRescueConfig;

pub struct RescueExpiredDeadlines {
    config: Config,
}

impl RescueExpiredDeadlines {
    pub fn new(config: Config) -> Self {
        Self { config }
    }
}

#[async_trait]
impl Branch for RescueExpiredDeadlines {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn class(&self) -> Class {
        Class::Slo
    }

    fn interval(&self) -> Duration {
        self.config.interval
    }

    fn quiet_period(&self) -> Option<Duration> {
        Some(self.config.quiet_period)
    }

    async fn backlog(&self, client: &Client) -> Result<Option<Backlog>, BranchError> {
        rescue::backlog(client, &SWEEP).await
    }

    async fn run(&self, ctx: &mut BranchContext<'_>) -> Result<Outcome, BranchError> {
        let sweep = SWEEP;
        let config = &self.config;
        rescue::run_batches(
            ctx,
            &sweep,
            config.batches(),
            config.interval,
            &config.retry,
        )
        .await
    }
}
