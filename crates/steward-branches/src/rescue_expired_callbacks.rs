//! `rescue_expired_callbacks`: jobs waiting for an external callback past its timeout.
//!
//! Such a job becomes `retryable` with the usual backoff, or `failed` once its attempts are used
//! up, with a `callback_timeout` entry in its errors. Exactly one of this rescue and
//! `Queue::resolve_callback` takes effect on a job: both change it only while it is
//! `waiting_external`, re-checked under the row lock; a resolve that loses sees
//! `CallbackNotPending`.
//!
//! The statement, as it runs, is in `tests/sql/rescue_expired_callbacks__rescue.snap`.

use crate::rescue::{self, rescue_statement};
use crate::{Backlog, Branch, BranchContext, BranchError, Class, Outcome, RescueReason};
use async_trait::async_trait;
use std::time::Duration;
use tokio_postgres::Client;

pub use crate::rescue::RetryConfig;

/// Waiting jobs whose callback timed out, earliest first. Index: jobs_callback_timeout_idx.
/// Clears callback_timeout_at (the jobs_callback_iff_waiting constraint); callback_id stays, so
/// a late resolve finds the job no longer waiting rather than an unknown id. $1 batch size;
/// $2, $3, $4 the retry_backoff base (ms), max (ms) and jitter.
pub const RESCUE: &str = rescue_statement!(
    pick: "state = 'waiting_external' AND callback_timeout_at <= now()
    ORDER BY callback_timeout_at, id",
    reason: "callback_timeout",
    error: "format('callback %s was not resolved by its timeout (%s)', j.callback_id,
        j.callback_timeout_at)",
    set: ",
    callback_timeout_at = NULL",
);

/// Seconds until the earliest callback timeout: negative when one has passed, NULL when no job
/// waits. The head of jobs_callback_timeout_idx.
pub const NEXT_EXPIRY: &str = "
SELECT extract(epoch FROM min(callback_timeout_at) - now())::float8
FROM jobs WHERE state = 'waiting_external'";

const SWEEP: rescue::Sweep<'static> = rescue::Sweep {
    rescue: RESCUE,
    next_expiry: NEXT_EXPIRY,
    reason: RescueReason::Callback,
    extra: &[],
};

/// See [`crate::ExpiryRescueConfig`].
pub type Config = crate::rescue::ExpiryRescueConfig;

pub struct RescueExpiredCallbacks {
    config: Config,
}

impl RescueExpiredCallbacks {
    pub fn new(config: Config) -> Self {
        Self { config }
    }
}

#[async_trait]
impl Branch for RescueExpiredCallbacks {
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
