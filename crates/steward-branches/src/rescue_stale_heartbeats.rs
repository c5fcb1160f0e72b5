//! `rescue_stale_heartbeats`: running jobs whose worker stopped heartbeating are presumed dead.
//!
//! Such a job becomes `retryable` with the usual backoff, or `failed` once its attempts are used
//! up (a job that keeps killing its worker must not cycle forever), with a `heartbeat_stale`
//! entry in its errors. The worker, should it still be alive, loses its lease: the run is no
//! longer `running`, and a new claim changes `run_lease`.
//!
//! The statement, as it runs, is in `tests/sql/rescue_stale_heartbeats__rescue.snap`.

use crate::config::branch_settings;
use crate::rescue::{self, rescue_statement};
use crate::{
    check_interval, Backlog, Branch, BranchContext, BranchError, Class, InvalidConfig, Outcome,
    RescueReason,
};
use async_trait::async_trait;
use std::time::Duration;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

pub use crate::rescue::RetryConfig;

/// Running jobs whose last heartbeat is older than $5 seconds, stalest first. Index:
/// jobs_running_heartbeat_idx. $1 batch size; $2, $3, $4 the retry_backoff base (ms), max (ms)
/// and jitter; $5 the staleness in seconds.
pub const RESCUE: &str = rescue_statement!(
    pick: "state = 'running' AND heartbeat_at < now() - make_interval(secs => $5)
    ORDER BY heartbeat_at, id",
    reason: "heartbeat_stale",
    error: "format('no heartbeat since %s (staleness limit %s): the worker is presumed dead',
        j.heartbeat_at, make_interval(secs => $5))",
    set: "",
);

/// Seconds until the stalest running job's heartbeat passes the staleness ($1 seconds):
/// negative when one is overdue, NULL when nothing runs. The head of
/// jobs_running_heartbeat_idx.
pub const NEXT_EXPIRY: &str = "
SELECT extract(epoch FROM min(heartbeat_at) + make_interval(secs => $1) - now())::float8
FROM jobs WHERE state = 'running'";

branch_settings! {
    /// Settings of `rescue_stale_heartbeats`.
    pub struct Config {
        interval: Duration::from_secs(5),
        batches: 1000, per_pass: 10,
        checks: Config::own_problems,
        /// A running job whose heartbeat is older than this is rescued: three missed beats of
        /// a worker heartbeating every 10 s.
        #[serde(with = "humantime_serde")]
        pub staleness: Duration = Duration::from_secs(30),
        /// How long the leader holds this branch back after a term starts or the database
        /// comes back. Unset: the staleness, so that every live worker has had a full window
        /// to heartbeat again before anyone is taken for dead.
        #[serde(with = "humantime_serde")]
        pub quiet_period: Option<Duration> = None,
        pub retry: RetryConfig = RetryConfig::default(),
    }
}

impl Config {
    fn own_problems(&self) -> Vec<InvalidConfig> {
        let mut problems: Vec<InvalidConfig> = check_interval("staleness", self.staleness)
            .err()
            .into_iter()
            .collect();
        problems.extend(rescue::check_quiet_period_and_retry(
            self.effective_quiet_period(),
            &self.retry,
        ));
        problems
    }

    /// The quiet period in force: the configured one, else the staleness.
    pub fn effective_quiet_period(&self) -> Duration {
        self.quiet_period.unwrap_or(self.staleness)
    }
}

/// The sweep, with `params` holding the staleness in seconds.
fn sweep<'a>(params: &'a [(&'a (dyn ToSql + Sync), Type)]) -> rescue::Sweep<'a> {
    rescue::Sweep {
        rescue: RESCUE,
        next_expiry: NEXT_EXPIRY,
        reason: RescueReason::Heartbeat,
        extra: params,
    }
}

pub struct RescueStaleHeartbeats {
    config: Config,
}

impl RescueStaleHeartbeats {
    pub fn new(config: Config) -> Self {
        Self { config }
    }
}

#[async_trait]
impl Branch for RescueStaleHeartbeats {
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
        Some(self.config.effective_quiet_period())
    }

    fn heartbeat_staleness(&self) -> Option<Duration> {
        Some(self.config.staleness)
    }

    async fn backlog(&self, client: &Client) -> Result<Option<Backlog>, BranchError> {
        let staleness = self.config.staleness.as_secs_f64();
        rescue::backlog(client, &sweep(&[(&staleness, Type::FLOAT8)])).await
    }

    async fn run(&self, ctx: &mut BranchContext<'_>) -> Result<Outcome, BranchError> {
        let staleness = self.config.staleness.as_secs_f64();
        let params: [(&(dyn ToSql + Sync), Type); 1] = [(&staleness, Type::FLOAT8)];
        let sweep = sweep(&params);
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
